"""Timebox against FastAPI + Celery (bench/celery_peer.py), per request, in one run:
every side is up at once and blocks of each measure alternate between them (A B C …,
then backwards), so that the machine's drift falls on all. An `echo` task; Timebox's
worker and Celery's have two processes each; one uvicorn process on each side.

    python -m bench.peer [--blocks N]

Measures: sequential RPCs (p50, p99), RPCs per second with 64 in flight, `202`
submissions per second until the last task ended, and the CPU each process spends per
RPC at 64 in flight (server, worker with its children, RabbitMQ, Redis, the load
generator). Celery's variants: results over `rpc://` or Redis, task events off or on.
`rpc://` results reach only the process that sent the task: its 202 variant cannot be
polled, and is not run."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import httpx

from bench.latency import percentiles
from bench.stack import AMQP_URL, CpuMeter, Stack, broker_cpu, own_cpu
from bench.throughput import IN_FLIGHT, _calls_per_s, _last_success
from compute.pool import cpu_seconds_of
from tests.harness import Proc, free_port, tree_cpu

REDIS_URL = os.environ.get("TIMEBOX_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
RPC_PER_BLOCK = 50
LOAD_SECONDS = 4.0


@dataclass
class Side:
    """One system under test: where to call it, and the pids whose CPU it spends."""

    name: str
    url: str
    rpc: str  # path of an echo RPC (POST)
    submit: str | None  # path of an echo 202 (POST); None: cannot be polled
    server: int
    worker: int
    ended: Callable[[list[str]], float]  # epoch when the last of these tasks ended
    latencies: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    submits: list[float] = field(default_factory=list)
    cpu_ms: dict[str, float] = field(default_factory=dict)
    calls: int = 0
    unanswered: int = 0  # RPCs that got no result (an error or no answer)

    def meter(self) -> CpuMeter:
        return CpuMeter(
            {
                "server": lambda: cpu_seconds_of(self.server),
                "worker_with_children": lambda: tree_cpu(self.worker),
                "rabbitmq": broker_cpu(),
                "redis": _pid_cpu("redis-server"),
                "load_generator": own_cpu,
            }
        )


def _pid_cpu(comm: str) -> Callable[[], float | None] | None:
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if entry.isdigit() and Path(f"/proc/{entry}/comm").read_text().strip() == comm:
                pid = int(entry)
                return lambda: cpu_seconds_of(pid)
    return None


# -- the sides ----------------------------------------------------------------------------


def timebox(stack: Stack, name: str) -> Side:
    gateway, worker = stack.gateway(), stack.worker(2)

    def ended(ids: list[str]) -> float:
        return asyncio.run(asyncio.wait_for(_last_success(stack.namespace, set(ids)), 300))

    return Side(
        name,
        gateway.url,
        "/v1/tasks/echo?wait=true",
        "/v1/tasks/echo",
        gateway.pid,
        worker.pid,
        ended,
    )


class Celery:
    """A Celery worker (prefork, two processes) and uvicorn serving bench/celery_peer.py."""

    def __init__(self, log_dir: Path, results: str, events: bool) -> None:
        self.queue = f"tbbench-celery-{uuid.uuid4().hex[:8]}"
        self.results = results
        env = {
            "CELERY_BROKER": AMQP_URL,
            "CELERY_RESULTS": results,
            "CELERY_EVENTS": "1" if events else "0",
            "CELERY_QUEUE": self.queue,
        }
        backend = "redis" if results.startswith("redis") else "rpc"
        name = f"celery-{backend}{'-events' if events else ''}"
        # a node name of its own: two workers named alike fight over their control queue
        worker_args = ["worker", "-c", "2", "-l", "warning", "-n", f"{self.queue}@%h"]
        worker_args += ["-E"] if events else []
        self.worker = Proc(
            f"{name}-worker",
            [sys.executable, "-m", "celery", "-A", "bench.celery_peer:celery", *worker_args],
            env,
            log_dir,
        )
        port = free_port()
        self.server = Proc(
            f"{name}-uvicorn",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "bench.celery_peer:app",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            env,
            log_dir,
        )
        self.url = f"http://127.0.0.1:{port}"
        self.name = f"FastAPI + Celery, results {results.split(':')[0]}" + (
            ", events" if events else ""
        )

    def side(self) -> Side:
        polled = self.results.startswith("redis")
        return Side(
            self.name,
            self.url,
            "/echo",
            "/tasks/echo" if polled else None,
            self.server.pid,
            self.worker.pid,
            self._ended,
        )

    def _ended(self, ids: list[str]) -> float:
        """The latest `date_done` of the tasks' results in Redis, once all are there."""
        import redis

        client = redis.Redis.from_url(self.results)
        end = time.monotonic() + 300
        while True:
            found = client.mget([f"celery-task-meta-{i}" for i in ids])
            if all(found):
                done = [str(json.loads(m)["date_done"]) for m in found if m is not None]
                return max(datetime.fromisoformat(d).timestamp() for d in done)
            if time.monotonic() > end:
                raise TimeoutError("Celery's results did not all arrive")
            time.sleep(0.2)

    def stop(self) -> None:
        self.server.stop()
        self.worker.stop()

        async def delete() -> None:
            connection = await aio_pika.connect(AMQP_URL)
            async with connection:
                channel = await connection.channel()
                await channel.queue_delete(self.queue)
                await channel.exchange_delete(self.queue)

        with contextlib.suppress(Exception):
            asyncio.run(delete())


def wait_up(side: Side) -> None:
    end = time.monotonic() + 60
    with httpx.Client(base_url=side.url, timeout=60) as client:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if client.post(side.rpc, json={"payload": 0}).status_code == 200:
                    break
            if time.monotonic() > end:
                raise TimeoutError(f"{side.name} does not answer")
            time.sleep(0.2)
        for i in range(50):  # warm-up: imports, connections, pools
            client.post(side.rpc, json={"payload": i})


# -- the blocks ------------------------------------------------------------------------------


def rpc_block(side: Side, client: httpx.Client) -> None:
    """RPC_PER_BLOCK sequential RPCs; a side whose RPCs fail three times in a row is
    broken for the rest of the block (each failure takes its whole timeout)."""
    failing = 0
    for i in range(RPC_PER_BLOCK):
        if failing == 3:
            return
        started = time.perf_counter()
        try:
            answered = client.post(side.rpc, json={"payload": i}).status_code == 200
        except httpx.TransportError:  # no answer in 15 s, or a server that broke
            answered = False
        side.latencies.append(time.perf_counter() - started)
        side.unanswered += not answered
        failing = 0 if answered else failing + 1


def load_block(side: Side) -> None:
    meter = side.meter()
    out = asyncio.run(_calls_per_s(side.url, LOAD_SECONDS, "POST", side.rpc, meter))
    calls = out["calls"]
    side.unanswered += out["failed"]
    side.calls += calls
    side.rates.append(out["calls_per_s"])
    for k, ms in out["cpu_ms_per_call"].items():
        if ms is not None:
            side.cpu_ms[k] = side.cpu_ms.get(k, 0.0) + ms * calls


def submit_block(side: Side, n: int) -> None:
    """n `202` submissions from IN_FLIGHT submitters; tasks per second from the first
    submission to the last task's end."""
    path = side.submit
    assert path is not None
    ids: list[str] = []

    async def submit_all() -> float:
        todo = iter(range(n))
        async with aiohttp.ClientSession(
            side.url, connector=aiohttp.TCPConnector(limit=IN_FLIGHT)
        ) as client:

            async def submitter() -> None:
                for i in todo:
                    async with client.post(path, json={"payload": i}) as r:
                        assert r.status == 202, await r.text()
                        ids.append((await r.json())["id"])

            started = time.time()
            await asyncio.gather(*(submitter() for _ in range(IN_FLIGHT)))
            return started

    started = asyncio.run(submit_all())
    side.submits.append(n / (side.ended(ids) - started))


# -- the run ---------------------------------------------------------------------------------


def run(blocks: int, submissions: int) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="timebox-peer-"))
    with contextlib.ExitStack() as stack:
        sides = [
            timebox(stack.enter_context(Stack()), "Timebox"),
            timebox(
                stack.enter_context(Stack(TIMEBOX_TASK_QUEUE_TYPE="classic")),
                "Timebox, classic task queue",
            ),
        ]
        for results in ("rpc://", REDIS_URL):
            for events in (False, True):
                peer = Celery(log_dir, results, events)
                stack.callback(peer.stop)
                sides.append(peer.side())
        for side in sides:
            wait_up(side)
        # Celery's RPC endpoint gives up after 10 s (CELERY_GET_TIMEOUT), Timebox's at
        # the task's deadline (60 s): a client that waits 15 s counts either as unanswered
        clients = [stack.enter_context(httpx.Client(base_url=s.url, timeout=15)) for s in sides]
        for i in range(blocks):
            order = range(len(sides)) if i % 2 == 0 else range(len(sides) - 1, -1, -1)
            for k in order:
                rpc_block(sides[k], clients[k])
            for k in order:
                load_block(sides[k])
            for k in order:
                if sides[k].submit is not None:
                    submit_block(sides[k], submissions)
    return {"parameters": {"blocks": blocks, "submissions": submissions}, "sides": summary(sides)}


def summary(sides: list[Side]) -> list[dict[str, Any]]:
    out = []
    for side in sides:
        p = percentiles(side.latencies)
        cpu = {k: round(v / side.calls, 2) for k, v in side.cpu_ms.items()} if side.calls else {}
        out.append(
            {
                "name": side.name,
                "rpc_p50_ms": p["p50_ms"],
                "rpc_p99_ms": p["p99_ms"],
                "rpc_unanswered": side.unanswered,
                "rpc_per_s": round(statistics.median(side.rates), 1),
                "submits_per_s": round(statistics.median(side.submits), 1)
                if side.submits
                else None,
                "cpu_ms_per_rpc": cpu,
                "cpu_ms_per_rpc_total": round(sum(v for v in cpu.values() if v is not None), 2),
            }
        )
    return out


def table(results: dict[str, Any]) -> str:
    rows = results["sides"]
    ours = [r for r in rows if r["name"].startswith("Timebox")]
    peers = [r for r in rows if not r["name"].startswith("Timebox")]

    def best(key: str, low: bool) -> float:
        values = [float(r[key]) for r in peers if r[key] is not None]
        return min(values) if low else max(values)

    lines = [
        "| per request | "
        + " | ".join(r["name"] for r in rows)
        + "".join(f" | {r['name']} / best Celery" for r in ours)
        + " |",
        "|---" * (len(rows) + len(ours) + 1) + "|",
    ]
    for label, key, low in (
        ("RPC p50, sequential (ms)", "rpc_p50_ms", True),
        ("RPC p99, sequential (ms)", "rpc_p99_ms", True),
        ("RPCs unanswered (errors, timeouts)", "rpc_unanswered", True),
        ("RPC/s, 64 in flight", "rpc_per_s", False),
        ("`202` submissions/s, until the last ended", "submits_per_s", False),
        ("CPU per RPC, all processes (ms)", "cpu_ms_per_rpc_total", True),
    ):
        values = [r[key] for r in rows]
        ratios = [round(r[key] / best(key, low), 2) if best(key, low) else None for r in ours]
        lines.append(
            f"| {label} | "
            + " | ".join("-" if v is None else str(v) for v in values + ratios)
            + " |"
        )
    for process in ("server", "worker_with_children", "rabbitmq", "redis", "load_generator"):
        values = [r["cpu_ms_per_rpc"].get(process) for r in rows]
        blank = " |" * len(ours)
        lines.append(f"| … of which {process} | " + " | ".join(map(str, values)) + f" |{blank}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--submissions", type=int, default=2000)
    args = parser.parse_args()
    results = run(args.blocks, args.submissions)
    print(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
