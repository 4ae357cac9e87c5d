"""Retries that respect the deadline: a failed attempt is tried again only if the time
left covers a run, and every attempt and its error is in the status and the events."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime

import httpx
import pytest

import timebox
from tests.conftest import Stack
from tests.harness import task_events

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def stack(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from tests.conftest import running_stack

    # a run time is trusted from its first sample: the last test judges by it
    with running_stack(
        amqp_url, tmp_path_factory.mktemp("retries"), 2, TIMEBOX_ESTIMATE_MIN_SAMPLES="1"
    ) as s:
        yield s


def rpc(client: httpx.Client, timeout: float = 20, **task_input: object) -> httpx.Response:
    return client.post(
        "/v1/tasks/flaky",
        params={"wait": "true"},
        headers={"Request-Timeout": str(timeout)},
        json={"key": uuid.uuid4().hex, **task_input},
    )


def test_a_failed_attempt_is_tried_again_and_each_failure_is_told(stack: Stack) -> None:
    with stack.client() as client:
        answer = rpc(client, failures=2)
        assert answer.status_code == 200, answer.text
        assert answer.json()["result"] == 3
        task_id = answer.json()["id"]
        status = client.get(f"/v1/tasks/{task_id}").json()
        assert status["attempts"] == 3
        failed = status["failed_attempts"]
        assert [f["attempt"] for f in failed] == [1, 2]
        assert [f["error"]["type"] for f in failed] == ["ConnectionError"] * 2
        assert failed[0]["error"]["message"] == "attempt 1: the service is away"
        events = task_events(client, task_id)
        retrying = [data for kind, data, _ in events if kind == "retrying"]
        assert [e["attempt"] for e in retrying] == [1, 2]
        assert all(e["error"]["type"] == "ConnectionError" for e in retrying)
        assert events[-1][0] == "succeeded"
    stack.workers[0].wait_for_line(rf"retrying flaky {task_id} in 0.05 s: attempt 1 failed")


def test_an_exception_not_declared_retryable_fails_at_once(stack: Stack) -> None:
    with stack.client() as client:
        answer = rpc(client, failures=2, fatal=True)
        assert answer.status_code == 500, answer.text
        status = answer.json()["task"]
        assert status["attempts"] == 1
        assert status["failed_attempts"] == []
        assert status["error"] == {"type": "ValueError", "message": "attempt 1: fatal"}


def test_an_attempt_whose_process_died_is_tried_again(stack: Stack) -> None:
    with stack.client() as client:
        answer = rpc(client, failures=1, crash=True)
        assert answer.status_code == 200, answer.text
        assert answer.json()["result"] == 2
        status = client.get(f"/v1/tasks/{answer.json()['id']}").json()
        assert [f["error"]["type"] for f in status["failed_attempts"]] == ["WorkerCrash"]


def test_no_retry_starts_when_the_time_left_cannot_cover_a_run(stack: Stack) -> None:
    with stack.client() as client:
        assert rpc(client, failures=0, seconds=0.6).status_code == 200  # its run time: 0.6 s
        answer = rpc(client, timeout=1.5, failures=10, seconds=0.6)
        assert answer.status_code == 500, answer.text  # failed, answered before the deadline
        status = answer.json()["task"]
        assert status["reason"].startswith("no time left to retry: needs about 0.6")
        assert status["error"]["type"] == "ConnectionError"  # the last attempt's
        assert len(status["failed_attempts"]) == status["attempts"] - 1
        deadline = datetime.fromisoformat(status["deadline"])
        assert datetime.fromisoformat(status["finished_at"]) < deadline
        events = task_events(client, status["id"])
        assert all(data["at"] < deadline.timestamp() for _, data, _ in events)


def test_bad_retry_options_are_refused_where_the_task_is_declared() -> None:
    def f(x: int) -> int:
        return x

    for options, message in (
        ({"retries": -1}, "retries"),
        ({"retries": 1.5}, "retries"),
        ({"retry_on": (int,)}, "retry_on"),
        ({"retry_on": ValueError}, "retry_on"),
        ({"backoff": -0.1}, "backoff"),
    ):
        with pytest.raises(TypeError, match=message):
            timebox.task(**options)(f)  # type: ignore[call-overload]
