"""Messages other than events: the task message's headers, and cancel requests."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

CONTENT_TYPE = "application/json"
OWNER_HEADER = "x-owner"
COST_HEADER = "x-cost"  # the input's cost hint, in its spec's unit
DELIVERY_COUNT_HEADER = "x-delivery-count"  # set by quorum queues on redelivery
PARK_REASON_HEADER = "x-park-reason"
SYNC_TYPE = "timebox.sync"  # a gateway's own marker in the event stream
EVENT_TYPE = "timebox.event"


class CancelRequest(BaseModel):
    """Sent on the control exchange to every worker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_id: str
    deadline_ms: int
    announced: bool = False  # the gateway already emitted `cancelled` (task was queued)
