"""Problem answers (RFC 9457) as the errors the gateway raised: one tree, in
contracts/errors.py, for both sides. `ProblemError` is its root."""

from __future__ import annotations

import contextlib

import httpx

from contracts.errors import (
    ClientGone,
    DeadlineUnmeetable,
    IdempotencyKeyReused,
    InvalidInput,
    NoWorker,
    Overloaded,
    TaskCancelled,
    TaskFailed,
    TaskTimedOut,
)
from contracts.errors import TimeboxError as ProblemError

__all__ = [
    "ClientGone",
    "DeadlineUnmeetable",
    "IdempotencyKeyReused",
    "InvalidInput",
    "NoWorker",
    "Overloaded",
    "ProblemError",
    "TaskCancelled",
    "TaskFailed",
    "TaskTimedOut",
    "raise_for_problem",
]


def raise_for_problem(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = {"title": response.reason_phrase, "detail": response.text[:500]}
    if not isinstance(body, dict):
        body = {"detail": str(body)}
    retry = response.headers.get("retry-after")
    if retry is not None and "retry_after" not in body:
        with contextlib.suppress(ValueError):
            body["retry_after"] = float(retry)
    raise ProblemError.from_problem(response.status_code, body)
