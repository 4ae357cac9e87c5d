"""A task stops at its deadline and runs once at a time, whatever happens to its
worker: frozen (SIGSTOP: a paused VM or container, a loop stuck in a blocking call) or
cut off from the broker."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import uuid
from datetime import datetime

import aio_pika
import httpx
import pytest

from contracts.deadline import Deadline
from contracts.tasks import DEFAULT_QUEUE
from contracts.topology import Topology
from tests.conftest import Stack
from tests.harness import (
    alive,
    busy_task_child,
    process_tree,
    queue_counts,
    task_events,
    wait_for_event,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("hold_gil", [False, True], ids=["python-loop", "hold-gil"])
def test_a_frozen_worker_s_task_is_stopped_by_the_kernel_at_its_deadline(
    make_stack, hold_gil: bool
) -> None:
    """The worker is stopped (SIGSTOP) while its task runs across its deadline: its
    child is gone within the kill grace of the stop time, killed by the timer it armed
    in the kernel; once the worker runs again it says the task was aborted."""
    stack: Stack = make_stack(TIMEBOX_HEARTBEAT="30")  # no watchdog: the freeze is short
    stack.gateway()
    worker = stack.worker(1)
    with stack.client() as client:
        body = {"seconds": 30, "hold_gil": hold_gil}
        task = client.post("/v1/tasks/burn_cpu", json=body, headers={"Request-Timeout": "2"})
        task_id = task.json()["id"]
        deadline = datetime.fromisoformat(task.json()["deadline"]).timestamp()
        wait_for_event(client, task_id, "running")
        child = busy_task_child(worker.pid)
        worker.signal(signal.SIGSTOP)
        try:
            wait_until(lambda: not alive(child), 10, "the child's end")
            gone_at = time.time()
            stop_at = deadline - 0.1 - 0.05  # reply margin and clock skew
            assert gone_at - stop_at < 0.1 + 0.2, gone_at - stop_at  # the grace, and our polling
            assert not any(alive(p) for p in process_tree(child))
        finally:
            worker.signal(signal.SIGCONT)
        events = task_events(client, task_id)
    assert events[-1][0] == "aborted", events[-1]
    assert abs(float(events[-1][1]["late_by"])) < 0.5  # type: ignore[arg-type]


def test_a_task_that_answered_before_its_frozen_worker_woke_has_succeeded(make_stack) -> None:
    """Frozen while the task ends, and until past its deadline: its answer was made in
    time, so it is the outcome, with the run time it took."""
    stack: Stack = make_stack(TIMEBOX_HEARTBEAT="30")
    stack.gateway()
    worker = stack.worker(1)
    with stack.client() as client:
        body = {"seconds": 0.5}
        task = client.post("/v1/tasks/burn_cpu", json=body, headers={"Request-Timeout": "2"})
        task_id = task.json()["id"]
        deadline = datetime.fromisoformat(task.json()["deadline"]).timestamp()
        wait_for_event(client, task_id, "running")
        worker.signal(signal.SIGSTOP)
        try:  # frozen while the task ends, and past its deadline
            wait_until(lambda: time.time() > deadline + 0.5, 10, "the deadline")
        finally:
            worker.signal(signal.SIGCONT)
        ended = task_events(client, task_id)[-1]
    assert ended[0] == "succeeded"
    # its run time as the child measured it: the freeze neither counts nor is learnt
    assert float(ended[1]["ran"]) < 1.0  # type: ignore[arg-type]


def test_messages_a_frozen_worker_held_are_run_by_another(make_stack) -> None:
    """A worker stopped with free slots is still handed messages; once RabbitMQ has
    given up on it (two heartbeats of silence), they go to the other worker."""
    stack: Stack = make_stack(TIMEBOX_HEARTBEAT="1")
    stack.gateway()
    frozen = stack.worker(2)
    other = stack.worker(1)
    with stack.client() as client:
        frozen.signal(signal.SIGSTOP)
        try:
            ids = [
                client.post(
                    "/v1/tasks/echo", json={"payload": i}, headers={"Request-Timeout": "20"}
                ).json()["id"]
                for i in range(4)
            ]
            for task_id in ids:
                assert task_events(client, task_id)[-1][0] == "succeeded"
            ran_on = {client.get(f"/v1/tasks/{i}").json()["worker"] for i in ids}
        finally:
            frozen.signal(signal.SIGCONT)
    assert ran_on == {other.status_name}


def test_a_task_never_runs_on_two_workers_at_once_when_the_broker_drops_them(
    make_stack,
) -> None:
    """Every connection closed while tasks run: their messages go back to the queue and
    to whichever worker takes them; the workers that lost them stop them first."""
    stack: Stack = make_stack()
    stack.gateway()
    workers = [stack.worker(2), stack.worker(2)]
    with stack.client() as client:
        ids = start_exclusive(client, 4)
        subprocess.run(
            ["rabbitmqctl", "close_all_connections", "timebox fault test"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        wait_until(lambda: client.get("/readyz").status_code == 200, 30, "readiness")
        assert_ran_once_at_a_time(client, ids)
    assert sum(w.count("handed_back exclusive") for w in workers) >= 1


def test_a_message_a_worker_lost_waits_for_its_run_there_to_stop(make_stack) -> None:
    """Only the running worker's connection is closed: RabbitMQ gives its messages at
    once to the other, connected and idle, which waits for the first run to stop."""
    stack: Stack = make_stack()
    stack.gateway()
    first = stack.worker(2)
    with stack.client() as client:
        # long enough to be running still once the other worker is up (seconds, under load)
        ids = start_exclusive(client, 2, seconds=6)
        other = stack.worker(2)
        first.drop_connection()
        assert_ran_once_at_a_time(client, ids)
        assert {client.get(f"/v1/tasks/{i}").json()["worker"] for i in ids} == {other.status_name}
    assert first.count("handed_back exclusive") == 2


def test_two_deliveries_of_one_task_handed_back_together_run_it_once(
    make_stack, amqp_url: str
) -> None:
    """A task published twice, both copies held by a consumer whose channel then
    closed: they reach the next worker together, both marked redelivered, and the
    second waits for the first's end (then is acked) instead of running beside it."""
    stack: Stack = make_stack()
    stack.gateway()
    topology = Topology(namespace=stack.namespace)
    queue_name = topology.task_queue(DEFAULT_QUEUE)
    task_id = str(uuid.uuid4())

    async def hand_back_two_copies() -> None:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=2)
            queue = await channel.declare_queue(
                queue_name, durable=True, arguments=topology.task_queue_arguments()
            )
            deadline = Deadline.after(20, maximum=60)
            for _ in range(2):
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        json.dumps({"key": task_id, "seconds": 1}).encode(),
                        content_type="application/json",
                        message_id=task_id,
                        type="exclusive",
                        headers=dict(deadline.headers()),
                    ),
                    queue_name,
                )
            held: list[object] = []
            async with queue.iterator() as messages:
                async for message in messages:
                    held.append(message)
                    if len(held) == 2:
                        break
            await channel.close()  # unacked: both go back, marked redelivered

    asyncio.run(hand_back_two_copies())
    worker = stack.worker(2)
    with stack.client() as client:
        events = task_events(client, task_id)
        assert [kind for kind, _, _ in events].count("running") == 1, events
        assert events[-1][0] == "succeeded", events[-1]
        wait_until(lambda: queue_counts(amqp_url, queue_name)[0] == 0, 10, "an empty queue")
    assert worker.count("exclusive") == 1  # one outcome; the copy was acked unrun


def start_exclusive(client: httpx.Client, count: int, seconds: float = 2) -> list[str]:
    """`count` tasks that fail if run twice at once, each running once this returns."""
    key = uuid.uuid4().hex[:8]
    ids = [
        client.post(
            "/v1/tasks/exclusive",
            json={"key": f"{key}-{i}", "seconds": seconds},
            headers={"Request-Timeout": "30"},
        ).json()["id"]
        for i in range(count)
    ]
    for task_id in ids:
        wait_for_event(client, task_id, "running")
    return ids


def assert_ran_once_at_a_time(client: httpx.Client, ids: list[str]) -> None:
    """Each task succeeded (a second run at once would have failed: the task holds a
    lock), and its status describes its last run: started, run and ended by one
    worker, its attempts its starts."""
    for task_id in ids:
        events = task_events(client, task_id)
        assert events[-1][0] == "succeeded", events[-1]
        runs = [data for kind, data, _ in events if kind == "running"]
        status = client.get(f"/v1/tasks/{task_id}").json()
        assert status["attempts"] == len({run["attempt"] for run in runs}) >= 2
        assert status["worker"] == runs[-1]["worker"] == events[-1][1]["worker"]
        last_start = datetime.fromisoformat(status["started_at"]).timestamp()
        assert last_start == pytest.approx(float(runs[-1]["at"]), abs=0.002)  # type: ignore[arg-type]
