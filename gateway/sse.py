"""Server-Sent Events of one task: replay what happened after `Last-Event-ID`, then
follow live until the terminal event."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from gateway import metrics
from gateway.tasktable import Record, Stored, Subscriber, SubscriberTooSlow, SubscriptionClosed

log = logging.getLogger("timebox.gateway.sse")


def parse_last_event_id(raw: str | None) -> int:
    if raw is None or not raw.strip():
        return -1
    try:
        return int(raw.strip())
    except ValueError:
        return -1


async def task_events(record: Record, after: int, buffer: int) -> AsyncIterator[bytes]:
    """The task's events after offset `after`: first those already seen, then live ones.
    Each event is encoded once, however many subscribers it goes to.

    Following live, a subscriber that is behind skips a progress report that carries
    only a fraction when a later event already waits for it: the later one says as
    much. So a gateway fanning events out to more subscribers than it can serve between
    two reports sends each the latest state instead of a backlog that grows for as long
    as the task runs. A report with a message is always sent (its text may be said
    once only), and so is the replay of what happened before the subscription."""
    # subscribe before the replay so nothing falls between the two; offsets dedupe
    sub = record.subscribe(buffer)
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
        record.unsubscribe(sub)


async def _replay_then_follow(
    record: Record, sub: Subscriber
) -> AsyncIterator[tuple[Stored, bool]]:
    """Each event, and whether it is live and another one already waits behind it."""
    for stored in list(record.events):
        yield stored, False
    while True:
        stored = await sub.get()
        yield stored, sub.waiting
