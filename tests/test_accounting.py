"""Where the fleet's CPU went, judged from one task's ending (gateway/accounting.py), and the
Grafana dashboard over the series both programs export."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from prometheus_client import REGISTRY

import compute.metrics
import gateway.accounting
import gateway.metrics
from contracts.events import CLIENT_GONE, EventType, TaskEvent
from gateway.accounting import account
from gateway.tasktable import Record, TaskTable


def queued(cost: float = 2.0) -> Record:
    deadline_ms = round((time.time() + 10) * 1000)
    event = TaskEvent(
        type=EventType.QUEUED, task_id="t1", task="resize", deadline_ms=deadline_ms, cost=cost
    )
    return TaskTable(10).expect(event)


def ending(kind: EventType, **fields: object) -> TaskEvent:
    return TaskEvent(type=kind, task_id="t1", task="resize", **fields)  # type: ignore[arg-type]


def expect(task: str, cost: float | None) -> float | None:
    return 0.5 * (cost or 1.0) if task == "resize" else None


def test_each_ending_is_delivered_wasted_or_saved_with_its_reason() -> None:
    record = queued()
    late = record.deadline.epoch + 1 if record.deadline else 0.0
    cases = {
        "on time": (
            ending(EventType.SUCCEEDED, ran=0.9, cpu_seconds=0.8),
            ("delivered", "succeeded", 0.8),
        ),
        "late": (
            ending(EventType.SUCCEEDED, ran=9, cpu_seconds=8.0, at=late),
            ("wasted", "late", 8.0),
        ),
        "failed": (
            ending(EventType.FAILED, ran=0.1, cpu_seconds=0.1),
            ("delivered", "failed", 0.1),
        ),
        "aborted": (ending(EventType.ABORTED, ran=10, cpu_seconds=9.5), ("wasted", "aborted", 9.5)),
        "cancelled running": (
            ending(EventType.CANCELLED, ran=1, cpu_seconds=1.0, reason="cancelled by DELETE"),
            ("wasted", "cancelled", 1.0),
        ),
        "abandoned running": (
            ending(EventType.CANCELLED, ran=1, cpu_seconds=0.9, reason=CLIENT_GONE),
            ("wasted", "abandoned", 0.9),
        ),
        # never started: the expected run time of its input (cost 2: 1.0 s) was saved
        "expired": (
            ending(EventType.EXPIRED, reason="deadline passed before start"),
            ("saved", "expired", 1.0),
        ),
        "abandoned queued": (
            ending(EventType.CANCELLED, reason=f"{CLIENT_GONE}; not started"),
            ("saved", "abandoned", 1.0),
        ),
        "refused": (ending(EventType.REJECTED, reason="queue full"), ("saved", "refused", 1.0)),
        "a failed attempt, retried": (
            ending(EventType.RETRYING, attempt=1, ran=0.3, cpu_seconds=0.25),
            ("wasted", "retried", 0.25),
        ),
    }
    for name, (event, counted) in cases.items():
        assert account(record, event, expect) == counted, name


def test_nothing_is_counted_but_endings_with_a_figure() -> None:
    record = queued()
    assert account(record, ending(EventType.RUNNING), expect) is None
    assert account(record, ending(EventType.PROGRESS, progress=0.5), expect) is None
    # a dead letter that failed unstarted saved nothing the deadlines can claim
    assert account(record, ending(EventType.FAILED, reason="dead-lettered"), expect) is None
    unknown = TaskEvent(type=EventType.EXPIRED, task_id="t2", task="new_type")
    assert account(record, unknown, expect) is None  # nothing learnt of its type yet


def test_the_grafana_dashboard_reads_only_series_timebox_exports() -> None:
    # the worker's series and the gateway's, registered by importing their modules
    assert {compute.metrics.__name__, gateway.metrics.__name__, gateway.accounting.__name__}
    families = {m.name for m in REGISTRY.collect()}
    exported = {f"{n}{s}" for n in families for s in ("", "_total", "_bucket", "_count", "_sum")}
    dashboard = json.loads((Path(__file__).parents[1] / "grafana" / "timebox.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    read = {name for e in exprs for name in re.findall(r"\btimebox_[a-z_]+", e)}
    assert len(read) >= 10
    assert read <= exported, read - exported
    assert {"timebox_fleet_cpu_seconds_total", "timebox_fleet_saved_cpu_seconds_total"} <= read
