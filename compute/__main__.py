"""`timebox-worker MODULE...` / `python -m compute MODULE...`: one worker serving the
@timebox.task functions of those modules, with N child processes."""

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
from contracts.tasks import module_names
from runtime import tracing
from runtime.logs import configure_logging


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="timebox-worker", description=__doc__)
    parser.add_argument(
        "modules", nargs="*", metavar="MODULE", help="task modules (default: TIMEBOX_TASK_MODULES)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=None, help="child processes (default: cores)"
    )
    parser.add_argument("--burst", action="store_true", help="drain the queues, then exit")
    parser.add_argument(
        "--queues", default=None, help="comma-separated queues to consume (default: all)"
    )
    parser.add_argument("--metrics-port", type=int, default=None)
    parser.add_argument(
        "--app-dir", default=".", help="where the modules are found first (default: .)"
    )
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
    modules = args.modules or module_names(settings.task_modules)
    if not modules:
        sys.exit(
            "timebox-worker: no task modules: name them (timebox-worker my.tasks) "
            "or set TIMEBOX_TASK_MODULES"
        )
    queues = module_names(args.queues) if args.queues else None
    configure_logging(settings.log_format)
    tracing.configure("timebox-worker")
    worker = Worker(settings, modules, app_dir=args.app_dir, burst=args.burst, queues=queues)
    try:
        run(_serve(worker))
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
