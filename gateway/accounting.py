"""Where the fleet's CPU went, on the gateway's /metrics: spent on answers delivered,
wasted on work nobody could use, and saved by the deadlines (work never started).

Every gateway reads every event, and every ending carries the CPU its run used, so
one scrape of any gateway answers for the whole fleet (take the max over replicas,
not the sum). What a task that never ran would have cost is its type's expected run
time for its input, as admission estimates it. Refusals before queueing are known
only to the gateway that refused: they are counted there (sum those over replicas)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

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


USES = ("delivered", "wasted", "saved")
HOUR = 60  # minutes of the console's chart


class Ledger:
    """A task table listener that counts each ending once: on the fleet's counters,
    and per owner (an API key's tasks) as totals by use and reason and as CPU seconds
    per minute over the last hour, which the console shows (gateway/console.py)."""

    def __init__(self, expect: Expect) -> None:
        self.expect = expect
        self._totals: defaultdict[str | None, defaultdict[tuple[str, str], float]] = defaultdict(
            lambda: defaultdict(float)
        )
        # owner -> minute -> seconds delivered, wasted, saved
        self._minutes: defaultdict[str | None, dict[float, list[float]]] = defaultdict(dict)

    def __call__(self, record: Record, event: TaskEvent) -> None:
        counted = account(record, event, self.expect)
        if counted is None:
            return
        use, reason, seconds = counted
        if use == "saved":
            SAVED.labels(event.task, reason).inc(seconds)
        else:
            SPENT.labels(event.task, use, reason).inc(seconds)
        self._book(record.owner, use, reason, seconds, event.at)

    def refused(self, owner: str | None, task: str, reason: str, cost: float | None) -> None:
        """A request this gateway refused before queueing: its expected run is saved."""
        seconds = self.expect(task, cost) or 0.0
        REFUSED.labels(task, reason).inc(seconds)
        self._book(owner, "saved", reason, seconds, time.time())

    def _book(self, owner: str | None, use: str, reason: str, seconds: float, at: float) -> None:
        self._totals[owner][(use, reason)] += seconds
        minutes = self._minutes[owner]
        minutes.setdefault(at // 60 * 60, [0.0, 0.0, 0.0])[USES.index(use)] += seconds
        if len(minutes) > HOUR:  # keeps the last hour's
            for minute in sorted(minutes)[:-HOUR]:
                del minutes[minute]

    def view(self, owner: str | None, now: float) -> dict[str, Any]:
        """The owner's CPU seconds: totals by use and reason since this gateway started,
        and per minute over the last hour (every minute, empty ones too)."""
        totals: dict[tuple[str, str], float] = self._totals.get(owner, {})
        by_minute = self._minutes.get(owner, {})
        this_minute = now // 60 * 60
        minutes = [this_minute - 60 * back for back in range(HOUR - 1, -1, -1)]
        return {
            "totals": {
                use: round(sum(s for (u, _), s in totals.items() if u == use), 3) for use in USES
            },
            "reasons": {
                use: {r: round(s, 3) for (u, r), s in sorted(totals.items()) if u == use}
                for use in USES
            },
            "minutes": [
                [minute, *(round(s, 3) for s in by_minute.get(minute, (0.0, 0.0, 0.0)))]
                for minute in minutes
            ],
        }
