"""What one SSE subscriber of a task is sent, from the gateway's task table: every
event it keeps up with, only the latest progress when it is behind, and the whole
history on a replay. (The streams over HTTP are in test_core_path.py.)"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest

from contracts.events import EventType, TaskEvent
from gateway.sse import task_events
from gateway.tasktable import TaskTable

pytestmark = pytest.mark.timeout(10)


def event(kind: EventType, **fields: object) -> TaskEvent:
    return TaskEvent(type=kind, task_id="t1", task="burn_cpu", at=100.0, **fields)  # type: ignore[arg-type]


def sent(frame: bytes) -> tuple[int, str]:
    found = re.match(rb"id: (\d+)\r\nevent: (\w+)\r\n", frame)
    assert found is not None, frame
    return int(found[1]), found[2].decode()


async def rest(stream: AsyncIterator[bytes]) -> list[tuple[int, str]]:
    return [sent(frame) async for frame in stream]


def test_a_subscriber_that_keeps_up_is_sent_every_progress_report() -> None:
    async def scenario() -> list[tuple[int, str]]:
        table = TaskTable(10)
        table.apply(0, event(EventType.QUEUED))
        record = table.get("t1")
        assert record is not None
        stream = task_events(record, -1, 100)
        got = [sent(await anext(stream))]  # the replay; it is subscribed from here on
        table.apply(1, event(EventType.RUNNING, worker="w:1", attempt=1))
        got.append(sent(await anext(stream)))
        for offset in (2, 3, 4):
            table.apply(offset, event(EventType.PROGRESS, progress=offset / 10))
            got.append(sent(await anext(stream)))
        table.apply(5, event(EventType.SUCCEEDED, result={"seconds": 1}))
        return got + await rest(stream)

    got = asyncio.run(scenario())
    assert got == [
        (0, "queued"),
        (1, "running"),
        (2, "progress"),
        (3, "progress"),
        (4, "progress"),
        (5, "succeeded"),
    ]


def test_a_subscriber_that_is_behind_skips_the_progress_reports_a_later_event_replaces() -> None:
    """A gateway serving more subscribers than it can between two reports sends each
    the latest state, not a backlog; every other event still goes to everyone."""

    async def scenario() -> list[tuple[int, str]]:
        table = TaskTable(10)
        table.apply(0, event(EventType.QUEUED))
        record = table.get("t1")
        assert record is not None
        stream = task_events(record, -1, 100)
        got = [sent(await anext(stream))]
        table.apply(1, event(EventType.RUNNING, worker="w:1", attempt=1))
        for offset in (2, 3, 4):  # three reports before the subscriber reads again
            table.apply(offset, event(EventType.PROGRESS, progress=offset / 10))
        got.append(sent(await anext(stream)))
        got.append(sent(await anext(stream)))
        # a report with a message is sent even with later ones waiting behind it
        table.apply(5, event(EventType.PROGRESS, progress=0.5, message="step 2 of 3"))
        for offset in (6, 7):
            table.apply(offset, event(EventType.PROGRESS, progress=offset / 10))
        table.apply(8, event(EventType.SUCCEEDED, result={"seconds": 1}))
        return got + await rest(stream)

    got = asyncio.run(scenario())
    assert got == [
        (0, "queued"),
        (1, "running"),
        (4, "progress"),
        (5, "progress"),
        (8, "succeeded"),
    ]


def test_the_replay_of_a_finished_task_leaves_no_event_out() -> None:
    async def scenario() -> list[tuple[int, str]]:
        table = TaskTable(10)
        table.apply(0, event(EventType.QUEUED))
        table.apply(1, event(EventType.RUNNING, worker="w:1", attempt=1))
        for offset in (2, 3, 4):
            table.apply(offset, event(EventType.PROGRESS, progress=offset / 10))
        table.apply(5, event(EventType.SUCCEEDED, result={"seconds": 1}))
        record = table.get("t1")
        assert record is not None
        return await rest(task_events(record, 2, 100))  # Last-Event-ID: 2

    assert asyncio.run(scenario()) == [(3, "progress"), (4, "progress"), (5, "succeeded")]
