"""Server-Sent Events of one task: replay what happened after `Last-Event-ID`, then
follow live until the terminal event. The live part comes from the fan-out of each
event the task table keeps, encoded once for all its subscribers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from gateway import metrics
from gateway.clients import Clients
from gateway.tasktable import Record, Stored

log = logging.getLogger("timebox.gateway.sse")


class SubscriberTooSlow(Exception):
    """The subscriber's buffer filled up: it is cut off so it slows nobody else."""


class SubscriptionClosed(Exception):
    """The gateway is shutting down: the stream ends, and the client reconnects."""


@dataclass(eq=False)
class Subscriber:
    queue: asyncio.Queue[Stored | None]
    overflowed: bool = False
    closed: bool = False

    def push(self, item: Stored) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.overflowed = True

    @property
    def waiting(self) -> bool:
        """Whether events wait to be taken."""
        return not self.queue.empty()

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)

    async def get(self) -> Stored:
        if self.queue.empty():
            if self.closed:
                raise SubscriptionClosed()
            if self.overflowed:
                raise SubscriberTooSlow()
        item = await self.queue.get()
        if item is None:
            raise SubscriptionClosed()
        return item


class Fanout:
    """The live subscribers of each task on this gateway (TaskTable.fanout)."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[Subscriber]] = {}

    def __call__(self, record: Record, stored: Stored) -> None:
        for sub in self._subscribers.get(record.status.id, ()):
            sub.push(stored)

    def subscribe(self, record: Record, buffer: int) -> Subscriber:
        sub = Subscriber(asyncio.Queue(maxsize=buffer))
        self._subscribers.setdefault(record.status.id, set()).add(sub)
        return sub

    def unsubscribe(self, record: Record, sub: Subscriber) -> None:
        subs = self._subscribers.get(record.status.id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subscribers[record.status.id]

    def close_all(self) -> int:
        """Ends every stream (the gateway is stopping): their clients resume elsewhere."""
        closed = 0
        for subs in self._subscribers.values():
            for sub in subs:
                sub.close()
                closed += 1
        return closed


def parse_last_event_id(raw: str | None) -> int:
    if raw is None or not raw.strip():
        return -1
    try:
        return int(raw.strip())
    except ValueError:
        return -1


async def task_events(
    fanout: Fanout, clients: Clients, record: Record, after: int, buffer: int
) -> AsyncIterator[bytes]:
    """The task's events after offset `after`: first those already seen, then live ones,
    its client followed here meanwhile.

    Following live, a subscriber that is behind skips a progress report that carries
    only a fraction when a later event already waits for it: the later one says as
    much. So a gateway fanning events out to more subscribers than it can serve between
    two reports sends each the latest state instead of a backlog that grows for as long
    as the task runs. A report with a message is always sent (its text may be said
    once only), and so is the replay of what happened before the subscription."""
    # subscribe before the replay so nothing falls between the two; offsets dedupe
    sub = fanout.subscribe(record, buffer)
    clients.follow(record)
    metrics.SSE_STREAMS.inc()
    try:
        last = after
        async for stored, newer_waits in _replay_then_follow(record, sub):
            if stored.offset > last and not (newer_waits and stored.fraction_only):
                yield stored.frame
                last = stored.offset
            if stored.terminal:  # sent now or before (Last-Event-ID past it): the end
                return
    except SubscriberTooSlow:
        log.warning("cut off a slow SSE subscriber of task %s", record.status.id)
    except SubscriptionClosed:
        pass  # shutting down: the stream ends cleanly; the client resumes elsewhere
    finally:
        metrics.SSE_STREAMS.dec()
        clients.unfollow(record)
        fanout.unsubscribe(record, sub)


async def _replay_then_follow(
    record: Record, sub: Subscriber
) -> AsyncIterator[tuple[Stored, bool]]:
    """Each event, and whether it is live and another one already waits behind it."""
    for stored in list(record.events):
        yield stored, False
    while True:
        stored = await sub.get()
        yield stored, sub.waiting
