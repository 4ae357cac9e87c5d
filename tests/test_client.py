"""The Python client against the real stack, sync and async."""

import signal
import threading

import pytest

from tests.conftest import Stack
from timebox_client import (
    AsyncClient,
    Client,
    DeadlineUnmeetable,
    TaskFailed,
    TaskTimedOut,
)
from timebox_client.errors import ProblemError

pytestmark = pytest.mark.timeout(90)


def test_sync_client_submits_calls_reads_and_cancels(session_stack: Stack) -> None:
    with Client(session_stack.url) as tb:
        assert tb.call("count_primes", {"n": 10_000}, request_timeout=10) == {"count": 1229}
        task = tb.submit("echo", {"payload": [1, "two"]})
        assert task.state == "queued"
        kinds = [e.type.value for e in tb.events(task.id)]
        assert kinds == ["queued", "running", "succeeded"]
        assert tb.status(task.id).result == {"payload": [1, "two"]}
        with pytest.raises(TaskFailed) as failed:
            tb.call("explode", {"message": "bad input"}, request_timeout=10)
        assert failed.value.task is not None
        assert failed.value.task["error"]["message"] == "bad input"
        with pytest.raises(TaskTimedOut):
            tb.call("burn_cpu", {"seconds": 30}, request_timeout=1)
        long = tb.submit("burn_cpu", {"seconds": 30})
        assert tb.cancel(long.id).id == long.id
        assert [e.type.value for e in tb.events(long.id)][-1] == "cancelled"
        with pytest.raises(ProblemError) as missing:
            tb.status("nope")
        assert missing.value.status == 404


async def test_async_client_does_the_same(session_stack: Stack) -> None:
    async with AsyncClient(session_stack.url) as tb:
        assert await tb.call("align_dna", {"a": "ACGT", "b": "ACGT"}, request_timeout=10) == {
            "score": 4
        }
        task = await tb.submit("burn_cpu", {"seconds": 0.3})
        kinds = [e.type.value async for e in tb.events(task.id)]
        assert kinds[0] == "queued"
        assert kinds[-1] == "succeeded"
        assert (await tb.status(task.id)).state == "succeeded"


def test_the_event_stream_resumes_after_a_dropped_connection(make_stack) -> None:
    stack: Stack = make_stack()
    first = stack.gateway()
    stack.worker(1)
    with Client(first.url, reconnect_attempts=40, reconnect_delay=0.1) as tb:
        task = tb.submit("burn_cpu", {"seconds": 3})
        seen = []
        restarted = threading.Event()
        for event in tb.events(task.id):
            seen.append(event)
            if event.type.value == "running" and not restarted.is_set():
                # the gateway dies mid-stream; a new one comes up on the same port
                first.signal(signal.SIGKILL)
                first.stop()
                stack.gateway(port=first.port)
                restarted.set()
        kinds = [e.type.value for e in seen]
        assert restarted.is_set()
        assert kinds[0] == "queued"
        assert kinds[-1] == "succeeded"
        assert kinds.count("running") == 1
        assert len({(e.type, e.at) for e in seen}) == len(seen)  # nothing twice


def test_refusals_come_back_as_typed_errors(make_stack) -> None:
    stack: Stack = make_stack()
    stack.gateway()
    stack.worker(1)
    with Client(stack.url) as tb:
        for _ in range(5):
            tb.call("burn_cpu", {"seconds": 0.2}, request_timeout=10)
        with pytest.raises(DeadlineUnmeetable) as refused:
            tb.submit("burn_cpu", {"seconds": 10}, request_timeout=2)
        assert refused.value.body["largest_input_that_fits"]["seconds"] < 2
