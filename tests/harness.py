"""Real processes under test: gateways and workers on loopback, each with its logs."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import aio_pika
import httpx

from compute.child import die_with_parent
from contracts.events import EventType, TaskEvent
from contracts.messages import WORKER_TYPE, WorkerAnnouncement
from contracts.tasks import load_tasks
from contracts.topology import Topology
from runtime.amqp import publish_event
from runtime.declare import counts, declare

if TYPE_CHECKING:
    from playwright.sync_api import Browser


@contextlib.contextmanager
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=shutil.which("chromium"),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            yield browser
        finally:
            browser.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Proc:
    """A child program whose stderr is collected line by line, so a test can wait
    for a line to appear instead of sleeping."""

    def __init__(
        self,
        name: str,
        args: list[str],
        env: dict[str, str],
        log_dir: Path,
        cwd: Path | None = None,  # another checkout: its code runs (`python -m` looks here first)
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.popen = subprocess.Popen(
            args,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            cwd=cwd,
            # killed when the test process dies: an interrupted run leaves no gateway or
            # worker behind (one that lives on would declare its deleted namespace again)
            preexec_fn=functools.partial(die_with_parent, os.getpid()),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._terminated = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stderr is not None
        with self.log_path.open("a") as log:
            for line in self.popen.stderr:
                log.write(line)
                log.flush()
                with self._cond:
                    self.lines.append(line.rstrip("\n"))
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_line(self, pattern: str, timeout: float = 15.0, start: int = 0) -> str:
        regex = re.compile(pattern)
        end = time.monotonic() + timeout
        with self._cond:
            seen = start
            while True:
                for line in self.lines[seen:]:
                    if regex.search(line):
                        return line
                seen = len(self.lines)
                left = end - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._reader.is_alive()):
                    tail = "\n".join(self.lines[-30:])
                    raise AssertionError(
                        f"{self.name}: no line matching {pattern!r}; last:\n{tail}"
                    )
                self._cond.wait(left)

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        with self._cond:
            return sum(1 for line in self.lines if regex.search(line))

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM, once (a worker takes a second one as: stop at once)."""
        if not self._terminated and self.popen.poll() is None:
            self._terminated = True
            self.signal(signal.SIGTERM)

    def stop(self, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._reader.join(5)
        if self.popen.stderr is not None:
            self.popen.stderr.close()
        return self.popen.returncode


class Gateway(Proc):
    def __init__(
        self,
        name: str,
        env: dict[str, str],
        log_dir: Path,
        port: int | None = None,
        cwd: Path | None = None,
        ready_on_use: bool = False,
    ) -> None:
        self.port = port or free_port()
        self._url = f"http://127.0.0.1:{self.port}"
        # waited for at the first use of its URL: what starts meanwhile (a worker, another
        # gateway) starts alongside it
        self._wait_on_use = ready_on_use
        self._first_use = threading.Lock()  # the other users of its URL wait for the first
        self._key = (env.get("TIMEBOX_API_KEYS") or "").split(",")[0].strip()
        super().__init__(
            name, [sys.executable, "-m", "gateway", "--port", str(self.port)], env, log_dir, cwd
        )

    def wait_hears(self, worker: str, timeout: float = 20.0) -> None:
        """Waits until this gateway has heard the worker's announcement."""
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        end = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                heard = httpx.get(f"{self.url}/v1/workers", headers=headers, timeout=2).json()
                if any(w.get("worker") == worker for w in heard):
                    return
            if time.monotonic() > end:
                raise AssertionError(f"{self.name} never heard of worker {worker}")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        if self._wait_on_use:
            with self._first_use:
                if self._wait_on_use:
                    try:
                        self.wait_ready()
                    finally:
                        self._wait_on_use = False
        return self._url

    def wait_ready(self, timeout: float = 20.0) -> None:
        self.wait_for_line(r"Uvicorn running|Application startup complete", timeout)
        end = time.monotonic() + timeout
        while True:  # readiness also needs the event stream read up to now
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self._url}/readyz", timeout=2).status_code == 200:
                    return
            if time.monotonic() > end:
                raise AssertionError(f"{self.name} never became ready")
            time.sleep(0.05)


class Worker(Proc):
    def __init__(
        self,
        name: str,
        env: dict[str, str],
        log_dir: Path,
        concurrency: int,
        *extra: str,
        cwd: Path | None = None,
    ) -> None:
        super().__init__(
            name,
            [sys.executable, "-m", "compute", "--concurrency", str(concurrency), *extra],
            env,
            log_dir,
            cwd,
        )

    def wait_ready(self, timeout: float = 20.0) -> None:
        self.wait_for_line(r"worker \S+ ready", timeout)

    @property
    def status_name(self) -> str:
        """How a task's status names this worker."""
        return f"{socket.gethostname()}:{self.pid}"

    def drop_connection(self) -> None:
        """The broker closes this worker's connection (rabbitmqctl: a local broker)."""
        listed = subprocess.run(
            [
                "rabbitmqctl",
                "list_connections",
                "-q",
                "--no-table-headers",
                "pid",
                "client_properties",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        mine = f'"worker {self.status_name}"'
        pids = [line.split("\t")[0] for line in listed.splitlines() if mine in line]
        assert pids, f"no connection of {self.status_name}"
        for pid in pids:
            subprocess.run(
                ["rabbitmqctl", "close_connection", pid, "timebox fault test"],
                check=True,
                capture_output=True,
                timeout=30,
            )


class Announcer:
    """Announces a worker of `tasks` every second, as a worker does, that takes no
    message: the gateways send it work, which stays queued."""

    def __init__(self, amqp_url: str, namespace: str, tasks: list[str]) -> None:
        from tests.conftest import MODULES

        digests = {t.name: t.digest for t in load_tasks(MODULES.split(",")).values()}
        self.name = f"busy-{os.getpid()}-{id(self)}"
        self._announcement = WorkerAnnouncement(
            worker=self.name, tasks={t: digests[t] for t in tasks}, slots=1, busy=1
        )
        self._stream = Topology(namespace=namespace).events_stream
        self._url = amqp_url
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    async def _run(self) -> None:
        connection = await aio_pika.connect(self._url)
        async with connection:
            channel = await connection.channel()

            async def announce(stopping: bool) -> None:
                update = {"at": time.time(), "stopping": stopping}
                body = self._announcement.model_copy(update=update).model_dump_json()
                message = aio_pika.Message(body.encode(), type=WORKER_TYPE)
                await channel.default_exchange.publish(message, self._stream)

            while not self._stopping.is_set():
                await announce(stopping=False)
                await asyncio.to_thread(self._stopping.wait, 1.0)
            await announce(stopping=True)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(10)


TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu(root: int, include_root: bool = True) -> float:
    """CPU seconds of a process and all its descendants, dead ones included: a reaped
    child's time is in its parent's cutime/cstime, a live one's is read directly.
    Without the root: only its children's (the root's own user+system left out)."""
    total = 0.0
    for pid in process_tree(root):
        fields = _stat(pid)
        if fields is None:
            continue
        own = int(fields[11]) + int(fields[12])
        reaped = int(fields[13]) + int(fields[14])
        total += (reaped + (own if include_root or pid != root else 0)) / TICK
    return total


def busy_task_child(worker_pid: int) -> int:
    """The pid of a worker's child that runs a task: a child of its fork server that
    is on a CPU (idle children sleep in a read)."""
    found: list[int] = []

    def burning() -> bool:
        for pid in process_tree(worker_pid)[1:]:
            fields = _stat(pid)
            if fields is not None and int(fields[1]) != worker_pid and fields[0] == b"R":
                found.append(pid)
                return True
        return False

    wait_until(burning, 10, "a task child on a CPU")
    return found[0]


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != b"Z"


def wait_until(predicate: object, timeout: float, what: str) -> None:
    """For conditions with no event to wait on (a process exiting, a count in /proc)."""
    assert callable(predicate)
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def events_read(client: httpx.Client) -> float:
    """How many events the gateway has read from the stream, live and history."""
    metrics = client.get("/metrics").text
    found = re.search(r"^timebox_gateway_events_read_total (\S+)$", metrics, re.M)
    assert found is not None
    return float(found[1])


def task_events(
    client: httpx.Client, task_id: str, last_event_id: str | None = None
) -> list[tuple[str, dict[str, object], str]]:
    """(event, data, id) of a task, read over SSE until its terminal event."""
    import json

    from httpx_sse import connect_sse

    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with connect_sse(client, "GET", f"/v1/tasks/{task_id}/events", headers=headers) as source:
        # httpx-sse reports a heartbeat comment as an event without data: skip those
        return [(e.event, json.loads(e.data), e.id) for e in source.iter_sse() if e.data]


def wait_for_event(client: httpx.Client, task_id: str, kind: str) -> dict[str, object]:
    """Reads the task's SSE stream until an event of `kind` arrives."""
    import json

    from httpx_sse import connect_sse

    with connect_sse(client, "GET", f"/v1/tasks/{task_id}/events") as source:
        for e in source.iter_sse():
            if e.event == kind:
                data: dict[str, object] = json.loads(e.data)
                return data
    raise AssertionError(f"task {task_id} ended without a {kind!r} event")


def queue_counts(amqp_url: str, queue: str) -> tuple[int, int]:
    """The broker's own count of a queue's ready messages and consumers (a passive declare)."""

    async def count() -> tuple[int, int]:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            return await counts(await connection.channel(), queue)

    return asyncio.run(count())


def queued_task(amqp_url: str, namespace: str, task: str, timeout: float = 10) -> str:
    """The id of the first task of type `task` queued in the namespace (read from its
    event stream, as a gateway reads it)."""

    async def read() -> str:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=100)
            stream = await channel.get_queue(Topology(namespace=namespace).events_stream)
            arguments = {"x-stream-offset": "first"}
            async with asyncio.timeout(timeout), stream.iterator(arguments=arguments) as events:
                async for message in events:
                    await message.ack()
                    with contextlib.suppress(ValueError):
                        event = TaskEvent.model_validate_json(message.body)
                        if event.type is EventType.QUEUED and event.task == task:
                            return event.task_id
        raise AssertionError(f"no {task} task queued")

    return asyncio.run(read())


def presence_told(amqp_url: str, namespace: str, tasks: int, timeout: float = 10) -> None:
    """Waits until a gateway tells the workers that clients follow `tasks` tied tasks
    there (a word on the control exchange, as a worker hears it)."""
    from contracts.messages import PRESENCE_TYPE, Presence

    async def listen() -> None:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(exclusive=True)
            await queue.bind(Topology(namespace=namespace).control_exchange)
            async with asyncio.timeout(timeout), queue.iterator(no_ack=True) as messages:
                async for message in messages:
                    told = message.type == PRESENCE_TYPE and Presence.model_validate_json(
                        message.body
                    )
                    if told and len(told.tasks) >= tasks:
                        return

    asyncio.run(listen())


def messages_ready(amqp_url: str, queue: str) -> int:
    return queue_counts(amqp_url, queue)[0]


def echo_lifecycle(task_id: str, **queued: object) -> list[TaskEvent]:
    """The events of one `echo` task that ran and succeeded, `queued` with these fields."""
    task = {"task_id": task_id, "task": "echo"}
    return [
        TaskEvent(type=EventType.QUEUED, deadline_ms=int(time.time() * 1000), **task, **queued),
        TaskEvent(type=EventType.RUNNING, worker="w:1", attempt=1, **task),
        TaskEvent(type=EventType.SUCCEEDED, worker="w:1", result={"payload": 1}, ran=0.01, **task),
    ]


async def fill_stream(
    amqp_url: str, namespace: str, events: list[TaskEvent], batch: int = 2000
) -> None:
    """Publishes `events` to the namespace's event stream (declared as a gateway
    declares it), each confirmed, `batch` at a time."""
    topology = Topology(namespace=namespace)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare(channel, topology, {})
        for i in range(0, len(events), batch):
            await asyncio.gather(
                *(
                    publish_event(channel, topology.events_stream, e, confirm_within=60)
                    for e in events[i : i + batch]
                )
            )
