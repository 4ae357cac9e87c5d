"""Messages other than events: the task message's headers, cancel requests, workers'
announcements, work notices and watch notices."""

from __future__ import annotations

import time

from pydantic import BaseModel, Field

from contracts.events import READER

CONTENT_TYPE = "application/json"
OWNER_HEADER = "x-owner"
COST_HEADER = "x-cost"  # the input's cost hint, in its spec's unit
DELIVERY_COUNT_HEADER = "x-delivery-count"  # set by quorum queues on redelivery
PARK_REASON_HEADER = "x-park-reason"
SYNC_TYPE = "timebox.sync"  # a gateway's own marker in the event stream
EVENT_TYPE = "timebox.event"
WORK_TYPE = "timebox.work"  # on the work exchange: a task message was just queued
WATCH_TYPE = "timebox.watch"  # on the gateways exchange: a task's events are followed
WORKER_TYPE = "timebox.worker"  # in the event stream: a worker's announcement

# seconds between a worker's announcements; a worker not heard for three is gone
ANNOUNCE_EVERY = 2.0


class CancelRequest(BaseModel):
    """Sent on the control exchange to every worker."""

    model_config = READER

    task_id: str
    deadline_ms: int
    announced: bool = False  # the gateway already emitted `cancelled` (task was queued)


class WorkerAnnouncement(BaseModel):
    """Appended to the event stream by each worker when it is ready, every
    `ANNOUNCE_EVERY` seconds, and when it stops: which task types it serves (with a
    digest of each input schema, to tell a gateway running other code) and its slots.
    Every gateway reads them: a task type no live worker serves is refused at once."""

    model_config = READER

    worker: str
    tasks: dict[str, str]  # task type: the digest of its input schema
    slots: int
    busy: int = 0
    stopping: bool = False
    at: float = Field(default_factory=time.time, description="epoch seconds")

    def live(self, now: float, skew: float = 0.0) -> bool:
        return not self.stopping and now - self.at < 3 * ANNOUNCE_EVERY + skew


class WorkNotice(BaseModel):
    """Sent on the work exchange (routing key: the task type) once a task message is
    confirmed in its queue, so that idle workers that pull that type (see
    compute/dispatch.py) look there at once."""

    model_config = READER

    task: str


class WatchNotice(BaseModel):
    """Sent on the gateways exchange by a gateway that serves tasks that have not ended
    to a client (their event streams, or RPCs retried with their Idempotency-Key): at
    once when it starts, then every half grace for those a client may abandon. A
    client that lost its connection to another gateway may have come back here, and
    that gateway must not cancel its task as abandoned. Every half grace (and within
    0.1 s of a new wait) it also lists the RPCs waiting there, and those it answered
    `202` while they run on: should it die, the other gateways cancel the tasks of the
    RPCs it had (gateway/watches.py)."""

    model_config = READER

    task_ids: list[str]
    # RPCs waiting on that gateway, and those it no longer waits for (they run on)
    awaited: list[str] = []
    released: list[str] = []
