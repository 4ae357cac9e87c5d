"""A task goes gateway → RabbitMQ → worker child → event stream → 202 / RPC / SSE."""

import asyncio
import itertools
import json
import os
import time
from datetime import datetime

import aio_pika
import httpx
import pytest
from httpx_sse import connect_sse

from tests.conftest import Stack


def events_of(client: httpx.Client, task_id: str, last_event_id: str | None = None) -> list:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with connect_sse(client, "GET", f"/v1/tasks/{task_id}/events", headers=headers) as source:
        return list(source.iter_sse())


def test_submit_answers_202_with_location_and_the_queued_status(client: httpx.Client) -> None:
    response = client.post("/v1/tasks/echo", json={"payload": {"hello": [1, 2]}})
    assert response.status_code == 202
    body = response.json()
    assert response.headers["location"] == f"/v1/tasks/{body['id']}"
    assert body["task"] == "echo"
    assert body["state"] == "queued"
    assert body["deadline"] > body["created_at"]

    events = events_of(client, body["id"])  # ends after the terminal event
    # a run this short has no `running` of its own: its ending says when it started
    assert [e.event for e in events] == ["queued", "succeeded"]
    ended = json.loads(events[-1].data)
    assert ended["started"] <= ended["at"]
    assert ended["attempt"] == 1
    status = client.get(response.headers["location"]).json()
    assert status["state"] == "succeeded"
    assert status["result"] == {"payload": {"hello": [1, 2]}}
    host, pid = status["worker"].rsplit(":", 1)
    assert host == os.uname().nodename
    assert int(pid) > 0
    assert status["attempts"] == 1
    assert status["started_at"] <= status["finished_at"]
    assert datetime.fromisoformat(status["started_at"]).timestamp() == pytest.approx(
        ended["started"], abs=0.001
    )


def test_a_run_longer_than_a_few_milliseconds_says_running_when_it_started(
    client: httpx.Client,
) -> None:
    task_id = client.post("/v1/tasks/nap", params={"wait": "true"}, json={"seconds": 0.2}).json()[
        "id"
    ]
    events = events_of(client, task_id)
    assert [e.event for e in events] == ["queued", "running", "succeeded"]
    running, ended = json.loads(events[1].data), json.loads(events[2].data)
    assert ended["at"] - running["at"] >= 0.2  # its start, not when it was said
    assert "started" not in ended or ended["started"] is None


@pytest.mark.parametrize("how", [{"headers": {"Prefer": "wait"}}, {"params": {"wait": "true"}}])
def test_rpc_waits_for_the_result(client: httpx.Client, how: dict) -> None:
    response = client.post("/v1/tasks/count_primes", json={"n": 10_000}, **how)
    assert response.status_code == 200
    assert response.json()["state"] == "succeeded"
    assert response.json()["result"] == {"count": 1229}


def test_prefer_wait_with_seconds_answers_202_once_they_run_out_and_the_task_runs_on(
    client: httpx.Client,
) -> None:
    """RFC 7240's `Prefer: wait=N`: a client that waits N seconds gets `202` after them,
    not a wait until the deadline that its own HTTP timeout would cut (and the cut
    would cancel the task)."""
    response = client.post("/v1/tasks/burn_cpu", json={"seconds": 2}, headers={"Prefer": "wait=1"})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["state"] in ("queued", "running")
    assert response.headers["location"] == f"/v1/tasks/{body['id']}"
    assert events_of(client, body["id"])[-1].event == "succeeded"  # not cancelled
    within = client.post(
        "/v1/tasks/count_primes",
        json={"n": 10_000},
        headers={"Prefer": "respond-async, wait=30"},
    )
    assert within.status_code == 200
    assert within.json()["result"] == {"count": 1229}


def test_rpc_align_dna_is_correct_end_to_end(client: httpx.Client) -> None:
    response = client.post(
        "/v1/tasks/align_dna", params={"wait": "true"}, json={"a": "GATTACA", "b": "GCATGCT"}
    )
    assert response.json()["result"] == {"score": 0}


def test_streaming_post_sends_the_events_in_order_then_closes(client: httpx.Client) -> None:
    with connect_sse(client, "POST", "/v1/tasks/burn_cpu", json={"seconds": 0.4}) as source:
        assert source.response.status_code == 200
        events = list(source.iter_sse())
    kinds = [e.event for e in events]
    assert kinds[0] == "queued"
    assert kinds[1] == "running"
    assert "progress" in kinds
    assert kinds[-1] == "succeeded"
    ids = [int(e.id) for e in events]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    final = json.loads(events[-1].data)
    assert final["result"]["seconds"] >= 0.3
    assert all(0 <= json.loads(e.data)["progress"] <= 1 for e in events if e.event == "progress")


def test_progress_is_reported_at_most_once_per_interval_and_not_for_short_tasks(
    client: httpx.Client,
) -> None:
    """Each report is an event every gateway reads: a task shorter than the progress
    interval (0.25 s) reports none, a longer one about one per interval."""
    # a fifth of the interval: on two busy shared cores 0.1 CPU s took over 0.25 s; so
    # short that it may end within 50 ms, and say no `running` of its own
    short = client.post("/v1/tasks/burn_cpu", params={"wait": "true"}, json={"seconds": 0.05})
    kinds = [e.event for e in events_of(client, short.json()["id"])]
    assert kinds in (["queued", "running", "succeeded"], ["queued", "succeeded"]), kinds
    long = client.post("/v1/tasks/burn_cpu", params={"wait": "true"}, json={"seconds": 1.0})
    assert long.status_code == 200
    events = events_of(client, long.json()["id"])
    reports = [json.loads(e.data) for e in events if e.event == "progress"]
    times = [r["at"] for r in reports]
    assert len(reports) >= 2
    assert all(b - a >= 0.2 for a, b in itertools.pairwise(times)), times
    started = datetime.fromisoformat(long.json()["started_at"]).timestamp()
    assert times[0] - started >= 0.2


def test_events_replay_and_honour_last_event_id(client: httpx.Client) -> None:
    task_id = client.post("/v1/tasks/nap", params={"wait": "true"}, json={"seconds": 0.1}).json()[
        "id"
    ]
    everything = events_of(client, task_id)
    assert [e.event for e in everything] == ["queued", "running", "succeeded"]
    after_first = events_of(client, task_id, last_event_id=everything[0].id)
    assert [e.id for e in after_first] == [e.id for e in everything[1:]]
    # at or past the terminal event: 204 stops a browser's EventSource for good
    response = client.get(
        f"/v1/tasks/{task_id}/events", headers={"Last-Event-ID": everything[-1].id}
    )
    assert response.status_code == 204


def test_a_task_that_raises_fails_and_the_worker_goes_on(client: httpx.Client) -> None:
    response = client.post("/v1/tasks/explode", params={"wait": "true"}, json={"message": "no!"})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["task"]["state"] == "failed"
    assert problem["task"]["error"] == {"type": "ValueError", "message": "no!"}
    assert "ValueError: no!" in problem["detail"]
    again = client.post("/v1/tasks/echo", params={"wait": "true"}, json={"payload": "still here"})
    assert again.status_code == 200


def test_unknown_tasks_and_ids_are_404_problems(client: httpx.Client) -> None:
    unknown = client.post("/v1/tasks/nope", json={})
    assert unknown.status_code == 404
    assert unknown.headers["content-type"] == "application/problem+json"
    assert "count_primes" in unknown.json()["detail"]
    missing = client.get("/v1/tasks/00000000-0000-0000-0000-000000000000")
    assert missing.status_code == 404
    assert missing.json()["type"] == "/problems/task-not-found"


def test_invalid_input_is_a_422_problem_with_the_field(client: httpx.Client) -> None:
    response = client.post("/v1/tasks/count_primes", json={"n": 1, "extra": True})
    assert response.status_code == 422
    fields = {e["field"] for e in response.json()["errors"]}
    assert fields == {"body.n", "body.extra"}
    too_big = client.post("/v1/tasks/align_dna", json={"a": "ACGU", "b": ""})
    assert too_big.status_code == 422


def test_task_types_list_schemas_and_limits(client: httpx.Client) -> None:
    types = {t["name"]: t for t in client.get("/v1/task-types").json()}
    assert {"echo", "burn_cpu", "count_primes", "process_text", "align_dna"} <= set(types)
    primes = types["count_primes"]
    assert primes["input_schema"]["properties"]["n"]["minimum"] == 2
    assert primes["output_schema"]["properties"]["count"]["type"] == "integer"
    assert primes["limits"]["n"] == {"minimum": 2, "maximum": 50_000_000}  # from the schema
    assert primes["timeout"] == {"default": 60, "maximum": 600}


def test_health_and_readiness(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200


@pytest.mark.timeout(90)
def test_a_second_gateway_serves_a_task_submitted_through_the_first(make_stack) -> None:
    stack: Stack = make_stack()
    first = stack.gateway()
    stack.worker(1)
    second = stack.gateway()
    with (
        httpx.Client(base_url=first.url, timeout=30) as a,
        httpx.Client(base_url=second.url, timeout=30) as b,
    ):
        task_id = a.post("/v1/tasks/burn_cpu", json={"seconds": 0.3}).json()["id"]
        # the second gateway streams it live, from the shared event stream
        events = events_of(b, task_id)
        assert [e.event for e in events][-1] == "succeeded"
        assert b.get(f"/v1/tasks/{task_id}").json()["state"] == "succeeded"

    # a gateway started afterwards rebuilds the table from the stream's retention
    first.stop()
    third = stack.gateway()
    with httpx.Client(base_url=third.url, timeout=30) as c:
        status = c.get(f"/v1/tasks/{task_id}").json()
        assert status["state"] == "succeeded"
        assert [e.id for e in events_of(c, task_id)] == [e.id for e in events]


def test_a_task_message_carries_the_properties_the_design_lists(make_stack) -> None:
    stack: Stack = make_stack()
    stack.gateway()
    stack.busy_worker("echo")  # the message stays in its queue to be read
    with stack.client() as c:
        before = time.time()
        response = c.post("/v1/tasks/echo", json={"payload": 1}, headers={"Request-Timeout": "30"})
    assert response.status_code == 202
    status = response.json()

    async def take() -> aio_pika.abc.AbstractIncomingMessage:
        connection = await aio_pika.connect(stack.amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.get_queue(f"{stack.namespace}.tasks.default", ensure=False)
            message = await queue.get(timeout=5)
            await message.nack(requeue=True)
            return message

    message = asyncio.run(take())
    deadline_ms = int(datetime.fromisoformat(status["deadline"]).timestamp() * 1000)
    assert message.message_id == status["id"]
    assert message.type == "echo"
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert json.loads(message.body) == {"payload": 1}
    assert message.headers is not None
    assert message.headers["x-deadline"] == deadline_ms
    assert datetime.fromisoformat(str(message.headers["x-deadline-iso"])).timestamp() == (
        deadline_ms / 1000
    )
    assert message.expiration is not None
    assert 25 < message.expiration <= 30  # seconds left when it was published
    assert message.timestamp is not None
    assert before - 1 <= message.timestamp.timestamp() <= time.time()
    assert "x-client-until" not in message.headers  # a 202's task is tied to no client
