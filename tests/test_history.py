"""A starting gateway reads the live window of the event stream first, is ready then,
and reads the older history after it (gateway/eventlog.py, TaskTable.recall)."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest

from contracts.events import EventType, TaskEvent, TaskState
from gateway.sse import Fanout
from gateway.tasktable import TaskTable
from tests.conftest import Stack
from tests.harness import echo_lifecycle, events_read, fill_stream, wait_until
from tests.proxy import gateway_through_proxy


def event(kind: EventType, task_id: str = "t1", **fields: object) -> TaskEvent:
    return TaskEvent(type=kind, task_id=task_id, task="echo", **fields)  # type: ignore[arg-type]


def test_a_task_whose_end_was_read_live_is_folded_again_in_stream_order() -> None:
    """Its `expired` came after the live window began, its run before: the first
    terminal event in stream order wins, as on a gateway that read it all in order."""
    table = TaskTable(10)
    table.apply(900, event(EventType.EXPIRED, reason="late dead letter"))
    queued, running, succeeded = echo_lifecycle("t1", cost=2.0)
    for offset, e in ((10, queued), (20, running), (30, succeeded)):
        table.recall(offset, e)
    record = table.get("t1")
    assert record is not None
    assert record.status.state is TaskState.SUCCEEDED
    assert record.status.created_at is not None
    assert record.status.attempts == 1
    assert [stored.offset for stored in record.events] == [10, 20, 30]
    assert record.terminal_offset == 30
    assert record.cost == 2.0
    assert record.done.is_set()


def test_the_history_never_pushes_a_task_of_the_live_window_out_of_a_full_table() -> None:
    table = TaskTable(3)
    table.apply(100, event(EventType.QUEUED, "live1"))
    table.apply(101, event(EventType.QUEUED, "live2"))
    for i, task_id in enumerate(["old1", "old2", "old3"]):
        table.recall(i, event(EventType.QUEUED, task_id, idempotency_key=f"k-{task_id}"))
    # the newest of the history fills the one place left
    assert [t for t in ("live1", "live2", "old1", "old2", "old3") if table.get(t)] == [
        "live1",
        "live2",
        "old3",
    ]
    assert table.by_idempotency_key(None, "k-old1") is None
    assert table.by_idempotency_key(None, "k-old3") is table.get("old3")
    # a new task pushes out the history first, then the oldest of the live window
    table.apply(102, event(EventType.QUEUED, "live3"))
    assert table.get("old3") is None
    assert table.by_idempotency_key(None, "k-old3") is None
    assert table.get("live1") is not None
    table.apply(103, event(EventType.QUEUED, "live4"))
    assert table.get("live1") is None
    assert len(table) == 3


def test_a_subscriber_to_a_task_of_the_history_is_sent_what_the_history_brings_next() -> None:
    async def scenario() -> None:
        table = TaskTable(10)
        table.fanout = fanout = Fanout()
        waiting = asyncio.ensure_future(table.arrival("t1", 5.0))
        queued, running, succeeded = echo_lifecycle("t1")
        table.recall(10, queued)
        record = await waiting  # an arrival is told of a task of the history too
        assert record is table.get("t1")
        sub = fanout.subscribe(record, 10)
        table.recall(20, running)
        table.recall(30, succeeded)
        assert [(await sub.get()).offset for _ in range(2)] == [20, 30]
        assert record.done.is_set()
        table.recall(30, succeeded)  # read again after a reconnect: changes nothing
        assert [stored.offset for stored in record.events] == [10, 20, 30]

    asyncio.run(scenario())


MAX_TIMEOUT = 1.0  # so that the live window is about 2 s long
HISTORY_TASKS = 6_000  # enough that reading them takes seconds
SHORT = {
    "TIMEBOX_MAX_TIMEOUT": str(MAX_TIMEOUT),
    "TIMEBOX_DEFAULT_TIMEOUT": str(MAX_TIMEOUT),
    "TIMEBOX_ARRIVAL_WAIT": "0.2",
}


def _history(stack: Stack, *first: TaskEvent) -> list[TaskEvent]:
    """Fills the stack's stream with `first` and HISTORY_TASKS tasks' events, and
    returns once they are older than a gateway's live window."""
    events = list(first)
    for _ in range(HISTORY_TASKS):
        events += echo_lifecycle(str(uuid.uuid4()))
    asyncio.run(fill_stream(stack.amqp_url, stack.namespace, events))
    # the stream's timestamps are whole seconds: let every event fall before the window
    time.sleep(MAX_TIMEOUT + 3.0)
    return events


@pytest.mark.timeout(180)
def test_a_new_gateway_is_ready_before_it_has_read_the_history_then_answers_for_it(
    make_stack,
) -> None:
    stack: Stack = make_stack(**SHORT)
    old_id, keyed_id = str(uuid.uuid4()), str(uuid.uuid4())
    events = _history(
        stack, *echo_lifecycle(old_id), *echo_lifecycle(keyed_id, idempotency_key="key-1")
    )

    gateway = stack.gateway()
    with stack.client() as c:
        ready = c.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["history"] == "reading"
        # an id it does not know yet may be in the history: 503, not 404
        unknown = c.get(f"/v1/tasks/{uuid.uuid4()}")
        assert unknown.status_code == 503, unknown.text
        assert unknown.json()["type"].endswith("history-not-read")
        assert unknown.headers["Retry-After"]

        line = gateway.wait_for_line(r"read the event history: \d+ events", 120)
        assert f"{len(events)} events" in line
        assert c.get("/readyz").json()["history"] == "read"
        status = c.get(f"/v1/tasks/{old_id}")
        assert status.status_code == 200
        assert status.json()["state"] == "succeeded"
        assert status.json()["created_at"] is not None
        again = c.post("/v1/tasks/echo", json={"payload": 1}, headers={"Idempotency-Key": "key-1"})
        assert again.json()["id"] == keyed_id
        assert c.get(f"/v1/tasks/{uuid.uuid4()}").status_code == 404


@pytest.mark.timeout(180)
def test_a_gateway_whose_history_connection_drops_reads_on_from_where_it_was(
    make_stack, amqp_url: str
) -> None:
    stack: Stack = make_stack(**SHORT)
    old_id = str(uuid.uuid4())
    events = _history(stack, *echo_lifecycle(old_id))
    with gateway_through_proxy(stack, amqp_url) as (gateway, proxy):
        # publishing, live window, then the history's connection, once it delivers
        with stack.client() as c:
            wait_until(lambda: events_read(c) > 100, 30, "the history being read")
        assert proxy.accepted == 3
        proxy.drop(2)
        gateway.wait_for_line("stopped reading the event history", 30)
        line = gateway.wait_for_line(r"read the event history: \d+ events", 120)
        assert f"{len(events)} events" in line  # each read once: on from where it was
        with stack.client() as c:
            assert c.get(f"/v1/tasks/{old_id}").json()["state"] == "succeeded"
        assert gateway.count("stopped reading the event history") == 1
        assert gateway.count("stopped reading the event stream|lost the connection") == 0
        assert gateway.count("ERROR|Traceback") == 0


def test_a_gateway_on_a_stream_with_no_history_reads_none(make_stack) -> None:
    stack: Stack = make_stack()
    gateway = stack.gateway()
    gateway.wait_for_line(r"read the event history: 0 events before offset 0", 10)
    with httpx.Client(base_url=gateway.url, timeout=10) as c:
        assert c.get("/readyz").json()["history"] == "read"
        assert c.get(f"/v1/tasks/{uuid.uuid4()}").status_code == 404
