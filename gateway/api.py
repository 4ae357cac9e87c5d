"""The HTTP API (v1): the paths and meanings of DESIGN.md."""

# No `from __future__ import annotations`: the per-task routes annotate their bodies
# with models chosen at run time, which FastAPI must see as real objects.

import asyncio
import hashlib
import json
import math
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.types import Message

from contracts.deadline import Deadline
from contracts.errors import (
    BrokerUnavailable,
    ConfirmLost,
    HistoryNotRead,
    IdempotencyKeyReused,
    TimeboxError,
    UnknownTaskType,
)
from contracts.events import EventType, TaskEvent, TaskState, TaskStatus
from contracts.messages import CancelRequest
from contracts.specs import TaskSpec
from gateway import metrics
from gateway.problems import PROBLEM_JSON, problem
from gateway.services import Services, log, services
from gateway.sse import parse_last_event_id, task_events
from gateway.tasktable import Record

RECONNECT = b"retry: 1000\r\n\r\n"  # an event stream's answer: come back in 1 s
DEMO_PAGE = (Path(__file__).parent / "static" / "index.html").read_text(encoding="utf-8")

PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": text, "content": {PROBLEM_JSON: {}}}
    for code, text in {
        404: "unknown task or task type",
        409: "cancelled, or already ended",
        415: "a body not sent as JSON (Content-Type: application/json)",
        422: "invalid input or Request-Timeout, or an Idempotency-Key used for another input",
        500: "the task failed",
        503: "overloaded, broker unavailable, or older tasks not read yet; see Retry-After",
        504: "expired or aborted at its deadline",
    }.items()
}


def _wants_stream(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "")


def _wait_bound(prefer: str | None, wait: bool) -> float | None:
    """How long the client waits for the task's end (inf: until its deadline), or None
    for a `202` at once. `Prefer: wait=N` (RFC 7240) bounds it: after N seconds the
    answer is `202` and the task runs on, rather than a wait the client's own HTTP
    timeout may cut first, which would cancel the task."""
    for preference in (prefer or "").split(","):
        name, _, value = preference.partition("=")
        if name.strip().lower() != "wait":
            continue
        try:
            seconds = float(value.strip().strip('"'))
        except ValueError:
            return math.inf  # a bare `wait`: until the task ends
        return seconds if math.isfinite(seconds) and seconds >= 0 else math.inf
    return math.inf if wait else None


def status_response(status: TaskStatus, code: int = 200, **headers: str) -> JSONResponse:
    return JSONResponse(status.model_dump(mode="json"), status_code=code, headers=headers)


def outcome_response(status: TaskStatus) -> Response:
    """RPC answer for a task that ended, or whose deadline came first."""
    waited = ran = None
    if status.created_at and status.started_at:
        waited = round((status.started_at - status.created_at).total_seconds(), 3)
    if status.started_at and status.finished_at:
        ran = round((status.finished_at - status.started_at).total_seconds(), 3)
    body = status.model_dump(mode="json")
    match status.state:
        case TaskState.SUCCEEDED:
            return status_response(status)
        case TaskState.FAILED:
            error = status.error
            detail = f"{error.type}: {error.message}" if error else "the task failed"
            return problem(
                500, "task-failed", "Task failed", detail, task=body, waited=waited, ran=ran
            )
        case TaskState.EXPIRED:
            detail = f"the task expired before it could start ({status.reason or 'deadline'})"
            return problem(
                504, "task-expired", "Task expired", detail, task=body, waited=waited, ran=ran
            )
        case TaskState.ABORTED:
            detail = f"the task was stopped at its deadline after running {ran} s"
            return problem(
                504,
                "task-aborted",
                "Task aborted at its deadline",
                detail,
                task=body,
                waited=waited,
                ran=ran,
            )
        case TaskState.CANCELLED:
            return problem(
                409,
                "task-cancelled",
                "Task cancelled",
                status.reason or "the task was cancelled",
                task=body,
                waited=waited,
                ran=ran,
            )
        case TaskState.REJECTED:
            return problem(
                503, "task-rejected", "Task rejected", status.reason or "rejected", task=body
            )
        case _:
            detail = f"the deadline passed while the task was {status.state.value}"
            return problem(
                504, "deadline-passed", "Deadline passed", detail, task=body, waited=waited, ran=ran
            )


async def _until_disconnect(request: Request) -> None:
    while True:
        message: Message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _wait(
    svc: Services, request: Request, record: Record, deadline: Deadline, bound: float
) -> Response:
    """Races the task's end, its deadline (or the client's bound on its wait), the
    client's disconnect and this gateway being told to stop."""
    remaining = max(0.0, deadline.remaining())
    ended = asyncio.ensure_future(record.done.wait())
    gone = asyncio.ensure_future(_until_disconnect(request))
    stopping = svc.stopping  # shared: not to be cancelled here
    waits: set[asyncio.Future[Any]] = {ended, gone, stopping}
    record.waiting += 1
    svc.watches.await_(record)
    if record.idempotency_key is not None:
        svc.watches.follow(record, tell=False)  # said at once by submit, if a retry
    try:
        done, _ = await asyncio.wait(
            waits,
            timeout=min(remaining, bound),
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        record.waiting -= 1
        ended.cancel()
        gone.cancel()
    if record.done.is_set():
        return outcome_response(record.status)
    if gone in done:
        why = "the waiting client disconnected"
        if record.idempotency_key is None:
            await svc.cancel_quietly(record, why)
        else:  # the key says it will ask again: as a streaming client, it has a grace
            svc.spawn(_cancel_if_abandoned(svc, record, why))
        return Response(status_code=499)
    if stopping in done or bound < remaining:
        # the task runs on; its Location can be followed through another gateway
        svc.watches.release(record)
        return accepted(svc, record)
    return outcome_response(record.status)


async def caller(request: Request) -> str | None:
    """The owner id of the request's API key (None when the API is open); 401 if bad.
    (async: FastAPI would run a plain function in its thread pool, on every request.)"""
    return services(request).auth.caller(request)


Caller = Annotated[str | None, Depends(caller)]


def accepted(svc: Services, record: Record) -> JSONResponse:
    """The `202` answer: status, plus an events URL a browser's EventSource can open."""
    task_id = record.status.id
    body = record.status.model_dump(mode="json")
    events_url = f"/v1/tasks/{task_id}/events"
    if not svc.auth.open:
        deadline = record.status.deadline
        token = svc.auth.events_token(task_id, deadline.timestamp() if deadline else None)
        events_url += f"?token={token}"
    body["events_url"] = events_url
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/tasks/{task_id}"})


async def respond(
    svc: Services, request: Request, record: Record, deadline: Deadline, wait: float | None
) -> Response:
    """Answers in the mode the client asked for: stream, RPC wait (for up to `wait`
    seconds), or 202."""
    if _wants_stream(request):
        svc.watches.follow(record, tell=False)  # said at once by submit, if a retry
        return _event_stream(svc, record, -1, headers={"Location": f"/v1/tasks/{record.status.id}"})
    if wait is not None:
        return await _wait(svc, request, record, deadline, wait)
    return accepted(svc, record)


async def submit(
    request: Request,
    spec: TaskSpec[Any],
    body: Any,
    owner: str | None,
    wait: bool,
    request_timeout: str | None,
    prefer: str | None,
    idempotency_key: str | None,
) -> Response:
    svc = services(request)
    settings = svc.settings
    deadline = Deadline.from_timeout_header(
        request_timeout, default=settings.default_timeout, maximum=settings.max_timeout
    )
    bound = _wait_bound(prefer, wait)
    task_input = body.model_dump_json().encode()
    digest = _digest(spec.name, body) if idempotency_key else None
    if idempotency_key:
        earlier = await svc.by_idempotency_key(owner, idempotency_key)
        if earlier is not None and not earlier.refused:
            if earlier.input_digest not in (None, digest):  # None: an older gateway's task
                raise IdempotencyKeyReused(
                    f"Idempotency-Key {idempotency_key!r} was used for task "
                    f"{earlier.status.id} ({earlier.status.task}) with another input; "
                    "a new request needs a new key",
                    task_id=earlier.status.id,
                )
            log.info("idempotent retry of %s %s", spec.name, earlier.status.id)
            svc.watches.follow(earlier)  # its first request may have left another gateway
            return await respond(svc, request, earlier, _deadline_of(earlier, deadline), bound)
    cost = spec.cost_of(body)
    try:
        svc.broker.require_connected()  # refused before anything is sent or to be undone
        if not svc.eventlog.reading:  # its outcome could not be seen here
            raise BrokerUnavailable("not reading the event stream; retry shortly", retry_after=2)
        svc.admission.admit(spec, cost, deadline)
    except TimeboxError as exc:
        metrics.REFUSALS.labels(spec.name, exc.slug).inc()
        metrics.REQUESTS.labels(spec.name, "rejected").inc()
        raise
    task_id = str(uuid.uuid4())
    queued = TaskEvent(
        type=EventType.QUEUED,
        task_id=task_id,
        task=spec.name,
        deadline_ms=deadline.epoch_ms,
        cost=cost,
        owner=owner,
        idempotency_key=idempotency_key or None,
        input_digest=digest,
        streamed=_wants_stream(request) or None,
    )
    # Both go out back to back on one channel and are confirmed together: `queued`
    # reaches the stream long before a worker can receive the task and say `running`
    # (and the table folds events in any order should it not).
    record = svc.table.expect(queued)
    event_sent = asyncio.ensure_future(svc.broker.publish_event(queued))
    task_sent = False
    try:
        await svc.broker.publish_task(spec.name, task_id, task_input, deadline, owner, cost)
        task_sent = True
        await event_sent
    except TimeboxError as exc:
        _forget(event_sent)
        record.refused = True  # an idempotent retry must not find it
        metrics.REFUSALS.labels(spec.name, exc.slug).inc()
        # The client hears 503; the rest must hear it too, even across a reconnect. Both
        # matter only until the deadline: then the task message expires unstarted.
        if task_sent or isinstance(exc, ConfirmLost):  # it may be queued: it must not run
            cancel = CancelRequest(task_id=task_id, deadline_ms=deadline.epoch_ms, announced=True)
            svc.spawn(svc.broker.send_cancel(cancel, f"the cancel of refused task {task_id}"))
        rejected = TaskEvent(
            type=EventType.REJECTED, task_id=task_id, task=spec.name, owner=owner, reason=exc.detail
        )
        svc.spawn(svc.broker.announce(rejected, give_up_at=deadline.epoch))
        raise
    log.debug("queued %s %s (deadline in %.3f s)", spec.name, task_id, deadline.remaining())
    return await respond(svc, request, record, deadline, bound)


def _digest(task: str, body: BaseModel) -> str:
    """What an Idempotency-Key's retry must match: the task type and its input as
    validated, in a canonical form (key order and spacing in the JSON do not matter)."""
    canonical = json.dumps([task, body.model_dump(mode="json")], sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _forget(publishing: asyncio.Future[None]) -> None:
    """Stops a publish whose outcome no longer matters; a failure it has already had is
    the one being answered, not one to log as never retrieved."""
    if not publishing.cancel() and not publishing.cancelled():
        publishing.exception()


def _deadline_of(record: Record, fallback: Deadline) -> Deadline:
    if record.status.deadline is None:
        return fallback
    return Deadline(int(record.status.deadline.timestamp() * 1000))


def _event_stream(
    svc: Services, record: Record, after: int, headers: dict[str, str] | None = None
) -> EventSourceResponse:
    """The task's events after offset `after`. A client of a task submitted as a
    stream that goes away has `stream_grace` to come back before it is cancelled."""

    async def on_close(message: Message) -> None:
        if record.streamed:
            svc.spawn(_cancel_if_abandoned(svc, record, "the streaming client disconnected"))

    return EventSourceResponse(
        task_events(record, after, svc.settings.subscriber_buffer),
        ping=svc.settings.sse_heartbeat,
        send_timeout=svc.settings.sse_send_timeout,
        shutdown_event=svc.shutting_down,
        shutdown_grace_period=2.0,
        client_close_handler_callable=on_close,
        headers=headers,
    )


async def _cancel_if_abandoned(svc: Services, record: Record, why: str) -> None:
    """A streaming client that went away, or an RPC's with an Idempotency-Key, has
    `stream_grace` seconds to come back, here or through another gateway
    (gateway/watches.py): to its events, or with the same key. Its task is cancelled
    after a whole grace in which no client followed it, here or elsewhere. One check
    runs per task: a client that leaves again moves the end of the grace on."""
    record.left_at = time.monotonic()
    if record.abandon_check:
        return
    record.abandon_check = True
    grace = svc.settings.stream_grace
    said = False
    try:
        while not record.status.state.terminal:
            if (wait := record.left_at + grace - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            elif record.subscribers or record.waiting:
                return  # back here: when it leaves again, a new check starts
            elif svc.watches.followed_elsewhere(record):
                if not said:
                    log.info(
                        "%s %s followed through another gateway",
                        record.status.task,
                        record.status.id,
                    )
                    said = True
                await asyncio.sleep(grace)  # watched for as long as notices come
            else:
                await svc.cancel_quietly(record, why)
                return
    finally:
        record.abandon_check = False


def _submit_route(spec: TaskSpec[Any]) -> Any:
    async def submit_task(
        request: Request,
        owner: Caller,
        body: Annotated[spec.input_model, Body()],  # type: ignore[name-defined]
        wait: Annotated[bool, Query(description="RPC: answer when the task ends")] = False,
        request_timeout: Annotated[
            str | None, Header(alias="Request-Timeout", description="seconds; default 60")
        ] = None,
        prefer: Annotated[str | None, Header(description="`wait` for RPC (RFC 7240)")] = None,
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                max_length=200,
                description="a retry with the same key returns the same task",
            ),
        ] = None,
    ) -> Response:
        return await submit(
            request, spec, body, owner, wait, request_timeout, prefer, idempotency_key
        )

    submit_task.__name__ = f"submit_{spec.name}"
    submit_task.__doc__ = (
        f"{spec.description}\n\n`202` + status by default; `Prefer: wait` or `?wait=true` "
        "answers when the task ends; `Accept: text/event-stream` streams its events."
    )
    return submit_task


def build_router(specs: dict[str, TaskSpec[Any]]) -> APIRouter:
    router = APIRouter()
    for spec in specs.values():
        router.add_api_route(
            f"/v1/tasks/{spec.name}",
            _submit_route(spec),
            methods=["POST"],
            status_code=202,
            response_model=TaskStatus,
            responses={
                200: {"model": TaskStatus, "description": "RPC: succeeded"},
                **PROBLEM_RESPONSES,
            },
            tags=["tasks"],
        )

    @router.post("/v1/tasks/{task}", include_in_schema=False)
    async def unknown_task(task: str, owner: Caller) -> Response:
        raise UnknownTaskType(
            f"no task type {task!r}; known task types: {', '.join(specs)}",
            task_types=list(specs),
        )

    @router.get(
        "/v1/tasks/{task_id}",
        response_model=TaskStatus,
        responses=PROBLEM_RESPONSES,
        tags=["tasks"],
    )
    async def get_task(request: Request, task_id: str, owner: Caller) -> Response:
        record = await services(request).find(task_id, owner)
        return status_response(record.status)

    @router.get(
        "/v1/tasks/{task_id}/events",
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "the task's events"},
            204: {"description": "Last-Event-ID is at or past the terminal event"},
            **PROBLEM_RESPONSES,
        },
        tags=["tasks"],
    )
    async def task_events_route(
        request: Request,
        task_id: str,
        last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
        token: Annotated[
            str | None, Query(description="the events URL's token, for EventSource")
        ] = None,
    ) -> Response:
        svc = services(request)
        try:
            if token is not None and svc.auth.token_allows(task_id, token):
                found = await svc.arrival(task_id, stream=True)
                if found is None:
                    raise svc.not_found(task_id)
                record = found
            else:
                record = await svc.find(task_id, svc.auth.caller(request), stream=True)
        except HistoryNotRead:
            if not svc.stopping.done():
                raise
            # an empty stream rather than a 503, on which an EventSource stops for good:
            # it reconnects after `retry`, through the load balancer, to a gateway that
            # can serve it
            return Response(RECONNECT, media_type="text/event-stream")
        after = parse_last_event_id(last_event_id)
        end = record.terminal_offset
        if end is not None and after >= end:
            return Response(status_code=204)
        svc.watches.follow(record)
        return _event_stream(svc, record, after)

    @router.delete(
        "/v1/tasks/{task_id}",
        status_code=202,
        response_model=TaskStatus,
        responses=PROBLEM_RESPONSES,
        tags=["tasks"],
    )
    async def cancel_task(request: Request, task_id: str, owner: Caller) -> Response:
        svc = services(request)
        record = await svc.find(task_id, owner)
        await svc.cancel(record, "cancelled by DELETE")
        return status_response(record.status, 202)

    @router.get("/v1/task-types", tags=["tasks"])
    async def task_types(owner: Caller) -> list[dict[str, Any]]:
        return [
            {
                "name": spec.name,
                "description": spec.description,
                "input_schema": spec.input_model.model_json_schema(),
                "output_schema": spec.output_model.model_json_schema(),
                "limits": spec.limits,
                "cost_unit": spec.cost_unit,
                "example": spec.example,
            }
            for spec in specs.values()
        ]

    @router.get("/v1/queues", tags=["operations"])
    async def queues(request: Request, owner: Caller) -> list[dict[str, Any]]:
        """Per task type: the broker's figures (at most a second old), observed run
        times, and the estimated wait for a request made now."""
        admission = services(request).admission
        out = []
        for name in specs:
            figures = admission.figures[name]
            estimate = admission.estimate(name)
            run_time = admission.summary(name)
            out.append(
                {
                    "task": name,
                    "messages_ready": figures.ready,
                    "messages_unacked": figures.unacked,
                    "consumers": figures.consumers,
                    "workers": figures.workers,
                    "running": estimate.running,
                    "parallel_slots": estimate.parallelism,
                    "run_time": {
                        "samples": run_time.samples,
                        "mean": run_time.mean,
                        "p90": run_time.p90,
                    },
                    "drained_per_s": admission.drain[name].per_second(time.time()),
                    "estimated_wait": estimate.wait,
                    "figures_age": round(max(0.0, time.time() - figures.at), 3)
                    if figures.at
                    else None,
                }
            )
        return out

    @router.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def demo_page() -> HTMLResponse:
        return HTMLResponse(DEMO_PAGE)

    @router.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics_route() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @router.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", tags=["operations"], responses={503: PROBLEM_RESPONSES[503]})
    async def readyz(request: Request) -> Response:
        svc = services(request)
        if not svc.broker.connected:
            why = "not connected to RabbitMQ"
        elif not svc.eventlog.reading:
            why = "not reading the event stream: reconnecting to RabbitMQ"
        elif not svc.eventlog.caught_up.is_set():
            why = "still reading the event stream"
        else:
            history = "read" if svc.eventlog.history_read.is_set() else "reading"
            return JSONResponse(
                {"status": "ready", "tasks_known": len(svc.table), "history": history}
            )
        return problem(503, "not-ready", "Not ready", why, headers={"Retry-After": "1"})

    return router


def include(app: FastAPI, specs: dict[str, TaskSpec[Any]]) -> None:
    app.include_router(build_router(specs))
