"""Processes under measurement, and how their CPU is read from outside (/proc)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tests.conftest import delete_namespace
from tests.harness import Gateway, Proc, Worker, free_port

AMQP_URL = os.environ.get("TIMEBOX_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Stack:
    """A namespace with a gateway and workers, torn down (namespace deleted) on exit."""

    def __init__(self, **env: str) -> None:
        self.namespace = f"tbbench-{uuid.uuid4().hex[:8]}"
        self.log_dir = Path(tempfile.mkdtemp(prefix="timebox-bench-"))
        self.env = {
            "TIMEBOX_AMQP_URL": AMQP_URL,
            "TIMEBOX_NAMESPACE": self.namespace,
            "TIMEBOX_LOG_FORMAT": "text",
            **env,
        }
        self.procs: list[Proc] = []

    def gateway(self, **env: str) -> Gateway:
        g = Gateway(f"gateway{len(self.procs)}", {**self.env, **env}, self.log_dir)
        self.procs.append(g)
        g.wait_ready(60)
        return g

    def worker(self, concurrency: int, *extra: str, **env: str) -> Worker:
        w = Worker(
            f"worker{len(self.procs)}", {**self.env, **env}, self.log_dir, concurrency, *extra
        )
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
