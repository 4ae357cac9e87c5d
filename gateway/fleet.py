"""The workers, as their announcements in the event stream describe them: which task
types each serves, with how many slots. A type that no live worker serves is refused
at once (503) rather than queued to expire; a worker whose input schema for a type
differs from this gateway's runs other code, and is logged once."""

from __future__ import annotations

import logging
import time
from typing import Any

from contracts.messages import WorkerAnnouncement
from contracts.tasks import Task

log = logging.getLogger("timebox.gateway.fleet")


class Fleet:
    def __init__(self, tasks: dict[str, Task[..., Any]], clock_skew: float) -> None:
        self.tasks = tasks
        self.clock_skew = clock_skew
        self._workers: dict[str, WorkerAnnouncement] = {}
        self._differ: set[tuple[str, str, str]] = set()  # (worker, task, digest) logged

    def heard(self, announcement: WorkerAnnouncement) -> None:
        known = self._workers.get(announcement.worker)
        if known is not None and known.at > announcement.at:
            return  # an older one, read after a newer
        self._workers[announcement.worker] = announcement
        for task, digest in announcement.tasks.items():
            ours = self.tasks.get(task)
            if ours is None or ours.digest == digest:
                continue
            key = (announcement.worker, task, digest)
            if key not in self._differ:
                self._differ.add(key)
                log.warning(
                    "worker %s serves %s with another input schema than this gateway's "
                    "(digest %s, here %s): the two programs run different code",
                    announcement.worker,
                    task,
                    digest,
                    ours.digest,
                )

    def live(self) -> list[WorkerAnnouncement]:
        """The workers heard from lately (and not stopping), by their latest word."""
        now = time.time()
        for name, announcement in list(self._workers.items()):
            if not announcement.live(now, self.clock_skew):
                del self._workers[name]
        return list(self._workers.values())

    def serving(self, task: str) -> list[WorkerAnnouncement]:
        """The live workers that serve `task`."""
        return [a for a in self.live() if task in a.tasks]

    def slots(self, queue: str) -> int:
        """The slots the live workers give `queue`."""
        return sum(a.queues.get(queue, 0) for a in self.live())
