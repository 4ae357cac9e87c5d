"""What the operations console (`/console`) shows, as one snapshot: per task type its
queue, slots, run times and outcomes per minute; the live workers; an owner's running
and latest ended tasks; and where its CPU went (gateway/accounting.py).

It is kept from the event stream, which every gateway reads whole, so any replica
shows the whole fleet. Task types and workers are the fleet's (as `/v1/queues` and
`/v1/workers` show them to any key); tasks and CPU are the key's own."""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from contracts.events import TaskEvent
from gateway.tasktable import Record

if TYPE_CHECKING:
    from gateway.services import Services

ENDED_KEPT = 1000  # the latest ended tasks of the fleet, from which an owner's are shown
RUNNING_SHOWN, ENDED_SHOWN = 50, 20  # tasks of each list in a snapshot
MINUTE = 60.0
STALE = 60.0  # a task not ended this long after its deadline is no longer shown running
STATIC = Path(__file__).parent / "static"
PAGE = (STATIC / "console.html").read_text(encoding="utf-8")
# uPlot (MIT), as npm publishes it: scripts/vendor-uplot fetches it again
ASSETS = {
    "uPlot.iife.min.js": ((STATIC / "uPlot.iife.min.js").read_bytes(), "text/javascript"),
    "uPlot.min.css": ((STATIC / "uPlot.min.css").read_bytes(), "text/css"),
}


class Activity:
    """A task table listener: the tasks not ended yet, the latest ended ones, and the
    endings of the last minute by type and outcome."""

    def __init__(self) -> None:
        self.active: dict[str, Record] = {}
        self.ended: deque[Record] = deque(maxlen=ENDED_KEPT)
        self._endings: deque[tuple[float, str, str]] = deque()  # (at, task, outcome)
        self._refused: deque[tuple[float, str]] = deque()  # refused here: (at, task)
        self._tidied = time.time()

    def __call__(self, record: Record, event: TaskEvent) -> None:
        task_id, now = record.status.id, time.time()
        if event.terminal:
            self.active.pop(task_id, None)
            self.ended.append(record)
            _within_a_minute(self._endings, now).append((now, event.task, event.type.value))
        else:
            self.active[task_id] = record
        if now - self._tidied > MINUTE:  # whether or not a console is open
            self._forget_stale(now)

    def refused(self, task: str) -> None:
        """A request this gateway refused before queueing."""
        now = time.time()
        _within_a_minute(self._refused, now).append((now, task))

    def per_minute(self, now: float) -> tuple[Counter[tuple[str, str]], Counter[str]]:
        """Endings by (task, outcome), and refusals here by task, in the last minute."""
        endings = _within_a_minute(self._endings, now)
        refused = _within_a_minute(self._refused, now)
        return Counter((task, outcome) for _, task, outcome in endings), Counter(
            task for _, task in refused
        )

    def states(self, now: float) -> Counter[tuple[str, str]]:
        """The fleet's tasks not ended, by (task type, state)."""
        self._forget_stale(now)
        return Counter((r.status.task, r.status.state.value) for r in self.active.values())

    def running(self, owner: str | None, now: float) -> list[Record]:
        """The owner's tasks not ended, the closest to their deadline first."""
        self._forget_stale(now)
        mine = [r for r in self.active.values() if r.owner == owner]
        return sorted(mine, key=lambda r: r.deadline.epoch if r.deadline else now)[:RUNNING_SHOWN]

    def _forget_stale(self, now: float) -> None:
        """Drops the tasks whose end was never heard, a while after their deadline."""
        self._tidied = now
        for task_id, record in list(self.active.items()):
            if record.deadline is None or record.deadline.epoch + STALE < now:
                del self.active[task_id]

    def latest_ended(self, owner: str | None) -> list[Record]:
        mine = (record for record in reversed(self.ended) if record.owner == owner)
        return list(itertools.islice(mine, ENDED_SHOWN))


W = TypeVar("W", bound=tuple[Any, ...])


def _within_a_minute(window: deque[W], now: float) -> deque[W]:
    """`window` (oldest first, each item's time first) without what is a minute old."""
    while window and window[0][0] < now - MINUTE:
        window.popleft()
    return window


def queues(svc: Services) -> list[dict[str, Any]]:
    """Per task type: its queue, with the broker's figures (at most a second old) and
    the slots the live workers give it, the workers that serve the type, observed run
    times, and the estimated wait for a request made now."""
    admission = svc.admission
    now = time.time()
    out = []
    for task in svc.tasks.values():
        figures = admission.figures[task.queue]
        estimate = admission.estimate(task)
        run_time = admission.summary(task.name)
        out.append(
            {
                "task": task.name,
                "queue": task.queue,
                "messages_ready": figures.ready,
                "messages_unacked": figures.unacked,
                "consumers": figures.consumers,
                "workers": len(svc.fleet.serving(task.name)),
                "queued": estimate.ready,
                "running": estimate.running,
                "parallel_slots": estimate.parallelism,
                "run_time": {
                    "samples": run_time.samples,
                    "mean": run_time.mean,
                    "p50": run_time.p50,
                    "p90": run_time.p90,
                },
                "work_drained_per_s": admission.backlogs[task.queue].drain.per_second(now),
                "estimated_wait": estimate.wait,
                "figures_age": round(max(0.0, now - figures.at), 3) if figures.at else None,
            }
        )
    return out


def workers(svc: Services) -> list[dict[str, Any]]:
    """The live workers, as each last announced itself (every few seconds)."""
    now = time.time()
    return [
        {
            "worker": a.worker,
            "tasks": sorted(a.tasks),
            "slots": a.slots,
            "busy": a.busy,
            "last_heard": round(max(0.0, now - a.at), 3),
        }
        for a in sorted(svc.fleet.live(), key=lambda a: a.worker)
    ]


def snapshot(svc: Services, owner: str | None) -> dict[str, Any]:
    """Everything the console shows to the key whose owner id is `owner`."""
    now = time.time()
    activity = svc.activity
    endings, refused = activity.per_minute(now)
    states = activity.states(now)
    types = queues(svc)
    for figures in types:
        task = figures["task"]
        figures["tasks_queued"] = states[(task, "queued")]
        figures["tasks_running"] = states[(task, "running")]
        figures["per_minute"] = {o: n for (t, o), n in sorted(endings.items()) if t == task}
        figures["refused_here_per_minute"] = refused[task]
    return {
        "at": now,
        "gateway": svc.broker.name,
        "types": types,
        "workers": workers(svc),
        "running": [_task(record, now) for record in activity.running(owner, now)],
        "ended": [_task(record, now) for record in activity.latest_ended(owner)],
        "cpu": svc.ledger.view(owner, now),
    }


async def snapshots(svc: Services, owner: str | None) -> AsyncIterator[dict[str, str]]:
    """The console's event stream: a snapshot now and every `console_period` seconds,
    until the gateway stops (its page then reconnects, to another replica)."""
    while not svc.shutting_down.is_set():
        yield {"event": "snapshot", "data": json.dumps(snapshot(svc, owner))}
        with anyio.move_on_after(svc.settings.console_period):
            await svc.shutting_down.wait()


def _task(record: Record, now: float) -> dict[str, Any]:
    status = record.status
    deadline = record.deadline
    return {
        "id": status.id,
        "task": status.task,
        "state": status.state.value,
        "progress": status.progress,
        "progress_message": status.progress_message,
        "time_left": round(deadline.epoch - now, 3) if deadline else None,
        "worker": status.worker,
        "attempts": status.attempts,
        "reason": status.reason,
        "cpu_seconds": status.cpu_seconds,
        "finished_at": status.finished_at.timestamp() if status.finished_at else None,
    }
