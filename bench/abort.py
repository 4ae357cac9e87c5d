"""Abort: how late a task past its deadline is killed (kill time minus deadline), for
a Python loop and for one C call that holds the GIL, and how soon the slot runs the
next task; and, interleaved with those, the same with the worker frozen (SIGSTOP)
across the deadline, when only the child's timer in the kernel can stop it."""

from __future__ import annotations

import signal
from datetime import datetime
from typing import Any

import httpx

from bench.latency import percentiles
from bench.stack import Stack
from tests.harness import Worker, alive, busy_task_child, task_events, wait_for_event, wait_until


def run(pairs: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "parameters": {"pairs": pairs, "deadline_s": 1.0, "task": "burn_cpu 30 s", "slots": 1}
    }
    with Stack(TIMEBOX_ADMISSION="false", TIMEBOX_START_ONLY_IF_FINISHABLE="false") as stack:
        gateway = stack.gateway()
        worker = stack.worker(1)
        with httpx.Client(base_url=gateway.url, timeout=30) as c:
            for hold_gil in (False, True):
                lateness, ready, frozen = [], [], []
                for _ in range(pairs):
                    late, slot = _stopped(c, hold_gil)
                    lateness.append(late)
                    ready.append(slot)
                    frozen.append(_stopped_frozen(c, worker, hold_gil))
                key = "hold_gil" if hold_gil else "python"
                # percentiles() reports milliseconds
                out[f"{key}_lateness"] = percentiles(lateness)
                out[f"{key}_slot_ready"] = percentiles(ready)
                out[f"{key}_frozen_lateness"] = percentiles(frozen)
    return out


def _burn(c: httpx.Client, hold_gil: bool) -> str:
    body = {"seconds": 30, "hold_gil": hold_gil}
    return str(
        c.post("/v1/tasks/burn_cpu", headers={"Request-Timeout": "1"}, json=body).json()["id"]
    )


def _stopped(c: httpx.Client, hold_gil: bool) -> tuple[float, float]:
    """Its lateness, and the time from its kill to the next task's start."""
    burn = _burn(c, hold_gil)
    nxt = c.post("/v1/tasks/echo", json={"payload": 1}).json()["id"]
    aborted = task_events(c, burn)[-1][1]
    assert aborted["type"] == "aborted", aborted
    late = float(aborted["late_by"])  # type: ignore[arg-type]
    task_events(c, nxt)  # until it ended
    # its status folds the start from a `running` event or, for a run of a few ms
    # that says none, from its ending
    started = datetime.fromisoformat(c.get(f"/v1/tasks/{nxt}").json()["started_at"])
    return late, started.timestamp() - float(aborted["at"])  # type: ignore[arg-type]


def _stopped_frozen(c: httpx.Client, worker: Worker, hold_gil: bool) -> float:
    """Its lateness with the worker stopped from its start until its child is gone
    (when the fork server reaped it, which the worker reports once it runs again)."""
    burn = _burn(c, hold_gil)
    wait_for_event(c, burn, "running")
    child = busy_task_child(worker.pid)
    worker.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: not alive(child), 10, "the child's end")
    finally:
        worker.signal(signal.SIGCONT)
    aborted = task_events(c, burn)[-1][1]
    assert aborted["type"] == "aborted", aborted
    return float(aborted["late_by"])  # type: ignore[arg-type]
