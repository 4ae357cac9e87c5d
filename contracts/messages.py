"""Messages other than events: the task message's headers, workers' announcements, and
what gateways tell workers on the control exchange (cancels, clients' presence)."""

from __future__ import annotations

import time

from pydantic import BaseModel, Field

from contracts.events import READER

CONTENT_TYPE = "application/json"
OWNER_HEADER = "x-owner"
COST_HEADER = "x-cost"  # the input's cost hint, in its spec's unit
# epoch microseconds (the AMQP `timestamp` has whole seconds): the queue wait's start
PUBLISHED_HEADER = "x-published-at"
DELIVERY_COUNT_HEADER = "x-delivery-count"  # set by quorum queues on redelivery
PARK_REASON_HEADER = "x-park-reason"
PARKED_AT_HEADER = "x-parked-at"  # epoch ms
PARKED_DELIVERIES_HEADER = "x-parked-deliveries"  # how often it was delivered before
SYNC_TYPE = "timebox.sync"  # a gateway's own marker in the event stream
EVENT_TYPE = "timebox.event"
WORKER_TYPE = "timebox.worker"  # in the event stream: a worker's announcement
PRESENCE_TYPE = "timebox.presence"  # on the control exchange: clients a gateway holds
# a task tied to its client (an RPC, a stream) carries its presence as a second deadline:
# the instant it lapses unless a gateway says the client is there, and the grace each
# such word gives it
CLIENT_UNTIL_HEADER = "x-client-until"  # epoch milliseconds
CLIENT_GRACE_HEADER = "x-client-grace"  # seconds

# seconds between a worker's announcements; a worker not heard for three is gone
ANNOUNCE_EVERY = 2.0


class CancelRequest(BaseModel):
    """Sent on the control exchange to every worker: the task must not run (on)."""

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
    queues: dict[str, int] = {}  # the queues it consumes: the slots of each
    slots: int
    busy: int = 0
    stopping: bool = False
    at: float = Field(default_factory=time.time, description="epoch seconds")

    def live(self, now: float, skew: float = 0.0) -> bool:
        return not self.stopping and now - self.at < 3 * ANNOUNCE_EVERY + skew


class Presence(BaseModel):
    """Sent on the control exchange by every gateway every half grace (an empty one too)
    and within 0.1 s of a client starting to follow a tied task there: the tied tasks
    whose client is there now, and those it untied (answered `202`) that have not
    ended, with their deadlines. A worker holds each tied task to the earlier of its
    deadline and a grace after the last word of its client (compute/presence.py)."""

    model_config = READER

    gateway: str
    grace: float
    tasks: list[str] = []
    released: dict[str, int] = {}  # task id: its deadline (epoch ms)
