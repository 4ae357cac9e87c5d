"""The benchmarks' own arithmetic, and one overload window of each kind run for real:
`make bench` is not part of the suite, and a harness that breaks unseen reports
nothing, or wrong figures."""

from __future__ import annotations

import httpx
import pytest

import bench.stack
from bench import broker_cost, latency, mixed, overload
from bench.__main__ import cpu_bound
from bench.latency import percentiles
from bench.overload import DEADLINE, Planned, Result, Window, cpu_left_for_slots_pct, summarize


def test_goodput_counts_answers_within_the_deadline_and_wasted_cpu_the_rest() -> None:
    window = 10.0  # capacity: 100 tasks in the window, 50 in each half
    results = [Result(sent_at=i * 0.1, status=200, latency=0.5, cpu=0.2) for i in range(60)]
    results += [Result(sent_at=6.0, status=200, latency=DEADLINE + 0.1, cpu=0.2)]  # late
    results += [Result(sent_at=7.0, status=503, latency=0.001, cpu=None)] * 30
    results += [Result(sent_at=8.0, status="gave up", latency=DEADLINE, cpu=None)]
    summary = summarize(results, window, cpu=15.0, root_cpu=0.3)
    assert summary["sent"] == 92
    assert summary["on_time"] == 60
    assert summary["goodput_pct"] == 60.0
    assert summary["goodput_second_half_pct"] == 20.0  # 10 of 50, sent at 5.0-5.9 s
    assert summary["refused_503"] == 30
    assert summary["statuses"] == {"200": 61, "503": 30, "gave up": 1}
    assert summary["useful_cpu_s"] == 12.0  # on time only: the late answer's CPU is waste
    assert summary["wasted_cpu_pct"] == 20.0
    assert summary["worker_loop_cpu_pct"] == 2.0


def test_a_mixed_load_is_the_same_for_a_seed_and_offers_the_cpu_asked() -> None:
    plan = mixed.plan(2, window=200, seed=7)
    assert plan == mixed.plan(2, window=200, seed=7)
    assert plan != mixed.plan(2, window=200, seed=8)
    sizes = [p.body["seconds"] for p in plan if p.body]
    assert min(sizes) >= 0.05
    assert max(sizes) <= 1.0
    assert all(1.0 <= p.deadline <= 3.0 for p in plan)
    assert sum(sizes) / (overload.SLOTS * 200) == pytest.approx(2, rel=0.1)  # 2x the slots
    assert sorted(p.at for p in plan) == [p.at for p in plan]


def test_mixed_goodput_is_the_on_time_cpu_by_tercile_of_size_and_deadline() -> None:
    def result(at: float, size: float, deadline: float, status: int, latency: float) -> Result:
        planned = Planned(at, {"seconds": size}, deadline)
        cpu = size if status == 200 else None
        return Result(at, status, latency, cpu, planned=planned, unmeetable=status == 504)

    results = [
        result(1.0, 0.1, 1.0, 200, 0.5),  # small, short deadline: on time
        result(2.0, 0.1, 1.5, 503, 0.01),  # refused
        result(3.0, 0.5, 2.0, 200, 2.5),  # late: its CPU is waste
        result(6.0, 0.5, 2.5, 200, 1.0),  # second half, on time
        result(7.0, 1.0, 2.8, 504, 2.8),  # admitted, then unmeetable
        result(8.0, 1.0, 3.0, 200, 2.0),  # second half, on time
    ]
    window = Window(results, cpu=2.5, root_cpu=0.05, beside_ms_per_s={"server": 200.0})
    s = mixed.summarize(window, window=10.0)  # the slots' CPU: 2 x 10 s
    assert s["offered_cpu_pct"] == 16.0  # 3.2 s of 20
    assert s["goodput_pct"] == 8.0  # 0.1 + 0.5 + 1.0 on time
    assert s["steady_goodput_pct"] == 15.0  # 1.5 s of 10, sent in the second half
    left = cpu_left_for_slots_pct({"server": 200.0})  # 90 % on two cores
    assert s["steady_cpu_left_for_slots_pct"] == left
    assert s["steady_goodput_of_cpu_left_pct"] == pytest.approx(100 * 15.0 / left, abs=0.05)
    assert s["admitted_then_unmeetable_pct"] == 20.0  # 1 of the 5 admitted
    assert s["wasted_cpu_pct"] == 36.0  # 0.9 of 2.5 s
    assert s["worker_loop_cpu_pct"] == 2.0  # 0.05 of 2.5 s, within the waste
    assert [t["served_pct"] for t in s["by_size"]] == [50.0, 50.0, 50.0]
    assert [t["size"] for t in s["by_size"]] == [[0.1, 0.1], [0.5, 0.5], [1.0, 1.0]]
    assert [t["served_pct"] for t in s["by_deadline"]] == [50.0, 50.0, 50.0]
    assert s["by_deadline"][0]["deadline"] == [1.0, 1.5]


def test_the_cpu_left_for_the_slots_is_what_the_other_processes_leave_of_the_cores() -> None:
    beside = {"server": 100.0, "worker_loop": 20.0, "rabbitmq": 60.0, "load_generator": 20.0}
    assert cpu_left_for_slots_pct(beside, cores=2) == 90.0
    assert cpu_left_for_slots_pct(beside, cores=4) == 100.0  # the two slots use two cores
    assert cpu_left_for_slots_pct({"server": 2500.0}, cores=2) == 0.0
    assert cpu_left_for_slots_pct({**beside, "rabbitmq": None}, cores=2) is None
    assert cpu_left_for_slots_pct({}, cores=2) is None


def test_the_throughput_bound_is_the_cores_over_the_cpu_a_task_costs() -> None:
    cpu = {"gateway": 1.25, "worker_with_children": 1.0, "rabbitmq": 1.6, "load_generator": 0.15}
    assert cpu_bound(cpu, 2) == "500/s / 1,250/s"
    assert cpu_bound({**cpu, "rabbitmq": None}, 2) == "-"  # a remote broker is not read


def test_percentiles_are_taken_from_the_sorted_samples_in_milliseconds() -> None:
    samples = [i / 1000 for i in range(1000, 0, -1)]  # 1..1000 ms, in reverse
    assert percentiles(samples) == {"n": 1000, "p50_ms": 501.0, "p99_ms": 991.0, "p999_ms": 1000.0}


@pytest.mark.timeout(120)
def test_an_overload_window_runs_against_timebox_and_the_in_process_recipe(
    amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One second at 2x against a real gateway and worker, and against the FastAPI +
    process pool app: every request is accounted for, and the CPU is read from /proc."""
    monkeypatch.setattr(bench.stack, "AMQP_URL", amqp_url)
    out = overload.run(window=1.0, drain=DEADLINE + 0.5, baseline_loads=(2,), loads=(2,))
    timebox = out["systems"]["timebox"]["2x"]
    assert timebox["sent"] == 20
    assert set(timebox["statuses"]) <= {"200", "503", "504"}, timebox["statuses"]
    assert timebox["on_time"] > 0
    assert 0 < timebox["useful_cpu_s"] <= timebox["tree_cpu_s"] * 1.05
    assert timebox["worker_loop_cpu_pct"] is not None
    beside = timebox["second_half_beside_tasks_cpu_ms_per_s"]
    assert set(beside) == {"server", "worker_loop", "rabbitmq", "load_generator"}
    assert beside["server"] is not None
    assert beside["worker_loop"] is not None
    left = timebox["second_half_cpu_left_for_slots_pct"]
    assert left is None or 0 <= left <= 100  # None: a broker on another machine
    for recipe in ("fastapi+processpool", "fastapi+processpool+wait_for"):
        baseline = out["systems"][recipe]["2x"]
        assert baseline["sent"] == 20
        assert set(baseline["statuses"]) <= {"200", "gave up"}, baseline["statuses"]
        assert baseline["tree_cpu_s"] > 0  # its pool's processes, children of the app
        assert set(baseline["second_half_beside_tasks_cpu_ms_per_s"]) == {
            "server",
            "rabbitmq",
            "load_generator",
        }


@pytest.mark.timeout(120)
def test_a_mixed_overload_window_runs_against_timebox() -> None:
    out = mixed.run(window=2.0, drain=3.5, seed=3, multiples=(2,))
    # the same requests, each way
    assert list(out["loads"]) == ["2x", "2x, wait limit 0.5 s", "2x, priorities"]
    for s in out["loads"].values():
        assert s["sent"] == len(mixed.plan(2, 2.0, seed=3))
        assert set(s["statuses"]) <= {"200", "503", "422", "504"}, s["statuses"]
        assert s["goodput_pct"] > 0
        assert sum(t["requests"] for t in s["by_size"]) == s["sent"]
        left = s["steady_cpu_left_for_slots_pct"]
        assert left is None or left > 0


@pytest.mark.timeout(60)
def test_sequential_rpcs_are_timed_with_the_cpu_each_process_spent_on_one(
    amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench.stack, "AMQP_URL", amqp_url)
    out = latency.rpc_and_submit(20)
    assert out["rpc"]["n"] == out["submit"]["n"] == 20
    assert 0 < out["rpc"]["p50_ms"] <= out["rpc"]["p99_ms"] <= out["rpc"]["p999_ms"]
    cpu = out["rpc"]["cpu_ms_per_call"]
    assert set(cpu) == {"gateway", "worker_with_children", "rabbitmq", "load_generator"}
    assert cpu["gateway"] is not None
    assert cpu["worker_with_children"] is not None


@pytest.mark.timeout(90)
def test_what_a_task_costs_the_broker_is_counted_per_queue_and_kind_of_message(
    amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An echo RPC is one task message and two events (queued, succeeded), each
    published, confirmed, delivered and acked once: read from the management API."""
    for module in (bench.stack, broker_cost):
        monkeypatch.setattr(module, "AMQP_URL", amqp_url)
    try:
        with broker_cost.management() as api:
            api.get("/overview").raise_for_status()
    except httpx.HTTPError as exc:
        pytest.skip(f"no management API beside the test broker: {exc!r}")
    with bench.stack.Stack() as stack:
        gateway = stack.gateway()
        stack.worker(2)
        out = broker_cost.count(stack, gateway.url, 1.0)
    assert out["tasks"] == out["rpcs_answered"] > 0
    per_task = out["per_task"]
    assert per_task["queue tasks.default"] == {"publish": 1.0, "deliver": 1.0, "ack": 1.0}
    assert per_task["queue events"]["publish"] == pytest.approx(2, abs=0.05)
    assert per_task["all"]["confirm"] >= 2.95  # the gateway's and the worker's publishes
    kinds = out["event_stream_per_task"]
    assert kinds["event queued"] == kinds["event succeeded"] == 1.0
