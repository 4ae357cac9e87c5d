"""The gateway's Prometheus metrics, on GET /metrics.

Tasks are counted by the gateway they were submitted through, so that summing over
replicas counts each task once (every replica reads every event)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from contracts.events import TaskEvent
from gateway.tasktable import Record

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

REQUESTS = Counter(
    "timebox_requests_total",
    "Tasks submitted through this gateway, by final outcome (rejected: refused at once)",
    ["task", "outcome"],
)
REFUSALS = Counter(
    "timebox_refusals_total", "Requests refused before queueing, by reason", ["task", "reason"]
)
QUEUE_WAIT = Histogram(
    "timebox_gateway_queue_wait_seconds", "From queued to running", ["task"], buckets=BUCKETS
)
END_TO_END = Histogram(
    "timebox_gateway_task_seconds", "From queued to the terminal event", ["task"], buckets=BUCKETS
)
SSE_STREAMS = Gauge("timebox_sse_streams", "Open SSE streams on this gateway")
STREAMS_WAITING = Gauge(
    "timebox_sse_streams_waiting_for_history",
    "Event streams of a task id this starting gateway has not read yet, waiting for it "
    "to read the event stream",
)
BROKER_CONNECTED = Gauge(
    "timebox_broker_connected",
    "1 while connected to RabbitMQ, both to publish and to read the event stream",
)
CLIENTS = Gauge(
    "timebox_gateway_clients",
    "Tasks tied to their client (RPCs, streams) that a client follows on this gateway now",
)
TASKS_KNOWN = Gauge("timebox_tasks_known", "Tasks in this gateway's table")
EVENTS_READ = Counter(
    "timebox_gateway_events_read",
    "Messages read from the event stream (the whole retention window at startup, then "
    "each new one; read again after a reconnect, they would count twice)",
)


def observe(record: Record, event: TaskEvent) -> None:
    """A table listener: counts the tasks submitted here."""
    if not record.local:
        return
    created = record.status.created_at
    if event.start is not None and created is not None:
        QUEUE_WAIT.labels(event.task).observe(max(0.0, event.start - created.timestamp()))
    if event.terminal:
        REQUESTS.labels(event.task, event.type.value).inc()
        if created is not None:
            END_TO_END.labels(event.task).observe(max(0.0, event.at - created.timestamp()))
