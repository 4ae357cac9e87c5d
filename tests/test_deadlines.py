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

import aio_pika
import httpx
import pytest
from httpx_sse import ServerSentEvent

from tests.conftest import Stack
from tests.harness import (
    alive,
    messages_ready,
    presence_told,
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
    assert messages_ready(stack.amqp_url, f"{stack.namespace}.tasks.default") == 0


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
    (with Last-Event-ID) to another gateway within the grace: that gateway speaks for
    it, and the task runs to its end."""
    stack: Stack = make_stack(TIMEBOX_STREAM_GRACE="1")
    first, second = stack.gateway(), stack.gateway()
    worker = stack.worker(1)
    with _streamed(first.url, 3) as (task_id, running, _):
        pass  # the connection drops
    with httpx.Client(base_url=second.url, timeout=30) as client:
        rest = task_events(client, task_id, last_event_id=running.id)
    assert rest[-1][0] == "succeeded", rest[-1]
    assert worker.count(rf"cancelled burn_cpu {task_id}") == 0


@pytest.mark.parametrize("back_on", ["same-gateway", "other-gateway"])
def test_a_streaming_client_that_comes_back_and_leaves_again_cancels_after_the_grace(
    make_stack, back_on: str
) -> None:
    """The tie between a streamed task and its client survives a reconnect: a client
    back to its events (with Last-Event-ID), on the same gateway or another, that then
    goes away for good has its task cancelled one grace later, as if it had never
    left."""
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
            # followed there for over two graces: kept all along
            until = time.monotonic() + 2.5
            for event in source.iter_sse():
                assert not event.event or event.event == "progress", event
                if time.monotonic() > until:
                    break
        left = time.monotonic()
    line = worker.wait_for_line(rf"cancelled burn_cpu {task_id}", 15)
    assert "its client is gone" in line
    assert time.monotonic() - left < 3  # a grace, and the half grace of the last word
    with stack.client() as client:
        status = client.get(f"/v1/tasks/{task_id}").json()
    assert status["state"] == "cancelled", status


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


def test_the_only_gateway_killed_mid_rpc_stops_its_running_tasks_and_its_queued_never_start(
    make_stack,
) -> None:
    """With one gateway (as compose runs it) killed outright, nobody is left to cancel
    anything: the workers hold each RPC's and stream's task to its client's presence,
    which its gateway no longer vouches for. The running ones are stopped within two
    graces; the queued ones never start. A task answered `202` is no client's: it
    runs on."""
    stack: Stack = make_stack(TIMEBOX_STREAM_GRACE="1")
    gateway = stack.gateway()
    worker = stack.worker(1)
    with stack.client() as client:
        plain = client.post("/v1/tasks/burn_cpu", json={"seconds": 2.5}).json()["id"]
    # the stream starts once the 202 task has run; two RPCs queue behind it
    with _streamed(gateway.url, 40) as (streamed, _, _):
        _rpc_in_background(gateway.url, 40)
        _rpc_in_background(gateway.url, 40)
        presence_told(stack.amqp_url, stack.namespace, tasks=3)  # the last word of them
        gateway.signal(signal.SIGKILL)
        gateway.popen.wait(5)
    killed_at = time.monotonic()
    assert "succeeded burn_cpu " + plain in worker.wait_for_line(rf"burn_cpu {plain}", 15)
    worker.wait_for_line(rf"cancelled burn_cpu {streamed}: its client is gone", 10)
    assert time.monotonic() - killed_at < 2 * 1 + 1  # two graces, and a second of slack
    wait_until(
        lambda: worker.count(r"cancelled burn_cpu \S+: its client is gone.*not started") == 2,
        10,
        "the queued RPCs dropped",
    )
    # nothing of theirs ran after: the only ones started were the 202 task and the stream
    assert worker.count(r"(succeeded|aborted) burn_cpu") == 1


def test_rpcs_answered_202_run_on_after_their_gateway_is_gone(make_stack) -> None:
    """An RPC that stopped waiting and got a `202` (its `Prefer: wait=N` bound passed,
    or its gateway was told to stop) is no longer tied to its client: the workers were
    told before the client was, and do not cancel it once its gateway is gone."""
    stack: Stack = make_stack(TIMEBOX_STREAM_GRACE="1")
    first = stack.gateway()
    worker = stack.worker(2)
    bounded = _rpc_in_background(first.url, 6, Prefer="wait=1")
    waiting = _rpc_in_background(first.url, 6)
    wait_until(lambda: bounded, 10, "the 202 at the wait's bound")
    first.signal(signal.SIGTERM)
    wait_until(lambda: waiting, 10, "the 202 of a stopping gateway")
    first.signal(signal.SIGKILL)
    first.popen.wait(5)
    for answer in (bounded[0], waiting[0]):
        assert answer.status_code == 202, answer.text
        task_id = answer.json()["id"]
        line = worker.wait_for_line(rf"(succeeded|cancelled) burn_cpu {task_id}", 30)
        assert f"succeeded burn_cpu {task_id}" in line, line


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
    dropped("gone")
    line = worker.wait_for_line(r"cancelled burn_cpu [0-9a-f-]{36}", 10)
    assert "its client is gone" in line
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
                queue = await channel.get_queue(f"{stack.namespace}.tasks.default", ensure=False)
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
                # only long tasks are refused, or ones behind the slots' work: a short one
                # that would start too late behind long runs under way is refused at once
                ahead = r.json().get("estimate", {})
                behind = ahead.get("queued_ahead", 0) + ahead.get("running", 0)
                assert seconds > 1.0 or behind >= ahead.get("parallel_slots", 1), r.text
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
