"""When a worker says `running`: after `TIMEBOX_RUNNING_HOLD` seconds, or with the
task's first progress report, or with its outcome if the task ends sooner; and its time
is always the start's."""

from __future__ import annotations

import json
import time

import pytest
from httpx_sse import connect_sse

from tests.conftest import Stack

pytestmark = pytest.mark.timeout(60)


def streamed(stack: Stack, seconds: float) -> list[tuple[str, dict[str, float], float]]:
    """A `burn_cpu` task streamed in its POST: (event, data, when this client read it)."""
    with (
        stack.client() as c,
        connect_sse(c, "POST", "/v1/tasks/burn_cpu", json={"seconds": seconds}) as source,
    ):
        return [(e.event, json.loads(e.data), time.time()) for e in source.iter_sse() if e.data]


def test_a_task_that_ends_within_the_hold_sends_running_with_its_outcome(make_stack) -> None:
    stack: Stack = make_stack()
    stack.gateway()
    stack.worker(1, TIMEBOX_RUNNING_HOLD="5", TIMEBOX_PROGRESS_INTERVAL="10")
    events = streamed(stack, 0.5)
    assert [kind for kind, _, _ in events] == ["queued", "running", "succeeded"]
    (_, running, running_read), (_, succeeded, succeeded_read) = events[1], events[2]
    assert running_read - running["at"] >= 0.4  # held while the task ran
    assert succeeded_read - running_read < 0.25  # and sent with the outcome
    assert succeeded["at"] - running["at"] >= 0.45  # stamped at the start all the same


def test_a_progress_report_within_the_hold_sends_running_first(make_stack) -> None:
    stack: Stack = make_stack()
    stack.gateway()
    stack.worker(1, TIMEBOX_RUNNING_HOLD="5", TIMEBOX_PROGRESS_INTERVAL="0.25")
    events = streamed(stack, 1.2)
    kinds = [kind for kind, _, _ in events]
    assert kinds[:3] == ["queued", "running", "progress"]
    assert kinds[-1] == "succeeded"
    running_read, succeeded_read = events[1][2], events[-1][2]
    assert succeeded_read - running_read >= 0.6  # at the first report, not the end


def test_a_task_that_outlasts_the_hold_is_announced_running_while_it_runs(make_stack) -> None:
    stack: Stack = make_stack()
    stack.gateway()
    stack.worker(1, TIMEBOX_RUNNING_HOLD="0.05", TIMEBOX_PROGRESS_INTERVAL="10")
    events = streamed(stack, 1.2)
    assert [kind for kind, _, _ in events] == ["queued", "running", "succeeded"]
    (_, running, running_read), (_, _, succeeded_read) = events[1], events[2]
    assert running_read - running["at"] < 0.6
    assert succeeded_read - running_read >= 0.6
