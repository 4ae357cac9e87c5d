"""Runs one task in one child: until it answers, its stop time comes, or its
caller cancels. Never touches the broker."""

from __future__ import annotations

import asyncio
import signal
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from compute.outcome import Kind, Outcome
from compute.pool import Child
from compute.presence import Tie
from contracts.context import PROGRESS_INTERVAL
from contracts.deadline import Deadline
from contracts.events import CLIENT_GONE, ErrorInfo
from runtime import tracing

OnProgress = Callable[[float, str | None], None]  # never waits: the deadline must not

CRASHED = "worker process crashed"
HANDED_BACK = "its worker can no longer ack its message: handed back to the queue"


@dataclass
class Job:
    """A task handed to a child, with the means to stop it from outside."""

    task: str
    task_id: str
    input_json: str
    deadline: Deadline
    stop_at: float  # epoch seconds: deadline minus reply margin and skew
    # a future, not an Event: waiting on it next to the child's answer takes no task
    cancelled: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    announced: asyncio.Future[None] | None = None  # the `running` event, being confirmed
    progress_interval: float = PROGRESS_INTERVAL
    client: Tie | None = None  # its client's presence, a second deadline, if tied to one
    kill_grace: float = 0.1  # seconds between SIGTERM and SIGKILL

    attempt: int = 1  # its delivery's number, plus the retries made on this worker
    handed_back: bool = False  # its message went back to the queue: its run must end
    started: float | None = None  # epoch seconds, once it has started in a child
    said_running: bool = False  # its `running` event is out (not for a short run)

    def cancel(self) -> None:
        if not self.cancelled.done():
            self.cancelled.set_result(None)

    def hand_back(self) -> None:
        """Its worker can no longer ack its message, which RabbitMQ gives to another:
        it stops, so that the task does not run twice at once."""
        self.handed_back = True
        self.cancel()

    @property
    def kill_at(self) -> float:
        """When the child's own timer in the kernel kills it: with the worker's SIGKILL,
        after its SIGTERM, whose grace lets the task's `finally` blocks run."""
        return self.stop_at + self.kill_grace


async def run(child: Child, job: Job, on_progress: OnProgress) -> Outcome:
    started = time.time()
    cpu0 = child.used  # what a kill or crash subtracts from the CPU it reads then
    await child.send(
        {
            "task": job.task,
            "id": job.task_id,
            "input_json": job.input_json,
            "deadline_ms": job.deadline.epoch_ms,
            "kill_at": job.kill_at,
            "progress_interval": job.progress_interval,
            "trace": tracing.inject({}),  # the child's span is one of the run's
        }
    )
    ended = False
    try:
        while True:
            receive = asyncio.ensure_future(child.receive())
            stop = await _until_stop(job, receive)
            if stop is not None:
                receive.cancel()
                ended = True
                return await _kill(child, job, *stop, started, cpu0)
            message = receive.result()
            if message is not None and message["kind"] == "progress":
                on_progress(message["fraction"], message.get("message"))
                continue
            ended = True
            return await _outcome(child, job, message, started, cpu0)
    finally:
        if not ended:
            child.discard()  # interrupted mid-task: its answer would reach the next one


async def _until_stop(
    job: Job, receive: asyncio.Future[dict[str, Any] | None]
) -> tuple[Kind, str] | None:
    """Waits for the child's next word; or, if the job must stop first (cancelled, its
    stop time, its client gone), says why."""
    while True:
        until = job.stop_at if job.client is None else min(job.stop_at, job.client.lapses_at())
        waits: set[asyncio.Future[Any]] = {receive, job.cancelled}
        timeout = max(0.0, until - time.time())
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=FIRST_COMPLETED)
        if receive in done:
            return None
        if job.cancelled in done:
            if job.handed_back:
                return Kind.HANDED_BACK, HANDED_BACK
            return Kind.CANCELLED, "cancelled while running"
        if time.time() >= job.stop_at:
            return Kind.ABORTED, "deadline"
        if job.client is not None and await job.client.gone():
            return Kind.CANCELLED, CLIENT_GONE
        # its client was heard from meanwhile: wait on


async def _outcome(
    child: Child, job: Job, message: dict[str, Any] | None, started: float, cpu0: float
) -> Outcome:
    """How the task ended, from its child's answer (None: the child died)."""
    if message is None:
        return await _died(child, job, started, cpu0)
    ran = float(message.get("ran", time.time() - started))
    cpu = float(message.get("cpu", 0.0))
    if message["ok"]:
        return Outcome(Kind.SUCCEEDED, output=message["output"], cpu_seconds=cpu, ran=ran)
    error = ErrorInfo(**message["error"])
    if message.get("invalid"):
        return Outcome(Kind.INVALID, error=error, reason=error.message, ran=ran)
    retried = bool(message.get("retried"))
    return Outcome(Kind.FAILED, error=error, cpu_seconds=cpu, ran=ran, retried=retried)


async def _died(child: Child, job: Job, started: float, cpu0: float) -> Outcome:
    """A child that died under its task: stopped by its timer in the kernel at its stop
    time (the worker was frozen), by its fork server (the worker was silent: its
    message goes to another), or it crashed."""
    end = await child.proc.wait()
    at = end.at or time.time()
    cpu = max(0.0, child.cpu() - cpu0)
    if end.silenced:
        return Outcome(Kind.HANDED_BACK, reason=HANDED_BACK, cpu_seconds=cpu, ran=at - started)
    if end.code == -signal.SIGKILL and at >= job.kill_at:
        late_by = at - job.deadline.epoch
        reason = "deadline (stopped by its timer in the kernel)"
        return Outcome(
            Kind.ABORTED, reason=reason, cpu_seconds=cpu, ran=at - started, late_by=late_by
        )
    return Outcome(
        Kind.CRASHED,
        error=ErrorInfo(type="WorkerCrash", message=f"{CRASHED} (exit status {end.code})"),
        reason=CRASHED,
        cpu_seconds=cpu,
        ran=at - started,
    )


async def _kill(
    child: Child, job: Job, kind: Kind, reason: str, started: float, cpu0: float
) -> Outcome:
    """Stops the task; if it had answered before its stop time (a worker frozen till
    past it reads the answer late), that answer is the outcome."""
    cpu, unread = await child.stop(job.kill_grace)
    killed_at = time.time()
    for said in unread:
        if (
            said.get("kind") == "result"
            and said.get("ok")
            and said.get("at", killed_at) <= job.stop_at
        ):
            return Outcome(
                Kind.SUCCEEDED,
                output=said["output"],
                cpu_seconds=float(said.get("cpu", 0.0)),
                ran=float(said["ran"]),
            )
    return Outcome(
        kind,
        reason=reason,
        cpu_seconds=max(0.0, cpu - cpu0),
        ran=killed_at - started,
        late_by=killed_at - job.deadline.epoch,
    )
