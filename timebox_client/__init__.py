"""A Python client for Timebox: submit, call (RPC), status, cancel, and an event stream
that resumes with `Last-Event-ID` after a dropped connection. Sync and async.

    from examples.tasks import count_primes

    with Client("http://127.0.0.1:8000") as tb:
        print(tb.call(count_primes, n=100_000))        # Counted(count=9592)
        task = tb.submit("burn_cpu", {"seconds": 2})
        for event in tb.events(task.id):
            print(event.type, event.progress)
"""

from timebox_client.client import AsyncClient, Client
from timebox_client.errors import (
    ClientGone,
    DeadlineUnmeetable,
    IdempotencyKeyReused,
    InvalidInput,
    NoWorker,
    Overloaded,
    ProblemError,
    TaskCancelled,
    TaskFailed,
    TaskTimedOut,
)

__all__ = [
    "AsyncClient",
    "Client",
    "ClientGone",
    "DeadlineUnmeetable",
    "IdempotencyKeyReused",
    "InvalidInput",
    "NoWorker",
    "Overloaded",
    "ProblemError",
    "TaskCancelled",
    "TaskFailed",
    "TaskTimedOut",
]
