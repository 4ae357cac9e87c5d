"""Task events: every state change of a task, appended to the `{ns}.events` stream."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, JsonValue, PrivateAttr

# the reason of a tied task's cancel when no gateway hears from its client any more
CLIENT_GONE = "its client is gone: no gateway has heard from it for a grace"


class EventType(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    PROGRESS = "progress"
    RETRYING = "retrying"  # an attempt failed; another follows its backoff
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"
    ABORTED = "aborted"
    CANCELLED = "cancelled"
    REJECTED = "rejected"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset(
    {
        EventType.SUCCEEDED,
        EventType.FAILED,
        EventType.EXPIRED,
        EventType.ABORTED,
        EventType.CANCELLED,
        EventType.REJECTED,
    }
)


# Events and messages ignore fields they do not know: during a rolling upgrade a
# gateway or worker reads what a newer one wrote, and a field added later must not
# make it skip the event (as "forbid" would).
READER = ConfigDict(extra="ignore", frozen=True)


class ErrorInfo(BaseModel):
    model_config = READER

    type: str
    message: str


class TaskEvent(BaseModel):
    """One event. Which optional fields are set depends on `type`."""

    model_config = READER

    type: EventType
    task_id: str
    task: str
    at: float = Field(default_factory=time.time, description="epoch seconds")
    deadline_ms: int | None = None
    cost: float | None = Field(default=None, description="the input's cost hint (queued)")
    owner: str | None = None
    idempotency_key: str | None = None
    input_digest: str | None = Field(
        default=None, description="of the task type and input (queued, with a key)"
    )
    tied: bool | None = Field(
        default=None, description="an RPC's or a stream's: held to its client (queued)"
    )
    priority: int | None = Field(
        default=None, description="its task message's priority, if above 0 (queued)"
    )
    worker: str | None = None
    attempt: int | None = None
    started: float | None = Field(
        default=None,
        description="epoch seconds of its start, on an ending with no `running` of its own "
        "(a run that ended within RUNNING_AFTER)",
    )
    progress: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    message: str | None = None
    result: JsonValue = None
    error: ErrorInfo | None = None
    reason: str | None = None
    waited: float | None = Field(default=None, description="seconds between queued and start")
    ran: float | None = Field(default=None, description="seconds the task ran")
    cpu_seconds: float | None = None
    late_by: float | None = Field(
        default=None, description="seconds past the deadline at the kill (negative: before)"
    )

    @property
    def terminal(self) -> bool:
        return self.type.terminal

    @property
    def start(self) -> float | None:
        """When the run it tells of started, if it tells of one."""
        return self.at if self.type is EventType.RUNNING else self.started


class TaskState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"
    ABORTED = "aborted"
    CANCELLED = "cancelled"
    REJECTED = "rejected"

    @property
    def terminal(self) -> bool:
        return self not in (TaskState.QUEUED, TaskState.RUNNING)


def _instant(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=UTC)


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else round((end - start).total_seconds(), 3)


class FailedAttempt(BaseModel):
    """An attempt that failed and was tried again."""

    attempt: int
    at: datetime
    error: ErrorInfo | None = None
    ran: float | None = None
    cpu_seconds: float | None = None


class TaskStatus(BaseModel):
    """What `GET /v1/tasks/{id}` answers: the fold of the task's events."""

    model_config = ConfigDict(extra="forbid")

    id: str
    task: str
    state: TaskState
    created_at: datetime | None = None
    deadline: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    worker: str | None = Field(
        default=None, description="the worker of its last start; if never started, of its end"
    )
    attempts: int = Field(default=0, description="how many times a worker started it")
    failed_attempts: list[FailedAttempt] = Field(
        default_factory=list, description="the attempts that failed and were tried again"
    )
    progress: float | None = None
    progress_message: str | None = None
    result: JsonValue = None
    error: ErrorInfo | None = None
    reason: str | None = None
    cpu_seconds: float | None = Field(default=None, description="CPU the run used")
    events_url: str | None = Field(
        default=None, description="in a 202: an SSE URL a browser's EventSource can open"
    )
    # the delivery numbers of the `running` events seen: a `running` published twice
    # (a publish retried across a reconnect) counts once, and a delivery that never
    # started (a message RabbitMQ took back from a cancelled consumer before it reached
    # the worker still counts as a delivery) is no attempt
    _started: set[int] = PrivateAttr(default_factory=set)

    @property
    def waited(self) -> float | None:
        """Seconds from queued to its start."""
        return _seconds(self.created_at, self.started_at)

    @property
    def ran(self) -> float | None:
        """Seconds from its start to its end."""
        return _seconds(self.started_at, self.finished_at)

    @classmethod
    def first(cls, event: TaskEvent) -> TaskStatus:
        status = cls(id=event.task_id, task=event.task, state=TaskState.QUEUED)
        status.apply(event)
        return status

    def apply(self, event: TaskEvent) -> bool:
        """Folds one event in. Returns False (and changes nothing) once terminal:
        the first terminal event in stream order wins on every gateway."""
        if self.state.terminal:
            return False
        if event.start is not None:
            self.started_at = _instant(event.start)
            self.worker = event.worker
            self._started.add(event.attempt or 1)
            self.attempts = len(self._started)
        match event.type:
            case EventType.QUEUED:
                self.created_at = _instant(event.at)
                if event.deadline_ms is not None:
                    self.deadline = _instant(event.deadline_ms / 1000)
            case EventType.RUNNING:
                self.state = TaskState.RUNNING
                self.progress = 0.0
            case EventType.PROGRESS:
                self.progress = event.progress
                self.progress_message = event.message
            case EventType.RETRYING:
                failed = FailedAttempt(
                    attempt=event.attempt or self.attempts,
                    at=datetime.fromtimestamp(event.at, tz=UTC),
                    error=event.error,
                    ran=event.ran,
                    cpu_seconds=event.cpu_seconds,
                )
                self.failed_attempts.append(failed)
            case _:
                self._end(event)
        return True

    def _end(self, event: TaskEvent) -> None:
        self.state = TaskState(event.type.value)
        self.finished_at = _instant(event.at)
        self.worker = self.worker or event.worker  # a run is told by its runner
        self.result = event.result
        self.error = event.error
        self.reason = event.reason
        self.cpu_seconds = event.cpu_seconds
        if event.type is EventType.SUCCEEDED:
            self.progress = 1.0
