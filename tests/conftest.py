"""Fixtures: a real broker, a namespace of our own, real gateways and workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import httpx
import pytest

from contracts.tasks import load_tasks, module_names, routes
from contracts.topology import Topology
from tests.harness import Announcer, Gateway, Worker

LOCAL_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
MODULES = "examples.tasks,tests.sample_tasks"


def _answers(url: str) -> bool:
    async def probe() -> None:
        connection = await aio_pika.connect(url, timeout=3)
        await connection.close()

    try:
        asyncio.run(probe())
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """TIMEBOX_TEST_AMQP_URL, else the local broker if it answers, else testcontainers.
    Under CI=true a missing broker fails the run; it never skips."""
    url = os.environ.get("TIMEBOX_TEST_AMQP_URL")
    if url:
        yield url
        return
    if _answers(LOCAL_AMQP_URL):
        yield LOCAL_AMQP_URL
        return
    try:
        from testcontainers.rabbitmq import RabbitMqContainer

        container = RabbitMqContainer("rabbitmq:3.13-management")
        container.start()
    except Exception as exc:
        message = f"no RabbitMQ: set TIMEBOX_TEST_AMQP_URL, start a local broker, or Docker ({exc})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(container.port)
        yield f"amqp://{container.username}:{container.password}@{host}:{port}/"
    finally:
        container.stop()


async def delete_namespace(url: str, namespace: str, task_queues: Iterable[str] = ()) -> None:
    """Deletes what the test modules' topology declares, and the `task_queues` a test's
    own modules routed tasks to."""
    tasks = load_tasks(module_names(MODULES)).values()
    topology = Topology(namespace=namespace)
    exchanges, queues = topology.owned_names(routes(tasks))
    queues += [topology.task_queue(queue) for queue in task_queues]
    connection = await aio_pika.connect(url)
    async with connection:
        for name in queues:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.queue_delete(name, if_unused=False, if_empty=False)
        for name in exchanges:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.exchange_delete(name)


@dataclass
class Stack:
    """One namespace with its gateways and workers."""

    amqp_url: str
    namespace: str
    log_dir: Path
    env: dict[str, str]
    gateways: list[Gateway] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)
    announcers: list[Announcer] = field(default_factory=list)
    task_queues: list[str] = field(default_factory=list)  # beyond the test modules' own

    @property
    def url(self) -> str:
        return self.gateways[0].url

    def gateway(self, port: int | None = None, **env: str) -> Gateway:
        """A gateway, ready once its URL is first used; one on a port given (a restart
        on the port its clients know) is ready on return."""
        name, env = f"gateway{len(self.gateways)}", {**self.env, **env}
        g = Gateway(name, env, self.log_dir, port, ready_on_use=port is None)
        self.gateways.append(g)
        if port is not None:
            g.wait_ready()
        return g

    def worker(self, concurrency: int = 2, *extra: str, **env: str) -> Worker:
        """A worker, ready, and heard of by every gateway started before it."""
        w = Worker(
            f"worker{len(self.workers)}", {**self.env, **env}, self.log_dir, concurrency, *extra
        )
        self.workers.append(w)
        w.wait_ready()
        for g in self.gateways:
            g.wait_hears(w.status_name)
        return w

    def busy_worker(self, *tasks: str) -> Announcer:
        """A worker that serves `tasks` and never takes a message (every slot busy, as
        far as anyone can tell): their tasks stay queued. It publishes to the event
        stream the gateways declare: they are ready first."""
        for g in self.gateways:
            g.wait_ready()
        announcer = Announcer(self.amqp_url, self.namespace, list(tasks))
        self.announcers.append(announcer)
        for g in self.gateways:
            g.wait_hears(announcer.name)
        return announcer

    def client(self, index: int = 0, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.gateways[index].url, timeout=timeout)

    def stop(self) -> None:
        for announcer in self.announcers:
            announcer.stop()
        procs = [*self.workers, *self.gateways]
        for p in procs:  # all at once: each takes a moment to stop
            p.terminate()
        for p in procs:
            p.stop()


def _make_stack(amqp_url: str, log_dir: Path, **env: str) -> Stack:
    namespace = f"tbtest-{uuid.uuid4().hex[:10]}"
    base = {
        "TIMEBOX_AMQP_URL": amqp_url,
        "TIMEBOX_NAMESPACE": namespace,
        "TIMEBOX_TASK_MODULES": MODULES,
        # the tests' tasks run for fractions of a second: a report every 0.25 s
        "TIMEBOX_PROGRESS_INTERVAL": "0.25",
        **env,
    }
    return Stack(amqp_url, namespace, log_dir, base)


@contextlib.contextmanager
def running_stack(amqp_url: str, log_dir: Path, workers: int, **env: str) -> Iterator[Stack]:
    """A gateway and a worker of `workers` slots in a namespace of their own, deleted after."""
    stack = _make_stack(amqp_url, log_dir, **env)
    try:
        stack.gateway()
        stack.worker(workers)
        yield stack
    finally:
        stack.stop()
        asyncio.run(delete_namespace(amqp_url, stack.namespace, stack.task_queues))


@pytest.fixture(scope="session")
def session_stack(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One gateway and one worker (2 slots) shared by the tests that only submit and read."""
    with running_stack(amqp_url, tmp_path_factory.mktemp("session-stack"), 2) as stack:
        yield stack


@pytest.fixture
def client(session_stack: Stack) -> Iterator[httpx.Client]:
    with session_stack.client() as c:
        yield c


@pytest.fixture
def make_stack(amqp_url: str, tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """A fresh namespace per call, for tests that need their own workers or faults."""
    stacks: list[Stack] = []

    def make(**env: str) -> Stack:
        stack = _make_stack(amqp_url, tmp_path, **env)
        stacks.append(stack)
        return stack

    try:
        yield make
    finally:
        for stack in stacks:
            stack.stop()
            asyncio.run(delete_namespace(amqp_url, stack.namespace, stack.task_queues))
