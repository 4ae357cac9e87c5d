"""Mixed overload: `burn_cpu` tasks whose sizes spread twentyfold, with deadlines of
1-3 s, arriving as a Poisson process at a multiple of what the slots can run. Goodput
(the CPU of on-time answers, as % of the slots' CPU) overall, in the steady state (the
window's second half, against the CPU the other processes left the slots), and by
tercile of size and of deadline (on-time CPU as % of the CPU offered in it). Wasted:
the worker tree's CPU that no on-time answer reported, its own loop's included.

    python -m bench.mixed --window 20 --seed 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
from typing import Any

import httpx

from bench.overload import (
    CLIENT,
    SLOTS,
    Planned,
    Result,
    Target,
    Window,
    admitted_then,
    cpu_left_for_slots_pct,
    measure,
    waste,
)
from bench.stack import CpuMeter, Stack

SIZES = (0.05, 1.0)  # seconds of CPU, log-uniform between them
DEADLINES = (1.0, 3.0)  # seconds, uniform between them
MULTIPLES = (2, 4)
LEARN = (0.05, 0.1, 0.2, 0.4, 0.8) * 2  # sizes run first, so every layer learns run times
# fleets (their settings), each with its gateways (name: settings): the load goes
# through each gateway in turn
FLEETS: tuple[tuple[dict[str, str], dict[str, dict[str, str]]], ...] = (
    ({}, {"": {}, ", wait limit 0.5 s": {"TIMEBOX_MAX_QUEUE_WAIT": "0.5"}}),
    ({"TIMEBOX_TASK_QUEUE_TYPE": "classic", "TIMEBOX_TASK_PRIORITIES": "10"}, {", priorities": {}}),
)


def target(url: str, gateway_pid: int, worker_pid: int) -> Target:
    """The load's requests: `burn_cpu` RPCs, each with its own deadline."""
    return Target(
        url,
        "/v1/tasks/burn_cpu",
        worker_pid,
        include_root=True,
        headers={"Prefer": "wait", "Request-Timeout": str(DEADLINES[1])},
        beside=CpuMeter.beside_tasks(gateway_pid, worker_pid),
    )


def plan(
    multiple: float,
    window: float,
    seed: int,
    sizes: tuple[float, float] = SIZES,
    deadlines: tuple[float, float] = DEADLINES,
) -> list[Planned]:
    """Poisson arrivals offering `multiple` times the slots' CPU over `window` seconds;
    the same `seed` gives the same requests."""
    rng = random.Random(seed)
    low, high = sizes
    mean = (high - low) / math.log(high / low) if high > low else low
    rate = multiple * SLOTS / mean
    out: list[Planned] = []
    at = rng.expovariate(rate)
    while at < window:
        size = low * (high / low) ** rng.random()
        deadline = rng.uniform(*deadlines)
        out.append(Planned(at, {"seconds": round(size, 4)}, round(deadline, 3)))
        at += rng.expovariate(rate)
    return out


def _size(r: Result) -> float:
    body = r.planned.body if r.planned else None
    assert body is not None
    return float(body["seconds"])


def _deadline(r: Result) -> float:
    assert r.planned is not None
    return r.planned.deadline


def by_tercile(results: list[Result], key: str) -> list[dict[str, Any]]:
    """The on-time share of the CPU offered, in each third of the requests ranked by
    `key` (size or deadline), smallest first."""
    of = _size if key == "size" else _deadline
    ranked = sorted(results, key=of)
    thirds = [ranked[i * len(ranked) // 3 : (i + 1) * len(ranked) // 3] for i in range(3)]
    out = []
    for third in thirds:
        offered = sum(_size(r) for r in third)
        served = sum(_size(r) for r in third if r.on_time)
        out.append(
            {
                key: [round(of(third[0]), 3), round(of(third[-1]), 3)] if third else None,
                "requests": len(third),
                "offered_cpu_s": round(offered, 2),
                "served_pct": round(100 * served / offered, 1) if offered else None,
            }
        )
    return out


def summarize(w: Window, window: float) -> dict[str, Any]:
    results = w.results
    on_time = [r for r in results if r.on_time]
    useful = sum(r.cpu or 0.0 for r in on_time)
    steady = sum(r.cpu or 0.0 for r in on_time if r.sent_at >= window / 2)
    refused = sum(r.status in (503, 422) for r in results)
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    left = cpu_left_for_slots_pct(w.beside_ms_per_s)
    steady_pct = 100 * steady / (SLOTS * window / 2)
    return {
        "sent": len(results),
        "offered_cpu_pct": round(100 * sum(_size(r) for r in results) / (SLOTS * window), 1),
        "goodput_pct": round(100 * useful / (SLOTS * window), 1),
        "steady_goodput_pct": round(steady_pct, 1),
        "steady_cpu_left_for_slots_pct": left,
        "steady_goodput_of_cpu_left_pct": round(100 * steady_pct / left, 1) if left else None,
        **admitted_then(results, refused),
        **waste(w.cpu, useful, w.root_cpu),
        "by_size": by_tercile(results, "size"),
        "by_deadline": by_tercile(results, "deadline"),
        "statuses": statuses,
    }


def run(
    window: float, drain: float, seed: int, multiples: tuple[float, ...] = MULTIPLES
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "parameters": {
            "task": f"burn_cpu, {SIZES[0]}-{SIZES[1]} s of CPU, log-uniform",
            "deadlines_s": list(DEADLINES),
            "arrivals": "Poisson",
            "slots": SLOTS,
            "window_s": window,
            "seed": seed,
            "client": CLIENT,
            "variants": {
                name: {**fleet, **env}
                for fleet, gateways in FLEETS
                for name, env in gateways.items()
            },
        },
        "loads": {},
    }
    loads: dict[tuple[float, str], dict[str, Any]] = {}
    for fleet, settings in FLEETS:
        with Stack(**fleet) as stack:
            gateways = {name: stack.gateway(**env) for name, env in settings.items()}
            worker = stack.worker(SLOTS)
            with httpx.Client(base_url=next(iter(gateways.values())).url, timeout=10) as c:
                for seconds in LEARN:
                    c.post("/v1/tasks/burn_cpu", params={"wait": "true"}, json={"seconds": seconds})
            for m in multiples:
                for name, gateway in gateways.items():
                    load = target(gateway.url, gateway.pid, worker.pid)
                    measured = asyncio.run(measure(load, plan(m, window, seed), window, drain))
                    loads[m, name] = summarize(measured, window)
    for m in multiples:
        for name in out["parameters"]["variants"]:
            out["loads"][f"{m:g}x{name}"] = loads[m, name]
    return out


def table(result: dict[str, Any]) -> str:
    rows = [
        "| load | goodput | steady state (of CPU left) | unmeetable (expired unstarted) "
        "| wasted (the worker's loop) | size terciles "
        "served | deadline terciles served |",
        "|---|---|---|---|---|---|---|",
    ]
    for load, s in result["loads"].items():
        sizes = " / ".join(f"{t['served_pct']}" for t in s["by_size"])
        deadlines = " / ".join(f"{t['served_pct']}" for t in s["by_deadline"])
        rows.append(
            f"| {load} | {s['goodput_pct']} % | {s['steady_goodput_pct']} % "
            f"({s['steady_goodput_of_cpu_left_pct']} % of {s['steady_cpu_left_for_slots_pct']} %) "
            f"| {s['admitted_then_unmeetable_pct']} % ({s.get('admitted_then_expired_pct')} %) "
            f"| {s['wasted_cpu_pct']} % ({s['worker_loop_cpu_pct']} %) "
            f"| {sizes} % | {deadlines} % |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    result = run(args.window, 6.0, args.seed)
    print(json.dumps(result, indent=2))
    print(table(result))


if __name__ == "__main__":
    main()
