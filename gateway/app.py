"""The standalone gateway: an app of its own with the tasks attached, the demo page,
health, readiness and metrics."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from contracts.tasks import Task
from gateway import problems
from gateway.api import PROBLEM_RESPONSES
from gateway.gateway import Gateway, attach
from gateway.limits import BodyLimit
from gateway.settings import GatewaySettings

DEMO_PAGE = (Path(__file__).parent / "static" / "index.html").read_text(encoding="utf-8")


def create_app(
    tasks: dict[str, Task[..., Any]],
    settings: GatewaySettings | None = None,
    *,
    on_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    settings = settings or GatewaySettings()
    app = FastAPI(
        title="Timebox",
        version="0.1.0",
        description="CPU-heavy tasks behind HTTP, with deadlines enforced at every layer.",
    )
    gateway = attach(app, *tasks.values(), settings=settings, on_failure=on_failure)
    problems.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    _operations(app, gateway)
    return app


def _operations(app: FastAPI, gateway: Gateway) -> None:
    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def demo_page() -> HTMLResponse:
        return HTMLResponse(DEMO_PAGE)

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics_route() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], responses={503: PROBLEM_RESPONSES[503]})
    async def readyz(request: Request) -> Response:
        svc = gateway.services
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
        return problems.problem(503, "not-ready", "Not ready", why, headers={"Retry-After": "1"})
