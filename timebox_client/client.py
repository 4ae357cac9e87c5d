"""Sync and async clients over httpx, sharing how requests are built and read."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, TypeVar, overload

import httpx
from httpx_sse import aconnect_sse, connect_sse
from pydantic import BaseModel, JsonValue

from contracts.errors import ending
from contracts.events import TaskEvent, TaskStatus
from contracts.tasks import Task
from timebox_client.errors import Overloaded, raise_for_problem

# the server answers an RPC by its deadline; allow this much more for the network
RPC_SLACK = 5.0

R = TypeVar("R")
Input = BaseModel | Mapping[str, Any] | None


def _headers(
    api_key: str | None,
    timeout: float | None = None,
    wait: bool = False,
    idempotency_key: str | None = None,
) -> dict[str, str]:
    headers = {}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if timeout is not None:
        headers["Request-Timeout"] = f"{timeout:g}"
    if wait:
        headers["Prefer"] = "wait"
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    return headers


def _status(response: httpx.Response) -> TaskStatus:
    raise_for_problem(response)
    return TaskStatus.model_validate(response.json())


def _body(task: Task[..., Any] | str, given: Input, fields: dict[str, Any]) -> tuple[str, Any]:
    """(task name, JSON body): a decorated function's input is validated here first."""
    if isinstance(task, Task):
        return task.name, task.parse(given, **fields).model_dump(mode="json")
    if isinstance(given, BaseModel):
        return task, given.model_dump(mode="json") | fields
    return task, dict(given or {}) | fields


def _call(
    api_key: str | None,
    task: Task[..., Any] | str,
    given: Input,
    fields: dict[str, Any],
    request_timeout: float | None,
) -> dict[str, Any]:
    """The RPC request of `call`, as keyword arguments of httpx's `post`."""
    name, body = _body(task, given, fields)
    if request_timeout is None and isinstance(task, Task):
        request_timeout = task.timeout
    read = None if request_timeout is None else request_timeout + RPC_SLACK
    return {
        "url": f"/v1/tasks/{name}",
        "json": body,
        "headers": _headers(api_key, request_timeout, wait=True),
        "timeout": httpx.Timeout(30.0, read=read),  # None: the gateway's default deadline
    }


def _result(task: Task[..., Any] | str, status: TaskStatus) -> Any:
    """A task's result, as its function's return type when the task is one; raises the
    error its RPC answers for an ending without a result."""
    problem = ending(status)
    if problem is not None:
        raise problem
    return task.output.validate_python(status.result) if isinstance(task, Task) else status.result


class _Resume:
    """Reconnect bookkeeping for an event stream."""

    def __init__(self, last_event_id: str | None, attempts: int, delay: float) -> None:
        self.last = last_event_id
        self.attempts = attempts
        self.delay = delay
        self.failures = 0

    def headers(self, api_key: str | None) -> dict[str, str]:
        headers = _headers(api_key)
        if self.last is not None:
            headers["Last-Event-ID"] = self.last
        return headers

    def failed(self, exc: Exception) -> float:
        """Seconds to wait before reconnecting, or raises once attempts run out."""
        self.failures += 1
        if self.failures > self.attempts:
            raise exc
        backoff = self.delay * 2 ** (self.failures - 1)
        if isinstance(exc, Overloaded) and exc.retry_after is not None:
            return float(max(backoff, exc.retry_after))
        return float(backoff)

    def seen(self, event_id: str) -> None:
        self.last = event_id
        self.failures = 0


# a 503 on an event stream: a gateway that just started and has not read the task yet,
# or is not connected to RabbitMQ; another try (after its Retry-After) may find it
RETRYABLE = (httpx.TransportError, Overloaded)


class Client:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        reconnect_attempts: int = 8,
        reconnect_delay: float = 0.1,
        http: httpx.Client | None = None,
    ) -> None:
        self.api_key = api_key
        self.reconnect_attempts = reconnect_attempts
        self.reconnect_delay = reconnect_delay
        self._http = http or httpx.Client(base_url=base_url, timeout=30.0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def submit(
        self,
        task: Task[..., Any] | str,
        task_input: Input = None,
        /,
        *,
        request_timeout: float | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> TaskStatus:
        """Queues a task (`202`) and returns its status at once."""
        name, body = _body(task, task_input, fields)
        headers = _headers(self.api_key, request_timeout, idempotency_key=idempotency_key)
        return _status(self._http.post(f"/v1/tasks/{name}", json=body, headers=headers))

    @overload
    def call(
        self,
        task: Task[..., R],
        task_input: Input = None,
        /,
        *,
        request_timeout: float | None = None,
        **fields: Any,
    ) -> R: ...

    @overload
    def call(
        self,
        task: str,
        task_input: Input = None,
        /,
        *,
        request_timeout: float | None = None,
        **fields: Any,
    ) -> JsonValue: ...

    def call(
        self,
        task: Task[..., Any] | str,
        task_input: Input = None,
        /,
        *,
        request_timeout: float | None = None,
        **fields: Any,
    ) -> Any:
        """Runs a task (a decorated function, or a task type's name) on an input (a
        model, a mapping or keyword fields) and returns its result — of the function's
        return type — or raises how it ended (TaskFailed, TaskTimedOut, …). A gateway
        told to stop while it waits answers `202`: the task is then followed to its end
        through the same URL (another gateway, or this one restarted)."""
        request = _call(self.api_key, task, task_input, fields, request_timeout)
        status = _status(self._http.post(**request))
        if status.state.terminal:
            return _result(task, status)
        for _ in self.events(status.id):
            pass
        return _result(task, self.status(status.id))

    def status(self, task_id: str) -> TaskStatus:
        return _status(self._http.get(f"/v1/tasks/{task_id}", headers=_headers(self.api_key)))

    def cancel(self, task_id: str) -> TaskStatus:
        return _status(self._http.delete(f"/v1/tasks/{task_id}", headers=_headers(self.api_key)))

    def events(self, task_id: str, *, last_event_id: str | None = None) -> Iterator[TaskEvent]:
        """The task's events until its terminal one, reconnecting with `Last-Event-ID`
        when the connection drops: no event is missed or repeated."""
        resume = _Resume(last_event_id, self.reconnect_attempts, self.reconnect_delay)
        while True:
            try:
                with connect_sse(
                    self._http,
                    "GET",
                    f"/v1/tasks/{task_id}/events",
                    headers=resume.headers(self.api_key),
                    timeout=httpx.Timeout(30.0, read=None),
                ) as source:
                    if source.response.status_code == 204:
                        return
                    if source.response.status_code >= 400:
                        source.response.read()
                        raise_for_problem(source.response)
                    for sse in source.iter_sse():
                        if not sse.data:
                            continue  # a heartbeat comment
                        resume.seen(sse.id)
                        event = TaskEvent.model_validate_json(sse.data)
                        yield event
                        if event.terminal:
                            return
            except RETRYABLE as exc:
                time.sleep(resume.failed(exc))


class AsyncClient:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        reconnect_attempts: int = 8,
        reconnect_delay: float = 0.1,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.api_key = api_key
        self.reconnect_attempts = reconnect_attempts
        self.reconnect_delay = reconnect_delay
        self._http = http or httpx.AsyncClient(base_url=base_url, timeout=30.0)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def submit(
        self,
        task: Task[..., Any] | str,
        task_input: Input = None,
        /,
        *,
        request_timeout: float | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> TaskStatus:
        name, body = _body(task, task_input, fields)
        headers = _headers(self.api_key, request_timeout, idempotency_key=idempotency_key)
        return _status(await self._http.post(f"/v1/tasks/{name}", json=body, headers=headers))

    @overload
    async def call(
        self,
        task: Task[..., R],
        task_input: Input = None,
        /,
        *,
        request_timeout: float | None = None,
        **fields: Any,
    ) -> R: ...

    @overload
    async def call(
        self,
        task: str,
        task_input: Input = None,
        /,
        *,
        request_timeout: float | None = None,
        **fields: Any,
    ) -> JsonValue: ...

    async def call(
        self,
        task: Task[..., Any] | str,
        task_input: Input = None,
        /,
        *,
        request_timeout: float | None = None,
        **fields: Any,
    ) -> Any:
        request = _call(self.api_key, task, task_input, fields, request_timeout)
        status = _status(await self._http.post(**request))
        if status.state.terminal:
            return _result(task, status)
        async for _ in self.events(status.id):
            pass
        return _result(task, await self.status(status.id))

    async def status(self, task_id: str) -> TaskStatus:
        return _status(await self._http.get(f"/v1/tasks/{task_id}", headers=_headers(self.api_key)))

    async def cancel(self, task_id: str) -> TaskStatus:
        return _status(
            await self._http.delete(f"/v1/tasks/{task_id}", headers=_headers(self.api_key))
        )

    async def events(
        self, task_id: str, *, last_event_id: str | None = None
    ) -> AsyncIterator[TaskEvent]:
        resume = _Resume(last_event_id, self.reconnect_attempts, self.reconnect_delay)
        while True:
            try:
                async with aconnect_sse(
                    self._http,
                    "GET",
                    f"/v1/tasks/{task_id}/events",
                    headers=resume.headers(self.api_key),
                    timeout=httpx.Timeout(30.0, read=None),
                ) as source:
                    if source.response.status_code == 204:
                        return
                    if source.response.status_code >= 400:
                        await source.response.aread()
                        raise_for_problem(source.response)
                    async for sse in source.aiter_sse():
                        if not sse.data:
                            continue
                        resume.seen(sse.id)
                        event = TaskEvent.model_validate_json(sse.data)
                        yield event
                        if event.terminal:
                            return
            except RETRYABLE as exc:
                await asyncio.sleep(resume.failed(exc))
