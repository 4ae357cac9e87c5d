"""Errors both sides agree on. Each maps to one HTTP status and, where a task is
involved, one terminal event.

    TimeboxError
     ├── Unauthorized            401  missing or unknown API key
     ├── BodyTooLarge            413  request body over the limit
     ├── InvalidTimeout          422  Request-Timeout not a positive finite number ≤ max
     ├── UnknownTaskType         404  no spec with that name
     ├── TaskNotFound            404  no task with that id (or not yours)
     ├── TaskAlreadyEnded        409  cancel of a task in a terminal state
     ├── DeadlineUnmeetable      422  this input alone cannot finish in time  → rejected
     ├── IdempotencyKeyReused    422  the key's task had another type or input
     ├── Overloaded              503  backlog or full queue; retry later       → rejected
     ├── HistoryNotRead          503  unknown id, while a new gateway reads older events
     └── BrokerUnavailable       503  no confirmed publish possible right now
          └── ConfirmLost        503  no confirm came: the message may be queued or not
"""

from __future__ import annotations

from typing import Any, ClassVar


class TimeboxError(Exception):
    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class Unauthorized(TimeboxError):
    status = 401
    slug = "unauthorized"
    title = "Unauthorized"


class BodyTooLarge(TimeboxError):
    status = 413
    slug = "body-too-large"
    title = "Request body too large"


class InvalidTimeout(TimeboxError, ValueError):
    status = 422
    slug = "invalid-timeout"
    title = "Invalid Request-Timeout"


class UnknownTaskType(TimeboxError):
    status = 404
    slug = "unknown-task-type"
    title = "Unknown task type"


class TaskNotFound(TimeboxError):
    status = 404
    slug = "task-not-found"
    title = "Task not found"


class TaskAlreadyEnded(TimeboxError):
    status = 409
    slug = "task-already-ended"
    title = "Task has already ended"


class DeadlineUnmeetable(TimeboxError):
    status = 422
    slug = "deadline-unmeetable"
    title = "Input cannot finish within the deadline"


class IdempotencyKeyReused(TimeboxError):
    status = 422
    slug = "idempotency-key-reused"
    title = "Idempotency-Key already used for another request"


class Overloaded(TimeboxError):
    status = 503
    slug = "overloaded"
    title = "Too much work queued to finish in time"


class HistoryNotRead(TimeboxError):
    """The id is not among the tasks read so far, and a starting gateway has not yet
    read the event history before its live window: it may be there."""

    status = 503
    slug = "history-not-read"
    title = "Older tasks not read yet"


class BrokerUnavailable(TimeboxError):
    status = 503
    slug = "broker-unavailable"
    title = "Message broker unavailable"


class ConfirmLost(BrokerUnavailable):
    """A publish timed out or its connection went before the confirm: the broker may
    still have taken the message (a blocked connection sends it once unblocked)."""
