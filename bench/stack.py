"""Processes under measurement, and how their CPU is read from outside (/proc)."""

from __future__ import annotations

import asyncio
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from yarl import URL

from compute.pool import cpu_seconds_of
from tests.conftest import delete_namespace
from tests.harness import Gateway, Proc, Worker, free_port, tree_cpu

AMQP_URL = os.environ.get("TIMEBOX_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def broker_pid() -> int | None:
    """The local RabbitMQ's Erlang VM, when the benchmarks' broker is on this machine."""
    if URL(AMQP_URL).host not in ("127.0.0.1", "localhost", "::1"):
        return None
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/comm") as f:
                if entry.isdigit() and f.read().strip() == "beam.smp":
                    return int(entry)
        except OSError:
            continue
    return None


class CpuMeter:
    """CPU seconds spent by the processes of one measurement (one reader each, None
    where it cannot be read), read before and after."""

    def __init__(self, readers: dict[str, Callable[[], float | None] | None]) -> None:
        self._readers = readers
        self._start: dict[str, float | None] = {}

    @classmethod
    def of_stack(cls, gateway: Gateway, worker: Worker) -> CpuMeter:
        """The gateway, the worker with its children, RabbitMQ (when local, from /proc)
        and this process, the load generator."""
        return cls(
            {
                "gateway": lambda: cpu_seconds_of(gateway.pid),
                "worker_with_children": lambda: tree_cpu(worker.pid, include_root=True),
                "rabbitmq": broker_cpu(),
                "load_generator": own_cpu,
            }
        )

    @classmethod
    def beside_tasks(cls, server_pid: int, worker_pid: int | None) -> CpuMeter:
        """What shares the cores with the tasks' own processes: the HTTP server, the
        worker's own loop (not its children), RabbitMQ and the load generator."""
        readers: dict[str, Callable[[], float | None] | None] = {
            "server": lambda: cpu_seconds_of(server_pid)
        }
        if worker_pid is not None:
            readers["worker_loop"] = lambda: cpu_seconds_of(worker_pid)
        readers["rabbitmq"] = broker_cpu()
        readers["load_generator"] = own_cpu
        return cls(readers)

    def start(self) -> None:
        self._start = {k: read() if read else None for k, read in self._readers.items()}

    def ms_per(self, n: float) -> dict[str, float | None]:
        """Milliseconds of CPU each process spent since start(), per one of n operations."""
        out: dict[str, float | None] = {}
        for k, read in self._readers.items():
            before, after = self._start.get(k), read() if read else None
            if before is None or after is None or n <= 0:
                out[k] = None
            else:
                out[k] = round(1000 * (after - before) / n, 2)
        return out


def broker_cpu() -> Callable[[], float | None] | None:
    """A reader of the local RabbitMQ's CPU seconds; None when the broker is elsewhere."""
    pid = broker_pid()
    return None if pid is None else lambda: cpu_seconds_of(pid)


def raft_index(queue: str) -> int | None:
    """The Raft log index of a quorum queue on the local broker (its largest member)."""
    if shutil.which("rabbitmq-queues") is None:
        return None
    out = subprocess.run(
        ["rabbitmq-queues", "quorum_status", queue, "--formatter", "json"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    found = re.findall(r'"Log Index":\s*(\d+)', out)
    return max(map(int, found)) if found else None


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Stack:
    """A namespace with a gateway and workers, torn down (namespace deleted) on exit."""

    def __init__(self, **env: str) -> None:
        # where its gateways and workers run from: set to another checkout, its code runs
        self.cwd: Path | None = None
        self.namespace = f"tbbench-{uuid.uuid4().hex[:8]}"
        self.log_dir = Path(tempfile.mkdtemp(prefix="timebox-bench-"))
        self.env = {
            "TIMEBOX_AMQP_URL": AMQP_URL,
            "TIMEBOX_NAMESPACE": self.namespace,
            "TIMEBOX_LOG_FORMAT": "text",
            "TIMEBOX_TASK_MODULES": "examples.tasks",
            **env,
        }
        self.procs: list[Proc] = []

    def gateway(self, **env: str) -> Gateway:
        g = Gateway(f"gateway{len(self.procs)}", {**self.env, **env}, self.log_dir, cwd=self.cwd)
        self.procs.append(g)
        g.wait_ready(60)
        return g

    def worker(self, concurrency: int, *extra: str, **env: str) -> Worker:
        name, env = f"worker{len(self.procs)}", {**self.env, **env}
        w = Worker(name, env, self.log_dir, concurrency, *extra, cwd=self.cwd)
        self.procs.append(w)
        w.wait_ready(60)
        return w

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.stop()
        asyncio.run(delete_namespace(AMQP_URL, self.namespace))


class Baseline:
    """bench/baseline_app.py under uvicorn."""

    def __init__(self, wait_for: float | None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "BASELINE_WAIT_FOR": str(wait_for or 0)}
        self.popen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "bench.baseline_app:app",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            env=env,
            start_new_session=True,  # so that its process pool goes down with it
        )
        import httpx

        end = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{self.url}/hello", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.1)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def __enter__(self) -> Baseline:
        return self

    def __exit__(self, *exc: object) -> None:
        # the pool's backlog would otherwise keep burning CPU into the next measurement
        os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(15)
