"""Errors both sides agree on: the gateway raises them, answers each as one
problem+json (RFC 9457), and the Python client raises the same class again from that
answer. A task that ended without a result ends in one of them, by one table.

    TimeboxError                      any problem (`ProblemError` in the client)
     ├── Unauthorized            401  missing or unknown API key
     ├── UnknownTaskType         404  no task type of that name
     ├── TaskNotFound            404  no task with that id (or not yours)
     ├── TaskAlreadyEnded        409  cancel of a task in a terminal state
     ├── TaskCancelled           409  the task was cancelled
     ├── BodyTooLarge            413  request body over the limit
     ├── InvalidInput            422  the input does not fit the task's model
     ├── InvalidTimeout          422  Request-Timeout not a positive finite number ≤ max
     ├── DeadlineUnmeetable      422  this input alone cannot finish in time  → rejected
     ├── IdempotencyKeyReused    422  the key's task had another type or input
     ├── ClientGone              499  the waiting client disconnected: its task is cancelled
     ├── TaskFailed              500  the task raised, or its process died
     ├── Overloaded              503  refused for now: retry after `retry_after`
     │    ├── NoWorker                no worker serves the task type at the moment
     │    ├── HistoryNotRead          unknown id, while a new gateway reads older events
     │    └── BrokerUnavailable       no confirmed publish possible right now
     │         └── ConfirmLost        no confirm came: the message may be queued or not
     └── TaskTimedOut            504  expired before it started, or stopped at its deadline
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from contracts.events import TaskStatus


class TimeboxError(Exception):
    status: int = 500
    slug: str = "internal"
    title: str = "Internal error"
    by_slug: ClassVar[dict[str, type[TimeboxError]]] = {}

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        TimeboxError.by_slug.setdefault(cls.slug, cls)

    def __str__(self) -> str:
        return f"{self.status} {self.title}: {self.detail}"

    @property
    def type(self) -> str:
        return f"/problems/{self.slug}"

    @property
    def body(self) -> dict[str, Any]:
        """The problem+json document."""
        core = {"type": self.type, "title": self.title, "status": self.status}
        return core | {"detail": self.detail} | self.extra

    @property
    def retry_after(self) -> float | None:
        value = self.extra.get("retry_after")
        return float(value) if isinstance(value, int | float) else None

    @property
    def task(self) -> TaskStatus | None:
        """The status of the task the problem is about, when the answer carries it."""
        from contracts.events import TaskStatus

        task = self.extra.get("task")
        return TaskStatus.model_validate(task) if isinstance(task, dict) else None

    @classmethod
    def from_problem(cls, status: int, body: dict[str, Any]) -> TimeboxError:
        """The error a problem+json answer stands for (the client's side)."""
        slug = str(body.get("type", "")).removeprefix("/problems/")
        kind = cls.by_slug.get(slug) or {503: Overloaded, 504: TaskTimedOut}.get(status, cls)
        known = {"type", "title", "status", "detail"}
        error = kind(
            str(body.get("detail", "")), **{k: v for k, v in body.items() if k not in known}
        )
        error.status, error.slug = status, slug or error.slug
        error.title = str(body.get("title", error.title))
        return error


class Unauthorized(TimeboxError):
    status = 401
    slug = "unauthorized"
    title = "Unauthorized"


class UnknownTaskType(TimeboxError):
    status = 404
    slug = "unknown-task-type"
    title = "Unknown task type"


class TaskNotFound(TimeboxError):
    status = 404
    slug = "task-not-found"
    title = "Task not found"


class ParkedNotFound(TimeboxError):
    status = 404
    slug = "parked-not-found"
    title = "Parked message not found"


class NotReplayable(TimeboxError):
    status = 409
    slug = "not-replayable"
    title = "Parked message cannot be replayed"


class TaskAlreadyEnded(TimeboxError):
    status = 409
    slug = "task-already-ended"
    title = "Task has already ended"


class TaskCancelled(TimeboxError):
    status = 409
    slug = "task-cancelled"
    title = "Task cancelled"


class BodyTooLarge(TimeboxError):
    status = 413
    slug = "body-too-large"
    title = "Request body too large"


class InvalidInput(TimeboxError):
    status = 422
    slug = "invalid-input"
    title = "Invalid input"


class InvalidTimeout(TimeboxError, ValueError):
    status = 422
    slug = "invalid-timeout"
    title = "Invalid Request-Timeout"


class DeadlineUnmeetable(TimeboxError):
    status = 422
    slug = "deadline-unmeetable"
    title = "Input cannot finish within the deadline"


class IdempotencyKeyReused(TimeboxError):
    status = 422
    slug = "idempotency-key-reused"
    title = "Idempotency-Key already used for another request"

    @property
    def task_id(self) -> str | None:
        """The task the key was used for."""
        task_id = self.extra.get("task_id")
        return task_id if isinstance(task_id, str) else None


class ClientGone(TimeboxError):
    status = 499
    slug = "client-gone"
    title = "Client closed the request"


class TaskFailed(TimeboxError):
    status = 500
    slug = "task-failed"
    title = "Task failed"


class Overloaded(TimeboxError):
    status = 503
    slug = "overloaded"
    title = "Too much work queued to finish in time"


class NoWorker(Overloaded):
    slug = "no-worker"
    title = "No worker serves this task type"


class HistoryNotRead(Overloaded):
    """The id is not among the tasks read so far, and a starting gateway has not yet
    read the event history before its live window: it may be there."""

    slug = "history-not-read"
    title = "Older tasks not read yet"


class BrokerUnavailable(Overloaded):
    slug = "broker-unavailable"
    title = "Message broker unavailable"


class ConfirmLost(BrokerUnavailable):
    """A publish timed out or its connection went before the confirm: the broker may
    still have taken the message (a blocked connection sends it once unblocked)."""

    slug = "confirm-lost"


class TaskTimedOut(TimeboxError):
    status = 504
    slug = "deadline-passed"
    title = "Deadline passed"


# How a task that did not succeed ends an RPC, by its final state: its error class,
# problem type and title. A task still queued or running at its deadline is
# TaskTimedOut's `deadline-passed`.
ENDINGS: dict[str, tuple[type[TimeboxError], str, str]] = {
    "failed": (TaskFailed, TaskFailed.slug, TaskFailed.title),
    "expired": (TaskTimedOut, "task-expired", "Task expired"),
    "aborted": (TaskTimedOut, "task-aborted", "Task aborted at its deadline"),
    "cancelled": (TaskCancelled, TaskCancelled.slug, TaskCancelled.title),
    "rejected": (Overloaded, "task-rejected", "Task rejected"),
}
for _kind, _slug, _ in ENDINGS.values():
    TimeboxError.by_slug.setdefault(_slug, _kind)


def ending(status: TaskStatus) -> TimeboxError | None:
    """The error an RPC answers for a task that ended without a result, or that has
    not ended by its deadline; None for a success."""
    state = status.state.value
    if state == "succeeded":
        return None
    kind, slug, title = ENDINGS.get(state, (TaskTimedOut, TaskTimedOut.slug, TaskTimedOut.title))
    if state == "failed":
        error = status.error
        detail = f"{error.type}: {error.message}" if error else "the task failed"
    elif state == "expired":
        detail = f"the task expired before it could start ({status.reason or 'deadline'})"
    elif state == "aborted":
        detail = f"the task was stopped at its deadline after running {status.ran} s"
    elif state in ("cancelled", "rejected"):
        detail = status.reason or f"the task was {state}"
    else:
        detail = f"the deadline passed while the task was {state}"
    problem = kind(
        detail, task=status.model_dump(mode="json"), waited=status.waited, ran=status.ran
    )
    problem.slug, problem.title = slug, title
    return problem
