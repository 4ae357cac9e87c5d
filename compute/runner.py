"""Runs one task in one child: until it answers, its stop time comes, or its
caller cancels. Never touches the broker."""

from __future__ import annotations

import asyncio
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
from contracts.events import ErrorInfo

OnProgress = Callable[[float, str | None], None]  # never waits: the deadline must not

CRASHED = "worker process crashed"
CLIENT_GONE = "its client is gone: no gateway has heard from it for a grace"


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

    def cancel(self) -> None:
        if not self.cancelled.done():
            self.cancelled.set_result(None)


async def run(child: Child, job: Job, on_progress: OnProgress, kill_grace: float) -> Outcome:
    started = time.time()
    cpu0 = child.used  # what a kill or crash subtracts from the CPU it reads then
    await child.send(
        {
            "task": job.task,
            "id": job.task_id,
            "input_json": job.input_json,
            "deadline_ms": job.deadline.epoch_ms,
            "progress_interval": job.progress_interval,
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
                return await _kill(child, job, *stop, started, cpu0, kill_grace)
            message = receive.result()
            if message is not None and message["kind"] == "progress":
                on_progress(message["fraction"], message.get("message"))
                continue
            ended = True
            return await _outcome(child, message, started, cpu0)
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
            return Kind.CANCELLED, "cancelled while running"
        if time.time() >= job.stop_at:
            return Kind.ABORTED, "deadline"
        if job.client is not None and await job.client.gone():
            return Kind.CANCELLED, CLIENT_GONE
        # its client was heard from meanwhile: wait on


async def _outcome(
    child: Child, message: dict[str, Any] | None, started: float, cpu0: float
) -> Outcome:
    """How the task ended, from its child's answer (None: the child died)."""
    ran = time.time() - started
    if message is None:
        await child.proc.wait()
        return Outcome(
            Kind.CRASHED,
            error=ErrorInfo(
                type="WorkerCrash", message=f"{CRASHED} (exit status {child.proc.returncode})"
            ),
            reason=CRASHED,
            cpu_seconds=max(0.0, child.cpu() - cpu0),
            ran=ran,
        )
    cpu = float(message.get("cpu", 0.0))
    if message["ok"]:
        return Outcome(Kind.SUCCEEDED, output=message["output"], cpu_seconds=cpu, ran=ran)
    error = ErrorInfo(**message["error"])
    if message.get("invalid"):
        return Outcome(Kind.INVALID, error=error, reason=error.message, ran=ran)
    return Outcome(Kind.FAILED, error=error, cpu_seconds=cpu, ran=ran)


async def _kill(
    child: Child, job: Job, kind: Kind, reason: str, started: float, cpu0: float, grace: float
) -> Outcome:
    cpu = await child.stop(grace)
    killed_at = time.time()
    late_by = killed_at - job.deadline.epoch
    return Outcome(
        kind,
        reason=reason,
        cpu_seconds=max(0.0, cpu - cpu0),
        ran=killed_at - started,
        late_by=late_by,
    )
