"""Timebox: CPU-heavy work behind HTTP, with a deadline enforced at every layer.

    import timebox

    @timebox.task(cost=lambda n: n**1.5)
    def count_primes(n: int, ctx: timebox.TaskContext) -> int: ...

Serve a module of tasks with `timebox-gateway MODULE` and `timebox-worker MODULE`, or
add them to your own FastAPI app with `timebox.attach(app, count_primes)` and call
them from your endpoints through `timebox.Call`; `timebox.Client` calls them from
anywhere else. The gateway's and the client's parts load on first use, so a worker
that imports your module does not load FastAPI for them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from contracts.context import TaskContext
from contracts.deadline import Deadline
from contracts.errors import (
    ClientGone,
    DeadlineUnmeetable,
    IdempotencyKeyReused,
    InvalidInput,
    NoWorker,
    Overloaded,
    TaskCancelled,
    TaskFailed,
    TaskTimedOut,
    TimeboxError,
)
from contracts.tasks import Task, task

if TYPE_CHECKING:
    from gateway.calls import Call, TaskCall
    from gateway.gateway import attach
    from timebox_client import AsyncClient, Client

_LAZY = {
    "attach": "gateway.gateway",
    "Call": "gateway.calls",
    "TaskCall": "gateway.calls",
    "Client": "timebox_client",
    "AsyncClient": "timebox_client",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'timebox' has no attribute {name!r}")


__all__ = [
    "AsyncClient",
    "Call",
    "Client",
    "ClientGone",
    "Deadline",
    "DeadlineUnmeetable",
    "IdempotencyKeyReused",
    "InvalidInput",
    "NoWorker",
    "Overloaded",
    "Task",
    "TaskCall",
    "TaskCancelled",
    "TaskContext",
    "TaskFailed",
    "TaskTimedOut",
    "TimeboxError",
    "attach",
    "task",
]
