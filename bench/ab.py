"""Which of two variants is faster, on a machine whose speed drifts from minute to
minute: both stacks run at once and blocks of calls alternate between them, so that a
slow moment falls on both. Not part of `make bench`.

    python -m bench.ab A B [--mode rpc|load|submit|overload|mixed] [--blocks N]

A variant is a git revision (its gateway and worker run from a temporary worktree of
it), environment settings for its gateway and worker, or both, joined by commas:

    python -m bench.ab HEAD~1 HEAD
    python -m bench.ab TIMEBOX_CHILD_NICE=0 TIMEBOX_CHILD_NICE=10
    python -m bench.ab d576ac9,TIMEBOX_CHILD_NICE=0 .

`rpc`: blocks of sequential `echo` RPCs (httpx), a worker with 2 slots. `load`: blocks
of 4 s with 64 `echo` RPCs in flight (aiohttp), a worker with 4 slots. `submit`:
blocks of 500 `echo` answered `202` (64 submitters), tasks per second from the first
submission to the last task's end, a worker with 2 slots. `overload`:
windows of bench/overload.py's load (`burn_cpu` 0.2 s, 2 s deadline), 2x and 4x in
turn, against two workers of one slot each (the same capacity), with how evenly the
two shared the answers. `mixed`: windows of bench/mixed.py's load (0.05-1 s tasks,
1-3 s deadlines), 2x and 4x in turn, the same requests for both sides of a pair, a
worker with 2 slots. Each side is reported on its own, and the two by the median
of the ratios B / A of paired blocks (with their quartiles), which is what drift
spoils least.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import mixed, overload
from bench.__main__ import machine
from bench.latency import _timed, percentiles
from bench.stack import CpuMeter, Stack
from bench.throughput import IN_FLIGHT, _calls_per_s, _end_to_end
from tests.harness import Gateway, Worker, tree_cpu

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
    namespace: str
    blocks: list[float] = field(default_factory=list)  # block p50 (ms) or calls/s
    latencies: list[float] = field(default_factory=list)
    cpu_ms: dict[str, float] = field(default_factory=dict)  # summed over blocks
    calls: int = 0
    others: list[Worker] = field(default_factory=list)  # the overload mode's second worker
    windows: list[dict[str, Any]] = field(default_factory=list)


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
    _add_cpu(side, out["cpu_ms_per_call"], out["calls"])
    side.blocks.append(out["calls_per_s"])


SUBMISSIONS = 500


def submit_block(side: Side) -> None:
    meter = CpuMeter.of_stack(side.gateway, side.worker)
    meter.start()
    out = asyncio.run(_end_to_end(side.gateway.url, side.namespace, SUBMISSIONS))
    _add_cpu(side, meter.ms_per(SUBMISSIONS), SUBMISSIONS)
    side.blocks.append(out["end_to_end_per_s"])


OVERLOAD_WINDOW = 10.0


def overload_block(side: Side, multiple: int) -> None:
    """One window of open-loop load at `multiple` x capacity; the block's figure is
    its goodput (% of capacity)."""
    workers = [side.worker, *side.others]
    before = sum(tree_cpu(w.pid) for w in workers)
    target = overload.Target(
        side.gateway.url,
        "/v1/tasks/burn_cpu",
        side.worker.pid,
        include_root=True,
        beside=CpuMeter({}),
        body={"seconds": overload.TASK_SECONDS},
        headers={"Prefer": "wait", "Request-Timeout": str(overload.DEADLINE)},
    )
    plan = overload.uniform(overload.CAPACITY * multiple, OVERLOAD_WINDOW)
    results = asyncio.run(overload.open_loop(target, plan))
    time.sleep(1.0)  # the last answers' CPU, as the main benchmark's drain does
    cpu = sum(tree_cpu(w.pid) for w in workers) - before
    window = overload.summarize(results, OVERLOAD_WINDOW, cpu)
    on_time = [r for r in results if r.on_time]
    window["split"] = sorted(Counter(r.worker for r in on_time).values())
    window["load"] = f"{multiple}x"
    side.windows.append(window)
    side.blocks.append(window["goodput_pct"])


MIXED_WINDOW = 15.0


def mixed_block(side: Side, multiple: int, seed: int) -> None:
    """One window of bench/mixed.py's load at `multiple` x the slots' CPU (the same
    requests for both sides of a pair); the block's figure is its goodput."""
    target = mixed.target(side.gateway.url, side.gateway.pid, side.worker.pid)
    plan = mixed.plan(multiple, MIXED_WINDOW, seed)
    window = mixed.summarize(
        asyncio.run(overload.measure(target, plan, MIXED_WINDOW, drain=4.0)), MIXED_WINDOW
    )
    window["load"] = f"{multiple}x"
    side.windows.append(window)
    side.blocks.append(window["goodput_pct"])


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, q2, q3


def report(mode: str, a: Side, b: Side) -> None:
    for side in (a, b):
        if mode == "overload":
            print(f"{side.variant.spec:>24s}:")
            for w in side.windows:
                print(
                    f"    {w['load']}: goodput {w['goodput_pct']}%, 2nd half "
                    f"{w['goodput_second_half_pct']}%, 503 {w['refused_503']}, admitted then "
                    f"unmeetable {w['admitted_then_unmeetable_pct']}% (expired unstarted "
                    f"{w['admitted_then_expired_pct']}%), wasted CPU "
                    f"{w['wasted_cpu_pct']}%, answers per worker {w['split']}"
                )
            continue
        if mode == "mixed":
            print(f"{side.variant.spec:>24s}:")
            for w in side.windows:
                sizes = " / ".join(str(t["served_pct"]) for t in w["by_size"])
                deadlines = " / ".join(str(t["served_pct"]) for t in w["by_deadline"])
                print(
                    f"    {w['load']}: goodput {w['goodput_pct']}%, steady "
                    f"{w['steady_goodput_of_cpu_left_pct']}% of the CPU left, unmeetable "
                    f"{w['admitted_then_unmeetable_pct']}% (expired unstarted "
                    f"{w['admitted_then_expired_pct']}%), wasted {w['wasted_cpu_pct']}%, "
                    f"served by size {sizes}%, by deadline {deadlines}%"
                )
            continue
        cpu = {k: round(v / side.calls, 2) for k, v in side.cpu_ms.items()}
        if mode == "rpc":
            p = percentiles(side.latencies)
            what = f"p50 {p['p50_ms']} ms, p99 {p['p99_ms']} ms, p99.9 {p['p999_ms']} ms"
        else:
            what = f"median {statistics.median(side.blocks):.1f} per s"
        print(f"{side.variant.spec:>24s}: {what}; CPU ms per call {cpu}")
    ratios = [y / x for x, y in zip(a.blocks, b.blocks, strict=True)]
    q1, q2, q3 = quartiles(ratios)
    measure = {
        "rpc": "block p50 latency",
        "load": "calls/s",
        "submit": "tasks/s",
        "overload": "goodput",
        "mixed": "goodput",
    }[mode]
    print(
        f"B / A, {measure}, paired blocks: median {q2:.3f} (quartiles {q1:.3f}-{q3:.3f}, "
        f"{len(ratios)} pairs)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a")
    parser.add_argument("b")
    modes = ("rpc", "load", "submit", "overload", "mixed")
    parser.add_argument("--mode", choices=modes, default="rpc")
    parser.add_argument("--blocks", type=int, default=20, help="blocks per side")
    args = parser.parse_args()
    variants = [Variant.parse(args.a), Variant.parse(args.b)]
    slots = {"rpc": 2, "load": 4, "submit": 2, "overload": 1, "mixed": 2}[args.mode]
    info = machine()
    print(
        f"{info['when']}: {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
        f"RabbitMQ {info['rabbitmq']}; mode {args.mode}, {args.blocks} blocks per side of "
        + {
            "rpc": f"{RPC_PER_BLOCK} sequential RPCs",
            "load": f"{LOAD_SECONDS} s, {IN_FLIGHT} in flight",
            "submit": f"{SUBMISSIONS} submissions answered 202, {IN_FLIGHT} submitters",
            "overload": f"{OVERLOAD_WINDOW:g} s at 2x and 4x in turn, two workers",
            "mixed": f"{MIXED_WINDOW:g} s of bench/mixed.py's load at 2x and 4x in turn",
        }[args.mode]
        + f", workers with {slots} slots; A = {args.a!r}, B = {args.b!r}"
    )
    with contextlib.ExitStack() as stack:
        sides, clients = [], []
        for variant in variants:
            tree = stack.enter_context(checkout(variant.revision))
            s = stack.enter_context(Stack())
            s.cwd = tree
            gateway, worker = s.gateway(**variant.env), s.worker(slots, **variant.env)
            side = Side(variant, gateway, worker, s.namespace)
            if args.mode == "overload":
                side.others.append(s.worker(slots, **variant.env))
            client = stack.enter_context(httpx.Client(base_url=side.gateway.url, timeout=30))
            for _ in range(50):  # warm-up: imports, connections, the run-time estimates
                client.post(ECHO_RPC, json={"payload": 0})
            learn = {
                "overload": [overload.TASK_SECONDS] * 10,
                "mixed": list(mixed.LEARN),
            }.get(args.mode, [])
            for seconds in learn:  # the run times, learned
                body = {"seconds": seconds}
                client.post("/v1/tasks/burn_cpu", params={"wait": "true"}, json=body)
            sides.append(side)
            clients.append(client)
        for i in range(args.blocks):
            for k in (0, 1) if i % 2 == 0 else (1, 0):
                if args.mode == "rpc":
                    rpc_block(sides[k], clients[k])
                elif args.mode == "load":
                    load_block(sides[k])
                elif args.mode == "submit":
                    submit_block(sides[k])
                elif args.mode == "mixed":
                    mixed_block(sides[k], 2 if i % 4 < 2 else 4, seed=i)
                else:
                    overload_block(sides[k], 2 if i % 4 < 2 else 4)
    report(args.mode, sides[0], sides[1])


if __name__ == "__main__":
    main()
