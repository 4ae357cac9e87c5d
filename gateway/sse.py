"""Server-Sent Events of one task: replay what happened after `Last-Event-ID`, then
follow live until the terminal event."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from sse_starlette import ServerSentEvent

from contracts.events import TaskEvent
from gateway import metrics
from gateway.tasktable import Record, SubscriberTooSlow, SubscriptionClosed

log = logging.getLogger("timebox.gateway.sse")


def to_sse(offset: int, event: TaskEvent) -> ServerSentEvent:
    return ServerSentEvent(
        data=event.model_dump_json(exclude_none=True), event=event.type.value, id=str(offset)
    )


def parse_last_event_id(raw: str | None) -> int:
    if raw is None or not raw.strip():
        return -1
    try:
        return int(raw.strip())
    except ValueError:
        return -1


async def task_events(record: Record, after: int, buffer: int) -> AsyncIterator[ServerSentEvent]:
    # subscribe before the replay so nothing falls between the two; offsets dedupe
    sub = record.subscribe(buffer)
    metrics.SSE_STREAMS.inc()
    try:
        last = after
        for offset, event in list(record.events):
            if offset <= last:
                continue
            yield to_sse(offset, event)
            last = offset
            if event.terminal:
                return
        while True:
            offset, event = await sub.get()
            if offset <= last:
                continue
            yield to_sse(offset, event)
            last = offset
            if event.terminal:
                return
    except SubscriberTooSlow:
        log.warning("cut off a slow SSE subscriber of task %s", record.status.id)
    except SubscriptionClosed:
        pass  # shutting down: the stream ends cleanly; the client resumes elsewhere
    finally:
        metrics.SSE_STREAMS.dec()
        record.unsubscribe(sub)
