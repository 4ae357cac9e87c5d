"""Taking task messages from several queues without holding more than the free slots.

Per-consumer prefetch bounds each queue separately: a worker consuming K quorum queues
with prefetch N may hold K*N messages (quorum queues refuse a channel-wide QoS, and on
RabbitMQ 3.x handing a message back counts towards its delivery limit). So a worker of
several task types pulls instead: one `basic.get` per free slot, from the queues that
may have messages — those named by a work notice from a gateway, those the last get
left non-empty — and from every queue once per poll interval, which also finds
messages nobody announced (redeliveries after a worker died)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from aio_pika.abc import AbstractIncomingMessage

log = logging.getLogger("timebox.worker.dispatch")

Get = Callable[[str], Awaitable[AbstractIncomingMessage | None]]
Handoff = Callable[[str, AbstractIncomingMessage, "Credit"], None]


class Credit:
    """One free slot lent to one message; given back once, however often released."""

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots: asyncio.Semaphore | None = slots

    def release(self) -> None:
        if self._slots is not None:
            self._slots.release()
            self._slots = None


class Puller:
    def __init__(
        self,
        tasks: Sequence[str],
        get: Get,
        slots: int,
        poll_interval: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tasks = list(tasks)
        self._get = get
        self._slots = asyncio.Semaphore(slots)
        self._poll_interval = poll_interval
        self._clock = clock
        self._maybe_ready = dict.fromkeys(self.tasks, True)
        self._notices = dict.fromkeys(self.tasks, 0)  # a notice during a get outranks it
        self._next = 0  # where the round robin over the queues starts
        self._polled_at = -float("inf")
        self._wake = asyncio.Event()

    def notice(self, task: str) -> None:
        """A gateway published a `task` message: look there at the next free slot."""
        if task in self._maybe_ready:
            self._maybe_ready[task] = True
            self._notices[task] += 1
            self._wake.set()

    async def run(self, handoff: Handoff) -> None:
        """Hands each message taken to `handoff` with the credit of its slot; the
        handler releases the credit when the slot is free again. Runs until cancelled."""
        while True:
            await self._slots.acquire()
            credit = Credit(self._slots)
            try:
                task, message = await self._take()
            except BaseException:
                credit.release()
                raise
            handoff(task, message, credit)

    async def _take(self) -> tuple[str, AbstractIncomingMessage]:
        delay = 0.05
        while True:
            self._wake.clear()  # before looking, so that a notice during the gets counts
            try:
                taken = await self._sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a lost connection: the robust channel comes back
                log.warning("taking a task message failed (%r); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.05
            if taken is not None:
                return taken
            timeout = max(0.0, self._polled_at + self._poll_interval - self._clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _sweep(self) -> tuple[str, AbstractIncomingMessage] | None:
        count = len(self.tasks)
        turn = [self.tasks[(self._next + step) % count] for step in range(count)]
        candidates = [task for task in turn if self._maybe_ready[task]]
        if self._clock() - self._polled_at >= self._poll_interval:
            self._polled_at = self._clock()
            # the announced queues first: a poll must not delay the work known to wait
            candidates += [task for task in turn if not self._maybe_ready[task]]
        for task in candidates:
            notices = self._notices[task]
            message = await self._get(task)
            # the get-ok says how many are left: no need to look again while none is
            left = 0 if message is None else getattr(message, "message_count", 0) or 0
            self._maybe_ready[task] = left > 0 or self._notices[task] != notices
            if message is None:
                continue
            self._next = (self.tasks.index(task) + 1) % count
            return task, message
        return None
