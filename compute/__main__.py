"""`timebox-worker` / `python -m compute`: one worker with N child processes."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Coroutine
from typing import Any

import prometheus_client
from pydantic import ValidationError

from compute.settings import WorkerSettings
from compute.worker import CannotStart, Worker
from contracts.logs import configure_logging


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="timebox-worker", description=__doc__)
    parser.add_argument(
        "--concurrency", type=int, default=None, help="child processes (default: cores)"
    )
    parser.add_argument("--burst", action="store_true", help="drain the queues, then exit")
    parser.add_argument("--tasks", default=None, help="comma-separated task types (default: all)")
    parser.add_argument("--metrics-port", type=int, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    overrides = {
        k: v
        for k, v in {"concurrency": args.concurrency, "metrics_port": args.metrics_port}.items()
        if v is not None
    }
    try:
        settings = WorkerSettings(**overrides)
    except ValidationError as exc:
        sys.exit(f"timebox-worker: invalid settings:\n{exc}")
    tasks = None
    if args.tasks:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        known = settings.specs()
        unknown = sorted(set(tasks) - set(known))
        if unknown:
            sys.exit(f"timebox-worker: unknown task types {unknown}; known: {sorted(known)}")
    configure_logging(settings.log_format)
    try:
        run(_serve(Worker(settings, burst=args.burst, tasks=tasks)))
    except CannotStart as exc:
        sys.exit(f"timebox-worker: cannot start: {exc}")


def run(main: Coroutine[Any, Any, None]) -> None:
    """On uvloop where there is one: the worker writes to the broker and to its
    children's pipes several times per task, and each write and wake-up costs less
    CPU there (`python -m bench` measures the worker's overhead per task)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


async def _serve(worker: Worker) -> None:
    if worker.settings.metrics_port is not None:
        prometheus_client.start_http_server(
            worker.settings.metrics_port, addr=worker.settings.metrics_host
        )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop, sig)
    await worker.run()


if __name__ == "__main__":
    main()
