"""How a task ended, and what the worker does about it: one pure table."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum

from pydantic import JsonValue

from contracts.events import ErrorInfo, EventType


class Kind(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the task raised
    ABORTED = "aborted"  # killed at its deadline
    CRASHED = "crashed"  # the child process died under it
    EXPIRED = "expired"  # never started: deadline passed or cannot be met
    CANCELLED = "cancelled"  # killed, or never started, because its caller cancelled
    INVALID = "invalid"  # the message itself is unusable: park it
    HANDED_BACK = "handed_back"  # its worker lost its message: another runs it


class Disposition(Enum):
    ACK = "ack"
    PARK = "park"  # copy to the parked queue with the reason, then ack
    REQUEUE = "requeue"  # back to its queue (nack), if the channel still can


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    output: JsonValue = None
    error: ErrorInfo | None = None
    reason: str | None = None
    cpu_seconds: float = 0.0
    ran: float | None = None
    late_by: float | None = None
    retried: bool = False  # a failure its task declared to be tried again


# A task handed back has no ending of its own: the run that follows it has.
SETTLE: dict[Kind, tuple[EventType | None, Disposition]] = {
    Kind.SUCCEEDED: (EventType.SUCCEEDED, Disposition.ACK),
    Kind.FAILED: (EventType.FAILED, Disposition.ACK),
    Kind.ABORTED: (EventType.ABORTED, Disposition.ACK),
    Kind.CRASHED: (EventType.FAILED, Disposition.ACK),
    Kind.EXPIRED: (EventType.EXPIRED, Disposition.ACK),
    Kind.CANCELLED: (EventType.CANCELLED, Disposition.ACK),
    Kind.INVALID: (EventType.FAILED, Disposition.PARK),
    Kind.HANDED_BACK: (None, Disposition.REQUEUE),
}


def settle(outcome: Outcome) -> tuple[EventType | None, Disposition]:
    """The event to emit and what to do with the message, for an outcome."""
    return SETTLE[outcome.kind]
