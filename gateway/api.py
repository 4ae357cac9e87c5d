"""The HTTP API (v1): the paths and meanings of DESIGN.md, as a router that any
FastAPI app can include (gateway/gateway.py)."""

# No `from __future__ import annotations`: the per-task routes annotate their bodies
# with models chosen at run time, which FastAPI must see as real objects.

import hashlib
import json
import math
from typing import Annotated, Any

from aio_pika.abc import AbstractIncomingMessage
from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ValidationError
from sse_starlette import EventSourceResponse

from contracts.deadline import Deadline
from contracts.errors import (
    HistoryNotRead,
    IdempotencyKeyReused,
    NotReplayable,
    UnknownTaskType,
    ending,
)
from contracts.events import TaskStatus
from contracts.tasks import Task
from gateway import console
from gateway.gateway import Gateway
from gateway.parked import ParkedMessage, owner_of
from gateway.problems import PROBLEM_JSON, ProblemRoute, from_error, invalid_input
from gateway.services import Services, log
from gateway.sse import parse_last_event_id, task_events
from gateway.submission import Waited, deadline_of, submit, wait
from gateway.tasktable import Record

RequestTimeout = Annotated[str | None, Header(alias="Request-Timeout", description="seconds")]
RECONNECT = b"retry: 1000\r\n\r\n"  # an event stream's answer: come back in 1 s

PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": text, "content": {PROBLEM_JSON: {}}}
    for code, text in {
        404: "unknown task or task type",
        409: "cancelled, or already ended",
        415: "a body not sent as JSON (Content-Type: application/json)",
        422: "invalid input or Request-Timeout, or an Idempotency-Key used for another input",
        500: "the task failed",
        503: "overloaded, no worker, broker unavailable, or older tasks not read yet; "
        "see Retry-After",
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
    problem = ending(status)
    return status_response(status) if problem is None else from_error(problem)


def _digest(task: str, body: BaseModel) -> str:
    """What an Idempotency-Key's retry must match: the task type and its input as
    validated, in a canonical form (key order and spacing in the JSON do not matter)."""
    canonical = json.dumps([task, body.model_dump(mode="json")], sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def build_router(gateway: Gateway) -> APIRouter:
    router = APIRouter(route_class=ProblemRoute, lifespan=gateway.lifespan)
    tasks = gateway.tasks

    async def caller(request: Request) -> str | None:
        """The owner id of the request's API key (None when the API is open); 401 if
        bad. (async: FastAPI would run a plain function in its thread pool.)"""
        return gateway.services.auth.caller(request)

    Caller = Annotated[str | None, Depends(caller)]

    def accepted(svc: Services, record: Record) -> JSONResponse:
        """The `202` answer: status, plus an events URL a browser's EventSource can open."""
        task_id = record.status.id
        body = record.status.model_dump(mode="json")
        events_url = gateway.path(f"/v1/tasks/{task_id}/events")
        if not svc.auth.open:
            deadline = record.deadline
            token = svc.auth.events_token(task_id, deadline.epoch if deadline else None)
            events_url += f"?token={token}"
        body["events_url"] = events_url
        location = gateway.path(f"/v1/tasks/{task_id}")
        return JSONResponse(body, status_code=202, headers={"Location": location})

    def event_stream(
        svc: Services, record: Record, after: int, headers: dict[str, str] | None = None
    ) -> EventSourceResponse:
        """The task's events after offset `after`."""
        return EventSourceResponse(
            task_events(svc.fanout, svc.clients, record, after, svc.settings.subscriber_buffer),
            ping=svc.settings.sse_heartbeat,
            send_timeout=svc.settings.sse_send_timeout,
            shutdown_event=svc.shutting_down,
            shutdown_grace_period=2.0,
            headers=headers,
        )

    async def respond(
        svc: Services, request: Request, record: Record, deadline: Deadline, bound: float | None
    ) -> Response:
        """Answers in the mode the client asked for: stream, RPC wait (for up to `bound`
        seconds), or 202."""
        if _wants_stream(request):
            location = gateway.path(f"/v1/tasks/{record.status.id}")
            return event_stream(svc, record, -1, headers={"Location": location})
        if bound is None:
            return accepted(svc, record)
        waited = await wait(svc, request, record, deadline, bound)
        if waited is Waited.GONE:
            return Response(status_code=499)
        if waited is Waited.RELEASED:
            return accepted(svc, record)
        return outcome_response(record.status)

    def submit_route(task: Task[..., Any]) -> Any:
        async def submit_task(
            request: Request,
            owner: Caller,
            body: Annotated[task.input_model, Body()],  # type: ignore[name-defined]
            wait: Annotated[bool, Query(description="RPC: answer when the task ends")] = False,
            request_timeout: RequestTimeout = None,
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
            svc = gateway.services
            deadline = deadline_of(svc, task, request_timeout)
            bound = _wait_bound(prefer, wait)
            digest = _digest(task.name, body) if idempotency_key else None
            if idempotency_key:
                earlier = await svc.by_idempotency_key(owner, idempotency_key)
                if earlier is not None and not earlier.refused:
                    if earlier.input_digest not in (None, digest):  # None: an older gateway's
                        raise IdempotencyKeyReused(
                            f"Idempotency-Key {idempotency_key!r} was used for task "
                            f"{earlier.status.id} ({earlier.status.task}) with another input; "
                            "a new request needs a new key",
                            task_id=earlier.status.id,
                        )
                    log.info("idempotent retry of %s %s", task.name, earlier.status.id)
                    return await respond(svc, request, earlier, earlier.deadline or deadline, bound)
            record = await submit(
                svc,
                task,
                body,
                deadline,
                owner=owner,
                idempotency_key=idempotency_key or None,
                input_digest=digest,
                tied=bound is not None or _wants_stream(request),
            )
            return await respond(svc, request, record, deadline, bound)

        submit_task.__name__ = f"submit_{task.name}"
        submit_task.__doc__ = (
            f"{task.description}\n\n`202` + status by default; `Prefer: wait` or `?wait=true` "
            "answers when the task ends; `Accept: text/event-stream` streams its events."
        )
        return submit_task

    for task in tasks.values():
        router.add_api_route(
            f"/v1/tasks/{task.name}",
            submit_route(task),
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
            f"no task type {task!r}; known task types: {', '.join(tasks)}",
            task_types=list(tasks),
        )

    @router.get(
        "/v1/tasks/{task_id}",
        response_model=TaskStatus,
        responses=PROBLEM_RESPONSES,
        tags=["tasks"],
    )
    async def get_task(task_id: str, owner: Caller) -> Response:
        record = await gateway.services.find(task_id, owner)
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
        svc = gateway.services
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
        return event_stream(svc, record, after)

    @router.delete(
        "/v1/tasks/{task_id}",
        status_code=202,
        response_model=TaskStatus,
        responses=PROBLEM_RESPONSES,
        tags=["tasks"],
    )
    async def cancel_task(task_id: str, owner: Caller) -> Response:
        svc = gateway.services
        record = await svc.find(task_id, owner)
        await svc.cancel(record, "cancelled by DELETE")
        return status_response(record.status, 202)

    @router.get("/v1/task-types", tags=["tasks"])
    async def task_types(owner: Caller) -> list[dict[str, Any]]:
        settings = gateway.settings
        return [
            {
                "name": task.name,
                "description": task.description,
                "input_schema": task.input_schema,
                "output_schema": task.output_schema,
                "limits": task.limits,
                "timeout": dict(zip(("default", "maximum"), settings.timeouts(task), strict=True)),
                "cost": task.cost is not None,
                "example": task.example,
            }
            for task in tasks.values()
        ]

    @router.get("/v1/queues", tags=["operations"])
    async def queues(owner: Caller) -> list[dict[str, Any]]:
        """Per task type: its queue, with the broker's figures (at most a second old) and
        the slots the live workers give it, the workers that serve the type, observed
        run times, and the estimated wait for a request made now."""
        return console.queues(gateway.services)

    @router.get("/v1/parked", tags=["operations"])
    async def parked(
        owner: Caller, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> list[ParkedMessage]:
        """Messages that could not run (undecodable, poison, dead-lettered), with why,
        when, after how many deliveries, and the start of the body."""
        return await gateway.services.parked.browse(owner, limit)

    @router.post(
        "/v1/parked/{parked_id}/replay",
        status_code=202,
        response_model=TaskStatus,
        responses=PROBLEM_RESPONSES,
        tags=["operations"],
    )
    async def replay_parked(
        parked_id: str,
        owner: Caller,
        request_timeout: RequestTimeout = None,
    ) -> Response:
        """Submits a parked message's input again as a new task (its deadline from
        `Request-Timeout`, as any submission's); the message leaves the parked queue
        once the new task is queued, and stays there if it cannot be."""
        svc = gateway.services

        async def resubmit(message: AbstractIncomingMessage) -> Record:
            task = tasks.get(message.type or "")
            if task is None:
                raise NotReplayable(
                    f"its task type {message.type!r} is not served here; "
                    f"known task types: {', '.join(tasks)}"
                )
            try:
                task_input = task.input_model.model_validate_json(message.body)
            except ValidationError as exc:
                raise invalid_input(exc.errors()) from None
            deadline = deadline_of(svc, task, request_timeout)
            return await submit(
                svc, task, task_input, deadline, owner=owner_of(message), tied=False
            )

        return accepted(svc, await svc.parked.act(parked_id, owner, resubmit))

    @router.delete(
        "/v1/parked/{parked_id}", status_code=204, responses=PROBLEM_RESPONSES, tags=["operations"]
    )
    async def delete_parked(parked_id: str, owner: Caller) -> Response:
        """Removes a parked message for good."""

        async def nothing(message: AbstractIncomingMessage) -> None:
            return None

        await gateway.services.parked.act(parked_id, owner, nothing)
        return Response(status_code=204)

    @router.get("/v1/workers", tags=["operations"])
    async def workers(owner: Caller) -> list[dict[str, Any]]:
        """The live workers, as each last announced itself (every few seconds)."""
        return console.workers(gateway.services)

    @router.get("/v1/console", tags=["operations"])
    async def console_snapshot(owner: Caller) -> dict[str, Any]:
        """What the operations console shows the key: the fleet's task types and workers,
        the key's running and latest ended tasks, and where their CPU went."""
        return console.snapshot(gateway.services, owner)

    @router.get(
        "/v1/console/stream",
        tags=["operations"],
        responses={200: {"content": {"text/event-stream": {}}, "description": "snapshots"}},
    )
    async def console_stream(owner: Caller) -> EventSourceResponse:
        """The console's snapshot as Server-Sent Events (`snapshot`), once a second."""
        svc = gateway.services
        return EventSourceResponse(
            console.snapshots(svc, owner), send_timeout=svc.settings.sse_send_timeout
        )

    @router.get("/console", include_in_schema=False)
    async def console_page() -> HTMLResponse:
        return HTMLResponse(console.PAGE)

    @router.get("/console/{asset}", include_in_schema=False)
    async def console_asset(asset: str) -> Response:
        found = console.ASSETS.get(asset)
        if found is None:
            return Response(status_code=404)
        return Response(
            found[0], media_type=found[1], headers={"Cache-Control": "public, max-age=86400"}
        )

    return router
