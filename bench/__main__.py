"""Runs every benchmark, prints each table, writes JSON and PNG under bench/results/.

python -m bench            full run
python -m bench --quick    under two minutes (shorter windows, fewer samples)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import abort, broker_cost, fanout, latency, mixed, overload, peer, throughput

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "?"

    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        rabbit = subprocess.run(
            ["rabbitmqctl", "version"], capture_output=True, text=True, timeout=20
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rabbit = "?"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "rabbitmq": rabbit,
        "versions": {
            p: version(p) for p in ("fastapi", "uvicorn", "aio-pika", "sse-starlette", "pydantic")
        },
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    line = " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=False))
    out = [f"\n{title}", line, "-+-".join("-" * w for w in widths)]
    out += [" | ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=False)) for r in rows]
    return "\n".join(out)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value}%"


def _cpu_ms(per_process: dict[str, float | None]) -> str:
    """CpuMeter.ms_per's figures, in its order: "1.2 ms / - / …"."""
    return " / ".join("-" if v is None else f"{v} ms" for v in per_process.values())


def cpu_bound(cpu_ms: dict[str, float | None], cores: int | None) -> str:
    """The most tasks a second these cores could do if they did nothing but this: with
    the CPU every process spends on one task, and with RabbitMQ's alone."""
    if not cores or any(v is None for v in cpu_ms.values()):
        return "-"
    total = sum(v for v in cpu_ms.values() if v is not None)
    broker = cpu_ms.get("rabbitmq")
    bounds = [cores * 1000 / ms if ms else None for ms in (total, broker)]
    return " / ".join("-" if b is None else f"{b:,.0f}/s" for b in bounds)


def _reasons(seconds: dict[str, float]) -> str:
    return ", ".join(f"{reason} {value} s" for reason, value in seconds.items()) or "none"


def report(results: dict[str, Any]) -> str:
    parts = []
    o = results["overload"]
    rows = []
    for system, by_load in o["systems"].items():
        for load, r in by_load.items():
            rows.append(
                [
                    system,
                    load,
                    r["sent"],
                    r["on_time"],
                    f"{r['goodput_pct']}%",
                    f"{r['goodput_second_half_pct']}%",
                    _pct(r.get("second_half_cpu_left_for_slots_pct")),
                    r["refused_503"],
                    f"{_pct(r.get('admitted_then_unmeetable_pct'))} "
                    f"({_pct(r.get('admitted_then_expired_pct'))})",
                    f"{r['wasted_cpu_pct']}%",
                    _pct(r.get("worker_loop_cpu_pct")),
                ]
            )
    parts.append(
        table(
            f"Overload: burn_cpu {overload.TASK_SECONDS} s, {overload.SLOTS} slots "
            f"(capacity {overload.CAPACITY:g}/s), deadline {overload.DEADLINE:g} s, "
            f"{o['parameters']['window_s']:g} s window",
            [
                "system",
                "load",
                "sent",
                "on time",
                "goodput",
                "2nd half",
                "CPU left for the slots",
                "503",
                "admitted, then unmeetable (expired unstarted)",
                "wasted CPU",
                "of it, worker loop",
            ],
            rows,
        )
    )
    if "console_cpu" in o:
        cpu = o["console_cpu"]
        parts.append(
            "Timebox's runs as its console showed them after: CPU delivered "
            f"{cpu['totals']['delivered']} s, wasted {cpu['totals']['wasted']} s "
            f"({_reasons(cpu['reasons']['wasted'])}), saved {cpu['totals']['saved']} s "
            f"({_reasons(cpu['reasons']['saved'])})"
        )
    parts.append(
        f"\nMixed overload (bench/mixed.py): {results['mixed']['parameters']['task']}, "
        f"deadlines {results['mixed']['parameters']['deadlines_s']} s, Poisson arrivals, "
        f"{results['mixed']['parameters']['window_s']:g} s window; terciles smallest first\n"
        + mixed.table(results["mixed"])
    )
    lat = results["latency"]
    parts.append(
        table(
            "Latency (sequential calls)",
            ["path", "n", "p50 ms", "p99 ms", "p99.9 ms"],
            [
                [k, v["n"], v["p50_ms"], v["p99_ms"], v["p999_ms"]]
                for k, v in lat.items()
                if k != "parameters"
            ],
        )
    )
    cpu = lat["rpc_echo"].get("cpu_ms_per_call")
    if cpu:
        parts.append(
            "CPU per sequential RPC (rpc_echo): gateway / worker and children / RabbitMQ / "
            "load generator: " + _cpu_ms(cpu)
        )
    tr = results["tracing"]
    parts.append(
        f"RPC echo with tracing off / every span exported over OTLP (interleaved): p50 "
        f"{tr['off']['p50_ms']} / {tr['otlp']['p50_ms']} ms (ratio {tr['p50_ratio']}), p99 "
        f"{tr['off']['p99_ms']} / {tr['otlp']['p99_ms']} ms (ratio {tr['p99_ratio']}); "
        f"{tr['spans_exported']} spans exported"
    )
    t = results["throughput"]
    parts.append(
        table(
            "Throughput",
            ["measure", "value"],
            [
                [
                    "echo end to end (202, counted at succeeded)",
                    f"{t['echo_202']['end_to_end_per_s']}/s",
                ],
                ["echo submits (202)", f"{t['echo_202']['submit_per_s']}/s"],
                [
                    f"echo RPC, {t['echo_rpc']['in_flight']} in flight",
                    f"{t['echo_rpc']['calls_per_s']}/s",
                ],
                [
                    "CPU per RPC: gateway / worker and children / RabbitMQ / load generator",
                    _cpu_ms(t["echo_rpc"]["cpu_ms_per_call"]),
                ],
                [
                    f"at most, from that CPU on {results['machine']['cores']} cores: "
                    "all four / RabbitMQ alone",
                    cpu_bound(t["echo_rpc"]["cpu_ms_per_call"], results["machine"]["cores"]),
                ],
                [
                    "ceiling: FastAPI hello-world GET, same load generator",
                    f"{t['ceiling_fastapi_hello_get']['calls_per_s']}/s",
                ],
                [
                    "ceiling: aio-pika quorum publish (confirmed) + consume, one process",
                    f"{t['ceiling_amqp_quorum_publish_consume']['messages_per_s']} messages/s",
                ],
            ],
        )
    )
    a = results["abort"]
    parts.append(
        table(
            "Abort (kill time minus deadline; slot ready = next task's start minus kill;"
            " frozen = the worker SIGSTOPped across the deadline, interleaved)",
            [
                "task",
                "lateness p50 ms",
                "p99 ms",
                "frozen p50 ms",
                "p99 ms",
                "slot ready p50 ms",
                "p99 ms",
            ],
            [
                [
                    k,
                    a[f"{k}_lateness"]["p50_ms"],
                    a[f"{k}_lateness"]["p99_ms"],
                    a[f"{k}_frozen_lateness"]["p50_ms"],
                    a[f"{k}_frozen_lateness"]["p99_ms"],
                    a[f"{k}_slot_ready"]["p50_ms"],
                    a[f"{k}_slot_ready"]["p99_ms"],
                ]
                for k in ("python", "hold_gil")
            ],
        )
    )
    parts.append(
        "\nPer request against FastAPI + Celery, interleaved (bench/peer.py)\n"
        + peer.table(results["peer"])
    )
    parts.append(
        "\nWhat a task costs RabbitMQ, by kind of message (bench/broker_cost.py)\n"
        + broker_cost.table(results["broker"])
    )
    f = results["fanout"]
    per = f["events_received_per_subscriber"]
    parts.append(
        table(
            "SSE fan-out on one gateway",
            ["measure", "value"],
            [
                [
                    "subscribers (finished)",
                    f"{f['parameters']['subscribers']} ({f['subscribers_finished']})",
                ],
                ["memory per subscriber", f"{f['memory_per_subscriber_kb']} KiB"],
                ["delivery p50 / p99", f"{f['delivery']['p50_ms']} / {f['delivery']['p99_ms']} ms"],
                [
                    "events emitted; sent to a subscriber min / p50 / max",
                    f"{f['events_emitted']}; {per['min']} / {per['p50']} / {per['max']}",
                ],
            ],
        )
    )
    return "\n".join(parts)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for system, by_load in results["overload"]["systems"].items():
        loads = [int(k.rstrip("x")) for k in by_load]
        line = ax.plot(
            loads, [r["goodput_pct"] for r in by_load.values()], marker="o", label=system
        )
        ax.plot(
            loads,
            [r["goodput_second_half_pct"] for r in by_load.values()],
            marker=".",
            linestyle="--",
            color=line[0].get_color(),
            label=f"{system}, 2nd half of the window",
        )
    timebox = results["overload"]["systems"].get("timebox", {})
    left = {
        int(k.rstrip("x")): r.get("second_half_cpu_left_for_slots_pct") for k, r in timebox.items()
    }
    if left and all(v is not None for v in left.values()):
        ax.plot(
            list(left),
            list(left.values()),
            marker="_",
            markersize=14,
            linestyle="none",
            color="black",
            label="timebox, CPU left for the slots in the 2nd half",
        )
    ax.axhline(90, color="grey", linestyle=":", linewidth=1, label="target: 90 %")
    ax.set_xlabel("offered load (x capacity)")
    ax.set_ylabel("goodput: answers within the deadline (% of capacity)")
    ax.set_xticks([1, 2, 4])
    ax.set_ylim(0, 110)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("Goodput under overload (2 s deadline, 0.2 s tasks, 2 slots)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated sections")
    args = parser.parse_args()
    q = args.quick
    sections = {
        "overload": lambda: overload.run(
            window=3 if q else 15,
            drain=2 if q else 3,
            baseline_loads=(2, 4) if q else overload.MULTIPLES,
        ),
        "mixed": lambda: mixed.run(8 if q else 20, 4 if q else 6, seed=1),
        "latency": lambda: latency.run(200 if q else 2000),
        "tracing": lambda: latency.tracing(200 if q else 1000, 2 if q else 10),
        "throughput": lambda: throughput.run(300 if q else 5000, 1 if q else 10),
        "abort": lambda: abort.run(3 if q else 50),
        "fanout": lambda: fanout.run(1000 if q else 10_000),
        "peer": lambda: peer.run(1 if q else 6, 300 if q else 2000),
        "broker": lambda: broker_cost.run(2 if q else 5, 1 if q else 4, 500 if q else 2000),
    }
    chosen = [s for s in args.only.split(",") if s] or list(sections)
    results: dict[str, Any] = {"mode": "quick" if q else "full", "machine": machine()}
    started = time.time()
    for name in chosen:
        t = time.time()
        results[name] = sections[name]()
        print(f"[{name}: {time.time() - t:.0f} s]", flush=True)
    results["took_s"] = round(time.time() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    stem = f"bench-{results['mode']}"
    path = RESULTS / f"{stem}.json"
    if args.only and path.exists():  # re-running some sections updates them in place
        merged = json.loads(path.read_text())
        merged.update({k: results[k] for k in chosen})
        merged.setdefault("reruns", []).append({"sections": chosen, **results["machine"]})
        results = merged
    path.write_text(json.dumps(results, indent=2))
    if set(sections) <= set(results):
        text = report(results)
        print(text)
        (RESULTS / f"{stem}.txt").write_text(text + "\n")
        plot(results, RESULTS / f"{stem}-goodput.png")
    m = results["machine"]
    print(
        f"\nmachine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, "
        f"RabbitMQ {m['rabbitmq']}; took {results['took_s']} s; results in {RESULTS}/"
    )


if __name__ == "__main__":
    main()
