"""Server-Sent Events of one task: replay what happened after `Last-Event-ID`, then
follow live until the terminal event."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from contracts.events import EventType, TaskEvent
from gateway import metrics
from gateway.tasktable import Record, Subscriber, SubscriberTooSlow, SubscriptionClosed

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
        async for offset, event, newer_waits in _replay_then_follow(record, sub):
            if offset > last and not (newer_waits and _fraction_only(event)):
                yield record.encoded(offset, event)
                last = offset
            if event.terminal:  # sent now or before (Last-Event-ID past it): the end
                return
    except SubscriberTooSlow:
        log.warning("cut off a slow SSE subscriber of task %s", record.status.id)
    except SubscriptionClosed:
        pass  # shutting down: the stream ends cleanly; the client resumes elsewhere
    finally:
        metrics.SSE_STREAMS.dec()
        record.unsubscribe(sub)


def _fraction_only(event: TaskEvent) -> bool:
    return event.type is EventType.PROGRESS and event.message is None


async def _replay_then_follow(
    record: Record, sub: Subscriber
) -> AsyncIterator[tuple[int, TaskEvent, bool]]:
    """Each event, and whether it is live and another one already waits behind it."""
    for offset, event in list(record.events):
        yield offset, event, False
    while True:
        offset, event = await sub.get()
        yield offset, event, sub.waiting
