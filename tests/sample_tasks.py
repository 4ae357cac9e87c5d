"""Test-only task types, served beside the demo tasks (TIMEBOX_TASK_MODULES)."""

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from opentelemetry import trace

import timebox


@timebox.task
def explode(message: str = "boom") -> None:
    """Raises ValueError(message)."""
    raise ValueError(message)


@timebox.task
def crash(how: str = "kill") -> None:
    """Kills its own process: `kill`, `segfault` or `exit`."""
    if how == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif how == "exit":
        os._exit(3)
    os.kill(os.getpid(), signal.SIGKILL)


@timebox.task
def kill_parent() -> None:
    """Kills the worker that runs it (its parent is the worker's fork server): a poison
    message."""
    with open(f"/proc/{os.getppid()}/stat") as f:
        worker = int(f.read().rsplit(")", 1)[1].split()[1])
    os.kill(worker, signal.SIGKILL)


@timebox.task
def nap(seconds: float) -> None:
    """Sleeps: a run time of the caller's choosing that no cost hint predicts."""
    time.sleep(seconds)


@timebox.task
def chatty(ctx: timebox.TaskContext, events: int = 100, size: int = 1000) -> None:
    """Sends many large progress events, unthrottled."""
    filler = "x" * size
    for i in range(events):
        ctx._sink(i / events, filler)


@timebox.task
def spawn(ctx: timebox.TaskContext, ignore_term: bool = False, new_session: bool = False) -> None:
    """Starts a process that burns CPU and ignores SIGTERM, says its pid, and waits:
    what a task that runs an external program leaves behind when it is killed.
    `ignore_term`: the task itself survives SIGTERM (only SIGKILL ends it);
    `new_session`: the program leaves the task's process group (setsid)."""
    burner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: pass",
        ],
        start_new_session=new_session,
    )
    ctx._sink(0.5, f"pid {burner.pid}")  # at once: progress() holds early reports back
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            time.sleep(0.05)
        except BaseException:
            if not ignore_term:
                raise


@timebox.task
def exclusive(key: str, seconds: float) -> None:
    """Holds the lock named `key` for `seconds`: a second run of it while the first
    lives (on any worker of this machine) fails, saying so."""
    import fcntl
    import tempfile

    with open(os.path.join(tempfile.gettempdir(), f"timebox-exclusive-{key}"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{key} runs twice at once") from None
        time.sleep(seconds)


@timebox.task
def traced(name: str = "inner") -> str:
    """Opens a span of its own inside its run's, and logs a line there."""
    with trace.get_tracer("sample").start_as_current_span(name):
        logging.getLogger("sample").warning("inside %s", name)
    return name


@timebox.task(retries=3, retry_on=(ConnectionError,), backoff=0.05)
def flaky(
    key: str, failures: int = 1, seconds: float = 0.0, fatal: bool = False, crash: bool = False
) -> int:
    """Fails in its first `failures` attempts, after `seconds` of CPU: ConnectionError
    (retried), ValueError if `fatal` (not retried), or its process dies if `crash`.
    Then returns the attempt it succeeded in. Attempts are counted in a file of `key`."""
    path = Path(tempfile.gettempdir()) / f"timebox-flaky-{key}"
    with path.open("a") as counter:
        counter.write("x")
    attempt = len(path.read_text())
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass
    if attempt <= failures:
        if crash:
            os._exit(7)
        if fatal:
            raise ValueError(f"attempt {attempt}: fatal")
        raise ConnectionError(f"attempt {attempt}: the service is away")
    return attempt
