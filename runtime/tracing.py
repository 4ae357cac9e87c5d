"""OpenTelemetry traces: one tracer for Timebox's spans, the task's attributes, and the
W3C trace context carried in task messages and on to the child process.

Only the API is a dependency: without an SDK every span is a no-op. With the SDK
installed (`pip install 'timebox[otel]'`), `OTEL_TRACES_EXPORTER` (`otlp`, `console`,
or any exporter's entry point) turns exporting on and the other standard `OTEL_*`
variables configure it (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME`, …)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, MutableMapping
from contextlib import AbstractContextManager
from importlib.metadata import entry_points
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from contracts.deadline import Deadline

log = logging.getLogger("timebox.tracing")
tracer = trace.get_tracer("timebox")

# how a task ended, marked on its spans as an error with the reason (mark())
UNWELL = frozenset({"rejected", "failed", "crashed", "expired", "aborted", "cancelled"})
# the exporter `otlp` means: the SDK's own default is gRPC, ours the lighter HTTP one
_ALIASES = {"otlp": "otlp_proto_http"}


def configure(service: str) -> None:
    """Exports this process's spans if `OTEL_TRACES_EXPORTER` asks for it, as `service`
    unless `OTEL_SERVICE_NAME` names another."""
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n and n != "none"]
    if not names or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return  # the app that Timebox is attached to has set one up: its own
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "OTEL_TRACES_EXPORTER is set, but no OpenTelemetry SDK: pip install 'timebox[otel]'"
        )
        return
    os.environ.setdefault("OTEL_SERVICE_NAME", service)  # Resource.create() reads it
    provider = TracerProvider(resource=Resource.create())
    for name in names:
        found = entry_points(group="opentelemetry_traces_exporter", name=_ALIASES.get(name, name))
        if not found:
            log.warning("no OpenTelemetry trace exporter named %r is installed", name)
            continue
        provider.add_span_processor(BatchSpanProcessor(next(iter(found)).load()()))
    trace.set_tracer_provider(provider)


def enabled() -> bool:
    """Whether this process records spans: an SDK's provider is set (ours, or that of
    the app Timebox is part of). Without one, Timebox builds no span and no attribute."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    context: Context | None = None,
    attributes: dict[str, str | int | float] | None = None,
    start_time: int | None = None,
) -> AbstractContextManager[Span]:
    """A span, current within the `with`; nothing at all while tracing is off."""
    if not enabled():
        return contextlib.nullcontext(trace.INVALID_SPAN)
    return tracer.start_as_current_span(
        name, context=context, kind=kind, attributes=attributes, start_time=start_time
    )


def flush() -> None:
    """Exports what this process's spans still hold (a child before its next task: a
    kill would lose them)."""
    provider = trace.get_tracer_provider()
    force_flush = getattr(provider, "force_flush", None)
    if force_flush is not None:
        force_flush(timeout_millis=1000)


def inject(carrier: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Writes the current trace context (`traceparent`, …) into message headers: a
    caller's passes through even while this process records nothing."""
    propagate.inject(carrier)
    return carrier


def extract(carrier: Mapping[str, Any] | None) -> Context:
    """The trace context that headers carry (an empty one if none)."""
    if not carrier:
        return Context()
    return propagate.extract({k: v for k, v in carrier.items() if isinstance(v, str)})


def task_attributes(
    task: str, task_id: str, deadline: Deadline, **more: str | int | float | None
) -> dict[str, str | int | float]:
    """What every span of a task carries: its id and type, its deadline and the time it
    had left when the span began."""
    attributes: dict[str, str | int | float | None] = {
        "timebox.task.id": task_id,
        "timebox.task.type": task,
        "timebox.deadline": deadline.iso(),
        "timebox.time_left_s": round(deadline.remaining(), 4),
        **{f"timebox.{k}": v for k, v in more.items()},
    }
    return {k: v for k, v in attributes.items() if v is not None}


def task_span(
    name: str,
    task: str,
    task_id: str,
    deadline: Deadline,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    context: Context | None = None,
    start_time: int | None = None,
    **more: str | int | float | None,
) -> AbstractContextManager[Span]:
    """A span of one step of a task, current within the `with` (log lines carry it)."""
    if not enabled():
        return contextlib.nullcontext(trace.INVALID_SPAN)
    attributes = task_attributes(task, task_id, deadline, **more)
    return span(name, kind=kind, context=context, attributes=attributes, start_time=start_time)


def ended(span: Span, outcome: str, reason: str | None) -> None:
    """How a task ended, on its span; marked as an error if it did not end well."""
    if not span.is_recording():
        return
    span.set_attribute("timebox.outcome", outcome)
    if outcome in UNWELL:
        mark(span, outcome, reason)


def mark(span: Span, what: str, reason: str | None) -> None:
    """A task that did not end well, on its span: an event named for how (refused,
    expired, aborted, cancelled, failed) with the reason, and an error status."""
    span.add_event(what, {"timebox.reason": reason or what})
    span.set_attribute("timebox.reason", reason or what)
    span.set_status(Status(StatusCode.ERROR, f"{what}: {reason}" if reason else what))
