"""The pool's children come from a fork server: replaced at once, reaped and accounted
for by it, and gone with it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import select
import signal
import time

import pytest

from compute import runner
from compute.forkserver import ForkServer
from compute.outcome import Kind
from compute.pool import PROTOCOL_LIMIT, Child, Pool
from contracts.deadline import Deadline
from tests.harness import alive

pytestmark = pytest.mark.timeout(30)

DEMO = ["examples.tasks", "tests.sample_tasks"]


def request(task: str, input_json: str) -> dict[str, object]:
    return {
        "task": task,
        "id": "t",
        "input_json": input_json,
        "deadline_ms": int((time.time() + 30) * 1000),
    }


async def echo_through(pool: Pool) -> None:
    child = await pool.acquire()
    try:
        await child.send(request("echo", '{"payload": 7}'))
        answer = await child.receive()
        assert answer is not None
        assert answer["output"] == {"payload": 7}
    finally:
        pool.release(child)


@pytest.fixture
async def pool():
    pool = Pool(1, DEMO)
    await pool.start()
    yield pool
    await pool.close()


async def test_a_killed_child_is_reaped_with_its_cpu_and_replaced(pool: Pool) -> None:
    child = await pool.acquire()
    await child.send(request("burn_cpu", '{"seconds": 30}'))
    progress = await child.receive()  # it burns
    assert progress is not None
    assert progress["kind"] == "progress"
    cpu, _ = await child.stop(0.2)
    assert child.proc.returncode == 143  # SIGTERM ended the task code, then the child
    assert 0.05 < cpu < 5  # reported by the fork server, which reaped it
    pool.release(child)
    replacement = await pool.acquire()
    assert replacement.pid != child.pid
    assert alive(replacement.pid)
    pool.release(replacement)
    await echo_through(pool)


async def test_an_exit_report_outlives_a_wait_cancelled_as_it_comes(pool: Pool) -> None:
    """A kill's grace can run out in the loop turn in which the fork server's report of
    the child's exit is read: the wait cancelled then must leave the report to the wait
    after the SIGKILL, which otherwise never returned (the worker's slot lost and its
    task never reported; seen once in CI)."""
    child = await pool.acquire()
    server, pid = pool.server, child.pid
    waiting = asyncio.ensure_future(child.proc.wait())
    loop = asyncio.get_running_loop()

    def cancel_once_reported() -> None:  # before the waiting task can wake with it
        if server.exit_if_known(pid) is None:
            loop.call_soon(cancel_once_reported)
        else:
            waiting.cancel()

    loop.call_soon(cancel_once_reported)
    os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    assert waiting.cancelled()
    assert (await asyncio.wait_for(child.proc.wait(), 5)).code == -signal.SIGKILL
    pool.release(child)


async def test_a_kill_whose_exit_is_never_reported_still_frees_the_slot(pool: Pool) -> None:
    """A fork server that does not answer (stopped here) must not hold a slot for good:
    after the SIGKILL the wait for its report is bounded and the child counts as dead."""
    child = await pool.acquire()
    await child.send(request("burn_cpu", '{"seconds": 30}'))
    assert await child.receive() is not None  # it burns
    server = pool.server.pid
    assert server is not None
    os.kill(server, signal.SIGSTOP)
    try:
        started = time.monotonic()
        await asyncio.wait_for(child.stop(0.1, report_within=0.5), 10)
        assert time.monotonic() - started < 5
        assert not child.alive
    finally:
        os.kill(server, signal.SIGCONT)
    pool.release(child)
    await echo_through(pool)  # the spare took its place


async def test_a_child_that_died_idle_is_never_handed_a_task(pool: Pool) -> None:
    """A task given to a child that is already dead would fail as `crashed` without
    ever running: acquiring passes over it and replaces it instead."""
    idle = await pool.acquire()
    pool.release(idle)
    os.kill(idle.pid, signal.SIGKILL)
    await asyncio.wait_for(idle.proc.wait(), 5)  # the fork server reported its exit
    assert pool.try_acquire() is not idle
    child = await asyncio.wait_for(pool.acquire(), 5)
    assert child is not idle
    assert child.alive
    pool.release(child)
    await echo_through(pool)


async def test_a_fork_server_that_stops_forking_is_replaced() -> None:
    """A fork server that never answers would leave a killed child's slot empty for
    good: a new child that is not ready in time gets its slot from a new server."""
    pool = Pool(1, DEMO, ready_within=0.5)
    await pool.start()
    try:
        hung = pool.server.pid
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)
        child = await pool.acquire()
        child.discard()
        pool.release(child)  # the spare takes the slot; a new spare is asked for
        spare = await asyncio.wait_for(pool.acquire(), 5)
        # a hung server reports no exit: this one is known only once it is replaced
        await asyncio.wait_for(spare.proc.wait(), 10)
        pool.release(spare)
        await asyncio.wait_for(echo_through(pool), 10)
        assert pool.server.pid != hung
        assert not alive(hung)  # killed, and its children with it
        assert not alive(spare.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung, signal.SIGCONT)
        await pool.close()


async def test_a_fork_server_still_importing_the_task_code_is_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only a server that has loaded the task code and then forks nothing is hung: one
    slow to import it (here 1.5 s, against 0.5 s for a child to be ready) is not killed."""
    monkeypatch.setenv("TIMEBOX_TEST_IMPORT_SECONDS", "1.5")
    # 0.2 s was too short for a fork on two busy cores
    pool = Pool(1, ["tests.slow_import_tasks"], ready_within=0.5)
    try:
        await asyncio.wait_for(pool.start(), 20)
        server = pool.server.pid
        await echo_through(pool)
        assert pool.server.pid == server
        assert pool.server.up
    finally:
        await pool.close()


async def test_the_fork_server_reports_every_child_of_many_that_end_together() -> None:
    """Children that end all at once: the fork server reaps each, reports each exit,
    and lives on (a SIGCHLD handled inside the handler once reaped a child under its
    feet, and the error it raised killed the server; seen once in CI)."""
    server = ForkServer(0, PROTOCOL_LIMIT, DEMO)
    await server.start()
    try:
        for _ in range(5):
            children = await asyncio.gather(*(Child.spawn(server) for _ in range(20)))
            for one in children:
                one.proc.close()  # EOF: each ends
            codes = await asyncio.wait_for(
                asyncio.gather(*(one.proc.wait() for one in children)), 20
            )
            assert [one.code for one in codes] == [0] * len(children)
            assert server.alive
    finally:
        await server.close(grace=0.0)


async def test_children_die_with_the_fork_server_and_the_pool_starts_another(pool: Pool) -> None:
    child = await pool.acquire()
    server = pool.server.pid
    assert server is not None
    os.kill(server, signal.SIGKILL)
    assert await child.receive() is None  # PR_SET_PDEATHSIG: it died with its parent
    assert (await asyncio.wait_for(child.proc.wait(), 5)).code == -signal.SIGKILL
    pool.release(child)
    await echo_through(pool)
    assert pool.server.pid not in (None, server)
    assert not alive(child.pid)


async def test_closing_the_pool_leaves_no_process(pool: Pool) -> None:
    await echo_through(pool)
    pids = pool.pids()
    assert len(pids) >= 2  # a child and the fork server
    await pool.close()
    for pid in pids:
        assert not alive(pid)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_closing_the_pool_while_it_replaces_a_child_leaves_no_pipe_open() -> None:
    """Closing may cancel a replacement (and a new spare) at any step of its fork:
    whatever step it is at, every pipe of the pool is closed."""
    before = open_fds()
    for turns in range(12):
        pool = Pool(1, DEMO)
        await pool.start()
        child = await pool.acquire()
        child.discard()
        pool.release(child)  # a replacement and a new spare are on their way
        for _ in range(turns):
            await asyncio.sleep(0)
        await pool.close()
        for _ in range(5):  # the transports' connection_lost callbacks
            await asyncio.sleep(0)
        gc.collect()  # an unclosed transport warns here, in this test
        assert open_fds() == before, f"pipes left open after {turns} turns"


def job(task: str, input_json: str, stop_in: float) -> runner.Job:
    return runner.Job(
        task=task,
        task_id="t",
        input_json=input_json,
        deadline=Deadline(int((time.time() + stop_in + 0.15) * 1000)),
        stop_at=time.time() + stop_in,
        kill_grace=0.2,
    )


def nothing(fraction: float, text: str | None) -> None:
    pass


async def test_a_killed_task_is_charged_its_own_cpu_not_its_childs_earlier_tasks(
    pool: Pool,
) -> None:
    child = await pool.acquire()
    done = await runner.run(child, job("burn_cpu", '{"seconds": 0.4}', 30), nothing)
    assert done.kind is Kind.SUCCEEDED
    assert child.used >= 0.4  # the child says how much it has used, with each answer
    killed = await runner.run(child, job("burn_cpu", '{"seconds": 30}', 0.3), nothing)
    assert killed.kind is Kind.ABORTED
    assert 0 < killed.cpu_seconds < 0.38  # its 0.3 s at most, not with the earlier 0.4 s
    pool.release(child)


async def test_an_idle_child_goes_to_whoever_waited_first(pool: Pool) -> None:
    child = pool.try_acquire()
    assert child is not None
    assert pool.try_acquire() is None  # the only one is taken
    waiting = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0)  # it is waiting now
    pool.release(child)
    assert pool.try_acquire() is None  # given back, but promised to the one waiting
    assert await asyncio.wait_for(waiting, 5) is child
    pool.release(child)


async def test_a_freed_child_goes_to_the_most_urgent_waiter_first_come_among_equals(
    pool: Pool,
) -> None:
    """Waiters by urgency (a task's stop time): the earliest deadline first. A waiter
    cancelled on the way is skipped, and one cancelled as it is given the child hands it
    on."""
    child = pool.try_acquire()
    assert child is not None
    order: list[str] = []

    async def wait(name: str, urgency: float) -> None:
        got = await pool.acquire(urgency)
        order.append(name)
        pool.release(got)

    waiters = {
        name: asyncio.ensure_future(wait(name, urgency))
        for name, urgency in [("late", 30.0), ("soon", 10.0), ("gone", 5.0), ("soon too", 10.0)]
    }
    await asyncio.sleep(0)  # all four wait now
    waiters["gone"].cancel()
    pool.release(child)
    await asyncio.wait_for(asyncio.gather(waiters["late"], waiters["soon"], waiters["soon too"]), 5)
    assert order == ["soon", "soon too", "late"]
    assert pool.try_acquire() is child
    pool.release(child)


@pytest.mark.parametrize("hold_gil", [False, True], ids=["python-loop", "hold-gil"])
async def test_a_child_whose_worker_does_nothing_is_stopped_by_the_kernel(
    pool: Pool, hold_gil: bool
) -> None:
    """Its timer in the kernel fires at the stop time and the kill grace, whatever the
    task does, however frozen its worker: nobody but the kernel acts here."""
    child = await pool.acquire()
    stopped = job("burn_cpu", json.dumps({"seconds": 30, "hold_gil": hold_gil}), 0.3)
    await child.send({**runner_request(stopped), "kill_at": stopped.kill_at})
    end = await asyncio.wait_for(child.proc.wait(), 5)
    assert end.code == -signal.SIGKILL
    assert end.at is not None
    assert stopped.kill_at <= end.at < stopped.kill_at + 0.2
    pool.release(child)


async def test_an_answer_made_before_the_stop_time_is_the_outcome_however_late_it_is_read(
    pool: Pool,
) -> None:
    """A worker frozen across a task's stop time finds, once it runs again, the stop time
    passed and the answer in the pipe, unread: it was made in time, so it is the
    outcome (succeeded), not the stop the worker decides on."""
    child = await pool.acquire()
    quick = job("burn_cpu", '{"seconds": 0.05}', 0.3)
    transport = child.proc._stdout_transport
    transport.pause_reading()  # the loop must not take the answer before we see it
    await child.send(runner_request(quick))
    pipe = transport.get_extra_info("pipe")
    # it has answered; nobody has read it (watched from another thread: not the loop's)
    ready, _, _ = await asyncio.to_thread(select.select, [pipe], [], [], 5)
    assert ready
    transport.resume_reading()
    quick.stop_at = time.time()  # and the stop time has come since
    done = await runner._kill(child, quick, Kind.ABORTED, "deadline", time.time(), 0.0)
    assert done.kind is Kind.SUCCEEDED, done
    assert done.output == {"seconds": pytest.approx(0.05, abs=0.05)}


async def test_a_task_the_kernel_stopped_while_its_worker_was_frozen_is_aborted(
    pool: Pool,
) -> None:
    child = await pool.acquire()
    stopped = job("burn_cpu", '{"seconds": 30}', 0.3)
    stopped.progress_interval = 0.01
    burning = asyncio.Event()
    running = asyncio.ensure_future(runner.run(child, stopped, lambda *_: burning.set()))
    await burning.wait()
    freeze(1.0)  # past its stop time, the grace and the kernel's timer
    done = await running
    assert done.kind is Kind.ABORTED, done
    assert child.proc.exit is not None
    assert child.proc.exit.at is not None
    assert child.proc.exit.at < stopped.kill_at + 0.2  # the kernel did not wait for us
    pool.release(child)


def freeze(seconds: float) -> None:
    """Blocks the event loop, as a stopped worker's is."""
    time.sleep(seconds)


def runner_request(one: runner.Job) -> dict[str, object]:
    return {
        "task": one.task,
        "id": one.task_id,
        "input_json": one.input_json,
        "deadline_ms": one.deadline.epoch_ms,
    }
