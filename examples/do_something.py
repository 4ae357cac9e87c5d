"""A FastAPI app whose endpoint computes for minutes, kept as it is, with Timebox
inside: the work runs in a worker's child process, stops at the client's deadline,
and stops when the client goes away.

    uvicorn examples.do_something:app
    timebox-worker examples.do_something

    curl 'localhost:8000/do_something?seconds=3'
    curl 'localhost:8000/do_something' -H 'Request-Timeout: 2'   # 504 after 2 s
"""

from __future__ import annotations

import logging
import random
import time
from typing import Annotated

from fastapi import FastAPI, Query
from pydantic import BaseModel, Field

import timebox

log = logging.getLogger("do_something")


class Done(BaseModel):
    cpu_seconds: float


@timebox.task
def crunch(ctx: timebox.TaskContext, seconds: Annotated[float, Field(gt=0, le=120)]) -> Done:
    """Keeps one core busy for `seconds` of CPU."""
    start = time.process_time()
    while (spent := time.process_time() - start) < seconds:
        sum(range(20_000))
        ctx.progress(spent / seconds)
    return Done(cpu_seconds=time.process_time() - start)


app = FastAPI()
timebox.attach(app, crunch)


@app.get("/do_something")
async def do_something(
    call: timebox.Call, seconds: Annotated[float | None, Query(gt=0, le=120)] = None
) -> Done:
    try:
        return await call(crunch, seconds=seconds or random.uniform(1, 120))
    except timebox.TaskTimedOut as stopped:
        if (task := stopped.task) is not None:
            log.warning(
                "do_something: stopped %s %s at the client's deadline after %.2f s, "
                "%.2f CPU s spent",
                task.task,
                task.id,
                task.ran or 0.0,
                task.cpu_seconds or 0.0,
            )
        raise
