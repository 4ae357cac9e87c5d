"""A client's presence: a tied task's second deadline, held where the first one is.

A task tied to its client (an RPC, a stream) carries when its presence lapses and the
grace each word of its client gives it. Gateways say on the control exchange which
tied tasks have a client there (every half grace, and at once when one comes back),
and which ones they untied (answered `202`). The worker holds a tied task to the
earlier of its deadline and a grace after the last word: it does not start one whose
client has gone, and cancels one that runs.

Silence is absence only while the worker can hear. That is judged here, once: before
a task is taken for abandoned, a round trip to the broker on the connection the word
would have come by must succeed, a confirmed publish, as the gateways' words are (a
broker alarm holds both). A worker that has just started, or hears again after a
spell it could not, gives every tied task a grace from then."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from compute.cancels import Remembered
from contracts.messages import Presence

log = logging.getLogger("timebox.worker.presence")

PROBE_WITHIN = 1.0  # seconds a round trip may take before the worker counts as deaf
DEAF_RECHECK = 1.0  # seconds between round trips while deaf
FORGET_AFTER = 60.0  # seconds a word outlives its grace (clock skew and late deliveries)


class Presences:
    """What the gateways said of clients, and whether this worker can hear them."""

    def __init__(self, probe: Callable[[], Awaitable[object]], clock_skew: float) -> None:
        self._probe = probe  # a round trip on the connection that hears the gateways
        self._skew = clock_skew
        self._heard: dict[str, float] = {}  # task id: until when its client's word holds
        self._released: Remembered[bool] = Remembered()
        self._since: float | None = time.time()  # hearing since; None while deaf
        self._listen_again = 0.0  # while deaf: when to try a round trip again
        self._pruned = time.time()

    def heard(self, presence: Presence) -> None:
        now = time.time()
        until = now + presence.grace
        for task_id in presence.tasks:
            self._heard[task_id] = max(until, self._heard.get(task_id, until))
        for task_id, deadline_ms in presence.released.items():
            self._released.add(task_id, deadline_ms, True)
        if now - self._pruned > FORGET_AFTER:
            self._pruned = now
            self._heard = {k: v for k, v in self._heard.items() if v > now - FORGET_AFTER}

    def resumed(self) -> None:
        """Hearing again (the connection is back): what was said meanwhile was missed."""
        self._since = time.time()

    def tie(self, task_id: str, until: float, grace: float) -> Tie:
        return Tie(self, task_id, until, grace)

    def lapses_at(self, tie: Tie) -> float:
        """When the tied task's client counts as gone unless word comes (epoch seconds);
        while deaf, when to listen again."""
        if tie.task_id in self._released:
            return math.inf
        if self._since is None:
            return self._listen_again
        word = self._heard.get(tie.task_id, -math.inf)
        return max(tie.until, word, self._since + tie.grace) + self._skew

    async def gone(self, tie: Tie) -> bool:
        """Whether the tied task's client is gone: its presence has lapsed, and the
        worker can hear (or it would be taking its own deafness for the client's)."""
        if time.time() < self.lapses_at(tie):
            return False
        try:
            async with asyncio.timeout(PROBE_WITHIN):
                await self._probe()
        except Exception as exc:
            if self._since is not None:
                log.warning(
                    "cannot hear the broker (%r): no task is cancelled for its client's "
                    "silence until it can",
                    exc,
                )
            self._since = None
            self._listen_again = time.time() + DEAF_RECHECK
            return False
        if self._since is None:
            log.warning("hears the broker again")
            self._since = time.time()
        return time.time() >= self.lapses_at(tie)


@dataclass(frozen=True)
class Tie:
    """One task's tie to its client, as the runner asks about it."""

    presences: Presences
    task_id: str
    until: float  # epoch seconds: its presence at publish, before any word
    grace: float

    def lapses_at(self) -> float:
        return self.presences.lapses_at(self)

    async def gone(self) -> bool:
        return await self.presences.gone(self)
