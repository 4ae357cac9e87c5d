"""A child process that runs task functions, one at a time, for its worker. It is
forked by the worker's fork server (compute/forkserver.py) with the task code loaded.

Protocol: the worker writes one JSON request a line on our stdin; we answer on a
private copy of the original stdout with JSON lines: `ready` once, then for each
request any number of `progress` and one `result` (with `at` and `ran`: when it
ended and how long it ran).
`ready` and every `result` carry `used`, the CPU seconds this process has used so
far: the worker's baseline for the next task's CPU, should it have to kill it. The
task's own prints go to stderr so they cannot corrupt the protocol.

While a task runs, a timer in the kernel is armed to SIGKILL this process at the
request's `kill_at` (its stop time and the kill grace): the worker stops it first as a
rule, but a worker that is frozen, or a task in a C call, cannot keep it from firing.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
import time
import traceback
from types import FrameType
from typing import IO, Any, NoReturn

from pydantic import ValidationError

from contracts.context import PROGRESS_INTERVAL, TaskContext
from contracts.deadline import Deadline
from contracts.tasks import Task, load_tasks
from runtime import tracing
from runtime.logs import configure_logging

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
CLOCK_REALTIME = 0
TIMER_ABSTIME = 1
SIGEV_SIGNAL = 0

_tasks: dict[str, Task[..., Any]] = {}


def die_with_parent(parent: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Asks the kernel to send us `sig` when our parent dies, so no task outlives it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: stdin EOF still ends us when idle
        pass
    if os.getppid() != parent:
        os._exit(1)  # the parent died before prctl took effect


def become_subreaper() -> None:
    """Makes the processes our children start and leave behind ours when they are
    orphaned, not init's: reaped here, their CPU counted with ours."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


class _SigEvent(ctypes.Structure):
    _fields_ = (
        ("sigev_value", ctypes.c_void_p),
        ("sigev_signo", ctypes.c_int),
        ("sigev_notify", ctypes.c_int),
        ("_pad", ctypes.c_int * 12),  # the rest of glibc's 64 bytes
    )


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _ITimerSpec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


class KillTimer:
    """A POSIX timer that SIGKILLs this process at a wall-clock instant: the kernel
    delivers it, whatever the process is doing, with no Python code to run."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        event = _SigEvent(sigev_signo=signal.SIGKILL, sigev_notify=SIGEV_SIGNAL)
        self._timer = ctypes.c_void_p()
        if self._libc.timer_create(CLOCK_REALTIME, ctypes.byref(event), ctypes.byref(self._timer)):
            raise OSError(ctypes.get_errno(), "timer_create")

    def arm(self, at: float) -> None:
        """Fires at `at` (epoch seconds); 0 disarms it."""
        seconds = int(at)
        value = _Timespec(seconds, int((at - seconds) * 1e9))
        spec = _ITimerSpec(it_value=value)
        if self._libc.timer_settime(self._timer, TIMER_ABSTIME, ctypes.byref(spec), None):
            raise OSError(ctypes.get_errno(), "timer_settime")

    def disarm(self) -> None:
        self.arm(0.0)


class Terminated(BaseException):
    """Raised in task code by SIGTERM, so its `finally` blocks run before we exit."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def _write(out: IO[str], message: dict[str, Any]) -> None:
    out.write(json.dumps(message, separators=(",", ":")) + "\n")
    out.flush()


def _run(request: dict[str, Any], out: IO[str], timer: KillTimer) -> dict[str, Any]:
    name = request["task"]
    task = _tasks.get(name)
    if task is None:
        error = {"type": "UnknownTaskType", "message": f"no task named {name!r} here"}
        return {"kind": "result", "ok": False, "invalid": True, "error": error}
    try:
        task_input = task.input_model.model_validate_json(request["input_json"])
    except ValidationError as exc:
        error = {"type": "ValidationError", "message": str(exc)}
        return {"kind": "result", "ok": False, "invalid": True, "error": error}

    def sink(fraction: float, message: str | None) -> None:
        _write(out, {"kind": "progress", "fraction": fraction, "message": message})

    ctx = TaskContext(
        request["id"],
        Deadline(int(request["deadline_ms"])),
        sink,
        min_interval=float(request.get("progress_interval", PROGRESS_INTERVAL)),
    )
    cpu0, start = time.process_time(), time.time()

    def result(ok: bool, **rest: Any) -> dict[str, Any]:
        # when it ended and how long it ran, as measured here: a worker that reads it
        # late (frozen, busy) neither misjudges it nor learns a longer run time
        now = time.time()
        cpu = time.process_time() - cpu0
        return {"kind": "result", "ok": ok, "cpu": cpu, "at": now, "ran": now - start, **rest}

    timer.arm(float(request.get("kill_at", 0.0)))  # 0: none (a caller that sets no stop)
    # the task's own spans, if it opens any, are children of this one
    with tracing.task_span(
        f"timebox.task {name}",
        name,
        request["id"],
        ctx.deadline,
        context=tracing.extract(request.get("trace")),
    ) as span:
        try:
            output = task.run(task_input, ctx)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            tracing.mark(span, "failed", f"{type(exc).__name__}: {exc}")
            error = {"type": type(exc).__name__, "message": str(exc)}
            return result(False, error=error, retried=task.retried(exc))
        finally:
            timer.disarm()
    return result(True, output=output)


def load(modules: list[str]) -> dict[str, Task[..., Any]]:
    """Imports the task modules (the fork server does it once, for every child)."""
    _tasks.update(load_tasks(modules))
    return _tasks


def serve(parent: int) -> NoReturn:
    """The life of one child, forked by the fork server (`parent`) with the request
    pipe on stdin and the answer pipe on stdout. Never returns."""
    try:
        die_with_parent(parent)
        out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        signal.signal(signal.SIGTERM, _on_sigterm)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the worker, which decides
        timer = KillTimer()  # not inherited across the fork: each child makes its own
        configure_logging(os.environ.get("TIMEBOX_LOG_FORMAT", "text"))  # the tasks' logs
        tracing.configure("timebox-worker")  # each child its own exporter (threads and fork)
        _write(out, {"kind": "ready", "pid": os.getpid(), "used": time.process_time()})
        for line in sys.stdin:
            try:
                request = json.loads(line)
            except json.JSONDecodeError as exc:
                error = {"type": "ProtocolError", "message": str(exc)}
                answer: dict[str, Any] = {"kind": "result", "ok": False, "error": error}
            else:
                answer = _run(request, out, timer)
            _write(out, answer | {"used": time.process_time()})
            tracing.flush()  # its spans out before a kill in a later task could lose them
    except Terminated:
        os._exit(143)
    except BrokenPipeError:  # the worker closed our pipes (its pool closing): nobody to tell
        os._exit(1)
    except BaseException:
        traceback.print_exc(file=sys.stderr)
        os._exit(1)
    os._exit(0)
