"""The recipe Timebox is measured against: a FastAPI endpoint that calls a Celery task,
as the two projects' docs write it. An RPC is a `def` endpoint (FastAPI runs it in its
thread pool) doing `task.delay(...).get(timeout=...)`; a 202 is `task.delay(...)` and
its id, polled at `GET /tasks/{id}`. The broker is the same RabbitMQ as Timebox's.

    celery -A bench.celery_peer:celery worker -c 2 [-E]      # -E: task events on
    uvicorn bench.celery_peer:app --port 8200

Environment: CELERY_RESULTS (`rpc://`, the default, or a Redis URL), CELERY_EVENTS=1
(the client's `task-sent` events too), CELERY_QUEUE (each run its own queue),
CELERY_BROKER, CELERY_GET_TIMEOUT (seconds an RPC waits for its result, 10)."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from fastapi import FastAPI, HTTPException

EVENTS = os.environ.get("CELERY_EVENTS") == "1"
QUEUE = os.environ.get("CELERY_QUEUE", "celery")
GET_TIMEOUT = float(os.environ.get("CELERY_GET_TIMEOUT", "10"))

celery = Celery(
    "peer",
    broker=os.environ.get("CELERY_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("CELERY_RESULTS", "rpc://"),
)
celery.conf.update(
    task_default_queue=QUEUE,
    task_send_sent_event=EVENTS,
    worker_send_task_events=EVENTS,
    result_expires=600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@celery.task  # type: ignore[untyped-decorator]
def echo(payload: Any) -> dict[str, Any]:
    return {"payload": payload}


app = FastAPI()


@app.post("/echo")
def echo_rpc(body: dict[str, Any]) -> Any:
    try:
        return echo.delay(body["payload"]).get(timeout=GET_TIMEOUT)
    except CeleryTimeout:
        raise HTTPException(504, "timed out") from None


@app.post("/tasks/echo", status_code=202)
def echo_submit(body: dict[str, Any]) -> dict[str, str]:
    return {"id": echo.delay(body["payload"]).id}


@app.get("/tasks/{task_id}")
def echo_status(task_id: str) -> dict[str, Any]:
    result = AsyncResult(task_id, app=celery)
    return {"state": result.state, "result": result.result if result.ready() else None}


@app.get("/hello")
def hello() -> dict[str, str]:
    return {"hello": "world"}
