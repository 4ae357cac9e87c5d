"""Faults: lose nothing across worker, child, broker and gateway failures. After each
fault an invariant checker counts tasks lost, duplicated terminal events and tasks
that never ended."""

import asyncio
import contextlib
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import httpx
import pytest
from httpx_sse import connect_sse

from tests import invariants
from tests.conftest import LOCAL_AMQP_URL, Stack
from tests.harness import (
    Gateway,
    Proc,
    Worker,
    alive,
    events_read,
    free_port,
    process_tree,
    queued_task,
    task_events,
    wait_for_event,
    wait_until,
)
from tests.proxy import Proxy, gateway_through_proxy, url_to_port

pytestmark = pytest.mark.timeout(120)


def assert_clean(stack: Stack, client: httpx.Client, task_ids: list[str]) -> invariants.Tally:
    tally = invariants.check(client, task_ids, stack.amqp_url, stack.namespace)
    print(f"invariants: {tally}")
    assert tally.clean, tally
    return tally


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_a_worker_killed_mid_task_is_redelivered_and_finished_by_another(
    make_stack, queue_type: str
) -> None:
    """Either type of task queue: a classic one has no delivery count, the attempt is
    still the second."""
    stack: Stack = make_stack(TIMEBOX_TASK_QUEUE_TYPE=queue_type)
    stack.gateway()
    workers = [stack.worker(1), stack.worker(1)]
    with stack.client() as client:
        task_id = client.post(
            "/v1/tasks/burn_cpu", headers={"Request-Timeout": "30"}, json={"seconds": 1.5}
        ).json()["id"]
        running = wait_for_event(client, task_id, "running")
        victim = next(w for w in workers if running["worker"].endswith(f":{w.pid}"))
        children = [p for p in process_tree(victim.pid) if p != victim.pid]
        victim.signal(signal.SIGKILL)
        wait_until(lambda: not any(alive(p) for p in children), 5, "the killed worker's children")
        events = task_events(client, task_id)
        runs = [e for e in events if e[0] == "running"]
        assert len(runs) == 2
        assert runs[1][1]["attempt"] == 2
        assert runs[1][1]["worker"] != running["worker"]
        assert events[-1][0] == "succeeded"
        assert client.get(f"/v1/tasks/{task_id}").json()["attempts"] == 2
        assert_clean(stack, client, [task_id])


def test_a_redelivered_task_past_its_deadline_ends_expired(make_stack) -> None:
    stack: Stack = make_stack(TIMEBOX_ADMISSION="false")
    stack.gateway()
    first = stack.worker(1)
    with stack.client() as client:
        task_id = client.post(
            "/v1/tasks/burn_cpu", headers={"Request-Timeout": "1.5"}, json={"seconds": 1}
        ).json()["id"]
        wait_for_event(client, task_id, "running")
        first.signal(signal.SIGKILL)
        events = task_events(client, task_id)  # the broker keeps it; nobody can run it in time
        assert events[-1][0] == "expired"
        assert_clean(stack, client, [task_id])


@pytest.mark.parametrize("how", ["kill", "segfault", "exit"])
def test_a_crashed_child_fails_its_task_and_the_worker_serves_on(session_stack, how) -> None:
    with session_stack.client() as client:
        response = client.post("/v1/tasks/crash", params={"wait": "true"}, json={"how": how})
        assert response.status_code == 500
        task = response.json()["task"]
        assert task["state"] == "failed"
        assert task["reason"] == "worker process crashed"
        ok = client.post("/v1/tasks/echo", params={"wait": "true"}, json={"payload": how})
        assert ok.status_code == 200


def test_a_poison_message_is_parked_after_the_delivery_limit(make_stack) -> None:
    stack: Stack = make_stack(TIMEBOX_DELIVERY_LIMIT="2")
    stack.gateway()
    stack.busy_worker("kill_parent", "echo")  # the gateway takes them before any worker runs
    with stack.client() as client:
        poison = client.post("/v1/tasks/kill_parent", json={}).json()["id"]
        others = [client.post("/v1/tasks/echo", json={"payload": i}).json()["id"] for i in range(3)]
        deaths = started = 0

        def parked() -> bool:
            return bool(client.get(f"/v1/tasks/{poison}").json()["state"] == "failed")

        while not parked() and started < 6:
            # each worker dies on the poison (maybe before it says ready), until the broker
            # parks the message (the last one started may find it parked already)
            worker = Worker(f"doomed{started}", stack.env, stack.log_dir, 1)
            stack.workers.append(worker)  # stopped by the fixture should the test fail
            started += 1
            wait_until(lambda w=worker: w.popen.poll() is not None or parked(), 30, "a death")
            deaths += worker.popen.poll() is not None
            worker.stop()
        status = client.get(f"/v1/tasks/{poison}").json()
        assert status["state"] == "failed"
        assert "delivery_limit" in status["reason"]
        assert deaths in (2, 3)
        stack.worker(1)
        for task_id in others:
            assert task_events(client, task_id)[-1][0] == "succeeded"
        assert_clean(stack, client, [poison, *others])


def _local_broker(amqp_url: str) -> bool:
    return amqp_url == LOCAL_AMQP_URL and shutil.which("rabbitmqctl") is not None


def test_the_broker_closing_every_connection_loses_nothing(make_stack, amqp_url) -> None:
    if not _local_broker(amqp_url):
        pytest.skip("needs the local broker and rabbitmqctl")
    stack: Stack = make_stack()
    gateway = stack.gateway()
    worker = stack.worker(2)
    with stack.client() as client:
        ids = [
            client.post("/v1/tasks/burn_cpu", json={"seconds": 0.3}).json()["id"] for _ in range(12)
        ]
        watched = ids[-1]
        seen: list[str] = []
        done = threading.Event()

        def watch() -> None:  # an SSE subscriber that stays connected across the outage
            with (
                stack.client(timeout=60) as c,
                connect_sse(c, "GET", f"/v1/tasks/{watched}/events") as source,
            ):
                seen.extend(e.event for e in source.iter_sse() if e.data)
            done.set()

        watcher = threading.Thread(target=watch)
        watcher.start()
        wait_for_event(client, ids[0], "running")
        started = time.monotonic()
        subprocess.run(
            ["rabbitmqctl", "close_all_connections", "timebox fault test"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        # a POST during the outage is refused fast, never left hanging
        during = client.post("/v1/tasks/echo", json={"payload": 1}, timeout=10)
        assert during.status_code in (202, 503)
        if during.status_code == 202:
            ids.append(during.json()["id"])
        wait_until(lambda: client.get("/readyz").status_code == 200, 30, "readiness")
        recovery = time.monotonic() - started
        print(f"recovered in {recovery:.3f} s")
        after = client.post("/v1/tasks/echo", params={"wait": "true"}, json={"payload": 2})
        assert after.status_code == 200
        ids.append(after.json()["id"])
        for task_id in ids:
            assert task_events(client, task_id)[-1][0] in ("succeeded", "expired")
        assert done.wait(30)
        watcher.join()
        assert seen[-1] == "succeeded"
        assert_clean(stack, client, ids)
    for program in (gateway, worker):  # each loss its own line, no traceback
        assert program.count("Traceback") == 0, program.name


def test_a_client_resumes_on_another_gateway_with_no_gap_and_no_duplicate(make_stack) -> None:
    stack: Stack = make_stack()
    first = stack.gateway()
    second = stack.gateway()
    stack.worker(1)
    with (
        httpx.Client(base_url=first.url, timeout=30) as a,
        httpx.Client(base_url=second.url, timeout=30) as b,
    ):
        task_id = a.post("/v1/tasks/burn_cpu", json={"seconds": 1.5}).json()["id"]
        got = []
        with connect_sse(a, "GET", f"/v1/tasks/{task_id}/events") as source:
            for e in source.iter_sse():
                got.append((e.event, e.id))
                if e.event == "progress":
                    break
        first.signal(signal.SIGKILL)
        with connect_sse(
            b, "GET", f"/v1/tasks/{task_id}/events", headers={"Last-Event-ID": got[-1][1]}
        ) as source:
            got.extend((e.event, e.id) for e in source.iter_sse() if e.data)
        everything = [(e[0], e[2]) for e in task_events(b, task_id)]
        assert got == everything
        again = b.get(f"/v1/tasks/{task_id}/events", headers={"Last-Event-ID": got[-1][1]})
        assert again.status_code == 204


def test_a_partition_between_gateway_and_broker_is_noticed_and_heals(make_stack, amqp_url):
    stack: Stack = make_stack(TIMEBOX_HEARTBEAT="2")
    with gateway_through_proxy(stack, amqp_url) as (gateway, proxy):
        stack.worker(1)
        with stack.client() as client:
            before = client.post("/v1/tasks/echo", params={"wait": "true"}, json={"payload": 0})
            assert before.status_code == 200
            proxy.cut()
            cut_at = time.monotonic()
            wait_until(lambda: client.get("/readyz").status_code == 503, 15, "not ready")
            noticed = time.monotonic() - cut_at
            print(f"partition noticed after {noticed:.2f} s (heartbeat 2 s)")
            t = time.monotonic()
            refused = client.post("/v1/tasks/echo", json={"payload": 1})
            assert refused.status_code == 503
            assert time.monotonic() - t < 1.0
            assert "Retry-After" in refused.headers
            proxy.heal()
            wait_until(lambda: client.get("/readyz").status_code == 200, 30, "ready again")
            after = client.post("/v1/tasks/echo", params={"wait": "true"}, json={"payload": 2})
            assert after.status_code == 200
            gateway.wait_for_line("reconnected to RabbitMQ")
            assert_clean(stack, client, [before.json()["id"], after.json()["id"]])


def echo_rpc(client: httpx.Client, payload: int) -> str:
    """An RPC `echo` that must succeed; its task id."""
    r = client.post("/v1/tasks/echo", params={"wait": "true"}, json={"payload": payload})
    assert r.status_code == 200
    return str(r.json()["id"])


def test_a_gateway_that_reconnects_reads_the_event_stream_on_from_where_it_was(
    make_stack, amqp_url
) -> None:
    """Not from the start of the retention window again: with an hour of events there,
    that would keep the gateway's core busy for minutes after every reconnect."""
    stack: Stack = make_stack()
    with gateway_through_proxy(stack, amqp_url) as (gateway, proxy):
        stack.worker(1)
        with stack.client() as client:
            ids = [echo_rpc(client, i) for i in range(10)]
            before = events_read(client)
            assert before >= 20  # queued and succeeded: an echo is too short to say running
            lines = len(gateway.lines)
            proxy.drop()
            gateway.wait_for_line("reconnected to RabbitMQ", 30, start=lines)
            gateway.wait_for_line("reading the event stream again", 30, start=lines)
            # one line for each connection's loss: publishing, and reading the stream
            assert gateway.count("lost the connection") == 1
            assert gateway.count("stopped reading the event stream") == 1
            assert gateway.count("ERROR|Traceback") == 0  # nor aiormq's, for the reset
            wait_until(lambda: client.get("/readyz").status_code == 200, 30, "ready again")
            ids.append(echo_rpc(client, 10))
            read = events_read(client) - before
            assert 2 <= read < 10, read  # the new task's events, not the twenty before again
            assert_clean(stack, client, ids)


def test_a_cancel_for_a_client_gone_while_the_gateway_cannot_publish_is_sent_once_it_can(
    make_stack, amqp_url
) -> None:
    """An RPC client goes away while the gateway's publishing connection is down: the
    cancel is retried until the broker takes it, not dropped with a warning while the
    task burns CPU for nobody until its deadline (or, here, a long grace)."""
    import socket

    stack: Stack = make_stack(TIMEBOX_STREAM_GRACE="30")
    with gateway_through_proxy(stack, amqp_url) as (gateway, proxy):
        worker = stack.worker(1)
        with stack.client() as client:
            body = b'{"seconds": 30}'
            rpc = socket.create_connection(("127.0.0.1", gateway.port))
            rpc.sendall(
                b"POST /v1/tasks/burn_cpu?wait=true HTTP/1.1\r\nHost: x\r\n"
                + b"Request-Timeout: 60\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            task_id = queued_task(stack.amqp_url, stack.namespace, "burn_cpu")
            wait_for_event(client, task_id, "running")
            proxy.refusing = True
            proxy.drop(0)  # the publishing connection
            wait_until(lambda: client.get("/readyz").status_code == 503, 10, "not ready")
            rpc.close()  # the client goes away
            gateway.wait_for_line(f"publishing the cancel of task {task_id} failed", 15)
            proxy.refusing = False
            line = worker.wait_for_line(f"cancelled burn_cpu {task_id}", 20)
            assert "cancelled while running" in line  # by the cancel, not the grace
            assert task_events(client, task_id)[-1][0] == "cancelled"
            assert_clean(stack, client, [task_id])


def _close_connection(name: str) -> None:
    """Closes the connection of that name at the broker, as an operator can from the
    management UI."""
    listed = subprocess.run(
        ["rabbitmqctl", "list_connections", "pid", "client_properties", "-q"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    named = f'{{"connection_name","{name}"}}'  # as rabbitmqctl prints client properties
    pids = [line.split("\t")[0] for line in listed.splitlines() if named in line]
    assert len(pids) == 1, (named, listed)
    subprocess.run(
        ["rabbitmqctl", "close_connection", pids[0], "timebox fault test"],
        check=True,
        capture_output=True,
        timeout=30,
    )


def test_a_gateway_whose_stream_connection_is_closed_reads_on_from_where_it_was(
    make_stack, amqp_url
) -> None:
    """The gateway reads the event stream on a connection of its own, and restores that
    consumer itself: its publishing connection stays up meanwhile."""
    if not _local_broker(amqp_url):
        pytest.skip("needs the local broker and rabbitmqctl")
    stack: Stack = make_stack()
    gateway = stack.gateway()
    stack.worker(1)
    name = re.search(r"(gateway \w+) ready on namespace", gateway.wait_for_line("ready on"))
    assert name is not None
    with stack.client() as client:
        ids = [echo_rpc(client, i) for i in range(5)]
        before = events_read(client)
        lines = len(gateway.lines)
        _close_connection(f"{name[1]} events")
        gateway.wait_for_line("stopped reading the event stream", 30, start=lines)
        gateway.wait_for_line("reading the event stream again", 30, start=lines)
        wait_until(lambda: client.get("/readyz").status_code == 200, 30, "ready again")
        ids.append(echo_rpc(client, 5))
        assert 2 <= events_read(client) - before < 10  # not the ten before again
        assert gateway.count("lost the connection") == 0  # the publishing one stayed up
        # one line for the loss: not aiormq's ERROR and traceback besides
        assert gateway.count("stopped reading the event stream") == 1
        assert gateway.count("ERROR|Traceback") == 0
        assert_clean(stack, client, ids)


def _tasks_known(client: httpx.Client) -> float:
    found = re.search(r"^timebox_tasks_known (\S+)$", client.get("/metrics").text, re.M)
    assert found is not None
    return float(found[1])


def test_a_gateway_that_cannot_publish_refuses_at_once_and_leaves_nothing_behind(
    make_stack, amqp_url
) -> None:
    """Its publishing connection is down, its reading one up: a task is refused before
    anything is recorded or sent, so there is nothing to undo and nothing to log."""
    stack: Stack = make_stack()
    with gateway_through_proxy(stack, amqp_url) as (gateway, proxy):
        stack.worker(1)
        with stack.client() as client:
            ids = [echo_rpc(client, 0)]
            known = _tasks_known(client)
            proxy.refusing = True  # it cannot reconnect until the end
            proxy.drop(0)  # the first connection a gateway opens: the publishing one
            wait_until(lambda: client.get("/readyz").status_code == 503, 10, "not ready")
            refused = client.post("/v1/tasks/echo", json={"payload": 1})
            assert refused.status_code == 503
            assert refused.json()["detail"] == "not connected to RabbitMQ; retry shortly"
            assert _tasks_known(client) == known
            gateway.wait_for_line("Connection attempt .* failed", 30)  # refused: not a loss
            proxy.refusing = False
            gateway.wait_for_line("reconnected to RabbitMQ", 30)
            assert gateway.count("lost the connection") == 1
            wait_until(lambda: client.get("/readyz").status_code == 200, 30, "ready again")
            ids.append(echo_rpc(client, 2))
            assert gateway.count("stopped reading the event stream") == 0
            assert gateway.count("ERROR|Traceback") == 0
            assert_clean(stack, client, ids)


def test_programs_started_before_the_broker_answers_serve_and_connect_once_it_does(
    make_stack, amqp_url
) -> None:
    """A gateway and a worker started while nothing listens on the broker's port (a
    machine booting, RabbitMQ restarting): the gateway answers at once (alive, not
    ready, tasks refused with 503), both say once what they wait for, and both
    connect when the broker comes, without a restart."""
    stack: Stack = make_stack()
    port = free_port()  # nothing listens here yet: connections are refused
    early = {**stack.env, "TIMEBOX_AMQP_URL": url_to_port(amqp_url, port)}
    gateway = Gateway("gateway-early", early, stack.log_dir)
    stack.gateways.append(gateway)
    worker = Worker("worker-early", early, stack.log_dir, 1)
    stack.workers.append(worker)
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        gateway.wait_for_line("Uvicorn running", 20)
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["detail"] == "not connected to RabbitMQ"
        refused = client.post("/v1/tasks/echo", json={"payload": 1})
        assert refused.status_code == 503
        assert refused.headers["content-type"] == "application/problem+json"
        assert "Retry-After" in refused.headers
        unknown = client.get(f"/v1/tasks/{uuid.uuid4()}")
        assert unknown.status_code == 503
        assert "has not read the event stream yet" in unknown.json()["detail"]
        for program in (gateway, worker):
            program.wait_for_line("Connection attempt .* Connection refused", 20)
        proxy = Proxy(urlsplit(amqp_url).port or 5672, listen_port=port)  # the broker is up
        try:
            gateway.wait_ready(30)
            worker.wait_ready(30)
            ids = [echo_rpc(client, 1)]
            for program in (gateway, worker):
                assert program.count("Connection attempt") == 1  # not one a second
                assert program.count("ERROR|Traceback") == 0
            assert_clean(stack, client, ids)
        finally:
            stack.stop()
            proxy.close()


def test_a_worker_waiting_for_the_broker_stops_at_once_when_told(make_stack, amqp_url) -> None:
    stack: Stack = make_stack()
    env = {**stack.env, "TIMEBOX_AMQP_URL": url_to_port(amqp_url, free_port())}
    worker = Worker("worker-waiting", env, stack.log_dir, 1)
    stack.workers.append(worker)
    worker.wait_for_line("Connection attempt .* failed", 20)
    assert worker.stop(timeout=5) == 0
    assert worker.count("stopped before RabbitMQ answered") == 1
    assert worker.count("ERROR|Traceback") == 0


@pytest.mark.parametrize("program", ["gateway", "worker"])
def test_a_program_that_cannot_start_for_another_reason_exits_with_it(
    make_stack, program: str
) -> None:
    """A task queue declared with other arguments than ours (an operator's leftover, a
    changed setting): the program cannot serve it, and says so once and exits, rather
    than staying up unready for good or ending in a bare traceback."""
    stack: Stack = make_stack()

    async def classic_queue() -> None:
        connection = await aio_pika.connect(stack.amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(f"{stack.namespace}.tasks.default", durable=True)

    asyncio.run(classic_queue())
    misfit: Proc
    if program == "gateway":
        misfit = Gateway("gateway-misfit", stack.env, stack.log_dir)
        stack.gateways.append(misfit)
    else:
        misfit = Worker("worker-misfit", stack.env, stack.log_dir, 1)
        stack.workers.append(misfit)
    assert misfit.popen.wait(30) == 1
    misfit.stop()
    assert misfit.count(rf"timebox-{program}: cannot start: .*PRECONDITION_FAILED") == 1
    assert misfit.count(r"ERROR timebox\.\w+: cannot start") == 1  # its traceback, once


@contextlib.contextmanager
def _memory_alarm(amqp_url: str) -> Iterator[None]:
    """RabbitMQ's memory alarm, raised and then cleared: meanwhile it reads nothing
    from a connection that publishes, and takes what it holds once the alarm ends.
    Entered once a probe's publish goes unconfirmed: the alarm reaches each connection
    a moment after rabbitmqctl returns."""

    def ctl(*args: str) -> str:
        done = subprocess.run(
            ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=30
        )
        return done.stdout.strip()

    async def probe() -> aio_pika.abc.AbstractConnection:
        connection = await aio_pika.connect(amqp_url)
        channel = await connection.channel(publisher_confirms=True)
        while True:  # an unroutable message: confirmed at once, unless the alarm holds it
            try:
                await channel.default_exchange.publish(aio_pika.Message(b""), "none", timeout=0.5)
            except TimeoutError:
                return connection

    was = ctl("eval", "vm_memory_monitor:get_vm_memory_high_watermark().")
    absolute = re.fullmatch(r"\{absolute,(\d+)\}", was)
    loop = asyncio.new_event_loop()
    connection: aio_pika.abc.AbstractConnection | None = None
    ctl("set_vm_memory_high_watermark", "absolute", "1")
    try:
        connection = loop.run_until_complete(asyncio.wait_for(probe(), 15))
        yield
    finally:
        ctl("set_vm_memory_high_watermark", *(["absolute", absolute[1]] if absolute else [was]))
        if connection is not None:
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.wait_for(connection.close(), 5))
        loop.close()


def _alarm_stack(make_stack: Any, amqp_url: str) -> tuple[Stack, Gateway, Worker]:
    """A gateway that waits 1 s for a confirm and a worker of one slot, on the local
    broker, whose memory alarm the test raises."""
    if not _local_broker(amqp_url):
        pytest.skip("needs the local broker and rabbitmqctl")
    stack: Stack = make_stack()
    return stack, stack.gateway(TIMEBOX_PUBLISH_TIMEOUT="1"), stack.worker(1)


def test_a_task_whose_publish_is_not_confirmed_is_refused_and_never_runs(
    make_stack, amqp_url
) -> None:
    """No confirm within the publish timeout: the client hears 503, though the broker
    may take the task later (here: when the alarm ends). The gateway cancels it and
    announces it rejected, each retried until the broker confirms it."""
    stack, gateway, worker = _alarm_stack(make_stack, amqp_url)
    with stack.client() as client:
        ids = [echo_rpc(client, 0)]
        with _memory_alarm(stack.amqp_url):
            refused = client.post(
                "/v1/tasks/burn_cpu",
                headers={"Request-Timeout": "30"},
                json={"seconds": 1.0},
                timeout=15,
            )
            assert refused.status_code == 503, refused.text
            gateway.wait_for_line("publishing the rejected event of task .* failed", 15)
        line = gateway.wait_for_line("published the rejected event of task (\\S+) after", 30)
        task_id = line.split("rejected event of task ")[1].split()[0]
        gateway.wait_for_line(f"published the cancel of refused task {task_id}", 30)
        worker.wait_for_line(f"cancelled burn_cpu {task_id}", 30)
        ids.append(echo_rpc(client, 1))
        assert client.get(f"/v1/tasks/{task_id}").json()["state"] == "rejected"
        published = asyncio.run(invariants.raw_events(stack.amqp_url, stack.namespace))
        assert "succeeded" not in [e["type"] for e in published if e["task_id"] == task_id]
        assert gateway.count("Traceback") == 0
        assert_clean(stack, client, ids)


def test_a_cancel_whose_publish_is_not_confirmed_is_finished_by_the_gateway(
    make_stack, amqp_url
) -> None:
    """A queued task's cancel tells the workers to drop it without a word, so its
    `cancelled` event must follow even when the cancel's confirm did not come: the
    DELETE is accepted, and the gateway retries both until the broker confirms them."""
    stack, gateway, worker = _alarm_stack(make_stack, amqp_url)
    with stack.client() as client:
        timeout = {"Request-Timeout": "60"}
        busy = client.post("/v1/tasks/burn_cpu", headers=timeout, json={"seconds": 6.0})
        wait_for_event(client, busy.json()["id"], "running")
        task_id = client.post("/v1/tasks/echo", headers=timeout, json={"payload": 1}).json()["id"]
        with _memory_alarm(stack.amqp_url):
            assert client.delete(f"/v1/tasks/{task_id}", timeout=15).status_code == 202
            gateway.wait_for_line(f"publishing the cancel of task {task_id} failed", 15)
        gateway.wait_for_line(f"published the cancel of task {task_id} after", 30)
        assert wait_for_event(client, task_id, "cancelled")
        worker.wait_for_line(f"cancelled echo {task_id}: cancelled before start", 30)
        assert task_events(client, busy.json()["id"])[-1][0] == "succeeded"
        assert gateway.count("Traceback") == 0
        assert_clean(stack, client, [busy.json()["id"], task_id])


def test_a_broker_alarm_longer_than_two_graces_leaves_every_followed_task_alone(
    make_stack, amqp_url
) -> None:
    """During a memory alarm no gateway's word of its clients gets through, and the
    worker's own round trip does not either: it takes the silence for its own deafness,
    not for the client's absence, and cancels nothing. Otherwise it would cancel the
    streamed task a client still follows once the alarm had lasted a grace."""
    if not _local_broker(amqp_url):
        pytest.skip("needs the local broker and rabbitmqctl")
    stack: Stack = make_stack(TIMEBOX_STREAM_GRACE="1")
    stack.gateway()
    worker = stack.worker(1)
    # long enough to run on after the alarm: the worker then hears the broker again
    with (
        stack.client() as client,
        connect_sse(client, "POST", "/v1/tasks/burn_cpu", json={"seconds": 10}) as source,
    ):
        events = source.iter_sse()
        assert next(events).event == "queued"
        assert next(events).event == "running"
        with _memory_alarm(stack.amqp_url):
            worker.wait_for_line("cannot hear the broker", 15)
            # what is checked is that nothing happens: the alarm lasts over two graces
            time.sleep(2.5)
        kinds = [event.event for event in events if event.data]
    assert kinds[-1] == "succeeded", kinds
    worker.wait_for_line("hears the broker again", 15)
    assert worker.count("cancelled burn_cpu") == 0


def test_a_task_that_expires_in_the_queue_during_an_alarm_is_announced_after_it(
    make_stack, amqp_url
) -> None:
    """The broker dead-letters an expired message whatever the alarm; the gateway that
    reads it is the only one who can say the task expired, so it retries the event
    until the broker confirms it and acks the dead letter then. (A publish that failed
    in the consumer held the dead letter unacked, with a traceback; a hundred of them,
    the prefetch, stopped the gateway reading dead letters at all.)"""
    stack, gateway, _ = _alarm_stack(make_stack, amqp_url)
    with stack.client() as client:
        busy = client.post("/v1/tasks/burn_cpu", json={"seconds": 8.0}).json()["id"]
        wait_for_event(client, busy, "running")
        # time to raise the alarm first: two rabbitmqctl calls, a second or more when busy
        short = client.post("/v1/tasks/echo", headers={"Request-Timeout": "4"}, json={"payload": 1})
        task_id = short.json()["id"]
        with _memory_alarm(stack.amqp_url):  # raised before the task expires behind `busy`
            gateway.wait_for_line(f"publishing the expired event of task {task_id} failed", 15)
        gateway.wait_for_line(f"published the expired event of task {task_id} after", 30)
        assert [e[0] for e in task_events(client, task_id)] == ["queued", "expired"]
        assert task_events(client, busy)[-1][0] == "succeeded"
        assert gateway.count("Traceback") == 0
        assert_clean(stack, client, [busy, task_id])


def test_a_subscriber_that_stops_reading_is_cut_off_and_slows_nobody(make_stack) -> None:
    import socket

    stack: Stack = make_stack(TIMEBOX_SUBSCRIBER_BUFFER="20", TIMEBOX_SSE_SEND_TIMEOUT="1")
    gateway = stack.gateway()
    stack.worker(1)
    with stack.client() as client:
        busy = client.post("/v1/tasks/burn_cpu", json={"seconds": 0.5}).json()["id"]
        task_id = client.post("/v1/tasks/chatty", json={"events": 3000, "size": 4000}).json()["id"]
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", gateway.port))
        stuck.sendall(f"GET /v1/tasks/{task_id}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        started = time.monotonic()
        events = task_events(client, task_id)  # a reader that keeps up gets everything
        took = time.monotonic() - started
        assert events[-1][0] == "succeeded"
        assert sum(1 for e in events if e[0] == "progress") == 3000
        assert task_events(client, busy)[-1][0] == "succeeded"
        gateway.wait_for_line("cut off a slow SSE subscriber|send timeout|SendTimeout", 30)
        stuck.settimeout(10)
        received = b""
        while chunk := stuck.recv(1 << 20):
            received += chunk
        stuck.close()
        assert b"event: succeeded" not in received
        print(f"the reading subscriber got 3000 events in {took:.2f} s")


def test_sigterm_lets_a_worker_finish_its_task_and_hand_back_the_rest(make_stack) -> None:
    stack: Stack = make_stack()
    stack.gateway()
    worker = stack.worker(1)
    with stack.client() as client:
        running = client.post("/v1/tasks/burn_cpu", json={"seconds": 1}).json()["id"]
        waiting = client.post("/v1/tasks/burn_cpu", json={"seconds": 0.2}).json()["id"]
        wait_for_event(client, running, "running")
        worker.signal(signal.SIGTERM)
        assert worker.popen.wait(30) == 0
        worker.stop()  # its log read to the end
        assert worker.count("lost the connection") == 0  # its own close is no loss
        assert client.get(f"/v1/tasks/{running}").json()["state"] == "succeeded"
        assert client.get(f"/v1/tasks/{waiting}").json()["state"] == "queued"
        stack.worker(1)  # the handed-back task runs on the next worker
        assert task_events(client, waiting)[-1][0] == "succeeded"
        assert_clean(stack, client, [running, waiting])


def test_a_second_signal_stops_a_worker_at_once_and_hands_its_task_back(make_stack) -> None:
    """Ctrl-C twice: the first says what the worker waits for (its running task, until
    its deadline at the latest); the second stops it at once, where it used to be
    ignored. Its processes end with it, and its task goes back to the queue, for the
    next worker to run again."""
    stack: Stack = make_stack()
    stack.gateway()
    worker = stack.worker(1)
    with stack.client() as client:
        task_id = client.post("/v1/tasks/burn_cpu", json={"seconds": 6}).json()["id"]
        wait_for_event(client, task_id, "running")
        processes = process_tree(worker.pid)[1:]  # its fork server and children
        worker.signal(signal.SIGINT)
        worker.wait_for_line(r"stopping: finishing 1 running task\(s\), by \d\d:\d\d:\d\d", 5)
        worker.signal(signal.SIGINT)
        assert worker.popen.wait(3) == 128 + signal.SIGINT
        worker.stop()  # its log read to the end
        assert worker.count("stopping now: 1 running task") == 1
        wait_until(lambda: not any(alive(pid) for pid in processes), 5, "its processes to end")
        stack.worker(1)
        assert task_events(client, task_id)[-1][0] == "succeeded"
        assert client.get(f"/v1/tasks/{task_id}").json()["attempts"] == 2


def test_sigterm_to_a_gateway_ends_its_streams_cleanly(make_stack) -> None:
    stack: Stack = make_stack()
    gateway = stack.gateway()
    worker = stack.worker(1)
    with stack.client() as client:
        task_id = client.post("/v1/tasks/burn_cpu", json={"seconds": 20}).json()["id"]
    following, ended = threading.Event(), threading.Event()
    kinds: list[str] = []

    def follow() -> None:
        with (
            stack.client(timeout=60) as c,
            connect_sse(c, "GET", f"/v1/tasks/{task_id}/events") as source,
        ):
            for e in source.iter_sse():
                kinds.append(e.event)
                if e.event == "running":
                    following.set()
        ended.set()

    follower = threading.Thread(target=follow)
    follower.start()
    assert following.wait(15)
    gateway.signal(signal.SIGTERM)
    assert ended.wait(15)
    follower.join()
    # uvicorn re-raises the signal once it has shut down cleanly
    assert gateway.popen.wait(15) in (0, -signal.SIGTERM)
    gateway.wait_for_line("Application shutdown complete")
    gateway.stop()  # its log read to the end
    worker.signal(signal.SIGKILL)  # its task is no concern here: not waited for
    assert gateway.count("lost the connection") == 0  # its own close is no loss
    assert gateway.count("stopped reading the event stream") == 0
    assert "succeeded" not in kinds  # the stream ended early, without an error


def test_an_idempotency_key_reused_for_another_request_is_422(client: httpx.Client) -> None:
    """A retry must be the same request (the IETF Idempotency-Key draft): the same key
    with another input or task type is refused, not answered with the earlier task;
    the same input written otherwise (key order, spacing) is the same request."""
    key = {"Idempotency-Key": f"reused-{uuid.uuid4()}"}
    first = client.post("/v1/tasks/echo", json={"payload": {"a": 1, "b": 2}}, headers=key)
    assert first.status_code == 202, first.text
    task_id = first.json()["id"]
    same = client.post(
        "/v1/tasks/echo",
        content=b'{ "payload" : {"b":2,"a":1} }',
        headers={**key, "Content-Type": "application/json"},
    )
    assert same.json()["id"] == task_id
    for task, body in (("echo", {"payload": {"a": 1}}), ("burn_cpu", {"seconds": 0.1})):
        refused = client.post(f"/v1/tasks/{task}", json=body, headers=key)
        assert refused.status_code == 422, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        problem = refused.json()
        assert problem["type"] == "/problems/idempotency-key-reused"
        assert problem["task_id"] == task_id
    assert client.get(f"/v1/tasks/{task_id}").json()["task"] == "echo"


def test_one_idempotency_key_used_at_once_through_two_gateways_means_one_task_on_both() -> None:
    """Two requests with one key at the same moment through two gateways, before either
    has read the other's `queued` event, make two tasks. Afterwards both gateways give
    a retry the same one: the first in stream order (before, each gave the one it read
    last, so a retry's answer depended on the gateway it reached)."""
    from contracts.events import EventType, TaskEvent
    from gateway.tasktable import TaskTable

    def queued(task_id: str) -> TaskEvent:
        return TaskEvent(type=EventType.QUEUED, task_id=task_id, task="echo", idempotency_key="k")

    first, second = TaskTable(10), TaskTable(10)
    first.expect(queued("a"))
    second.expect(queued("b"))
    for table in (first, second):
        table.apply(10, queued("b"))
        table.apply(11, queued("a"))
    for table in (first, second):
        holder = table.by_idempotency_key(None, "k")
        assert holder is not None
        assert holder.status.id == "b"
    # a full table forgets the oldest task first: here the one that lost the key (it
    # was queued here before the other was read), which leaves the key to its holder
    full = TaskTable(2)
    full.expect(queued("a"))
    full.apply(10, queued("b"))
    full.apply(11, queued("a"))
    full.apply(12, TaskEvent(type=EventType.QUEUED, task_id="c", task="echo"))
    assert full.get("a") is None
    holder = full.by_idempotency_key(None, "k")
    assert holder is not None
    assert holder.status.id == "b"


def test_the_same_idempotency_key_returns_the_same_task(make_stack) -> None:
    stack: Stack = make_stack(TIMEBOX_API_KEYS="k1,k2")
    stack.gateway()
    stack.gateway()
    stack.worker(1)
    k1 = {"Authorization": "Bearer k1", "Idempotency-Key": "order-42"}
    k2 = {"Authorization": "Bearer k2", "Idempotency-Key": "order-42"}
    with stack.client(0) as a, stack.client(1) as b:
        first = a.post("/v1/tasks/echo", json={"payload": 1}, headers=k1).json()["id"]
        again = a.post("/v1/tasks/echo", json={"payload": 1}, headers=k1).json()["id"]
        assert again == first
        wait_until(lambda: b.get(f"/v1/tasks/{first}", headers=k1).status_code == 200, 5, "replica")
        elsewhere = b.post("/v1/tasks/echo", json={"payload": 1}, headers=k1)
        assert elsewhere.json()["id"] == first
        rpc = b.post("/v1/tasks/echo", params={"wait": "true"}, json={"payload": 1}, headers=k1)
        assert rpc.status_code == 200
        assert rpc.json()["id"] == first
        changed = b.post("/v1/tasks/echo", json={"payload": 2}, headers=k1)
        assert changed.status_code == 422, changed.text
        assert changed.json()["task_id"] == first
        other_key = a.post("/v1/tasks/echo", json={"payload": 1}, headers=k2).json()["id"]
        assert other_key != first
        fresh = a.post(
            "/v1/tasks/echo", json={"payload": 1}, headers={"Authorization": "Bearer k1"}
        ).json()["id"]
        assert fresh not in (first, other_key)
