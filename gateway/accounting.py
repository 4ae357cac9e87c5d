"""Where the fleet's CPU went, on the gateway's /metrics: spent on answers delivered,
wasted on work nobody could use, and saved by the deadlines (work never started).

Every gateway reads every event, and every ending carries the CPU its run used, so
one scrape of any gateway answers for the whole fleet (take the max over replicas,
not the sum). What a task that never ran would have cost is its type's expected run
time for its input, as admission estimates it. Refusals before queueing are known
only to the gateway that refused: they are counted there (sum those over replicas)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter

from contracts.events import CLIENT_GONE, EventType, TaskEvent
from gateway.tasktable import Record

SPENT = Counter(
    "timebox_fleet_cpu_seconds_total",
    "CPU of the fleet's task processes, from the events: use=delivered (reason succeeded, "
    "failed) or wasted (late, aborted, cancelled, abandoned, retried). Every gateway "
    "counts the whole fleet",
    ["task", "use", "reason"],
)
SAVED = Counter(
    "timebox_fleet_saved_cpu_seconds_total",
    "Estimated CPU never spent: tasks that ended unstarted (expired, cancelled, abandoned, "
    "refused), at their expected run time. Every gateway counts the whole fleet",
    ["task", "reason"],
)
REFUSED = Counter(
    "timebox_refused_cpu_seconds_total",
    "Estimated CPU of the requests this gateway refused before queueing, by reason",
    ["task", "reason"],
)

UNSTARTED = frozenset({EventType.EXPIRED, EventType.CANCELLED, EventType.REJECTED})
Expect = Callable[[str, float | None], float | None]  # (task type, cost) -> seconds


def account(record: Record, event: TaskEvent, expect: Expect) -> tuple[str, str, float] | None:
    """(use, reason, CPU seconds) for a task's ending or a failed attempt retried; None
    for any other event, or an ending with no figure to count (unstarted, with nothing
    learnt of its type yet)."""
    if not (event.terminal or event.type is EventType.RETRYING):
        return None
    reason = _reason(record, event)
    if event.ran is None:  # it never started
        expected = expect(event.task, record.cost) if event.type in UNSTARTED else None
        return None if expected is None else ("saved", reason, expected)
    return (DELIVERED.get(reason, "wasted"), reason, event.cpu_seconds or 0.0)


DELIVERED = {"succeeded": "delivered", "failed": "delivered"}  # an answer; the rest waste
REASONS = {EventType.REJECTED: "refused", EventType.RETRYING: "retried"}


def _reason(record: Record, event: TaskEvent) -> str:
    if event.type is EventType.SUCCEEDED:
        deadline = record.deadline
        return "late" if deadline is not None and event.at > deadline.epoch else "succeeded"
    if event.type is EventType.CANCELLED and CLIENT_GONE in (event.reason or ""):
        return "abandoned"
    return REASONS.get(event.type, event.type.value)


def listener(expect: Expect) -> Callable[[Record, TaskEvent], None]:
    """A task table listener that counts each ending once."""

    def count(record: Record, event: TaskEvent) -> None:
        counted = account(record, event, expect)
        if counted is not None:
            use, reason, seconds = counted
            if use == "saved":
                SAVED.labels(event.task, reason).inc(seconds)
            else:
                SPENT.labels(event.task, use, reason).inc(seconds)

    return count
