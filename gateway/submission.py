"""One task's way through a gateway, shared by the HTTP API and the calls an app's own
endpoints make (gateway/calls.py): admitted or refused, published, then waited for
until it ends, its deadline passes or its client goes."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import Request
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from pydantic import BaseModel
from starlette.types import Message

from contracts.deadline import Deadline
from contracts.errors import BrokerUnavailable, ConfirmLost, TimeboxError
from contracts.events import EventType, TaskEvent
from contracts.messages import CancelRequest
from contracts.tasks import Task
from gateway import metrics
from gateway.services import Services, log
from gateway.tasktable import Record
from runtime import tracing


class Waited(enum.Enum):
    ENDED = "ended"  # the task ended, or its deadline passed
    GONE = "gone"  # the client disconnected
    RELEASED = "released"  # the wait's bound passed, or the gateway is stopping


def deadline_of(svc: Services, task: Task[..., Any], request_timeout: str | None) -> Deadline:
    """The task's deadline, fixed now from a `Request-Timeout` header value."""
    default, maximum = svc.settings.timeouts(task)
    return Deadline.from_timeout_header(request_timeout, default=default, maximum=maximum)


async def submit(
    svc: Services,
    task: Task[..., Any],
    task_input: BaseModel,
    deadline: Deadline,
    *,
    owner: str | None,
    idempotency_key: str | None = None,
    input_digest: str | None = None,
    tied: bool = True,
) -> Record:
    """Admits and publishes a task; raises the refusal (503, 422) otherwise. A `tied`
    task (an RPC's, a stream's) is held to its client's presence (gateway/clients.py)."""
    cost = task.cost_of(task_input)
    task_id = str(uuid.uuid4())
    # the endpoint's span (FastAPI's, or your app's): which task the request became
    endpoint = trace.get_current_span()
    if endpoint.is_recording():
        endpoint.set_attributes(tracing.task_attributes(task.name, task_id, deadline))
    try:
        with _step("timebox.admission", task, task_id, deadline):
            svc.broker.require_connected()  # refused before anything is sent or to be undone
            if not svc.eventlog.reading:  # its outcome could not be seen here
                raise BrokerUnavailable(
                    "not reading the event stream; retry shortly", retry_after=2
                )
            priority = svc.admission.admit(task, cost, deadline)
    except TimeboxError as exc:
        metrics.REFUSALS.labels(task.name, exc.slug).inc()
        metrics.REQUESTS.labels(task.name, "rejected").inc()
        svc.ledger.refused(owner, task.name, exc.slug, cost)
        svc.activity.refused(task.name)
        raise
    queued = TaskEvent(
        type=EventType.QUEUED,
        task_id=task_id,
        task=task.name,
        deadline_ms=deadline.epoch_ms,
        cost=cost,
        owner=owner,
        idempotency_key=idempotency_key,
        input_digest=input_digest,
        tied=tied or None,
        priority=priority or None,
    )
    # Both go out back to back on one channel and are confirmed together: `queued`
    # reaches the stream long before a worker can receive the task and say `running`
    # (and the table folds events in any order should it not).
    record = svc.table.expect(queued)
    event_sent = asyncio.ensure_future(svc.broker.publish_event(queued))
    task_sent = False
    body = task_input.model_dump_json().encode()
    try:
        # the task message carries this span's context: the worker's spans follow it
        with _step("timebox.publish", task, task_id, deadline, SpanKind.PRODUCER):
            grace = svc.settings.stream_grace if tied else None
            await svc.broker.publish_task(
                task.name, task_id, body, deadline, owner, cost, grace, priority
            )
            task_sent = True
            await event_sent
    except TimeboxError as exc:
        _forget(event_sent)
        record.refused = True  # an idempotent retry must not find it
        metrics.REFUSALS.labels(task.name, exc.slug).inc()
        # The client hears 503; the rest must hear it too, even across a reconnect. Both
        # matter only until the deadline: then the task message expires unstarted.
        if task_sent or isinstance(exc, ConfirmLost):  # it may be queued: it must not run
            cancel = CancelRequest(task_id=task_id, deadline_ms=deadline.epoch_ms, announced=True)
            svc.spawn(svc.broker.send_cancel(cancel, f"the cancel of refused task {task_id}"))
        rejected = TaskEvent(
            type=EventType.REJECTED, task_id=task_id, task=task.name, owner=owner, reason=exc.detail
        )
        svc.spawn(svc.broker.announce(rejected, give_up_at=deadline.epoch))
        raise
    log.debug("queued %s %s (deadline in %.3f s)", task.name, task_id, deadline.remaining())
    return record


@contextlib.contextmanager
def _step(
    name: str,
    task: Task[..., Any],
    task_id: str,
    deadline: Deadline,
    kind: SpanKind = SpanKind.INTERNAL,
) -> Iterator[None]:
    """A step of the submission in a span of its own; a refusal is marked on it."""
    with tracing.task_span(name, task.name, task_id, deadline, kind=kind) as span:
        try:
            yield
        except TimeboxError as exc:
            tracing.mark(span, "refused", exc.detail)
            raise


def _forget(publishing: asyncio.Future[None]) -> None:
    """Stops a publish whose outcome no longer matters; a failure it has already had is
    the one being answered, not one to log as never retrieved."""
    if not publishing.cancel() and not publishing.cancelled():
        publishing.exception()


async def wait(
    svc: Services,
    request: Request,
    record: Record,
    deadline: Deadline,
    bound: float,
    *,
    release_on_stop: bool = True,
) -> Waited:
    """Waits for the task's end, racing its deadline (or the client's `bound` on its
    wait), the client's disconnect and (if `release_on_stop`) this gateway being told
    to stop. A client that went away has its task cancelled."""
    status = record.status
    with tracing.task_span("timebox.wait", status.task, status.id, deadline) as span:
        waited = await _wait(svc, request, record, deadline, bound, release_on_stop)
        if waited is Waited.GONE:
            tracing.ended(span, "cancelled", "the waiting client disconnected")
        else:
            tracing.ended(span, record.status.state.value, record.status.reason)
        return waited


async def _wait(
    svc: Services,
    request: Request,
    record: Record,
    deadline: Deadline,
    bound: float,
    release_on_stop: bool,
) -> Waited:
    remaining = max(0.0, deadline.remaining())
    ended = asyncio.ensure_future(record.done.wait())
    gone = asyncio.ensure_future(_until_disconnect(request))
    waits: set[asyncio.Future[Any]] = {ended, gone}
    if release_on_stop:
        waits.add(svc.stopping)  # shared: not to be cancelled here
    svc.clients.follow(record)
    try:
        done, _ = await asyncio.wait(
            waits, timeout=min(remaining, bound), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        svc.clients.unfollow(record)
        ended.cancel()
        gone.cancel()
    if record.done.is_set():
        return Waited.ENDED
    if gone in done:
        # one with an Idempotency-Key may ask again: as a streaming client, it has the
        # grace its task is held to (its workers cancel it once that lapses)
        if record.idempotency_key is None:
            await svc.cancel_quietly(record, "the waiting client disconnected")
        return Waited.GONE
    if svc.stopping in done or bound < remaining:
        await svc.clients.release(record)  # it runs on; its Location can be followed
        return Waited.RELEASED
    return Waited.ENDED


async def _until_disconnect(request: Request) -> None:
    while True:
        message: Message = await request.receive()
        if message["type"] == "http.disconnect":
            return
