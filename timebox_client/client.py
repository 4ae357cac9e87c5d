"""Sync and async clients over httpx, sharing how requests are built and read."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
from httpx_sse import aconnect_sse, connect_sse
from pydantic import JsonValue

from contracts.events import TaskEvent, TaskState, TaskStatus
from timebox_client.errors import (
    Overloaded,
    ProblemError,
    TaskCancelled,
    TaskFailed,
    TaskTimedOut,
    raise_for_problem,
)

# the server answers an RPC by its deadline; allow this much more for the network
RPC_SLACK = 5.0


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


def _result(response: httpx.Response) -> JsonValue:
    return _status(response).result


def _call(
    api_key: str | None, task: str, task_input: dict[str, Any], request_timeout: float
) -> dict[str, Any]:
    """The RPC request of `call`, as keyword arguments of httpx's `post`."""
    return {
        "url": f"/v1/tasks/{task}",
        "json": task_input,
        "headers": _headers(api_key, request_timeout, wait=True),
        "timeout": request_timeout + RPC_SLACK,
    }


# how an RPC answers a task that did not succeed: its problem's class, status and type
_ENDINGS: dict[TaskState, tuple[type[ProblemError], int, str]] = {
    TaskState.FAILED: (TaskFailed, 500, "task-failed"),
    TaskState.EXPIRED: (TaskTimedOut, 504, "task-expired"),
    TaskState.ABORTED: (TaskTimedOut, 504, "task-aborted"),
    TaskState.CANCELLED: (TaskCancelled, 409, "task-cancelled"),
    TaskState.REJECTED: (Overloaded, 503, "task-rejected"),
}


def _ended(status: TaskStatus) -> JsonValue:
    """What `call` gives for a task it followed to its end after a `202` (the gateway
    stopped while it waited): the result, or the error the RPC's answer would raise."""
    if status.state is TaskState.SUCCEEDED:
        return status.result
    kind, code, slug = _ENDINGS.get(status.state, (ProblemError, 504, "deadline-passed"))
    error = status.error
    detail = f"{error.type}: {error.message}" if error else status.reason or status.state.value
    body = {
        "type": f"/problems/{slug}",
        "title": f"Task {status.state.value}",
        "status": code,
        "detail": detail,
        "task": status.model_dump(mode="json"),
    }
    raise kind(code, body, httpx.Headers())


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
        task: str,
        task_input: dict[str, Any],
        *,
        request_timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> TaskStatus:
        """Queues a task (`202`) and returns its status at once."""
        return _status(
            self._http.post(
                f"/v1/tasks/{task}",
                json=task_input,
                headers=_headers(self.api_key, request_timeout, idempotency_key=idempotency_key),
            )
        )

    def call(self, task: str, task_input: dict[str, Any], *, request_timeout: float) -> JsonValue:
        """Runs a task and returns its result, or raises (TaskFailed, TaskTimedOut, …).
        A gateway told to stop while it waits answers `202`: the task is then followed
        to its end through the same URL (another gateway, or this one restarted)."""
        response = self._http.post(**_call(self.api_key, task, task_input, request_timeout))
        if response.status_code != 202:
            return _result(response)
        task_id = _status(response).id
        for _ in self.events(task_id):
            pass
        return _ended(self.status(task_id))

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
        task: str,
        task_input: dict[str, Any],
        *,
        request_timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> TaskStatus:
        return _status(
            await self._http.post(
                f"/v1/tasks/{task}",
                json=task_input,
                headers=_headers(self.api_key, request_timeout, idempotency_key=idempotency_key),
            )
        )

    async def call(
        self, task: str, task_input: dict[str, Any], *, request_timeout: float
    ) -> JsonValue:
        response = await self._http.post(**_call(self.api_key, task, task_input, request_timeout))
        if response.status_code != 202:
            return _result(response)
        task_id = _status(response).id
        async for _ in self.events(task_id):
            pass
        return _ended(await self.status(task_id))

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
