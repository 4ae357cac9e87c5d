"""Messages other than events: the task message's headers, cancel requests, work
notices and watch notices."""

from __future__ import annotations

from pydantic import BaseModel

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


class CancelRequest(BaseModel):
    """Sent on the control exchange to every worker."""

    model_config = READER

    task_id: str
    deadline_ms: int
    announced: bool = False  # the gateway already emitted `cancelled` (task was queued)


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
