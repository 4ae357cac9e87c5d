"""A Python client for Timebox: submit, call (RPC), status, cancel, and an event stream
that resumes with `Last-Event-ID` after a dropped connection. Sync and async.

    with Client("http://127.0.0.1:8000") as tb:
        print(tb.call("count_primes", {"n": 100_000}, request_timeout=10))   # {'count': 9592}
        task = tb.submit("burn_cpu", {"seconds": 2})
        for event in tb.events(task.id):
            print(event.type, event.progress)
"""

from timebox_client.client import AsyncClient, Client
from timebox_client.errors import (
    DeadlineUnmeetable,
    IdempotencyKeyReused,
    Overloaded,
    ProblemError,
    TaskCancelled,
    TaskFailed,
    TaskTimedOut,
)

__all__ = [
    "AsyncClient",
    "Client",
    "DeadlineUnmeetable",
    "IdempotencyKeyReused",
    "Overloaded",
    "ProblemError",
    "TaskCancelled",
    "TaskFailed",
    "TaskTimedOut",
]
