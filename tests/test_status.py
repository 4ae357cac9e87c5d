import pytest

from contracts.events import ErrorInfo, EventType, TaskEvent, TaskState, TaskStatus


def event(kind: EventType, **fields: object) -> TaskEvent:
    return TaskEvent(type=kind, task_id="t1", task="echo", at=100.0, **fields)  # type: ignore[arg-type]


def test_status_follows_the_lifecycle() -> None:
    status = TaskStatus.first(event(EventType.QUEUED, deadline_ms=160_000))
    assert status.state is TaskState.QUEUED
    assert status.deadline is not None
    assert status.deadline.timestamp() == 160.0
    status.apply(event(EventType.RUNNING, worker="host:1", attempt=1))
    assert (status.state, status.worker, status.attempts) == (TaskState.RUNNING, "host:1", 1)
    status.apply(event(EventType.PROGRESS, progress=0.5, message="half"))
    assert (status.progress, status.progress_message) == (0.5, "half")
    status.apply(event(EventType.SUCCEEDED, result={"payload": 1}))
    assert status.state is TaskState.SUCCEEDED
    assert status.result == {"payload": 1}
    assert status.progress == 1.0


def test_attempts_count_the_starts_not_the_deliveries() -> None:
    """`attempt` in a running event is the broker's delivery number: a message handed
    back before it reached a worker counts as a delivery; a start published twice (a
    retried publish) is still one start."""
    status = TaskStatus.first(event(EventType.QUEUED))
    status.apply(event(EventType.RUNNING, worker="a:1", attempt=2))
    status.apply(event(EventType.RUNNING, worker="a:1", attempt=2))
    assert status.attempts == 1
    status.apply(event(EventType.RUNNING, worker="b:1", attempt=3))  # a redelivery after a crash
    assert status.attempts == 2


def test_a_run_handed_back_then_ended_unstarted_elsewhere_is_told_by_its_runner() -> None:
    """Its worker lost its message; the worker given it next found its deadline
    unmeetable: the status names the worker of the run it describes, not the other."""
    status = TaskStatus.first(event(EventType.QUEUED))
    status.apply(event(EventType.RUNNING, worker="a:1", attempt=1))
    status.apply(event(EventType.EXPIRED, worker="b:1", reason="unmeetable"))
    assert (status.state, status.worker, status.attempts) == (TaskState.EXPIRED, "a:1", 1)
    never_started = TaskStatus.first(event(EventType.QUEUED))
    never_started.apply(event(EventType.EXPIRED, worker="b:1"))
    assert never_started.worker == "b:1"


def test_an_ending_that_carries_its_start_counts_as_the_run() -> None:
    """A run too short for a `running` event of its own: its ending says when it
    started, on which attempt, and the status reads it as it would a `running`."""
    status = TaskStatus.first(event(EventType.QUEUED))
    status.apply(event(EventType.SUCCEEDED, worker="a:1", attempt=1, started=99.99))
    assert status.started_at is not None
    assert status.started_at.timestamp() == 99.99
    assert (status.worker, status.attempts, status.state) == ("a:1", 1, TaskState.SUCCEEDED)


def test_the_first_terminal_event_wins() -> None:
    status = TaskStatus.first(event(EventType.QUEUED))
    assert status.apply(event(EventType.CANCELLED, reason="DELETE"))
    assert not status.apply(event(EventType.EXPIRED))
    assert not status.apply(event(EventType.FAILED, error=ErrorInfo(type="X", message="y")))
    assert status.state is TaskState.CANCELLED
    assert status.reason == "DELETE"


def test_events_and_messages_ignore_fields_they_do_not_know() -> None:
    """A gateway or worker reads what a newer version wrote (a rolling upgrade)."""
    from contracts.messages import CancelRequest

    event = TaskEvent.model_validate({"type": "queued", "task_id": "a", "task": "b", "new": 1})
    assert event.task_id == "a"
    assert "new" not in event.model_dump_json()
    cancel = CancelRequest.model_validate({"task_id": "a", "deadline_ms": 1, "new": True})
    assert cancel.task_id == "a"


def test_run_time_estimates_ignore_samples_that_say_nothing() -> None:
    from contracts.estimates import RunTimes

    rt = RunTimes(min_samples=2)
    rt.add(0.5, 1e-320)  # a vanishing cost: an infinite rate
    rt.add(float("nan"))
    rt.add(-1.0)
    assert len(rt) == 0
    rt.add(1.0, 2.0)
    rt.add(2.0, 4.0)
    assert rt.expect(10.0) == 5.0
    assert rt.largest_cost(1.0) == 2.0


def test_a_fixed_part_of_the_run_time_is_not_charged_per_unit_to_large_inputs() -> None:
    """burn_cpu as measured under load: each run the seconds asked plus about 30 ms of
    overhead (the child hop, a busy machine), within ±5 %. Per unit alone, the small
    inputs' overhead made a rate of up to 1.6 s a second asked, and a 1 s input was
    refused with 1.3 s left."""
    import random

    from contracts.estimates import LIKELY, RunTimes

    rng = random.Random(4)
    rt = RunTimes()
    for _ in range(200):
        asked = 0.05 * 20 ** rng.random()  # 0.05-1 s, as bench/mixed.py asks
        rt.add((asked + 0.03) * rng.uniform(0.95, 1.05), cost=asked)
    fixed, rate = rt.line()
    assert fixed == pytest.approx(0.03, abs=0.01)
    assert rate == pytest.approx(1.0, abs=0.05)
    big = rt.expect(1.0, q=LIKELY)
    assert big is not None
    assert 1.03 < big < 1.15  # fits in 1.3 s, as it does
    small = rt.expect(0.05, q=LIKELY)
    assert small is not None
    assert 0.08 < small < 0.095
    fits = rt.largest_cost(1.3, q=LIKELY)
    assert fits is not None
    assert 1.1 < fits < 1.3
    # the backlog's work, on average: each run's fixed part once, its units at the rate
    mean = rt.mean_run(units_sum=3.0, count=4)
    assert mean == pytest.approx(4 * fixed + 3.0 * rate)


def test_run_time_quantiles_from_the_recent_rates() -> None:
    from contracts.estimates import RunTimes

    rt = RunTimes(min_samples=5)
    for seconds in (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0):
        rt.add(seconds)
    assert rt.expect() == 1.0  # the median: what most runs take
    assert rt.expect(q=0.9) == 1.0
    rt.add(3.0)
    rt.add(3.0)
    assert rt.expect(q=0.9) == 3.0  # a tail of slow runs: a start needs that much time
    assert rt.largest_cost(6.0) == 6.0
    assert rt.largest_cost(6.0, q=0.9) == 2.0
