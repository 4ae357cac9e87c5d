"""Which of two variants is faster, on a machine whose speed drifts from minute to
minute: both stacks run at once and blocks of calls alternate between them, so that a
slow moment falls on both. Not part of `make bench`.

    python -m bench.ab A B [--mode rpc|load] [--blocks N]

A variant is a git revision (its gateway and worker run from a temporary worktree of
it), environment settings for its gateway and worker, or both, joined by commas:

    python -m bench.ab HEAD~1 HEAD
    python -m bench.ab TIMEBOX_LEASE_SLOTS=false TIMEBOX_LEASE_SLOTS=true
    python -m bench.ab d576ac9,TIMEBOX_POLL_INTERVAL=10 .

`rpc`: blocks of sequential `echo` RPCs (httpx), a worker with 2 slots. `load`: blocks
of 4 s with 64 `echo` RPCs in flight (aiohttp), a worker with 4 slots. Each side is
reported on its own, and the two by the median of the ratios B / A of paired blocks
(with their quartiles), which is what drift spoils least.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.__main__ import machine
from bench.latency import _timed, percentiles
from bench.stack import CpuMeter, Stack
from bench.throughput import IN_FLIGHT, _calls_per_s
from tests.harness import Gateway, Worker

RPC_PER_BLOCK = 50
LOAD_SECONDS = 4.0
ECHO_RPC = "/v1/tasks/echo?wait=true"


@dataclass
class Variant:
    spec: str
    revision: str | None
    env: dict[str, str]

    @classmethod
    def parse(cls, spec: str) -> Variant:
        revision, env = None, {}
        for part in filter(None, spec.split(",")):
            if "=" in part:
                key, _, value = part.partition("=")
                env[key] = value
            elif revision is None:
                revision = None if part == "." else part
            else:
                raise SystemExit(f"{spec!r}: two revisions")
        return cls(spec, revision, env)


@dataclass
class Side:
    variant: Variant
    gateway: Gateway
    worker: Worker
    blocks: list[float] = field(default_factory=list)  # block p50 (ms) or calls/s
    latencies: list[float] = field(default_factory=list)
    cpu_ms: dict[str, float] = field(default_factory=dict)  # summed over blocks
    calls: int = 0


@contextlib.contextmanager
def checkout(revision: str | None) -> Iterator[Path | None]:
    """A temporary worktree at `revision`, or None for the working tree itself."""
    if revision is None:
        yield None
        return
    where = Path(tempfile.mkdtemp(prefix="timebox-ab-")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(where), revision], check=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(where)], check=False)
        shutil.rmtree(where.parent, ignore_errors=True)


def _add_cpu(side: Side, ms_per_call: dict[str, float | None], calls: int) -> None:
    side.calls += calls
    for k, ms in ms_per_call.items():
        if ms is not None:
            side.cpu_ms[k] = side.cpu_ms.get(k, 0.0) + ms * calls


def rpc_block(side: Side, client: httpx.Client) -> None:
    meter = CpuMeter.of_stack(side.gateway, side.worker)
    meter.start()

    def rpc(i: int) -> None:
        r = client.post(ECHO_RPC, json={"payload": i})
        assert r.status_code == 200, r.text

    samples = _timed(RPC_PER_BLOCK, rpc)
    _add_cpu(side, meter.ms_per(RPC_PER_BLOCK), RPC_PER_BLOCK)
    side.latencies += samples
    side.blocks.append(statistics.median(samples) * 1000)


def load_block(side: Side) -> None:
    meter = CpuMeter.of_stack(side.gateway, side.worker)
    out = asyncio.run(_calls_per_s(side.gateway.url, LOAD_SECONDS, "POST", ECHO_RPC, meter))
    _add_cpu(side, out["cpu_ms_per_call"], round(out["calls_per_s"] * out["seconds"]))
    side.blocks.append(out["calls_per_s"])


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, q2, q3


def report(mode: str, a: Side, b: Side) -> None:
    for side in (a, b):
        cpu = {k: round(v / side.calls, 2) for k, v in side.cpu_ms.items()}
        if mode == "rpc":
            p = percentiles(side.latencies)
            what = f"p50 {p['p50_ms']} ms, p99 {p['p99_ms']} ms, p99.9 {p['p999_ms']} ms"
        else:
            what = f"median {statistics.median(side.blocks):.1f} calls/s"
        print(f"{side.variant.spec:>24s}: {what}; CPU ms per call {cpu}")
    ratios = [y / x for x, y in zip(a.blocks, b.blocks, strict=True)]
    q1, q2, q3 = quartiles(ratios)
    measure = "block p50 latency" if mode == "rpc" else "calls/s"
    print(
        f"B / A, {measure}, paired blocks: median {q2:.3f} (quartiles {q1:.3f}-{q3:.3f}, "
        f"{len(ratios)} pairs)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--mode", choices=("rpc", "load"), default="rpc")
    parser.add_argument("--blocks", type=int, default=20, help="blocks per side")
    args = parser.parse_args()
    variants = [Variant.parse(args.a), Variant.parse(args.b)]
    slots = 2 if args.mode == "rpc" else 4
    info = machine()
    print(
        f"{info['when']}: {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
        f"RabbitMQ {info['rabbitmq']}; mode {args.mode}, {args.blocks} blocks per side of "
        + (
            f"{RPC_PER_BLOCK} sequential RPCs"
            if args.mode == "rpc"
            else f"{LOAD_SECONDS} s, {IN_FLIGHT} in flight"
        )
        + f", worker with {slots} slots; A = {args.a!r}, B = {args.b!r}"
    )
    with contextlib.ExitStack() as stack:
        sides, clients = [], []
        for variant in variants:
            tree = stack.enter_context(checkout(variant.revision))
            s = stack.enter_context(Stack())
            s.cwd = tree
            side = Side(variant, s.gateway(**variant.env), s.worker(slots, **variant.env))
            client = stack.enter_context(httpx.Client(base_url=side.gateway.url, timeout=30))
            for _ in range(50):  # warm-up: imports, connections, the run-time estimates
                client.post(ECHO_RPC, json={"payload": 0})
            sides.append(side)
            clients.append(client)
        for i in range(args.blocks):
            for k in (0, 1) if i % 2 == 0 else (1, 0):
                if args.mode == "rpc":
                    rpc_block(sides[k], clients[k])
                else:
                    load_block(sides[k])
    report(args.mode, sides[0], sides[1])


if __name__ == "__main__":
    main()
