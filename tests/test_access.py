"""Access and bad input: API keys, per-key isolation, clear errors, nothing crashes."""

import asyncio
import hashlib
import hmac
import socket
import time
import uuid
from datetime import datetime
from pathlib import Path

import aio_pika
import httpx
import pytest
import yaml

from tests.conftest import Stack

pytestmark = pytest.mark.timeout(120)

ALICE = {"Authorization": "Bearer alice-key"}
BOB = {"Authorization": "Bearer bob-key"}


def is_problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    return body


@pytest.fixture(scope="module")
def keyed(amqp_url: str, tmp_path_factory: pytest.TempPathFactory):
    from tests.conftest import running_stack

    with running_stack(
        amqp_url,
        tmp_path_factory.mktemp("keyed"),
        1,
        TIMEBOX_API_KEYS="alice-key,bob-key",
        TIMEBOX_TOKEN_SECRET="s3cret",
    ) as stack:
        yield stack


def test_requests_without_a_valid_key_get_401(keyed: Stack) -> None:
    with keyed.client() as c:
        for headers in [{}, {"Authorization": "Bearer nope"}, {"Authorization": "alice-key"}]:
            r = c.post("/v1/tasks/echo", json={"payload": 1}, headers=headers)
            is_problem(r, 401)
            assert r.headers["www-authenticate"].startswith("Bearer")
        is_problem(c.get("/v1/task-types"), 401)
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200


def test_a_task_is_visible_only_to_the_key_that_made_it(keyed: Stack) -> None:
    with keyed.client() as c:
        created = c.post("/v1/tasks/echo", json={"payload": "mine"}, headers=ALICE)
        assert created.status_code == 202
        task_id = created.json()["id"]
        assert uuid.UUID(task_id).version == 4
        assert c.get(f"/v1/tasks/{task_id}", headers=ALICE).status_code == 200
        unknown = is_problem(c.get(f"/v1/tasks/{uuid.uuid4()}", headers=BOB), 404)
        for response in [
            c.get(f"/v1/tasks/{task_id}", headers=BOB),
            c.delete(f"/v1/tasks/{task_id}", headers=BOB),
            c.get(f"/v1/tasks/{task_id}/events", headers=BOB),
        ]:
            other = is_problem(response, 404)
            assert other["type"] == unknown["type"]
            assert other["title"] == unknown["title"]
        alice_events = c.get(f"/v1/tasks/{task_id}/events", headers=ALICE)
        assert alice_events.status_code == 200
        assert "event: succeeded" in alice_events.text


def forged_token(task_id: str, expires: int) -> str:
    secret = hashlib.sha256(b"timebox-events:" + b"s3cret").digest()
    sig = hmac.new(secret, f"{task_id}.{expires}".encode(), hashlib.sha256).hexdigest()[:32]
    return f"{expires}.{sig}"


def test_the_events_url_token_works_for_its_task_only_and_expires(keyed: Stack) -> None:
    with keyed.client() as c:
        first = c.post("/v1/tasks/echo", json={"payload": 1}, headers=ALICE).json()
        second = c.post("/v1/tasks/echo", json={"payload": 2}, headers=ALICE).json()
        url = first["events_url"]
        assert "token=" in url
        # an EventSource sends no headers: the URL alone opens the stream
        stream = c.get(url)
        assert stream.status_code == 200
        assert "event: succeeded" in stream.text
        token = url.split("token=")[1]
        # good until TIMEBOX_EVENTS_TOKEN_TTL (600 s) after the deadline, not after the
        # 202: a task may run up to TIMEBOX_MAX_TIMEOUT, which may be raised above it
        deadline = datetime.fromisoformat(first["deadline"]).timestamp()
        assert int(token.split(".")[0]) >= int(deadline + 600)
        is_problem(c.get(f"/v1/tasks/{second['id']}/events", params={"token": token}), 401)
        expired = forged_token(first["id"], int(time.time()) - 1)
        is_problem(c.get(f"/v1/tasks/{first['id']}/events", params={"token": expired}), 401)
        fresh = forged_token(first["id"], int(time.time()) + 60)
        assert c.get(f"/v1/tasks/{first['id']}/events", params={"token": fresh}).status_code == 200


def test_malformed_and_invalid_bodies_are_422_with_field_paths(client: httpx.Client) -> None:
    bad_json = client.post(
        "/v1/tasks/echo", content=b'{"payload": ', headers={"content-type": "application/json"}
    )
    is_problem(bad_json, 422)
    wrong = is_problem(
        client.post("/v1/tasks/burn_cpu", json={"seconds": "lots", "hold_gil": 3, "x": 1}), 422
    )
    assert {e["field"] for e in wrong["errors"]} == {"body.seconds", "body.hold_gil", "body.x"}
    dna = is_problem(client.post("/v1/tasks/align_dna", json={"a": "ACGX", "b": "A" * 20_001}), 422)
    assert {e["field"] for e in dna["errors"]} == {"body.a", "body.b"}
    listed = is_problem(client.post("/v1/tasks/mine_bitcoin", json={}), 404)
    assert set(listed["task_types"]) >= {"echo", "burn_cpu", "count_primes"}


def test_a_body_not_sent_as_json_is_415_saying_how_to_send_it(client: httpx.Client) -> None:
    """`curl -d` without a Content-Type sends a form's media type, which FastAPI does not
    read as JSON: the client is told that, not that the body is not an object."""
    for media in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {"content-type": media} if media else {}
        refused = client.post("/v1/tasks/echo", content=b'{"payload": 1}', headers=headers)
        problem = is_problem(refused, 415)
        assert "Content-Type: application/json" in problem["detail"]
        assert (media or "none") in problem["detail"]
    for media in ("application/json; charset=utf-8", "application/merge-patch+json"):
        sent = client.post(
            "/v1/tasks/echo", content=b'{"payload": 1}', headers={"content-type": media}
        )
        assert sent.status_code == 202, sent.text
    form = is_problem(  # JSON that does not fit the input is still 422 with the fields
        client.post("/v1/tasks/echo", content=b"[1]", headers={"content-type": "application/json"}),
        422,
    )
    assert form["errors"][0]["field"] == "body"


def test_a_body_over_the_limit_is_refused_before_it_is_read(session_stack: Stack) -> None:
    port = session_stack.gateways[0].port
    # the headers announce 5 MB; not one byte of it is sent
    head = (
        b"POST /v1/tasks/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5000000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413")
    assert b"application/problem+json" in answer

    def chunks():
        for _ in range(40):
            yield b" " * 65536

    with httpx.Client(base_url=session_stack.url, timeout=30) as c:
        chunked = c.post(
            "/v1/tasks/echo", content=chunks(), headers={"content-type": "application/json"}
        )
        assert chunked.status_code == 413
        assert chunked.json()["max_bytes"] == 1024 * 1024


def test_hostile_messages_on_a_task_queue_are_parked_and_the_worker_serves_on(
    make_stack,
) -> None:
    stack: Stack = make_stack()
    stack.gateway()
    worker = stack.worker(1)
    deadline = str(int(time.time() * 1000) + 60_000).encode()
    hostile = [
        ("not-json", b"{{{ nope", {"x-deadline": int(deadline)}, "burn_cpu"),
        ("no-deadline", b'{"seconds": 0.1}', {}, "burn_cpu"),
        ("wrong-task", b'{"seconds": 0.1}', {"x-deadline": int(deadline)}, "mine_bitcoin"),
        ("bad-deadline", b'{"seconds": 0.1}', {"x-deadline": "tomorrow"}, "burn_cpu"),
    ]

    async def publish_and_collect() -> dict[str, str]:
        connection = await aio_pika.connect(stack.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            for message_id, body, headers, kind in hostile:
                await channel.default_exchange.publish(
                    aio_pika.Message(body, message_id=message_id, headers=headers, type=kind),
                    f"{stack.namespace}.tasks.default",
                )
            parked = await channel.get_queue(f"{stack.namespace}.parked", ensure=False)
            reasons: dict[str, str] = {}
            end = time.monotonic() + 20
            while len(reasons) < len(hostile) and time.monotonic() < end:
                message = await parked.get(timeout=5, fail=False)
                if message is None:
                    await asyncio.sleep(0.05)
                    continue
                reasons[str(message.message_id)] = str(message.headers["x-park-reason"])
                await message.ack()
            return reasons

    reasons = asyncio.run(publish_and_collect())
    assert set(reasons) == {h[0] for h in hostile}
    assert "ValidationError" in reasons["not-json"] or "JSON" in reasons["not-json"]
    assert "x-deadline" in reasons["no-deadline"]
    assert "mine_bitcoin" in reasons["wrong-task"]
    assert "x-deadline" in reasons["bad-deadline"]
    for message_id in ("no-deadline", "wrong-task", "bad-deadline"):
        assert worker.count(f"parked a burn_cpu message.*{message_id}|{message_id}") <= 1
    with stack.client() as c:
        ok = c.post("/v1/tasks/burn_cpu", params={"wait": "true"}, json={"seconds": 0.1})
        assert ok.status_code == 200
    assert worker.popen.poll() is None


def test_slow_and_idle_clients_do_not_stop_normal_requests(make_stack) -> None:
    stack: Stack = make_stack()
    gateway = stack.gateway()
    stack.busy_worker("echo")  # the streamed task stays queued
    with stack.client() as c:
        task_id = c.post("/v1/tasks/echo", json={"payload": 1}).json()["id"]

    async def scenario() -> float:
        # 300 slowloris connections: half-sent headers, never finished
        loris = []
        for _ in range(300):
            _reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(b"POST /v1/tasks/echo HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            await writer.drain()
            loris.append(writer)
        # 1000 idle SSE subscribers
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=gateway.url, limits=limits, timeout=30) as idle:
            opened = asyncio.Event()
            count = 0

            async def subscribe() -> None:
                nonlocal count
                async with idle.stream("GET", f"/v1/tasks/{task_id}/events") as response:
                    assert response.status_code == 200
                    count += 1
                    if count == 1000:
                        opened.set()
                    await asyncio.sleep(3600)

            subscribers = [asyncio.create_task(subscribe()) for _ in range(1000)]
            await asyncio.wait_for(opened.wait(), 60)
            async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as normal:
                slowest = 0.0
                for _ in range(20):
                    t = time.perf_counter()
                    r = await normal.post("/v1/tasks/echo", json={"payload": 2})
                    assert r.status_code == 202
                    assert (await normal.get("/healthz")).status_code == 200
                    slowest = max(slowest, time.perf_counter() - t)
            for s in subscribers:
                s.cancel()
            await asyncio.gather(*subscribers, return_exceptions=True)
        for w in loris:
            w.close()
        await asyncio.gather(*(w.wait_closed() for w in loris), return_exceptions=True)
        return slowest

    slowest = asyncio.run(scenario())
    assert slowest < 1.0


def test_compose_uses_its_own_broker_user_and_keeps_the_ui_local() -> None:
    compose = yaml.safe_load(Path("compose.yaml").read_text())
    text = Path("compose.yaml").read_text()
    assert "guest" not in text
    broker = compose["services"]["rabbitmq"]
    assert broker["environment"]["RABBITMQ_DEFAULT_PASS"].startswith("${")
    assert all(p.startswith("127.0.0.1:") for p in broker["ports"])
    assert all(p.startswith("127.0.0.1:") for p in compose["services"]["gateway"]["ports"])
    assert compose["services"]["compute"]["deploy"]["replicas"] == 2


def test_a_malformed_events_token_is_refused_not_a_crash(keyed: Stack) -> None:
    with keyed.client() as c:
        task_id = c.post("/v1/tasks/echo", json={"payload": 1}, headers=ALICE).json()["id"]
        for token in ["²", "²³.abc", "", ".", "9" * 400, "12.zz", "-5.x"]:
            r = c.get(f"/v1/tasks/{task_id}/events", params={"token": token})
            is_problem(r, 401)


def test_parked_messages_are_listed_replayed_and_deleted_by_the_key_they_belong_to(
    keyed: Stack,
) -> None:
    from gateway.auth import owner_of

    run = uuid.uuid4().hex[:8]
    deadline = int(time.time() * 1000) + 60_000
    alice = {"x-owner": owner_of("alice-key")}
    unrunnable = {  # id: body, headers, task type; each parked by the worker
        f"no-deadline-{run}": (b'{"payload": "again"}', alice, "echo"),
        f"gone-{run}": (b'{"seconds": 0.1}', {**alice, "x-deadline": deadline}, "retired_task"),
        f"not-json-{run}": (b"{{{ nope", {**alice, "x-deadline": deadline}, "echo"),
    }

    async def publish() -> None:
        connection = await aio_pika.connect(keyed.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            for message_id, (body, headers, kind) in unrunnable.items():
                message = aio_pika.Message(body, message_id=message_id, headers=headers, type=kind)
                await channel.default_exchange.publish(message, f"{keyed.namespace}.tasks.default")

    def listed(c: httpx.Client, headers: dict[str, str]) -> dict[str, dict]:
        response = c.get("/v1/parked", headers=headers)
        assert response.status_code == 200, response.text
        return {m["id"]: m for m in response.json() if m["id"].endswith(run)}

    asyncio.run(publish())
    with keyed.client() as c:
        end = time.monotonic() + 20
        while len(parked := listed(c, ALICE)) < 3 and time.monotonic() < end:
            time.sleep(0.1)
        assert set(parked) == set(unrunnable)
        again = parked[f"no-deadline-{run}"]
        assert again["task"] == "echo"
        assert "x-deadline" in again["reason"]
        assert again["preview"] == '{"payload": "again"}'
        assert again["size"] == 20
        assert again["deliveries"] == 1
        at = datetime.fromisoformat(again["parked_at"]).timestamp()
        assert time.time() - 30 < at <= time.time() + 1
        assert "retired_task" in parked[f"gone-{run}"]["reason"]
        assert listed(c, BOB) == {}  # another key sees none of them, and cannot act on them
        is_problem(c.post(f"/v1/parked/no-deadline-{run}/replay", headers=BOB), 404)
        is_problem(c.delete(f"/v1/parked/no-deadline-{run}", headers=BOB), 404)
        # a replay that cannot be made leaves the message parked
        gone = is_problem(c.post(f"/v1/parked/gone-{run}/replay", headers=ALICE), 409)
        assert "retired_task" in gone["detail"]
        invalid = is_problem(c.post(f"/v1/parked/not-json-{run}/replay", headers=ALICE), 422)
        assert invalid["type"].endswith("invalid-input")
        assert set(listed(c, ALICE)) == set(unrunnable)
        # a replay is a new task of the same owner, with a fresh deadline
        replayed = c.post(
            f"/v1/parked/no-deadline-{run}/replay", headers={**ALICE, "Request-Timeout": "20"}
        )
        assert replayed.status_code == 202, replayed.text
        task = replayed.json()
        assert task["task"] == "echo"
        assert task["id"] != f"no-deadline-{run}"
        assert 19 < datetime.fromisoformat(task["deadline"]).timestamp() - time.time() <= 20
        end = time.monotonic() + 20
        while (status := c.get(f"/v1/tasks/{task['id']}", headers=ALICE).json())["state"] in (
            "queued",
            "running",
        ) and time.monotonic() < end:
            time.sleep(0.05)
        assert status["state"] == "succeeded"
        assert status["result"] == {"payload": "again"}
        assert set(listed(c, ALICE)) == {f"gone-{run}", f"not-json-{run}"}
        assert c.delete(f"/v1/parked/gone-{run}", headers=ALICE).status_code == 204
        is_problem(c.delete(f"/v1/parked/gone-{run}", headers=ALICE), 404)
        assert set(listed(c, ALICE)) == {f"not-json-{run}"}
