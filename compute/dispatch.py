"""Taking task messages from several queues without holding more than the free slots.

Per-consumer prefetch bounds each queue separately: a worker consuming K quorum queues
with prefetch N may hold K*N messages (quorum queues refuse a channel-wide QoS, and on
RabbitMQ 3.x handing a message back counts towards its delivery limit). So a worker of
several task types pulls: one `basic.get` per free slot, from the queues that may have
messages — those named by a work notice from a gateway, those the last get left
non-empty — and from every queue once per poll interval, which also finds messages
nobody announced (redeliveries after a worker died).

A poll asks each queue how many messages it holds (a passive declare) and gets only
from those that hold some: on a quorum queue every basic.get, an empty one too, is an
entry in its Raft log, written to disk and replicated, and idle workers polling with
gets would write one per queue a second each.

A pull costs a notice and a get round trip per task. So while only one queue has work
and every slot is free, the puller lends all its slots to a consumer on that queue
(a lease: prefetch = the slots lent, so the broker still never hands over more than
the free slots) and the messages come without either; a notice or a poll that finds
work in another queue ends the lease, and the slots come back as their tasks end.
No lease starts on a notice that follows one for another queue: a lease costs a
consumer started and cancelled (two Raft log entries) and the queue's notices unbound
and bound again, for nothing when the work alternates between types — and every idle
worker that hears the notice would pay it. (Every worker that pulls a type hears the
same notices, so all of them decide alike.)"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from aio_pika.abc import AbstractIncomingMessage

log = logging.getLogger("timebox.worker.dispatch")

Get = Callable[[str], Awaitable[AbstractIncomingMessage | None]]
Count = Callable[[str], Awaitable[int]]  # the messages ready in a task's queue
Handoff = Callable[[str, AbstractIncomingMessage, "Credit"], None]
Deliver = Callable[[AbstractIncomingMessage], None]


class Consumers(Protocol):
    """The broker side of a lease."""

    async def start(
        self, task: str, prefetch: int, deliver: Deliver, lost: Callable[[], None]
    ) -> str:
        """Consumes `task`'s queue with this prefetch, passing each message to `deliver`;
        `lost` is called if the consumer goes (its channel, a broker cancel) before `stop`.
        Returns the consumer's tag."""
        ...

    async def stop(self, consumer: str) -> None:
        """Cancels the consumer; returns once every message the broker delivered before
        its cancel-ok has gone to `deliver`."""
        ...


class Credit:
    """One free slot lent to one message; given back once, however often released."""

    def __init__(self, give_back: Callable[[], None]) -> None:
        self._give_back: Callable[[], None] | None = give_back

    def release(self) -> None:
        if self._give_back is not None:
            give_back, self._give_back = self._give_back, None
            give_back()


@dataclass(eq=False)
class Lease:
    """Slots lent to a consumer on one queue."""

    task: str
    slots: int
    in_hand: int = 0  # messages delivered whose slot is not free again yet
    consumer: str | None = None  # its tag, once the broker has it
    ended: bool = False


class Puller:
    def __init__(
        self,
        tasks: Sequence[str],
        get: Get,
        slots: int,
        poll_interval: float,
        *,
        count: Count,
        consumers: Consumers | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tasks = list(tasks)
        self._get = get
        self._count = count
        self._size = slots
        self._free = slots  # slots lent neither to a message nor to a lease
        self._consumers = consumers
        self._noticed: tuple[str | None, str | None] = (None, None)  # the last two named
        self._poll_interval = poll_interval
        self._clock = clock
        self._maybe_ready = dict.fromkeys(self.tasks, True)
        self._notices = dict.fromkeys(self.tasks, 0)  # a notice during a get outranks it
        self._next = 0  # where the round robin over the queues starts
        self._polled_at = -float("inf")
        self._wake = asyncio.Event()  # a notice, a slot given back, a lease ended, close
        self._closing = False
        self.lease: Lease | None = None
        self._handoff: Handoff | None = None
        self.looked = asyncio.Event()  # every queue was looked at once

    def notice(self, task: str) -> None:
        """A gateway published a `task` message: look there at the next free slot."""
        if task in self._maybe_ready:
            self._maybe_ready[task] = True
            self._notices[task] += 1
            self._noticed = (self._noticed[1], task)
            self._wake.set()

    def close(self) -> None:
        """Makes `run` return at its next turn. Cancel it as well, to end a get in
        flight: a cancel alone can be lost on Python 3.11, where asyncio.wait_for (aiormq
        times its calls with it) returns the reply that arrives in the cancel's loop
        turn instead of raising."""
        self._closing = True
        self._wake.set()

    @property
    def in_hand(self) -> int:
        """Messages handed over whose slot is not free again."""
        lent_unused = self.lease.slots - self.lease.in_hand if self.lease else 0
        return self._size - self._free - lent_unused

    async def run(self, handoff: Handoff) -> None:
        """Hands each message taken to `handoff` with the credit of its slot; the
        handler releases the credit when the slot is free again. Runs until `close`d
        or cancelled."""
        self._handoff = handoff
        delay = 0.05
        try:
            while not self._closing:
                self._wake.clear()  # before looking, so that a notice during the gets counts
                try:
                    await self._step()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a lost connection: the robust channel comes back
                    log.warning("taking a task message failed (%r); retrying", exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                delay = 0.05
        finally:
            if self.lease is not None:
                with contextlib.suppress(Exception):
                    await self._end_lease(self.lease)

    async def _step(self) -> None:
        lease = self.lease
        if lease is not None:
            if await self._work_elsewhere(lease.task):
                await self._end_lease(lease)
            else:
                await self._until_poll()
            return
        if self._free <= 0:
            await self._wake.wait()
            return
        if self._consumers is not None and self._free == self._size:
            hot = [task for task in self.tasks if self._maybe_ready[task]]
            if len(hot) == 1 and set(self._noticed) <= {None, hot[0]}:
                await self._start_lease(hot[0])
                return
        taken = await self._sweep()
        self.looked.set()
        if taken is None:
            await self._until_poll()
            return
        self._hand_over(*taken)

    async def _until_poll(self) -> None:
        timeout = max(0.0, self._polled_at + self._poll_interval - self._clock())
        # not asyncio.wait_for: on Python 3.11 it swallows a cancel that comes in the
        # loop turn in which the wait ends, and the worker's shutdown never returned
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    def _hand_over(self, task: str, message: AbstractIncomingMessage) -> None:
        """A message outside any lease: it takes a free slot of its own."""
        assert self._handoff is not None
        self._free -= 1
        self._handoff(task, message, Credit(self._give_back))

    def _give_back(self) -> None:
        self._free += 1
        self._wake.set()

    # -- pulling ---------------------------------------------------------------------

    async def _sweep(self) -> tuple[str, AbstractIncomingMessage] | None:
        count = len(self.tasks)
        turn = [self.tasks[(self._next + step) % count] for step in range(count)]
        candidates = [task for task in turn if self._maybe_ready[task]]
        polled = [task for task in turn if not self._maybe_ready[task]]
        if self._poll_due():
            # the announced queues first: a poll must not delay the work known to wait
            candidates += polled
        for task in candidates:
            notices = self._notices[task]
            if task in polled and not await self._count(task):
                continue  # a notice meanwhile has marked it for the next sweep
            message = await self._get(task)
            # the get-ok says how many are left: no need to look again while none is
            left = 0 if message is None else getattr(message, "message_count", 0) or 0
            self._maybe_ready[task] = left > 0 or self._notices[task] != notices
            if message is None:
                continue
            self._next = (self.tasks.index(task) + 1) % count
            return task, message
        return None

    def _poll_due(self) -> bool:
        if self._clock() - self._polled_at < self._poll_interval:
            return False
        self._polled_at = self._clock()
        return True

    # -- leasing ---------------------------------------------------------------------

    async def _start_lease(self, task: str) -> None:
        assert self._consumers is not None
        lease = Lease(task, self._free)
        self._free = 0
        self.lease = lease
        try:
            lease.consumer = await self._consumers.start(
                task,
                lease.slots,
                functools.partial(self._deliver, lease),
                functools.partial(self._lost, lease),
            )
        except BaseException:
            self._lost(lease)
            raise
        self._maybe_ready[task] = False  # the consumer gets what comes

    async def _work_elsewhere(self, leased: str) -> bool:
        """Whether another queue has work: announced, or found by the poll."""
        others = [task for task in self.tasks if task != leased]
        if any(self._maybe_ready[task] for task in others):
            return True
        if not others or not self._poll_due():
            return False
        for task in others:
            if await self._count(task):
                self._maybe_ready[task] = True
                return True
        return False

    async def _end_lease(self, lease: Lease) -> None:
        assert self._consumers is not None
        try:
            if lease.consumer is not None and not lease.ended:
                await self._consumers.stop(lease.consumer)
        finally:
            self._lost(lease)

    def _lost(self, lease: Lease) -> None:
        """The lease is over: its slots without a message come back now, the others as
        their tasks end."""
        if lease.ended:
            return
        lease.ended = True
        if self.lease is lease:
            self.lease = None
        self._free += lease.slots - lease.in_hand
        self._maybe_ready[lease.task] = True  # what the consumer left behind
        self._wake.set()

    def _deliver(self, lease: Lease, message: AbstractIncomingMessage) -> None:
        if lease.ended:  # the broker sends nothing after its cancel-ok: not expected
            log.warning("a %s message came after its consumer's lease ended", lease.task)
            self._hand_over(lease.task, message)
            return
        assert self._handoff is not None
        lease.in_hand += 1
        self._handoff(lease.task, message, Credit(functools.partial(self._leased_back, lease)))

    def _leased_back(self, lease: Lease) -> None:
        if lease.ended:
            self._give_back()
        else:
            lease.in_hand -= 1  # the broker sends the next once this one is acked
