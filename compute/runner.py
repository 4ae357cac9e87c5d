"""Runs one task in one child: until it answers, its stop time comes, or its
caller cancels. Never touches the broker."""

from __future__ import annotations

import asyncio
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from compute.outcome import Kind, Outcome
from compute.pool import Child
from contracts.context import PROGRESS_INTERVAL
from contracts.deadline import Deadline
from contracts.events import ErrorInfo

OnProgress = Callable[[float, str | None], Awaitable[None]]

CRASHED = "worker process crashed"


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
            waits: set[asyncio.Future[Any]] = {receive, job.cancelled}
            timeout = max(0.0, job.stop_at - time.time())
            done, _ = await asyncio.wait(waits, timeout=timeout, return_when=FIRST_COMPLETED)
            if receive not in done:
                receive.cancel()
                kind = Kind.CANCELLED if job.cancelled in done else Kind.ABORTED
                ended = True
                return await _kill(child, job, kind, started, cpu0, kill_grace)
            message = receive.result()
            if message is None or message["kind"] != "progress":
                ended = True
            if message is None:
                await child.proc.wait()
                return Outcome(
                    Kind.CRASHED,
                    error=ErrorInfo(
                        type="WorkerCrash",
                        message=f"{CRASHED} (exit status {child.proc.returncode})",
                    ),
                    reason=CRASHED,
                    cpu_seconds=max(0.0, child.cpu() - cpu0),
                    ran=time.time() - started,
                )
            if message["kind"] == "progress":
                await on_progress(message["fraction"], message.get("message"))
                continue
            ran = time.time() - started
            cpu = float(message.get("cpu", 0.0))
            if message["ok"]:
                return Outcome(Kind.SUCCEEDED, output=message["output"], cpu_seconds=cpu, ran=ran)
            error = ErrorInfo(**message["error"])
            if message.get("invalid"):
                return Outcome(Kind.INVALID, error=error, reason=error.message, ran=ran)
            return Outcome(Kind.FAILED, error=error, cpu_seconds=cpu, ran=ran)
    finally:
        if not ended:
            child.discard()  # interrupted mid-task: its answer would reach the next one


async def _kill(
    child: Child, job: Job, kind: Kind, started: float, cpu0: float, grace: float
) -> Outcome:
    cpu = await child.stop(grace)
    killed_at = time.time()
    late_by = killed_at - job.deadline.epoch
    reason = "deadline" if kind is Kind.ABORTED else "cancelled while running"
    return Outcome(
        kind,
        reason=reason,
        cpu_seconds=max(0.0, cpu - cpu0),
        ran=killed_at - started,
        late_by=late_by,
    )
