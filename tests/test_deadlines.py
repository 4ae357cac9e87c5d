"""Deadlines at every layer: expire in the queue, never start late, kill at the deadline,
cancel, client disconnect."""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import aio_pika
import httpx
import pytest
from httpx_sse import ServerSentEvent

from tests.conftest import Stack
from tests.harness import (
    alive,
    messages_ready,
    metric,
    process_tree,
    task_events,
    tree_cpu,
    wait_for_event,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("hold_gil", [False, True], ids=["python-loop", "hold-gil"])
def test_a_30s_task_with_a_2s_deadline_is_killed_and_costs_no_cpu_after(
    make_stack, hold_gil: bool
) -> None:
    stack: Stack = make_stack()
    stack.gateway()
    worker = stack.worker(1)
    with stack.client() as client:
        started = time.time()
        response = client.post(
            "/v1/tasks/burn_cpu",
            params={"wait": "true"},
            headers={"Request-Timeout": "2"},
            json={"seconds": 30, "hold_gil": hold_gil},
        )
        answered = time.time() - started
        assert response.status_code == 504
        problem = response.json()
        assert problem["type"] == "/problems/task-aborted"
        assert problem["task"]["state"] == "aborted"
        assert problem["ran"] < 2.0
        assert answered < 2.5
        task_id = problem["task"]["id"]

        line = worker.wait_for_line(rf"aborted burn_cpu {task_id}")
        assert "from the deadline" in line
        assert "CPU s spent" in line
        aborted = task_events(client, task_id)[-1][1]
        assert aborted["late_by"] <= 0.05  # killed by its deadline, not after
        assert aborted["cpu_seconds"] > 1.0

    # from half a second after the deadline, the worker's process tree is idle
    deadline = started + 2
    time.sleep(max(0.0, deadline + 0.5 - time.time()))
    before = tree_cpu(worker.pid)
    time.sleep(1.0)  # the measurement window itself
    spent = tree_cpu(worker.pid) - before
    assert spent < 0.05, f"the worker tree used {spent:.3f} CPU s after the deadline"


def test_tasks_queued_behind_a_busy_slot_expire_without_ever_running(make_stack) -> None:
    stack: Stack = make_stack()
    stack.gateway()
    stack.worker(1)
    with stack.client() as client:
        busy = client.post("/v1/tasks/burn_cpu", json={"seconds": 2.5}).json()["id"]
        wait_for_event(client, busy, "running")
        short = [
            client.post(f"/v1/tasks/{task}", headers={"Request-Timeout": "0.8"}, json=body).json()[
                "id"
            ]
            for task, body in [
                ("burn_cpu", {"seconds": 0.1}),  # behind the busy task in its own queue
                ("echo", {"payload": 1}),  # another queue: no free slot, so the worker takes none
                ("burn_cpu", {"seconds": 0.1}),
            ]
        ]
        for task_id in short:
            events = task_events(client, task_id)
            assert [e[0] for e in events] == ["queued", "expired"]
            # RabbitMQ dropped it (per-message TTL → {ns}.dead), long before the slot was free
            assert events[-1][1]["reason"] == "expired in the queue before a worker could start it"
            assert client.get(f"/v1/tasks/{task_id}").json()["state"] == "expired"
        assert client.get(f"/v1/tasks/{busy}").json()["state"] == "running"
        assert task_events(client, busy)[-1][0] == "succeeded"


def test_a_delivered_message_past_its_deadline_is_acked_unstarted(make_stack) -> None:
    """A message whose x-deadline has passed but that RabbitMQ still delivers (published
    without expiration, or by a publisher whose clock runs behind) is never started."""
    stack: Stack = make_stack()
    stack.gateway()
    worker = stack.worker(1)
    task_id = f"late-{os.getpid()}-{time.monotonic_ns()}"

    async def publish_late() -> None:
        connection = await aio_pika.connect(stack.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(f"{stack.namespace}.tasks", ensure=False)
            message = aio_pika.Message(
                b'{"payload": 1}',
                message_id=task_id,
                type="echo",
                content_type="application/json",
                headers={"x-deadline": int((time.time() - 5) * 1000)},
            )
            await exchange.publish(message, "echo")

    asyncio.run(publish_late())
    line = worker.wait_for_line(rf"expired echo {task_id}")
    assert "deadline passed before start" in line
    with stack.client() as client:
        events = task_events(client, task_id)
        assert [e[0] for e in events] == ["expired"]  # never `running`
    assert worker.stop() == 0  # an unacked message would be ready again once it is gone
    assert messages_ready(stack.amqp_url, f"{stack.namespace}.tasks.echo") == 0


def test_delete_kills_a_running_task(make_stack) -> None:
    stack: Stack = make_stack()
    stack.gateway()
    worker = stack.worker(1)
    with stack.client() as client:
        task_id = client.post("/v1/tasks/burn_cpu", json={"seconds": 30}).json()["id"]
        wait_for_event(client, task_id, "running")
        response = client.delete(f"/v1/tasks/{task_id}")
        assert response.status_code == 202
        events = task_events(client, task_id)
        assert events[-1][0] == "cancelled"
        assert events[-1][1]["reason"] == "cancelled while running"
        worker.wait_for_line(rf"cancelled burn_cpu {task_id}")
        again = client.delete(f"/v1/tasks/{task_id}")
        assert again.status_code == 409
        assert again.headers["content-type"] == "application/problem+json"
        assert client.delete("/v1/tasks/no-such-task").status_code == 404
        # the slot serves the next task
        ok = client.post("/v1/tasks/echo", params={"wait": "true"}, json={"payload": 1})
        assert ok.status_code == 200


def test_delete_drops_a_queued_task_before_it_starts(make_stack) -> None:
    stack: Stack = make_stack()
    stack.gateway()
    worker = stack.worker(1)
    with stack.client() as client:
        busy = client.post("/v1/tasks/burn_cpu", json={"seconds": 1.5}).json()["id"]
        wait_for_event(client, busy, "running")
        queued = client.post("/v1/tasks/burn_cpu", json={"seconds": 0.2}).json()["id"]
        assert client.delete(f"/v1/tasks/{queued}").status_code == 202
        assert [e[0] for e in task_events(client, queued)] == ["queued", "cancelled"]
        assert client.get(f"/v1/tasks/{queued}").json()["state"] == "cancelled"
        # the worker gets the message once the slot is free, and drops it unstarted
        worker.wait_for_line(rf"cancelled burn_cpu {queued}: cancelled before start")
        assert [e[0] for e in task_events(client, queued)] == ["queued", "cancelled"]
        assert task_events(client, busy)[-1][0] == "succeeded"


def test_an_rpc_client_that_disconnects_cancels_its_task(make_stack) -> None:
    stack: Stack = make_stack()
    stack.gateway()
    worker = stack.worker(1)
    with stack.client() as client:
        # Given a client that gives up after 1 s on a 30 s task with a 20 s deadline
        # (without an Idempotency-Key: it will not ask again)
        with pytest.raises(httpx.ReadTimeout):
            client.post(
                "/v1/tasks/burn_cpu",
                params={"wait": "true"},
                headers={"Request-Timeout": "20"},
                json={"seconds": 30},
                timeout=1.0,
            )
        # Then the task is cancelled at once, long before its deadline
        line = worker.wait_for_line(r"cancelled burn_cpu [0-9a-f-]{36}", 5)
        task_id = line.split("cancelled burn_cpu ")[1][:36]
        assert task_events(client, task_id)[-1][0] == "cancelled"


def test_a_streaming_client_that_goes_away_cancels_after_the_grace(make_stack) -> None:
    from httpx_sse import connect_sse

    stack: Stack = make_stack(TIMEBOX_STREAM_GRACE="0.3")
    stack.gateway()
    worker = stack.worker(1)
    with stack.client() as client:
        with connect_sse(client, "POST", "/v1/tasks/burn_cpu", json={"seconds": 30}) as source:
            events = source.iter_sse()
            first = next(events)
            assert first.event == "queued"
            task_id = first.json()["task_id"]
            assert next(events).event == "running"
        # the connection is closed; nobody reconnects within the grace (a GET of its
        # events now would count as the reconnect, so the test watches the worker)
        worker.wait_for_line(rf"cancelled burn_cpu {task_id}")
        assert task_events(client, task_id)[-1][0] == "cancelled"


@contextlib.contextmanager
def _streamed(
    url: str, seconds: float
) -> Iterator[tuple[str, ServerSentEvent, Iterator[ServerSentEvent]]]:
    """A `burn_cpu` task submitted as an event stream, read up to its `running` event:
    its id, that event, and the rest of the stream (closed on leaving)."""
    from httpx_sse import connect_sse

    body = {"seconds": seconds}
    with (
        httpx.Client(base_url=url, timeout=30) as client,
        connect_sse(client, "POST", "/v1/tasks/burn_cpu", json=body) as source,
    ):
        events = source.iter_sse()
        task_id = next(events).json()["task_id"]
        running = next(events)
        assert running.event == "running"
        yield task_id, running, events


def test_a_streaming_client_back_through_another_gateway_keeps_its_task(make_stack) -> None:
    """Behind a load balancer, a streaming client that lost its connection comes back
    (with Last-Event-ID) to another gateway: the first one hears of it and does not
    cancel the task when the grace ends."""
    stack: Stack = make_stack(TIMEBOX_STREAM_GRACE="1")
    first, second = stack.gateway(), stack.gateway()
    stack.worker(1)
    with _streamed(first.url, 3) as (task_id, running, _):
        pass  # the connection drops
    with httpx.Client(base_url=second.url, timeout=30) as client:
        rest = task_events(client, task_id, last_event_id=running.id)
    assert rest[-1][0] == "succeeded", rest[-1]
    assert first.count(rf"burn_cpu {task_id} followed through another gateway") == 1


@pytest.mark.parametrize("back_on", ["same-gateway", "other-gateway"])
def test_a_streaming_client_that_comes_back_and_leaves_again_cancels_after_the_grace(
    make_stack, back_on: str
) -> None:
    """The tie between a streamed task and its client survives a reconnect: a client
    back to its events (with Last-Event-ID), on the same gateway or another, that then
    goes away for good has its task cancelled one grace later, as if it had never
    left. Before, the tie was lost at the first reconnect and the task ran on."""
    from httpx_sse import connect_sse

    stack: Stack = make_stack(TIMEBOX_STREAM_GRACE="1")
    first, second = stack.gateway(), stack.gateway()
    again = first if back_on == "same-gateway" else second
    worker = stack.worker(1)
    with _streamed(first.url, 40) as (task_id, running, _):
        pass  # the connection drops
    with httpx.Client(base_url=again.url, timeout=30) as client:
        resumed = {"Last-Event-ID": running.id}
        url = f"/v1/tasks/{task_id}/events"
        with connect_sse(client, "GET", url, headers=resumed) as source:
            # followed here for over two graces: the first gateway's check lets it be
            until = time.monotonic() + 2.5
            for event in source.iter_sse():
                assert not event.event or event.event == "progress", event
                if time.monotonic() > until:
                    break
    if again is second:
        assert first.count(rf"burn_cpu {task_id} followed through another gateway") == 1
    worker.wait_for_line(rf"cancelled burn_cpu {task_id}", 15)
    with stack.client() as client:
        status = client.get(f"/v1/tasks/{task_id}").json()
    assert status["state"] == "cancelled", status
    why = rf"cancel burn_cpu {task_id}: the streaming client disconnected"
    wait_until(lambda: first.count(why) + second.count(why) >= 1, 5, "the gateway's cancel")


def test_a_streamed_task_watched_and_left_elsewhere_stays_with_its_client(make_stack) -> None:
    """Someone else following a streamed task's events through another gateway, and
    leaving, does not cancel it while its own client still streams it."""
    stack: Stack = make_stack(TIMEBOX_STREAM_GRACE="1")
    first, second = stack.gateway(), stack.gateway()
    stack.worker(1)
    with _streamed(first.url, 4) as (task_id, _, events):
        with httpx.Client(base_url=second.url, timeout=30) as other:
            assert wait_for_event(other, task_id, "progress")["type"] == "progress"
        kinds = [event.event for event in events if event.data]
    assert kinds[-1] == "succeeded", kinds
    assert second.count(rf"burn_cpu {task_id} followed through another gateway") == 1


@pytest.mark.parametrize("read_by", ["other-gateway", "restarted-gateway"])
def test_a_streamed_task_whose_gateway_was_killed_is_cancelled_once_nobody_came_back(
    make_stack, read_by: str
) -> None:
    """A gateway killed outright says nothing more, and its streaming clients, cut off,
    may come back through another gateway or not. The task of one that does not is
    cancelled two graces later by a gateway that reads the event stream, the only
    gateway restarted included; the task of one that does is served to its end.
    Before, the first ran on to its deadline."""
    stack: Stack = make_stack(TIMEBOX_STREAM_GRACE="1")
    first = stack.gateway()
    other = stack.gateway() if read_by == "other-gateway" else None
    worker = stack.worker(2)
    with (
        _streamed(first.url, 40) as (task_id, _, _),
        _streamed(first.url, 4) as (back_id, running, _),
    ):
        first.signal(signal.SIGKILL)
        first.popen.wait(5)
    killed_at = time.monotonic()
    other = other or stack.gateway()
    with httpx.Client(base_url=other.url, timeout=30) as client:
        # followed to its end there, longer than two graces: not taken for an orphan
        rest = task_events(client, back_id, last_event_id=running.id)
        assert rest[-1][0] == "succeeded", rest[-1]
        worker.wait_for_line(rf"cancelled burn_cpu {task_id}", 20)
        assert time.monotonic() - killed_at < 15  # not its deadline, 60 s on
        wait_until(
            lambda: client.get(f"/v1/tasks/{task_id}").json()["state"] == "cancelled",
            5,
            "the cancelled event",
        )
    why = rf"cancel burn_cpu {task_id}: orphaned: no client followed its event stream"
    assert other.count(why) == 1
    assert other.count(rf"cancel burn_cpu {back_id}") == 0


def _watches_on_a_fake_clock(
    monkeypatch: pytest.MonkeyPatch, streamed: dict[str, bool | None]
) -> tuple[Any, Any, list[float]]:
    """A gateway's watches (grace 1 s, named "gateway me", no broker) on a clock that
    reads `now[0]` (from 1000.0), and its table with a queued `burn_cpu` task for each
    id of `streamed`, submitted as a stream or not."""
    from contracts.events import EventType, TaskEvent
    from gateway import watches as module
    from gateway.tasktable import TaskTable

    now = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    table = TaskTable(10)
    watches = module.Watches(SimpleNamespace(name="gateway me"), table, grace=1.0)  # type: ignore[arg-type]
    table.listeners.append(watches.observe)
    deadline_ms = int((time.time() + 60) * 1000)
    for task_id, is_streamed in streamed.items():
        queued = TaskEvent(
            type=EventType.QUEUED,
            task_id=task_id,
            task="burn_cpu",
            deadline_ms=deadline_ms,
            streamed=is_streamed,
        )
        table.apply(len(table), queued)
    return watches, table, now


def _deliver(watches: Any, sender: str, body: bytes) -> None:
    """A watch notice as it comes off the gateways exchange."""
    message = SimpleNamespace(app_id=sender, body=body)
    asyncio.run(watches._on_message(message))


def test_the_orphan_rule_counts_every_follower_and_only_time_spent_listening(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A streamed task is an orphan after two graces with no client here, no notice of
    one elsewhere, and no check of a client that left here; time not spent listening
    for notices (the broker away, or its own notices not coming back) does not count.
    Another task is one only once a
    notice said that an RPC waits for it elsewhere, and not after one said the RPC
    let it run on, or after a time not listening in which that could have been said."""
    watches, table, now = _watches_on_a_fake_clock(monkeypatch, {"s": True, "plain": None})
    record = table.get("s")
    assert record is not None

    def orphans_at(t: float, listening: bool = True, own_back: bool = True) -> list[str]:
        now[0] = 1000.0 + t
        if own_back:  # its own notice has just come back: notices get through
            _deliver(watches, "gateway me", b"{}")
        return [orphan.status.id for orphan in watches.orphans(listening)]

    assert orphans_at(0) == []
    assert orphans_at(1.9) == []
    record.watched_elsewhere = 1001.5  # another gateway's notice
    assert orphans_at(3.4) == []
    record.waiting = 1  # an RPC waits here
    assert orphans_at(3.6) == []
    record.waiting = 0
    assert orphans_at(5.5) == []
    assert orphans_at(5.7, listening=False) == []  # the broker away: the wait starts again
    assert orphans_at(6.0) == []
    # connected, but its own notices not back for a grace (a broker alarm holds every
    # gateway's): the wait starts again
    assert orphans_at(7.5, own_back=False) == []
    assert orphans_at(8.0) == []
    record.abandon_check = True  # its client left here: that check decides
    assert orphans_at(10.1) == []
    record.abandon_check = False
    assert orphans_at(10.1) == ["s"]  # and once only
    assert orphans_at(20) == []

    # An RPC's task: only after word that a client waits for it on another gateway
    from contracts.messages import WatchNotice

    def hear(t: float, **lists: list[str]) -> None:
        now[0] = 1000.0 + t
        _deliver(
            watches, "gateway other", WatchNotice(task_ids=[], **lists).model_dump_json().encode()
        )

    assert orphans_at(30) == []  # "plain": never said to be awaited
    hear(30, awaited=["plain"])
    assert orphans_at(31.9) == []
    assert orphans_at(32.0) == ["plain"]
    hear(40, awaited=["plain"])
    hear(40.5, released=["plain"])  # it answered 202: the task runs on
    assert orphans_at(50) == []
    hear(51, awaited=["plain"])
    assert orphans_at(51.5, listening=False) == []  # a `released` may have been missed
    assert orphans_at(60) == []


def test_word_of_an_awaited_rpc_heard_before_a_new_gateway_first_hears_itself_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gateway just started sweeps before its first notice can have come back: that
    is not a spell of notices lost, and what it heard meanwhile (an RPC awaited on a
    gateway that then dies) still counts once it hears itself. Before, that first sweep
    forgot it, and the RPC ran on to its deadline."""
    from contracts.messages import WatchNotice

    watches, _, now = _watches_on_a_fake_clock(monkeypatch, {"rpc": None})

    def hear(t: float, sender: str, notice: WatchNotice) -> None:
        now[0] = 1000.0 + t
        _deliver(watches, sender, notice.model_dump_json().encode())

    hear(0.2, "gateway other", WatchNotice(task_ids=[], awaited=["rpc"]))
    now[0] = 1000.5
    assert watches.orphans(True) == []  # its own first notice is not back yet
    assert watches.tied == (0, 1)
    for t in (0.51, 1.5, 2.5):  # its own notices come back: it listens from 1.0 on
        hear(t, "gateway me", WatchNotice(task_ids=[]))
        now[0] = 1000.0 + t + 0.49
        assert watches.orphans(True) == []
    now[0] = 1003.0  # two graces listening, no word of it since 0.2
    assert [record.status.id for record in watches.orphans(True)] == ["rpc"]


def _rpc_in_background(url: str, seconds: float, **headers: str) -> list[httpx.Response]:
    """A `burn_cpu` RPC sent from a thread: its answer, if it gets one, lands in the
    list returned."""
    answers: list[httpx.Response] = []

    def call() -> None:
        with contextlib.suppress(httpx.HTTPError):
            answers.append(
                httpx.post(
                    f"{url}/v1/tasks/burn_cpu",
                    json={"seconds": seconds},
                    headers={"Prefer": "wait", **headers},
                    timeout=60,
                )
            )

    threading.Thread(target=call, daemon=True).start()
    return answers


def _awaited_elsewhere(client: httpx.Client) -> float:
    return metric(client.get("/metrics").text, "timebox_gateway_tied_tasks", tie="rpc-elsewhere")


def test_an_rpc_whose_gateway_was_killed_is_cancelled_by_a_gateway_told_it_was_awaited(
    make_stack,
) -> None:
    """An RPC's client cut off by its gateway's death cannot come back (it does not
    know the task's id): another gateway, told by the notices that the RPC was waited
    for, cancels it two graces after the word stopped. Before, it ran to its deadline."""
    stack: Stack = make_stack(TIMEBOX_STREAM_GRACE="1")
    first, second = stack.gateway(), stack.gateway()
    worker = stack.worker(1)
    _rpc_in_background(first.url, 40)
    with httpx.Client(base_url=second.url, timeout=10) as client:
        wait_until(lambda: _awaited_elsewhere(client) == 1, 10, "word of the waiting RPC")
        first.signal(signal.SIGKILL)
        first.popen.wait(5)
        killed_at = time.monotonic()
        line = worker.wait_for_line(r"cancelled burn_cpu [0-9a-f-]{36}", 20)
        assert time.monotonic() - killed_at < 15  # not its deadline, 60 s on
        task_id = line.split("cancelled burn_cpu ")[1][:36]
        wait_until(
            lambda: client.get(f"/v1/tasks/{task_id}").json()["state"] == "cancelled",
            5,
            "the cancelled event",
        )
    why = rf"cancel burn_cpu {task_id}: orphaned: no client followed its RPC"
    assert second.count(why) == 1


def test_word_of_a_new_rpc_reaches_the_other_gateways_at_once_not_at_the_next_renewal(
    make_stack,
) -> None:
    """A gateway killed by a burst of requests dies soon after they came: the other
    gateways hear of each new wait within a tenth of a second, so that they can cancel
    its task. Before, word came with the next renewal, up to half a grace later (here
    10 s), and an RPC whose gateway died sooner ran to its deadline."""
    stack: Stack = make_stack(TIMEBOX_STREAM_GRACE="20")
    first, second = stack.gateway(), stack.gateway()
    stack.worker(1)
    with httpx.Client(base_url=second.url, timeout=10) as client:
        assert _awaited_elsewhere(client) == 0
        answers = _rpc_in_background(first.url, 3)
        wait_until(lambda: _awaited_elsewhere(client) == 1, 3, "word of the waiting RPC")
        assert not answers


def test_rpcs_answered_202_run_on_after_their_gateway_is_gone(make_stack) -> None:
    """An RPC that stopped waiting and got a `202` (its `Prefer: wait=N` bound passed,
    or its gateway was told to stop) is no longer tied to its client: the other
    gateways hear that it was released, and do not take it for an orphan once its
    gateway is gone."""
    stack: Stack = make_stack(TIMEBOX_STREAM_GRACE="1")
    first, second = stack.gateway(), stack.gateway()
    worker = stack.worker(2)
    bounded = _rpc_in_background(first.url, 6, Prefer="wait=2")
    waiting = _rpc_in_background(first.url, 6)
    with httpx.Client(base_url=second.url, timeout=10) as client:
        wait_until(lambda: _awaited_elsewhere(client) == 2, 10, "word of the waiting RPCs")
        wait_until(lambda: bounded, 10, "the 202 at the wait's bound")
        first.signal(signal.SIGTERM)
        wait_until(lambda: waiting, 10, "the 202 of a stopping gateway")
        wait_until(lambda: _awaited_elsewhere(client) == 0, 10, "word of the releases")
        first.signal(signal.SIGKILL)
        first.popen.wait(5)
        for answer in (bounded[0], waiting[0]):
            assert answer.status_code == 202, answer.text
            task_id = answer.json()["id"]
            # watched through the worker: a client following it here would keep it anyway
            line = worker.wait_for_line(rf"(succeeded|cancelled) burn_cpu {task_id}", 30)
            assert f"succeeded burn_cpu {task_id}" in line, line
    assert second.count("orphaned: ") == 0


def test_an_rpc_with_an_idempotency_key_whose_client_drops_may_ask_again(make_stack) -> None:
    """An RPC whose connection drops (here: the client's own timeout) and that asks
    again with the same Idempotency-Key, through the same gateway or another, gets
    its task's result: the key says it will be back, so its task waits out the grace
    instead of being cancelled at the disconnect. Nobody back: cancelled after it."""
    stack: Stack = make_stack(TIMEBOX_STREAM_GRACE="1")  # shorter than the task
    first, second = stack.gateway(), stack.gateway()
    worker = stack.worker(2)

    def dropped(key: str) -> None:
        with (
            httpx.Client(base_url=first.url, timeout=0.5) as client,
            pytest.raises(httpx.ReadTimeout),
        ):
            client.post(
                "/v1/tasks/burn_cpu",
                json={"seconds": 3},
                headers={"Prefer": "wait", "Idempotency-Key": key},
            )

    for key, again in (("same", first), ("other", second)):
        dropped(key)
        with httpx.Client(base_url=again.url, timeout=30) as client:
            answer = client.post(
                "/v1/tasks/burn_cpu",
                json={"seconds": 3},
                headers={"Prefer": "wait", "Idempotency-Key": key},
            )
        assert answer.status_code == 200, (key, answer.text)
        assert answer.json()["state"] == "succeeded"
    assert first.count("followed through another gateway") == 1
    dropped("gone")
    line = worker.wait_for_line(r"cancelled burn_cpu [0-9a-f-]{36}", 10)
    task_id = line.split("cancelled burn_cpu ")[1][:36]
    with stack.client() as client:
        status = client.get(f"/v1/tasks/{task_id}").json()
    assert status["state"] == "cancelled"


def test_a_get_subscriber_leaving_does_not_cancel_a_202_task(client: httpx.Client) -> None:
    from httpx_sse import connect_sse

    task_id = client.post("/v1/tasks/burn_cpu", json={"seconds": 0.6}).json()["id"]
    with connect_sse(client, "GET", f"/v1/tasks/{task_id}/events") as source:
        assert next(source.iter_sse()).event == "queued"
    assert task_events(client, task_id)[-1][0] == "succeeded"


def test_request_timeouts_over_the_maximum_or_not_positive_are_422(client: httpx.Client) -> None:
    for raw in ["601", "0", "-1", "nan", "inf", "soon"]:
        response = client.post(
            "/v1/tasks/echo", headers={"Request-Timeout": raw}, json={"payload": 1}
        )
        assert response.status_code == 422, raw
        assert response.json()["type"] == "/problems/invalid-timeout"


def test_healthz_stays_fast_while_every_slot_is_busy(make_stack) -> None:
    stack: Stack = make_stack()
    stack.gateway()
    stack.worker(1)
    with stack.client() as client:
        busy = client.post("/v1/tasks/burn_cpu", json={"seconds": 3, "hold_gil": True}).json()
        client.post("/v1/tasks/count_primes", json={"n": 2_000_000})
        wait_for_event(client, busy["id"], "running")
        slowest = 0.0
        for _ in range(50):
            t = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            slowest = max(slowest, time.perf_counter() - t)
        assert slowest < 0.5


def test_a_killed_worker_leaves_no_child_behind(make_stack) -> None:
    stack: Stack = make_stack()
    stack.gateway()
    worker = stack.worker(2)
    with stack.client() as client:
        task_id = client.post("/v1/tasks/burn_cpu", json={"seconds": 30}).json()["id"]
        wait_for_event(client, task_id, "running")
    children = [p for p in process_tree(worker.pid) if p != worker.pid]
    assert len(children) >= 3  # two slots and the warm spare
    worker.signal(signal.SIGKILL)
    wait_until(lambda: not any(alive(p) for p in children), 5, "the children to die")


@pytest.mark.parametrize(
    ("ignore_term", "new_session"),
    [(False, False), (True, False), (False, True)],
    ids=["task-ends", "task-ignores-sigterm", "program-in-a-session-of-its-own"],
)
def test_what_a_task_started_dies_with_it_at_the_deadline(
    client: httpx.Client, ignore_term: bool, new_session: bool
) -> None:
    """A task that runs an external program (here one that ignores SIGTERM and burns
    CPU): killing the task at its deadline kills the program too, whether the task
    ends on SIGTERM or only on SIGKILL, and whether the program stayed in the task's
    process group or left it (`start_new_session`, a daemon's `setsid`), rather than
    leaving it to burn CPU for nobody."""
    task_id = client.post(
        "/v1/tasks/spawn",
        headers={"Request-Timeout": "2"},
        json={"ignore_term": ignore_term, "new_session": new_session},
    ).json()["id"]
    events = task_events(client, task_id)
    said = next(data["message"] for kind, data, _ in events if kind == "progress")
    assert isinstance(said, str)
    burner = int(said.split()[1])
    try:
        assert events[-1][0] == "aborted"
        wait_until(lambda: not alive(burner), 5, "the task's own process to die")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(burner, signal.SIGKILL)


@pytest.mark.parametrize("new_session", [False, True], ids=["in-its-group", "own-session"])
def test_what_a_task_started_dies_with_its_worker_even_a_sigkilled_one(
    make_stack, new_session: bool
) -> None:
    """A worker killed outright (SIGKILL, the OOM killer) takes its fork server and its
    tasks with it, and the programs those tasks started too (in the task's process
    group or not): they would be orphaned to init and burn CPU for nobody."""
    stack: Stack = make_stack()
    stack.gateway()
    worker = stack.worker(1)
    with stack.client() as client:
        created = client.post(
            "/v1/tasks/spawn",
            headers={"Request-Timeout": "30"},
            json={"new_session": new_session},
        )
        said = wait_for_event(client, created.json()["id"], "progress")["message"]
    assert isinstance(said, str)
    burner = int(said.split()[1])
    try:
        worker.signal(signal.SIGKILL)
        wait_until(lambda: not alive(burner), 5, "the task's own process to die")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(burner, signal.SIGKILL)


def test_the_worker_refuses_a_max_timeout_not_below_the_consumer_timeout() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "compute"],
        env={
            **os.environ,
            "TIMEBOX_MAX_TIMEOUT": "1800",
            "TIMEBOX_BROKER_CONSUMER_TIMEOUT": "1800",
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "consumer timeout" in result.stderr


def test_programs_refuse_invalid_settings_with_a_clear_message() -> None:
    for module, env in [
        ("gateway", {"TIMEBOX_DEFAULT_TIMEOUT": "-1"}),
        ("compute", {"TIMEBOX_KILL_GRACE": "soon"}),
        ("gateway", {"TIMEBOX_AMQP_URL": "amqp://guest:guest@broker.example:5672/"}),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", module],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode != 0
        assert "invalid settings" in result.stderr


def test_a_message_dead_lettered_for_another_reason_fails_and_is_parked(make_stack) -> None:
    stack: Stack = make_stack()
    stack.gateway()
    stack.busy_worker("echo")  # the test plays a consumer that rejects
    with stack.client() as client:
        task_id = client.post("/v1/tasks/echo", json={"payload": "x"}).json()["id"]

        async def reject_one() -> None:
            connection = await aio_pika.connect(stack.amqp_url)
            async with connection:
                channel = await connection.channel()
                queue = await channel.get_queue(f"{stack.namespace}.tasks.echo", ensure=False)
                message = await queue.get(timeout=5)
                assert message is not None
                await message.reject(requeue=False)

        asyncio.run(reject_one())
        events = task_events(client, task_id)
        assert events[-1][0] == "failed"
        assert "rejected" in events[-1][1]["reason"]

        async def parked() -> aio_pika.abc.AbstractIncomingMessage | None:
            connection = await aio_pika.connect(stack.amqp_url)
            async with connection:
                channel = await connection.channel()
                queue = await channel.get_queue(f"{stack.namespace}.parked", ensure=False)
                message = await queue.get(timeout=5, fail=False)
                return message

        message = asyncio.run(parked())
        assert message is not None
        assert message.message_id == task_id
        assert "rejected" in str(message.headers["x-park-reason"])


def _hammer_health(url: str, stop: threading.Event, worst: list[float]) -> None:
    with httpx.Client(base_url=url, timeout=10) as c:
        while not stop.is_set():
            t = time.perf_counter()
            c.get("/healthz").raise_for_status()
            worst[0] = max(worst[0], time.perf_counter() - t)
            stop.wait(0.05)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("admission", ["false", "true"], ids=["kill-layer-only", "admission"])
def test_the_classic_scenario_no_task_runs_past_its_deadline(make_stack, admission: str) -> None:
    """Clients with a fixed 3 s timeout call tasks of random length (0.05 to 6 s) over two
    workers: nothing runs past its deadline, each early stop is logged, and the server
    answers throughout. Without admission every long task must be killed; with it, the
    gateway and workers refuse what cannot finish once they have learned run times."""
    import random

    stack: Stack = make_stack(
        TIMEBOX_ADMISSION=admission, TIMEBOX_START_ONLY_IF_FINISHABLE=admission
    )
    stack.gateway()
    workers = [stack.worker(1), stack.worker(1)]
    rng = random.Random(42)
    lengths = [round(rng.uniform(0.05, 6.0), 3) for _ in range(24)]
    results: list[tuple[float, httpx.Response]] = []
    lock = threading.Lock()

    def client_loop(mine: list[float]) -> None:
        with stack.client(timeout=3.5) as c:
            for seconds in mine:
                r = c.post(
                    "/v1/tasks/burn_cpu",
                    headers={"Request-Timeout": "3", "Prefer": "wait"},
                    json={"seconds": seconds},
                )
                with lock:
                    results.append((seconds, r))

    stop, worst = threading.Event(), [0.0]
    health = threading.Thread(target=_hammer_health, args=(stack.url, stop, worst))
    health.start()
    threads = [threading.Thread(target=client_loop, args=(lengths[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    health.join()

    assert len(results) == len(lengths)
    aborted = expired = 0
    with stack.client() as c:
        for seconds, r in results:
            assert r.status_code in (200, 504, 422, 503), r.text
            if r.status_code in (422, 503):
                assert admission == "true"
                assert seconds > 1.0  # only long tasks, or ones behind a backlog, are refused
                continue
            status = r.json() if r.status_code == 200 else r.json()["task"]
            if r.status_code == 200:
                assert seconds < 3
                continue
            final = task_events(c, status["id"])[-1]
            assert final[0] in ("aborted", "expired")
            if final[0] == "aborted":
                aborted += 1
                assert final[1]["late_by"] <= 0.05
                log_lines = sum(w.count(rf"aborted burn_cpu {status['id']}") for w in workers)
                assert log_lines == 1
            else:
                expired += 1
    if admission == "false":
        assert aborted >= 3
    assert worst[0] < 0.5, f"/healthz took {worst[0]:.3f} s at worst"
