"""Abort: how late a task past its deadline is killed (kill time minus deadline), for
a Python loop and for one C call that holds the GIL, and how soon the slot runs the
next task."""

from __future__ import annotations

from typing import Any

import httpx

from bench.latency import percentiles
from bench.stack import Stack
from tests.harness import task_events


def run(pairs: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "parameters": {"pairs": pairs, "deadline_s": 1.0, "task": "burn_cpu 30 s", "slots": 1}
    }
    with Stack(TIMEBOX_ADMISSION="false", TIMEBOX_START_ONLY_IF_FINISHABLE="false") as stack:
        gateway = stack.gateway()
        stack.worker(1)
        with httpx.Client(base_url=gateway.url, timeout=30) as c:
            for hold_gil in (False, True):
                lateness, ready = [], []
                for _ in range(pairs):
                    burn = c.post(
                        "/v1/tasks/burn_cpu",
                        headers={"Request-Timeout": "1"},
                        json={"seconds": 30, "hold_gil": hold_gil},
                    ).json()["id"]
                    nxt = c.post("/v1/tasks/echo", json={"payload": 1}).json()["id"]
                    aborted = task_events(c, burn)[-1][1]
                    assert aborted["type"] == "aborted", aborted
                    running = next(e[1] for e in task_events(c, nxt) if e[0] == "running")
                    lateness.append(float(aborted["late_by"]))  # type: ignore[arg-type]
                    ready.append(float(running["at"]) - float(aborted["at"]))  # type: ignore[arg-type]
                key = "hold_gil" if hold_gil else "python"
                # percentiles() reports milliseconds
                out[f"{key}_lateness"] = percentiles(lateness)
                out[f"{key}_slot_ready"] = percentiles(ready)
    return out
