"""The fork server: one process that imports the task code once, then forks a child
for each slot the worker fills, so that replacing a child killed at its deadline costs
a fork (milliseconds), not an interpreter's start and imports.

The worker talks to it over a Unix socket (SOCK_SEQPACKET: one message per send):
`fork` carries the child's two pipe ends as file descriptors; the server answers
nothing to it (the child says `ready` on its pipe). It sends `up <json>` once it has
loaded the task modules (each task type's queue, digest, maximum timeout and retries: the worker
itself never imports them), or `error <text>` if they do not load, and
`exit <pid> <code> <cpu seconds> <epoch seconds> <silenced>` whenever it reaps a
child. The worker sends `tick` every second: a worker that says nothing for
`silence` seconds (frozen: stopped, or its loop stuck) has its children killed
(`silenced` 1 in their reports), before RabbitMQ, which gives up on it only after
about two heartbeats, hands their messages to another worker. It
ends with the worker (PR_SET_PDEATHSIG, even a SIGKILLed one), and its children and
what they started end with it, so none outlives the worker.

Each child leads a process group of its own, so that what its task starts (an
external program, a multiprocessing pool) is signalled with it; when a child ends,
the rest of its group is killed before it is reaped. A program that leaves the group
(a daemon's `setsid`, `start_new_session=True`) is found by the mark in its
environment, which every program a child's tasks start inherits, and killed once
the child has ended. The server is a child subreaper: such processes, orphaned, are
reaped here. (Only a cgroup would hold a program that also drops its environment.)

`python -m compute.forkserver FD NICE SILENCE APP_DIR MODULE...` runs the server on
socket FD."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from types import FrameType
from typing import Any, NoReturn

from compute import child

FORK = b"fork"
TICK = b"tick"
EXIT = b"exit"
UP = b"up"
ERROR = b"error"
MESSAGE_SIZE = 1 << 16
TASK_MARK = "TIMEBOX_TASK_PROCESS"  # =<the child's pid>, in what its tasks start


def _marked(marks: set[bytes]) -> list[int]:
    """The live processes with one of `marks` in their environment (a zombie's reads
    empty)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read()
        except OSError:  # ended meanwhile, or not ours to read
            continue
        if not marks.isdisjoint(environ.split(b"\0")):
            found.append(int(name))
    return found


def kill_started_by(children: set[int]) -> None:
    """SIGKILLs what the tasks of `children` (ended) started and left the children's
    process groups; again until none is found, so that one that forked meanwhile is
    killed too."""
    if not children or not os.path.isdir("/proc"):
        return
    marks = {b"%s=%d" % (TASK_MARK.encode(), pid) for pid in children}
    for _ in range(10):
        found = _marked(marks)
        if not found:
            return
        for pid in found:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


# -- the server process ---------------------------------------------------------------


def serve(sock: socket.socket, nice: int, silence: float, app_dir: str, modules: list[str]) -> None:
    forked: set[int] = set()
    silenced: set[int] = set()  # killed because the worker said nothing

    def end() -> NoReturn:
        # each child would die with us (its own PR_SET_PDEATHSIG), but what its task
        # started would live on, orphaned to init once no subreaper is left. No reap
        # may run meanwhile: it would take a child out of `forked` under the loop (a
        # RuntimeError that skipped the rest, seen in CI) or before its programs died
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, signal.SIGTERM})
        for pid in forked:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
        kill_started_by(forked)
        os._exit(0)

    signal.signal(signal.SIGTERM, lambda signum, frame: end())  # the worker died
    worker = os.getppid()
    child.die_with_parent(worker, signal.SIGTERM)
    os.nice(nice)  # inherited by every child
    sys.path.insert(0, app_dir)
    try:
        tasks = child.load(modules)
    except BaseException:
        with contextlib.suppress(OSError):
            sock.send(ERROR + b" " + traceback.format_exc()[-MESSAGE_SIZE + 16 :].encode())
        os._exit(1)
    me = os.getpid()
    report = {
        name: {
            "queue": t.queue,
            "digest": t.digest,
            "max_timeout": t.max_timeout,
            "retries": t.retries,
            "backoff": t.backoff,
        }
        for name, t in tasks.items()
    }
    with contextlib.suppress(OSError):  # the worker is gone: recv below says so
        sock.send(UP + b" " + json.dumps(report).encode())

    child.become_subreaper()  # what a task starts and leaves behind is reaped here

    def reap(signum: int, frame: FrameType | None) -> None:
        # Python runs a handler between any two bytecodes, this one's included: a
        # SIGCHLD during it would reap the child it looks at under its feet. Held back
        # until it is done, it runs the handler again, so none is missed. So is a
        # SIGTERM: `end` would miss the programs of a child taken out of `forked`.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, signal.SIGTERM})
        try:
            while _reap_one():
                pass
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def _reap_one() -> bool:
        try:  # WNOWAIT: the exited child stays a zombie, holding its pid for now
            found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        if found is None:
            return False
        pid = found.si_pid
        if pid in forked:
            # the processes its task started die with it; the zombie keeps the
            # group's id from being anyone else's
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
        try:
            _, status, usage = os.wait4(pid, 0)
        except ChildProcessError:
            return True
        if pid not in forked:
            return True  # a task's own process, orphaned: its CPU counts here
        forked.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        cpu = usage.ru_utime + usage.ru_stime
        report = b"%s %d %d %.6f %.6f %d" % (EXIT, pid, code, cpu, time.time(), pid in silenced)
        silenced.discard(pid)
        with contextlib.suppress(OSError):
            sock.send(report)
        kill_started_by({pid})  # after the report: the worker's slot need not wait
        return True

    signal.signal(signal.SIGCHLD, reap)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock.settimeout(1.0)
    heard = time.monotonic()
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, 64, 2)
        except TimeoutError:
            if time.monotonic() - heard > silence and not silenced.issuperset(forked):
                print(
                    f"timebox-forkserver: its worker has said nothing for {silence:g} s: "
                    "its tasks are stopped, and their messages go back to the queue",
                    file=sys.stderr,
                    flush=True,
                )
                silenced.update(forked)
                for pid in forked:
                    with contextlib.suppress(OSError):
                        os.killpg(pid, signal.SIGKILL)
            continue
        heard = time.monotonic()
        if not message:
            end()  # the worker closed its end
        if message != FORK or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            continue
        # a child that ends at once is reaped only once it is known as ours; nor may
        # the child run the server's SIGTERM handler, which kills its siblings
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, signal.SIGTERM})
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # child.serve sets its own
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD, signal.SIGTERM})
            # a group of its own: a kill reaches whatever its task started as well
            os.setpgid(0, 0)
            os.environ[TASK_MARK] = str(os.getpid())
            sock.close()
            os.dup2(fds[0], 0)
            os.dup2(fds[1], 1)
            for fd in fds:
                os.close(fd)
            child.serve(me)
        forked.add(pid)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD, signal.SIGTERM})
        for fd in fds:
            os.close(fd)


# -- the worker's side ------------------------------------------------------------------


@dataclass(frozen=True)
class Exit:
    """How a child ended, as the fork server reports it."""

    code: int
    cpu: float | None = None  # all it used, the grace after SIGTERM included
    at: float | None = None  # epoch seconds
    silenced: bool = False  # killed because its worker said nothing for too long


GONE = Exit(-signal.SIGKILL)  # died with its fork server: nothing more is known


class Forked:
    """A forked child as the worker sees it: the subset of asyncio's Process that
    compute/pool.py uses. Its pid comes from its `ready` line."""

    def __init__(
        self,
        server: ForkServer,
        stdin: asyncio.StreamWriter,
        stdout: asyncio.StreamReader,
        stdout_transport: asyncio.BaseTransport,
    ) -> None:
        self.server = server
        self.stdin = stdin
        self.stdout = stdout
        self._stdout_transport = stdout_transport
        self.pid = 0
        self.exit: Exit | None = None

    @property
    def returncode(self) -> int | None:
        if self.exit is None and self.pid:
            self.exit = self.server.exit_if_known(self.pid)
        return None if self.exit is None else self.exit.code

    @property
    def cpu_at_exit(self) -> float | None:
        return None if self.exit is None else self.exit.cpu

    def send_signal(self, sig: int) -> None:
        """Signals the child and every process its task started (its process group)."""
        if self.returncode is not None or not self.pid:
            raise ProcessLookupError(self.pid)  # reaped: the pid may be someone else's now
        os.killpg(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> Exit:
        if self.returncode is None:
            self.exit = await self.server.exit_of(self.pid)
        assert self.exit is not None
        return self.exit

    def close(self) -> None:
        """Closes our ends of its pipes (a live child reads EOF and ends)."""
        self.stdin.close()
        self._stdout_transport.close()


class CannotLoad(RuntimeError):
    """The task modules did not import: the text is the fork server's traceback."""


class ForkServer:
    """One server process, used until it dies; its children are known by pid."""

    def __init__(
        self,
        nice: int,
        protocol_limit: int,
        modules: list[str],
        app_dir: str = ".",
        silence: float = 10.0,
    ) -> None:
        self.nice = nice
        self.silence = silence
        self.limit = protocol_limit
        self.modules = modules
        self.app_dir = os.path.abspath(app_dir)
        self._sock: socket.socket | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._exits: dict[int, asyncio.Future[Exit]] = {}
        self.up = False  # it has loaded the task code: forks from now on take milliseconds
        # each task type's digest and max_timeout once loaded; None if they did not load
        self.loaded: asyncio.Future[dict[str, dict[str, Any]] | None] | None = None
        self.load_error = "the fork server ended before it loaded the task modules"

    @property
    def alive(self) -> bool:
        return self._sock is not None and self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "compute.forkserver",
                str(theirs.fileno()),
                str(self.nice),
                str(self.silence),
                self.app_dir,
                *self.modules,
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
            )
        ours.setblocking(False)
        self._sock = ours
        self.loaded = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(ours.fileno(), self._on_message)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _on_message(self) -> None:
        assert self._sock is not None
        try:
            message = self._sock.recv(MESSAGE_SIZE)
        except BlockingIOError:
            return
        except OSError:
            message = b""
        if not message:  # the server died, and its children with it
            self._lost()
            return
        kind, _, rest = message.partition(b" ")
        if kind in (UP, ERROR):
            if kind == UP:
                self.up = True
            else:
                self.load_error = rest.decode(errors="replace")
            if self.loaded is not None and not self.loaded.done():
                self.loaded.set_result(json.loads(rest) if kind == UP else None)
            return
        if kind == EXIT:
            pid, code, cpu, at, silenced = rest.split()
            future = self._future(int(pid))
            if not future.done():
                future.set_result(Exit(int(code), float(cpu), float(at), silenced == b"1"))

    def _lost(self) -> None:
        if self.loaded is not None and not self.loaded.done():
            self.loaded.set_result(None)
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for future in self._exits.values():
            if not future.done():
                future.set_result(GONE)

    def tick(self) -> None:
        """Tells the server that the worker lives (its loop turns)."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.send(TICK)

    def _future(self, pid: int) -> asyncio.Future[Exit]:
        future = self._exits.get(pid)
        if future is None:
            future = self._exits[pid] = asyncio.get_running_loop().create_future()
            if self._sock is None:
                future.set_result(GONE)
        return future

    def exit_if_known(self, pid: int) -> Exit | None:
        future = self._exits.get(pid)
        if future is None and self._sock is None:
            return GONE  # died with the server
        return future.result() if future is not None and future.done() else None

    async def exit_of(self, pid: int) -> Exit:
        # Forgotten only once returned: a wait cancelled in the loop turn in which the
        # report came (a kill's grace running out just then) must leave it for the next
        # wait, which would otherwise never end.
        reported = await asyncio.shield(self._future(pid))
        self._exits.pop(pid, None)
        return reported

    async def fork(self) -> Forked:
        """A new child's pipes; the caller reads its `ready` line (and pid) first."""
        if self._sock is None:
            raise ConnectionError("the fork server is gone")
        loop = asyncio.get_running_loop()
        child_in, to_child = os.pipe()
        from_child, child_out = os.pipe()
        try:
            socket.send_fds(self._sock, [FORK], [child_in, child_out])
        finally:
            os.close(child_in)
            os.close(child_out)
        reader = asyncio.StreamReader(limit=self.limit)
        from_file, to_file = os.fdopen(from_child, "rb", 0), os.fdopen(to_child, "wb", 0)
        read_transport: asyncio.BaseTransport | None = None
        try:
            read_transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), from_file
            )
            transport, protocol = await loop.connect_write_pipe(
                asyncio.streams.FlowControlMixin, to_file
            )
        except BaseException:  # cancelled (a pool closing) or failed: no pipe stays open
            if read_transport is not None:
                read_transport.close()
            from_file.close()
            to_file.close()
            raise
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
        return Forked(self, writer, reader, read_transport)

    async def close(self, grace: float = 5.0) -> None:
        """Ends the server (and so its children): it exits on our end's EOF, or is
        killed after `grace` seconds."""
        if self._sock is not None:
            self._lost()  # closing our end ends the server
        if self._proc is not None:
            try:
                await asyncio.wait_for(self._proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()
                await self._proc.wait()
            self._proc = None


if __name__ == "__main__":
    serve(
        socket.socket(fileno=int(sys.argv[1])),
        int(sys.argv[2]),
        float(sys.argv[3]),
        sys.argv[4],
        sys.argv[5:],
    )
