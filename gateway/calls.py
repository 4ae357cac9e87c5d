"""Tasks called from an app's own endpoints, with the gateway's RPC semantics:

    @app.get("/do_something")
    async def do_something(call: timebox.Call, seconds: float) -> Done:
        return await call(crunch, seconds=seconds)

The deadline comes from the request's `Request-Timeout` (else the task's default);
a refusal is raised at once (503, 422), a task that ends without a result raises its
ending (504 at the deadline, 500 failed, 409 cancelled), a client that disconnects
has its task cancelled, and the result is the function's return type."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

from contracts.errors import ClientGone, UnknownTaskType, ending
from contracts.tasks import Task
from gateway.gateway import Gateway
from gateway.problems import invalid_input
from gateway.submission import Waited, deadline_of, submit, wait

R = TypeVar("R")


class TaskCall:
    """Runs tasks for one request of the app (see `Call`)."""

    def __init__(self, gateway: Gateway, request: Request) -> None:
        self._gateway = gateway
        self._request = request

    async def __call__(
        self,
        task: Task[..., R],
        given: BaseModel | Mapping[str, Any] | None = None,
        /,
        **fields: Any,
    ) -> R:
        """Runs `task` on an input (a model, a mapping, or keyword fields) and returns
        its result, or raises how it ended."""
        svc = self._gateway.services
        if svc.tasks.get(task.name) is not task:
            raise UnknownTaskType(
                f"task {task.name!r} is not attached to this app: timebox.attach(app, "
                f"{task.name}, ...)"
            )
        try:
            task_input = task.parse(given, **fields)
        except ValidationError as exc:
            raise invalid_input(exc.errors()) from None
        deadline = deadline_of(svc, task, self._request.headers.get("request-timeout"))
        record = await submit(svc, task, task_input, deadline, owner=None)
        waited = await wait(svc, self._request, record, deadline, math.inf, release_on_stop=False)
        if waited is Waited.GONE:
            raise ClientGone(f"the client went away; task {record.status.id} was cancelled")
        problem = ending(record.status)
        if problem is not None:
            raise problem
        return task.output.validate_python(record.status.result)


async def task_call(request: Request) -> TaskCall:
    gateway = getattr(request.app.state, "timebox", None)
    if not isinstance(gateway, Gateway):
        raise RuntimeError("timebox.Call needs timebox.attach(app, ...) on the app first")
    return TaskCall(gateway, request)


Call = Annotated[TaskCall, Depends(task_call)]
