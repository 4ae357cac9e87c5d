"""What one SSE subscriber of a task is sent, from the gateway's task table: every
event it keeps up with, only the latest progress when it is behind, and the whole
history on a replay; and a gateway holding thousands of streams. (The streams of one
client over HTTP are in test_core_path.py.)"""

from __future__ import annotations

import asyncio
import re
import resource
from collections.abc import AsyncIterator

import httpx
import pytest

from contracts.events import EventType, TaskEvent
from gateway.clients import Clients
from gateway.sse import Fanout, task_events
from gateway.tasktable import Record, TaskTable
from tests.conftest import Stack

pytestmark = pytest.mark.timeout(10)


def event(kind: EventType, **fields: object) -> TaskEvent:
    return TaskEvent(type=kind, task_id="t1", task="burn_cpu", at=100.0, **fields)  # type: ignore[arg-type]


def sent(frame: bytes) -> tuple[int, str]:
    found = re.match(rb"id: (\d+)\r\nevent: (\w+)\r\n", frame)
    assert found is not None, frame
    return int(found[1]), found[2].decode()


def events_of(table: TaskTable, record: Record, after: int) -> AsyncIterator[bytes]:
    """The SSE frames of `record` after offset `after`, as the gateway streams them."""
    if not isinstance(table.fanout, Fanout):
        table.fanout = Fanout()
    clients = Clients(None, grace=1.0)  # type: ignore[arg-type]  # its tasks are tied to none
    return task_events(table.fanout, clients, record, after, 100)


async def rest(stream: AsyncIterator[bytes]) -> list[tuple[int, str]]:
    return [sent(frame) async for frame in stream]


async def subscribed_after_running(
    table: TaskTable,
) -> tuple[AsyncIterator[bytes], list[tuple[int, str]]]:
    """A subscriber of a task queued at offset 0 that starts running at offset 1: its
    stream, and what it was sent of those two (taken before `running` is applied, so
    `running` comes live)."""
    table.apply(0, event(EventType.QUEUED))
    record = table.get("t1")
    assert record is not None
    stream = events_of(table, record, -1)
    got = [sent(await anext(stream))]  # the replay; it is subscribed from here on
    table.apply(1, event(EventType.RUNNING, worker="w:1", attempt=1))
    return stream, got


def test_a_subscriber_that_keeps_up_is_sent_every_progress_report() -> None:
    async def scenario() -> list[tuple[int, str]]:
        table = TaskTable(10)
        stream, got = await subscribed_after_running(table)
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
        stream, got = await subscribed_after_running(table)
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
        return await rest(events_of(table, record, 2))  # Last-Event-ID: 2

    assert asyncio.run(scenario()) == [(3, "progress"), (4, "progress"), (5, "succeeded")]


def test_a_subscriber_that_already_has_the_terminal_event_is_sent_nothing_and_let_go() -> None:
    """A client that saw the task's end through a gateway that read it first resumes
    through one that has not read it yet (Last-Event-ID at the terminal offset): when
    the end arrives, its stream closes at once, rather than staying open for good with
    nothing more to come. (Asked again, the gateway then answers 204.)"""

    async def scenario() -> list[tuple[int, str]]:
        table = TaskTable(10)
        table.apply(0, event(EventType.QUEUED))
        table.apply(1, event(EventType.RUNNING, worker="w:1", attempt=1))
        record = table.get("t1")
        assert record is not None
        stream = events_of(table, record, 5)  # Last-Event-ID: 5, the end not read yet
        ending = asyncio.ensure_future(rest(stream))
        await asyncio.sleep(0)  # subscribed, the replay skipped
        table.apply(5, event(EventType.SUCCEEDED, result={"seconds": 1}))
        return await asyncio.wait_for(ending, 5)

    assert asyncio.run(scenario()) == []


def full_collections(client: httpx.Client) -> float:
    """The gateway process's full (generation 2) garbage collections so far."""
    text = client.get("/metrics").text
    found = re.search(r'^python_gc_collections_total\{generation="2"\} (\S+)$', text, re.M)
    assert found is not None, "no GC figures in /metrics"
    return float(found[1])


@pytest.mark.timeout(120)
def test_a_gateway_opening_thousands_of_streams_runs_no_full_garbage_collection(
    make_stack,
) -> None:
    """With CPython's default thresholds every quarter of growth of a heap full of live
    streams cost a full collection — pauses of up to 1.6 s at 10,000 streams, in which
    no event went out."""
    streams = 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * streams + 500)), hard))
    stack: Stack = make_stack()
    gateway = stack.gateway()  # inherits the limit
    stack.busy_worker("echo")  # the task stays queued
    with stack.client() as c:
        task_id = c.post("/v1/tasks/echo", json={"payload": 1}).json()["id"]
        before = full_collections(c)

    async def hold_streams() -> float:
        writers: list[asyncio.StreamWriter] = []

        async def one() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writers.append(writer)
            writer.write(f"GET /v1/tasks/{task_id}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")

        try:
            await asyncio.gather(*(one() for _ in range(streams)))  # all open at once
            with httpx.Client(base_url=gateway.url, timeout=30) as c:
                return full_collections(c)
        finally:
            for writer in writers:
                writer.close()
            await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)

    after = asyncio.run(hold_streams())
    assert after == before


def test_a_kept_event_is_sent_as_read_and_as_one_line_whatever_it_was_written_as() -> None:
    """The table keeps each event as its SSE frame (a TaskEvent object costs KiBs): made
    from the body read from the stream as it is, or, if that body spans lines (which
    would end the frame early), from the event encoded again."""
    from gateway.tasktable import Stored

    done = event(EventType.SUCCEEDED, result={"text": "two\nlines"}, cpu_seconds=0.5)
    body = done.model_dump_json(exclude_none=True).encode()
    as_read = Stored.of(7, done, body)
    assert as_read.frame == b"id: 7\r\nevent: succeeded\r\ndata: " + body + b"\r\n\r\n"
    assert as_read.frame == Stored.of(7, done).frame
    assert as_read.terminal
    assert not as_read.fraction_only
    assert as_read.event() == done
    spread = done.model_dump_json(exclude_none=True, indent=2).encode()
    assert b"\n" in spread
    kept = Stored.of(7, done, spread)
    assert kept.frame == as_read.frame
    assert Stored.of(8, event(EventType.PROGRESS, progress=0.5)).fraction_only
    assert not Stored.of(8, event(EventType.PROGRESS, progress=0.5, message="hi")).fraction_only
