"""The worker's Prometheus metrics (served on --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from compute.outcome import Kind, Outcome

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
LATENESS_BUCKETS = (-0.5, -0.2, -0.1, -0.05, -0.02, 0, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 5)

TASKS = Counter("timebox_tasks_total", "Tasks this worker ended, by outcome", ["task", "outcome"])
QUEUE_WAIT = Histogram(
    "timebox_queue_wait_seconds", "From publish to start", ["task"], buckets=BUCKETS
)
RUN_TIME = Histogram(
    "timebox_run_seconds", "Wall time tasks ran, by outcome", ["task", "outcome"], buckets=BUCKETS
)
ABORT_LATENESS = Histogram(
    "timebox_abort_lateness_seconds",
    "Kill time minus deadline (negative: before the deadline)",
    ["task"],
    buckets=LATENESS_BUCKETS,
)
CPU = Counter("timebox_cpu_seconds_total", "CPU seconds of task processes", ["task", "outcome"])
WASTED_CPU = Counter(
    "timebox_wasted_cpu_seconds_total",
    "CPU spent on tasks that gave no on-time answer (aborted, cancelled, crashed, late, retried)",
    ["task"],
)
SAVED_CPU = Counter(
    "timebox_saved_cpu_seconds_total",
    "Estimated CPU not spent: tasks dropped before start times their expected run time",
    ["task"],
)
SLOTS = Gauge("timebox_slots", "Child processes that run tasks")
SLOTS_BUSY = Gauge("timebox_slots_busy", "Slots running a task now")

NO_ANSWER = {Kind.ABORTED, Kind.CANCELLED, Kind.CRASHED, Kind.HANDED_BACK}
DROPPED = {Kind.EXPIRED, Kind.CANCELLED}


def record(task: str, outcome: Outcome, late: bool, expected: float | None) -> None:
    """Counts one outcome. `late`: it ended after its deadline; `expected`: its
    expected run time, for a task dropped before it started."""
    kind = outcome.kind.value
    TASKS.labels(task, kind).inc()
    if outcome.ran is None:
        if outcome.kind in DROPPED and expected is not None:
            SAVED_CPU.labels(task).inc(expected)
        return
    RUN_TIME.labels(task, kind).observe(outcome.ran)
    CPU.labels(task, kind).inc(outcome.cpu_seconds)
    if outcome.kind in NO_ANSWER or late:
        WASTED_CPU.labels(task).inc(outcome.cpu_seconds)
    if outcome.kind is Kind.ABORTED and outcome.late_by is not None:
        ABORT_LATENESS.labels(task).observe(outcome.late_by)


def retried(task: str, failed: Outcome) -> None:
    """Counts an attempt that failed and is tried again: its CPU gave no answer."""
    TASKS.labels(task, "retried").inc()
    CPU.labels(task, "retried").inc(failed.cpu_seconds)
    WASTED_CPU.labels(task).inc(failed.cpu_seconds)
