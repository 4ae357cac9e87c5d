"""Overload: open-loop load at 1x, 2x and 4x capacity, against Timebox and against
the usual in-process recipes, with the same client: it waits (RPC) and gives up at
the deadline. Goodput counts answers that arrive within it."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx

from bench.stack import Baseline, CpuMeter, Stack
from compute.pool import cpu_seconds_of
from tests.harness import tree_cpu

TASK_SECONDS = 0.2
SLOTS = 2
CAPACITY = SLOTS / TASK_SECONDS  # tasks per second
DEADLINE = 2.0
# how long past its deadline the client still reads an answer: a `504` sent at the
# deadline tells why (expired unstarted, aborted); it is never counted on time
ANSWER_GRACE = 0.5
CLIENT = (
    "open loop, waits for the answer; on time only by its deadline, read until "
    f"{ANSWER_GRACE:g} s past it (a 504 at the deadline says why)"
)
MULTIPLES = (1, 2, 4)


@dataclass(frozen=True)
class Planned:
    """One request of an open loop: when it is sent (seconds after the start), its body
    (None: the target's) and the deadline its client gives it."""

    at: float
    body: dict[str, Any] | None = None
    deadline: float = DEADLINE


@dataclass
class Result:
    sent_at: float
    status: int | str
    latency: float
    cpu: float | None
    worker: str | None = None  # which worker ran it, when the answer says
    unmeetable: bool = False  # admitted, then not started by a worker: it could not finish
    planned: Planned | None = None
    expired: bool = False  # admitted, then ended unstarted (unmeetable, its TTL, no slot)

    @property
    def on_time(self) -> bool:
        deadline = self.planned.deadline if self.planned else DEADLINE
        return self.status == 200 and self.latency <= deadline


@dataclass(frozen=True)
class Target:
    """What one request of the load is, and which process tree does the work."""

    url: str
    path: str
    pid: int
    include_root: bool  # the root's own CPU counts (a worker) or not (uvicorn serving HTTP)
    # the CPU of the processes beside the tasks' own, read over the window's second half
    beside: CpuMeter
    body: dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def uniform(rate: float, window: float) -> list[Planned]:
    """`rate` requests a second for `window` seconds, evenly spaced."""
    return [Planned(i / rate) for i in range(int(rate * window))]


async def open_loop(target: Target, plan: list[Planned]) -> list[Result]:
    """Sends each planned request at its time, whatever the answers do; its client gives
    up at its deadline."""
    results: list[Result] = []
    # aiohttp: a load generator light enough not to take the machine's CPU from the
    # system under test (httpx costs several ms of CPU a request)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(target.url, connector=connector) as client:

        async def one(planned: Planned) -> None:
            t = time.perf_counter()
            status: int | str
            cpu = worker = None
            unmeetable = expired = False
            headers = target.headers
            if "Request-Timeout" in headers:  # the client's deadline, told to the server
                headers = {**headers, "Request-Timeout": str(planned.deadline)}
            try:
                async with client.post(
                    target.path,
                    json=planned.body or target.body,
                    params=target.params,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=planned.deadline + ANSWER_GRACE),
                ) as r:
                    status = r.status
                    if r.status == 200:
                        answer = await r.json(content_type=None)
                        cpu, worker = answer.get("cpu_seconds"), answer.get("worker")
                    elif r.status == 504:
                        body = await r.read()
                        unmeetable = b'"reason":"unmeetable' in body
                        # expired, or still queued when its deadline passed
                        expired = b"/problems/task-expired" in body or (
                            b"/problems/deadline-passed" in body and b'"state":"queued"' in body
                        )
                    else:
                        await r.read()
            except TimeoutError:
                status = "gave up"
            except aiohttp.ClientError as exc:
                status = type(exc).__name__
            latency = time.perf_counter() - t
            results.append(
                Result(planned.at, status, latency, cpu, worker, unmeetable, planned, expired)
            )

        start = time.perf_counter()
        tasks = []
        for planned in plan:
            delay = start + planned.at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(planned)))
        await asyncio.gather(*tasks)
    return results


def cpu_left_for_slots_pct(
    beside_ms_per_s: dict[str, float | None], cores: int | None = None
) -> float | None:
    """The CPU the other processes leave the slots on this machine's cores, as % of
    capacity. Under a backlog the slots are busy throughout, and the second half's
    goodput cannot go much above it; without one (1x) they idle now and then, and
    their work spreads into the seconds after the window, so it does not bound it."""
    if not beside_ms_per_s or any(v is None for v in beside_ms_per_s.values()):
        return None
    cores = cores or os.cpu_count() or SLOTS
    left = cores * 1000 - sum(v or 0.0 for v in beside_ms_per_s.values())
    return round(100 * max(0.0, min(SLOTS * 1000, left)) / (SLOTS * 1000), 1)


def admitted_then(results: list[Result], refused: int) -> dict[str, float]:
    """Of the admitted requests, the % a worker then found unmeetable, and the % that
    ended unstarted for any reason (unmeetable, their TTL, no slot in time)."""
    admitted = max(1, len(results) - refused)
    return {
        "admitted_then_unmeetable_pct": round(
            100 * sum(r.unmeetable for r in results) / admitted, 2
        ),
        "admitted_then_expired_pct": round(100 * sum(r.expired for r in results) / admitted, 2),
    }


def waste(cpu: float, useful: float, root_cpu: float | None) -> dict[str, float | None]:
    """The % of the worker tree's `cpu` that no on-time answer reported, and of it the
    worker process's own loop (`root_cpu`, where it counts)."""
    return {
        "wasted_cpu_pct": round(100 * (cpu - useful) / cpu, 1) if cpu > 0 else 0.0,
        "worker_loop_cpu_pct": (
            round(100 * root_cpu / cpu, 1) if root_cpu is not None and cpu > 0 else None
        ),
    }


def summarize(
    results: list[Result],
    window: float,
    cpu: float,
    root_cpu: float | None = None,
    beside_ms_per_s: dict[str, float | None] | None = None,
) -> dict[str, Any]:
    """`root_cpu`: the worker process's own share of `cpu` (its loop), where it counts;
    `beside_ms_per_s`: the CPU the processes beside the tasks spent in the second half."""
    on_time = [r for r in results if r.on_time]
    late_half = [r for r in on_time if r.sent_at >= window / 2]
    useful = sum(r.cpu or 0.0 for r in on_time)
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    refused = statuses.get("503", 0) + statuses.get("422", 0)
    return {
        "sent": len(results),
        "on_time": len(on_time),
        "goodput_pct": round(100 * len(on_time) / window / CAPACITY, 1),
        "goodput_second_half_pct": round(100 * len(late_half) / (window / 2) / CAPACITY, 1),
        "refused_503": statuses.get("503", 0),
        # admitted, then expired `unmeetable` by a worker: a 504 where a 503 was due
        **admitted_then(results, refused),
        "statuses": statuses,
        "tree_cpu_s": round(cpu, 2),
        "useful_cpu_s": round(useful, 2),
        **waste(cpu, useful, root_cpu),
        "second_half_beside_tasks_cpu_ms_per_s": beside_ms_per_s,
        "second_half_cpu_left_for_slots_pct": cpu_left_for_slots_pct(beside_ms_per_s or {}),
    }


@dataclass
class Window:
    """One window of open-loop load, as measured: the answers, the CPU of the tree that
    does the work (of it, its root's own), and what the processes beside the tasks spent
    in its second half."""

    results: list[Result]
    cpu: float
    root_cpu: float | None
    beside_ms_per_s: dict[str, float | None]


async def measure(target: Target, plan: list[Planned], window: float, drain: float) -> Window:
    before, root_before = tree_cpu(target.pid, target.include_root), cpu_seconds_of(target.pid)
    results, beside = await asyncio.gather(
        open_loop(target, plan), _second_half(target.beside, window)
    )
    longest = max((p.deadline for p in plan), default=DEADLINE)
    await asyncio.sleep(max(0.0, drain - longest))  # the same wall interval for everyone
    cpu = tree_cpu(target.pid, target.include_root) - before
    root_after = cpu_seconds_of(target.pid)  # the worker's own loop, where it counts
    root = None
    if target.include_root and root_before is not None and root_after is not None:
        root = root_after - root_before
    return Window(results, cpu, root, beside)


async def _measure(target: Target, rate: float, window: float, drain: float) -> dict[str, Any]:
    w = await measure(target, uniform(rate, window), window, drain)
    return summarize(w.results, window, w.cpu, w.root_cpu, w.beside_ms_per_s)


async def _second_half(meter: CpuMeter, window: float) -> dict[str, float | None]:
    """Milliseconds of CPU a second each process beside the tasks spent in the second
    half of the window, the steady state of the load."""
    await asyncio.sleep(window / 2)
    meter.start()
    await asyncio.sleep(window / 2)
    return meter.ms_per(window / 2)


def console(url: str) -> dict[str, Any]:
    """Where the runs' CPU went, as the gateway's console (/console) shows it; with
    TIMEBOX_BENCH_CONSOLE_PNG set, a screenshot of the page too (Chromium)."""
    snapshot = httpx.get(url + "/v1/console", timeout=10).json()
    path = os.environ.get("TIMEBOX_BENCH_CONSOLE_PNG")
    if path and shutil.which("chromium"):
        from tests.harness import browser

        with browser() as chromium:
            page = chromium.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url + "/console")
            page.get_by_test_id("link").filter(has_text="live").wait_for()
            page.screenshot(path=path, full_page=True)
    return {key: snapshot["cpu"][key] for key in ("totals", "reasons")}


def run(
    window: float,
    drain: float,
    baseline_loads: tuple[int, ...] = MULTIPLES,
    loads: tuple[int, ...] = MULTIPLES,
) -> dict[str, Any]:
    """`loads` for Timebox, `baseline_loads` for the in-process recipes (the quick run
    skips them at 1x, where nothing is late)."""
    out: dict[str, Any] = {
        "parameters": {
            "task": f"burn_cpu {TASK_SECONDS} s",
            "slots": SLOTS,
            "capacity_per_s": CAPACITY,
            "deadline_s": DEADLINE,
            "window_s": window,
            "cpu_measured_until_s_after_window": drain,
            "client": CLIENT,
            "loads": [f"{m}x" for m in loads],
            "baseline_loads": [f"{m}x" for m in baseline_loads],
            "second_half_cpu_left_for_slots": "the cores' CPU left to the slots by the "
            "processes beside the tasks' own (HTTP server, worker loop, RabbitMQ, load "
            "generator) in the window's second half, as % of capacity: under a backlog, "
            "about the most the second half's goodput can reach",
        },
        "systems": {},
    }
    body = {"seconds": TASK_SECONDS}
    with Stack() as stack:
        gateway = stack.gateway()
        worker = stack.worker(SLOTS)
        with httpx.Client(base_url=gateway.url, timeout=10) as c:
            for _ in range(10):  # the run time every layer learns from
                c.post("/v1/tasks/burn_cpu", params={"wait": "true"}, json=body)
        target = Target(
            gateway.url,
            "/v1/tasks/burn_cpu",
            worker.pid,
            include_root=True,
            body=body,
            headers={"Prefer": "wait", "Request-Timeout": str(DEADLINE)},
            beside=CpuMeter.beside_tasks(gateway.pid, worker.pid),
        )
        out["systems"]["timebox"] = {
            f"{m}x": asyncio.run(_measure(target, CAPACITY * m, window, drain)) for m in loads
        }
        out["console_cpu"] = console(gateway.url)
    for name, wait_for in (
        ("fastapi+processpool", None),
        ("fastapi+processpool+wait_for", DEADLINE),
    ):
        out["systems"][name] = {}
        for m in baseline_loads:
            with Baseline(wait_for) as app:  # a fresh pool each time: no backlog carried over
                target = Target(
                    app.url,
                    "/burn",
                    app.pid,
                    include_root=False,
                    params={"seconds": TASK_SECONDS},
                    beside=CpuMeter.beside_tasks(app.pid, None),
                )
                out["systems"][name][f"{m}x"] = asyncio.run(
                    _measure(target, CAPACITY * m, window, drain)
                )
    return out
