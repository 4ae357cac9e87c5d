"""Problem responses (RFC 9457) as exceptions.

ProblemError              any problem+json answer
 ├── TaskFailed           500: the task raised (its error type and message)
 ├── TaskTimedOut         504: expired before it started, or aborted at its deadline
 ├── TaskCancelled        409: cancelled
 ├── Overloaded           503: refused for now; see `retry_after`
 ├── DeadlineUnmeetable   422: this input cannot finish within the deadline
 └── IdempotencyKeyReused 422: the key was used for another input; see `task_id`
"""

from __future__ import annotations

from typing import Any

import httpx


class ProblemError(Exception):
    def __init__(self, status: int, body: dict[str, Any], headers: httpx.Headers) -> None:
        self.status = status
        self.body = body
        self.type = str(body.get("type", "about:blank"))
        self.title = str(body.get("title", ""))
        self.detail = str(body.get("detail", ""))
        retry = headers.get("retry-after")
        try:
            self.retry_after: float | None = float(retry) if retry else None
        except ValueError:
            self.retry_after = None
        super().__init__(f"{status} {self.title}: {self.detail}")

    @property
    def task(self) -> dict[str, Any] | None:
        task = self.body.get("task")
        return task if isinstance(task, dict) else None


class TaskFailed(ProblemError):
    pass


class TaskTimedOut(ProblemError):
    pass


class TaskCancelled(ProblemError):
    pass


class Overloaded(ProblemError):
    pass


class DeadlineUnmeetable(ProblemError):
    pass


class IdempotencyKeyReused(ProblemError):
    @property
    def task_id(self) -> str | None:
        """The task the key was used for."""
        task_id = self.body.get("task_id")
        return task_id if isinstance(task_id, str) else None


def raise_for_problem(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = {"title": response.reason_phrase, "detail": response.text[:500]}
    if not isinstance(body, dict):
        body = {"detail": str(body)}
    kind: type[ProblemError] = ProblemError
    status = response.status_code
    if status == 500 and body.get("type") == "/problems/task-failed":
        kind = TaskFailed
    elif status == 504:
        kind = TaskTimedOut
    elif status == 409 and body.get("type") == "/problems/task-cancelled":
        kind = TaskCancelled
    elif status == 503:
        kind = Overloaded
    elif status == 422 and body.get("type") == "/problems/deadline-unmeetable":
        kind = DeadlineUnmeetable
    elif status == 422 and body.get("type") == "/problems/idempotency-key-reused":
        kind = IdempotencyKeyReused
    raise kind(status, body, response.headers)
