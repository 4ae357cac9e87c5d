"""OpenTelemetry: one trace per request, from the caller's span through the gateway,
the queue, the worker and its child, exported over OTLP to a collector here."""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from runtime.logs import JsonFormatter, TextFormatter, _trace_ids
from tests.collector import Collector, Span
from tests.conftest import Stack, running_stack
from tests.harness import wait_for_event


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    collector = Collector()
    yield collector
    collector.close()


def otel(collector: Collector) -> dict[str, str]:
    """The standard variables, as an operator would set them: no code."""
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # milliseconds: the tests wait for the spans
    }


@pytest.fixture(scope="module")
def traced(
    amqp_url: str, tmp_path_factory: pytest.TempPathFactory, collector: Collector
) -> Iterator[Stack]:
    with running_stack(amqp_url, tmp_path_factory.mktemp("traced"), 2, **otel(collector)) as s:
        yield s


def caller_span() -> tuple[str, str, dict[str, str]]:
    """A trace id and span id of the caller's, and its `traceparent` header."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, {"traceparent": f"00-{trace_id}-{span_id}-01"}


STEPS = ("timebox.admission", "timebox.publish", "timebox.wait")


def ancestors(spans: dict[str, Span], span: Span) -> list[str]:
    by_id = {s.span_id: s for s in spans.values()}
    chain = []
    while span.parent_id:
        chain.append(span.parent_id)
        if span.parent_id not in by_id:
            break
        span = by_id[span.parent_id]
    return chain


@pytest.mark.timeout(60)
def test_an_rpc_is_one_trace_from_the_callers_span_through_the_worker_to_the_child(
    traced: Stack, collector: Collector
) -> None:
    trace_id, parent, headers = caller_span()
    with traced.client() as client:
        response = client.post(
            "/v1/tasks/traced", params={"wait": "true"}, headers=headers, json={"name": "mine"}
        )
    assert response.status_code == 200, response.text
    task_id = response.json()["id"]
    deadline = datetime.fromisoformat(response.json()["deadline"])
    run, child = "timebox.run", "timebox.task traced"
    spans = collector.trace(
        trace_id,
        "POST /v1/tasks/traced",
        *STEPS,
        "timebox.queue_wait",
        run,
        child,
        "mine",
        "timebox.outcome_event",
    )
    request = spans["POST /v1/tasks/traced"]
    assert request.parent_id == parent
    assert request.service == "timebox-gateway"
    assert request.attributes["http.response.status_code"] == 200
    for name in STEPS:  # within the request's (FastAPI's own spans may come between)
        assert request.span_id in ancestors(spans, spans[name]), name
        assert spans[name].service == "timebox-gateway"
    publish = spans["timebox.publish"]
    for name in ("timebox.queue_wait", run):  # continued from the task message's headers
        assert spans[name].parent_id == publish.span_id
        assert spans[name].service == "timebox-worker"
    assert spans[child].parent_id == spans[run].span_id  # in the child process
    assert spans["mine"].parent_id == spans[child].span_id  # the task's own
    assert spans["timebox.outcome_event"].parent_id == spans[run].span_id
    # the endpoint's span says which task the request became
    endpoint = next(x for x in spans.values() if x.span_id == spans[STEPS[0]].parent_id)
    assert endpoint.attributes["timebox.task.id"] == task_id
    for name in (*STEPS, "timebox.queue_wait", run, child):
        attributes = spans[name].attributes
        assert attributes["timebox.task.id"] == task_id, name
        assert attributes["timebox.task.type"] == "traced"
        assert datetime.fromisoformat(attributes["timebox.deadline"]) == deadline
        assert 0 < attributes["timebox.time_left_s"] <= 60.01  # a deadline in whole ms
        assert not spans[name].error, name
    left = [spans[n].attributes["timebox.time_left_s"] for n in ("timebox.admission", run, child)]
    assert left == sorted(left, reverse=True)  # time passes along the way
    assert spans[run].attributes["timebox.attempt"] == 1
    assert spans[run].attributes["timebox.outcome"] == "succeeded"
    assert spans["timebox.wait"].attributes["timebox.outcome"] == "succeeded"
    # the queue wait ends where the run begins, in order
    assert spans["timebox.queue_wait"].start_ns >= publish.start_ns
    assert spans["timebox.queue_wait"].end_ns <= spans[run].start_ns + 1_000_000
    # log lines join the trace: the worker's about the task, the task's own in the child
    worker = traced.workers[0]
    worker.wait_for_line(rf"succeeded traced {task_id}.* trace_id={trace_id}")
    worker.wait_for_line(rf"inside mine trace_id={trace_id} span_id={spans['mine'].span_id}")


@pytest.mark.timeout(60)
def test_an_abort_at_the_deadline_is_marked_on_the_run_and_the_wait(
    traced: Stack, collector: Collector
) -> None:
    trace_id, _, headers = caller_span()
    with traced.client() as client:
        response = client.post(
            "/v1/tasks/nap",
            params={"wait": "true"},
            headers={**headers, "Request-Timeout": "1"},
            json={"seconds": 10},
        )
    assert response.status_code == 504
    spans = collector.trace(trace_id, "timebox.run", "timebox.wait", "POST /v1/tasks/nap")
    run = spans["timebox.run"]
    assert run.error
    assert run.attributes["timebox.outcome"] == "aborted"
    assert "aborted" in run.events
    assert run.events["aborted"]["timebox.reason"]
    assert spans["timebox.wait"].error
    assert spans["timebox.wait"].attributes["timebox.outcome"] == "aborted"
    assert spans["POST /v1/tasks/nap"].attributes["http.response.status_code"] == 504


@pytest.mark.timeout(60)
def test_a_cancel_is_marked_on_the_run_with_its_reason(traced: Stack, collector: Collector) -> None:
    trace_id, _, headers = caller_span()
    with traced.client() as client:
        task_id = client.post("/v1/tasks/nap", headers=headers, json={"seconds": 10}).json()["id"]
        wait_for_event(client, task_id, "running")
        assert client.delete(f"/v1/tasks/{task_id}").status_code == 202
    run = collector.trace(trace_id, "timebox.run")["timebox.run"]
    assert run.error
    assert run.attributes["timebox.outcome"] == "cancelled"
    assert "cancel" in run.events["cancelled"]["timebox.reason"]


@pytest.mark.timeout(60)
def test_a_refusal_is_marked_on_the_admission_span_with_its_reason(
    make_stack: Callable[..., Stack], collector: Collector
) -> None:
    """No worker serves the type: refused at once, with the reason on the trace."""
    stack = make_stack(**otel(collector))
    stack.gateway()
    trace_id, _, headers = caller_span()
    with stack.client() as client:
        response = client.post("/v1/tasks/echo", headers=headers, json={"payload": 1})
    assert response.status_code == 503
    spans = collector.trace(trace_id, "POST /v1/tasks/echo", "timebox.admission")
    assert spans["POST /v1/tasks/echo"].attributes["http.response.status_code"] == 503
    admission = spans["timebox.admission"]
    assert admission.error
    assert "no worker" in admission.events["refused"]["timebox.reason"]
    assert "timebox.publish" not in spans


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_a_line_logged_within_a_span_carries_its_trace_and_span_ids(
    formatter: logging.Formatter,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span("step") as span:
        record = logging.makeLogRecord({"msg": "hello", "levelname": "INFO", "name": "t"})
        _trace_ids(record)
    outside = logging.makeLogRecord({"msg": "hello", "levelname": "INFO", "name": "t"})
    _trace_ids(outside)
    context = span.get_span_context()
    trace_id, span_id = f"{context.trace_id:032x}", f"{context.span_id:016x}"
    line = formatter.format(record)
    if isinstance(formatter, JsonFormatter):
        entry: dict[str, Any] = json.loads(line)
        assert (entry["trace_id"], entry["span_id"]) == (trace_id, span_id)
        assert "trace_id" not in json.loads(formatter.format(outside))
    else:
        assert line.endswith(f"hello trace_id={trace_id} span_id={span_id}")
        assert "trace_id" not in formatter.format(outside)
    assert [s.name for s in exporter.get_finished_spans()] == ["step"]


def test_without_an_exporter_the_spans_cost_no_export_and_carry_the_callers_context() -> None:
    """The API alone (no SDK configured): Timebox's spans are no-ops, but a caller's
    `traceparent` still passes through to the task message."""
    from opentelemetry import trace

    from runtime.tracing import extract, inject, tracer

    _, parent, headers = caller_span()
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    with tracer.start_as_current_span("step", context=extract(headers)) as span:
        assert not span.is_recording()
        carried = inject({})
    assert carried["traceparent"] == headers["traceparent"]
    assert parent in carried["traceparent"]
