"""The Python client against the real stack, sync and async."""

import signal
import threading
import uuid
from urllib.parse import urlsplit

import httpx
import pytest

from contracts.events import TaskEvent
from tests.conftest import Stack
from tests.harness import Gateway, free_port, metric, wait_until
from tests.proxy import Proxy, url_to_port
from timebox_client import (
    AsyncClient,
    Client,
    DeadlineUnmeetable,
    IdempotencyKeyReused,
    Overloaded,
    TaskCancelled,
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
        assert kinds == ["queued", "succeeded"]  # too short to say `running` on its own
        assert tb.status(task.id).result == {"payload": [1, "two"]}
        with pytest.raises(TaskFailed) as failed:
            tb.call("explode", {"message": "bad input"}, request_timeout=10)
        assert failed.value.task is not None
        assert failed.value.task.error is not None
        assert failed.value.task.error.message == "bad input"
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


@pytest.mark.parametrize("gateway_waits", [True, False], ids=["gateway-waits", "client-retries"])
def test_an_event_stream_asked_of_a_gateway_not_yet_connected_comes_once_it_is(
    make_stack, amqp_url: str, gateway_waits: bool
) -> None:
    """A gateway restarted while a browser or a client follows a task, and slow to reach
    RabbitMQ: the stream's request waits for it to read the event stream, not 503
    (which stops a browser's EventSource for good). One told not to wait answers 503
    with Retry-After, and the client tries again after it."""
    stack: Stack = make_stack()
    stack.gateway()
    stack.worker(1)
    with Client(stack.url) as tb:
        task = tb.submit("burn_cpu", {"seconds": 0.2})
    port = free_port()  # the late gateway's broker: nothing listens here yet
    late = Gateway(
        "gateway-late",
        {
            **stack.env,
            "TIMEBOX_AMQP_URL": url_to_port(amqp_url, port),
            "TIMEBOX_HISTORY_WAIT": "60" if gateway_waits else "0",
            "TIMEBOX_ACCESS_LOG": "true",
        },
        stack.log_dir,
    )
    stack.gateways.append(late)
    late.wait_for_line("Uvicorn running", 20)
    seen: list[TaskEvent] = []
    failed: list[BaseException] = []

    def follow() -> None:
        try:
            with Client(late.url, reconnect_attempts=5) as tb:
                seen.extend(tb.events(task.id))
        except BaseException as exc:
            failed.append(exc)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    if gateway_waits:
        with httpx.Client(base_url=late.url, timeout=10) as c:
            wait_until(
                lambda: metric(c.get("/metrics").text, "timebox_sse_streams_waiting_for_history"),
                20,
                "the stream's request to wait",
            )
    else:
        late.wait_for_line(rf"GET /v1/tasks/{task.id}/events HTTP/1.1\" 503", 20)
    proxy = Proxy(urlsplit(amqp_url).port or 5672, listen_port=port)  # the broker comes
    try:
        follower.join(30)
        assert not follower.is_alive()
        assert not failed, failed
        # (progress too, should a busy machine stretch its 0.2 s past a report's interval)
        kinds = [e.type.value for e in seen if e.type.value != "progress"]
        assert kinds == ["queued", "running", "succeeded"]
        refused = late.count(r"/events HTTP/1.1\" 503")
        assert refused == 0 if gateway_waits else refused >= 1
    finally:
        stack.stop()
        proxy.close()


def test_an_event_stream_waiting_on_a_gateway_told_to_stop_says_reconnect(
    make_stack, amqp_url: str
) -> None:
    """A gateway that has not read the event stream yet (here: RabbitMQ away) is told to
    stop while an event stream's request waits for it: the request is answered at once
    with an empty stream that says when to reconnect (an EventSource does, through the
    load balancer, to a gateway that can serve it), not cut with a 500 when uvicorn's
    graceful shutdown runs out (an EventSource stops for good on it)."""
    stack: Stack = make_stack()
    late = Gateway(
        "gateway-unconnected",
        {**stack.env, "TIMEBOX_AMQP_URL": url_to_port(amqp_url, free_port())},
        stack.log_dir,
    )
    stack.gateways.append(late)
    late.wait_for_line("Uvicorn running", 20)
    answers: list[httpx.Response] = []

    def follow() -> None:
        with httpx.Client(base_url=late.url, timeout=30) as c:
            answers.append(c.get(f"/v1/tasks/{uuid.uuid4()}/events"))

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    with httpx.Client(base_url=late.url, timeout=10) as c:
        wait_until(
            lambda: metric(c.get("/metrics").text, "timebox_sse_streams_waiting_for_history"),
            20,
            "the stream's request to wait",
        )
    late.popen.send_signal(signal.SIGTERM)
    follower.join(4)  # less than uvicorn's 5 s of graceful shutdown
    assert answers, "no answer before the graceful shutdown ran out"
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].headers["content-type"].startswith("text/event-stream")
    assert "retry: " in answers[0].text
    assert late.popen.wait(15) in (0, -signal.SIGTERM)


def test_a_call_whose_gateway_is_stopped_while_it_waits_still_returns_the_result(
    make_stack,
) -> None:
    """A rolling restart: the gateway an RPC waits on is told to stop. It answers the
    wait at once with `202` and the task's Location instead of holding it until it is
    cut, the task runs on, and the client follows it to its result through the same
    URL once a gateway serves there again."""
    stack: Stack = make_stack()
    first = stack.gateway()
    stack.worker(1)
    answers: list[object] = []

    def call() -> None:
        with Client(first.url, reconnect_attempts=40, reconnect_delay=0.1) as tb:
            try:
                # longer than the 5 s a stopping gateway gives the requests still open
                answers.append(tb.call("burn_cpu", {"seconds": 7}, request_timeout=30))
            except Exception as exc:
                answers.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    with httpx.Client(base_url=first.url, timeout=10) as c:
        wait_until(
            lambda: metric(
                c.get("/metrics").text, "timebox_gateway_queue_wait_seconds_count", task="burn_cpu"
            ),
            20,
            "the task to start",
        )
    first.signal(signal.SIGTERM)
    first.popen.wait(10)  # at once: nothing holds it for the graceful shutdown's 5 s
    stack.gateway(port=first.port)
    caller.join(30)
    assert not caller.is_alive()
    [answer] = answers
    assert isinstance(answer, dict), answer
    assert answer["seconds"] == pytest.approx(7, abs=0.01)


@pytest.mark.parametrize(
    ("state", "kind", "code", "slug"),
    [
        ("failed", TaskFailed, 500, "task-failed"),
        ("aborted", TaskTimedOut, 504, "task-aborted"),
        ("expired", TaskTimedOut, 504, "task-expired"),
        ("running", TaskTimedOut, 504, "deadline-passed"),
        ("cancelled", TaskCancelled, 409, "task-cancelled"),
        ("rejected", Overloaded, 503, "task-rejected"),
    ],
)
def test_each_ending_is_one_error_on_the_gateway_and_the_same_in_the_client(
    state: str, kind: type[ProblemError], code: int, slug: str
) -> None:
    """One table: what the gateway answers for a task's end, what `call` raises from
    that answer, and what it raises for a task it followed to its end after a `202`."""
    from contracts.errors import ending
    from contracts.events import ErrorInfo, TaskState, TaskStatus
    from timebox_client.client import _result

    status = TaskStatus(
        id="t", task="echo", state=TaskState(state), error=ErrorInfo(type="E", message="m")
    )
    served = ending(status)
    assert type(served) is kind or isinstance(served, kind)
    assert (served.status, served.slug) == (code, slug)
    read = ProblemError.from_problem(served.status, served.body)
    assert isinstance(read, kind)
    assert (read.status, read.slug, read.detail) == (code, slug, served.detail)
    assert read.task == status
    with pytest.raises(kind):
        _result("echo", status)
    ok = TaskStatus(id="t", task="echo", state=TaskState.SUCCEEDED, result={"payload": 1})
    assert ending(ok) is None
    assert _result("echo", ok) == {"payload": 1}


def test_refusals_come_back_as_typed_errors(make_stack) -> None:
    stack: Stack = make_stack()
    stack.gateway()
    stack.worker(1)
    with Client(stack.url) as tb:
        for _ in range(5):
            tb.call("burn_cpu", {"seconds": 0.2}, request_timeout=10)
        with pytest.raises(DeadlineUnmeetable) as refused:
            tb.submit("burn_cpu", {"seconds": 10}, request_timeout=2)
        assert refused.value.body["largest_cost_that_fits"] < 2
        first = tb.submit("echo", {"payload": 1}, idempotency_key="typed-errors")
        assert tb.submit("echo", {"payload": 1}, idempotency_key="typed-errors").id == first.id
        with pytest.raises(IdempotencyKeyReused) as reused:
            tb.submit("echo", {"payload": 2}, idempotency_key="typed-errors")
        assert reused.value.task_id == first.id
