"""Every error as `application/problem+json` (RFC 9457)."""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from contracts.errors import TimeboxError

PROBLEM_JSON = "application/problem+json"


def problem(
    status: int,
    slug: str,
    title: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = {"type": f"/problems/{slug}", "title": title, "status": status, "detail": detail}
    body.update(_finite(extra))
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _finite(value: Any) -> Any:
    """JSON has no infinities or NaN: such numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def from_error(error: TimeboxError) -> JSONResponse:
    extra = dict(error.extra)
    headers = None
    if error.status == 401:
        headers = {"WWW-Authenticate": 'Bearer realm="timebox"'}
    if error.status == 503:
        seconds = max(1, math.ceil(error.retry_after or 1))
        headers = {"Retry-After": str(seconds)}
        extra["retry_after"] = seconds
    return problem(error.status, error.slug, error.title, error.detail, headers=headers, **extra)


def field_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic's errors as the problem's `errors`: each field's path and message."""
    return [
        {
            "field": ".".join(str(part) for part in e.get("loc", ())),
            "message": e.get("msg", ""),
            "type": e.get("type"),
        }
        for e in errors
    ]


def invalid_input(errors: Sequence[Any]) -> TimeboxError:
    from contracts.errors import InvalidInput

    listed = field_errors(errors)
    fields = ", ".join(e["field"] for e in listed) or "the request"
    return InvalidInput(f"check {fields}", errors=listed)


def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    json_sent = media == "application/json" or media.endswith("+json")
    if not json_sent and any(tuple(e.get("loc", ()))[:1] == ("body",) for e in exc.errors()):
        # FastAPI reads no JSON without its media type (curl -d sends a form's): the
        # fields' errors would only confuse
        return problem(
            415,
            "unsupported-media-type",
            "Unsupported media type",
            "send the task input as JSON, with Content-Type: application/json "
            f"(this request's: {media or 'none'})",
        )
    return from_error(invalid_input(exc.errors()))


class ProblemRoute(APIRoute):
    """A route whose invalid requests are answered as problems, in whatever app its
    router is included: the app's own validation answers stay as they are."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return _validation(request, exc)

        return route


def install(app: FastAPI) -> None:
    """Problems for the app's own errors too: unknown paths and methods (the standalone
    gateway's)."""

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "HTTP error")
        return problem(
            exc.status_code,
            f"http-{exc.status_code}",
            title,
            str(exc.detail),
            headers=dict(exc.headers) if exc.headers else None,
        )
