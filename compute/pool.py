"""Child processes that run tasks: one per slot, plus a warm spare so a slot whose
child was killed is ready again at once."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import os
import signal
from collections import deque
from typing import Any

from compute.forkserver import CannotLoad, Forked, ForkServer
from runtime.background import Background

log = logging.getLogger("timebox.worker.pool")

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROTOCOL_LIMIT = 256 * 1024 * 1024  # one result line may be large (process_text)
# how long a SIGKILLed child's exit report may take before the child counts as dead
# without it: a slot must not wait forever on a fork server that does not answer
REPORT_WITHIN = 5.0
# how long a new child may take to say `ready` (a fork takes milliseconds) before a
# fork server that has loaded the task code counts as hung and is replaced
READY_WITHIN = 10.0
TICK_EVERY = 1.0  # seconds between the worker's word to its fork server that it lives


class NotReady(RuntimeError):
    """A new child did not say `ready` in time."""


def cpu_seconds_of(pid: int) -> float | None:
    """User + system CPU seconds of a live or zombie process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Child:
    def __init__(self, proc: Forked) -> None:
        self.proc = proc
        self.broken = False
        # the CPU seconds it said it had used in its last answer: what a task it runs
        # next started from, read without a trip to /proc per task
        self.used = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def spawn(cls, server: ForkServer, ready_within: float = READY_WITHIN) -> Child:
        child = cls(await server.fork())
        try:
            try:
                async with asyncio.timeout(ready_within):
                    hello = await child.receive()
            except TimeoutError:
                raise NotReady(f"no task process ready within {ready_within} s") from None
            if hello is None or hello.get("kind") != "ready":
                raise RuntimeError(f"task child process did not start: {hello!r}")
        except BaseException:
            child.proc.close()
            raise
        child.proc.pid = int(hello["pid"])
        return child

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self.broken

    def discard(self) -> None:
        """Kills the child at once; the pool replaces it when it is released."""
        self.broken = True
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    def cpu(self) -> float:
        if self.proc.cpu_at_exit is not None:
            return self.proc.cpu_at_exit
        return cpu_seconds_of(self.pid) or 0.0

    async def send(self, request: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request, separators=(",", ":")).encode() + b"\n")
        await self.proc.stdin.drain()

    async def receive(self) -> dict[str, Any] | None:
        """The next protocol message; None when the child has died."""
        assert self.proc.stdout is not None
        try:
            line = await self.proc.stdout.readline()
        except (ValueError, ConnectionError):
            return None
        if not line:
            return None
        message: dict[str, Any] = json.loads(line)
        used = message.get("used")
        if isinstance(used, int | float):
            self.used = float(used)
        return message

    async def stop(
        self, grace: float, report_within: float = REPORT_WITHIN
    ) -> tuple[float, list[dict[str, Any]]]:
        """SIGTERM, then SIGKILL after `grace`. Returns the CPU seconds it had used, and
        what it had said that was not read yet (a result among it is what it did)."""
        cpu = self.cpu()
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                cpu = self.cpu()
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                try:
                    await asyncio.wait_for(self.proc.wait(), report_within)
                except TimeoutError:
                    self.broken = True
                    log.error(
                        "no exit report for task process %d %.1f s after SIGKILL; "
                        "counting it as dead",
                        self.pid,
                        report_within,
                    )
        unread = await self._unread() if not self.broken else []
        self.proc.close()
        # the fork server reaps it and reports all it used, the grace included
        return max(cpu, self.proc.cpu_at_exit or 0.0), unread

    async def _unread(self, within: float = 0.5) -> list[dict[str, Any]]:
        """What a child that has ended wrote and nobody read: up to the pipe's end."""
        said: list[dict[str, Any]] = []
        with contextlib.suppress(TimeoutError, json.JSONDecodeError):
            async with asyncio.timeout(within):
                while (message := await self.receive()) is not None:
                    said.append(message)
        return said


class Pool:
    """`size` idle-or-busy children and one warm spare."""

    def __init__(
        self,
        size: int,
        modules: list[str],
        *,
        nice: int = 0,
        app_dir: str = ".",
        silence: float = 10.0,
        ready_within: float = READY_WITHIN,
    ) -> None:
        """`silence`: how long the worker may say nothing before the fork server
        takes it for frozen and kills its tasks (compute/forkserver.py)."""
        self.size = size
        self.nice = nice
        self.ready_within = ready_within
        self._server_args = (nice, PROTOCOL_LIMIT, modules, app_dir, silence)
        self.server = ForkServer(*self._server_args)
        self.tasks: dict[str, dict[str, Any]] = {}  # what the fork server loaded
        self._restarting = asyncio.Lock()
        self._idle: deque[Child] = deque()
        self._spare: asyncio.Task[Child] | None = None
        self._all: set[Child] = set()
        # callers of acquire() not yet given a child, the most urgent first:
        # (urgency, arrival, future)
        self._waiters: list[tuple[float, int, asyncio.Future[Child]]] = []
        self._arrivals = itertools.count()
        self._replacing = Background()
        self._ticking = Background()

    async def start(self) -> None:
        """Loads the task modules in the fork server (CannotLoad if they do not
        import), then forks the children."""
        await self.server.start()
        assert self.server.loaded is not None
        report = await self.server.loaded
        if report is None:
            await self.server.close()
            raise CannotLoad(self.server.load_error)
        self.tasks = report
        self._ticking.spawn(self._keep_ticking())
        self._spare = asyncio.create_task(self._spawn())
        children = await asyncio.gather(*(self._spawn() for _ in range(self.size)))
        for child in children:
            self._all.add(child)
            self._idle.append(child)
        await asyncio.wait([self._spare])  # the first kill is replaced at once too

    async def _spawn(self) -> Child:
        failures = 0
        while True:
            async with self._restarting:  # one restart, however many spawns notice
                if not self.server.alive:  # it died, and its children with it
                    log.error("the fork server died; starting a new one")
                    await self.server.close()
                    self.server = ForkServer(*self._server_args)
                    await self.server.start()
            server = self.server
            try:
                return await Child.spawn(server, self.ready_within)
            except NotReady:
                async with self._restarting:
                    if server is not self.server or not server.alive:
                        continue  # replaced meanwhile
                    if not server.up:  # still importing the task code: slow, not hung
                        log.warning(
                            "the fork server is still loading the task code (%.1f s more)",
                            self.ready_within,
                        )
                        continue
                    # A hung fork server would leave the slot empty for good; a new one
                    # costs the tasks running in its children (they end as crashed).
                    log.error(
                        "the fork server forked no task process within %.1f s; "
                        "killing it and starting a new one",
                        self.ready_within,
                    )
                    await server.close(grace=0.0)
                    failure: Exception = NotReady("the fork server hung")
            except (RuntimeError, OSError) as exc:
                log.warning("a task process did not start (%r); retrying", exc)
                failure = exc
            failures += 1
            if failures >= 5:
                raise RuntimeError("cannot start task processes") from failure
            await asyncio.sleep(0.05 * failures)

    async def _keep_ticking(self) -> None:
        """Tells the fork server, every second, that this worker's loop turns."""
        while True:
            self.server.tick()
            await asyncio.sleep(TICK_EVERY)

    async def acquire(self, urgency: float = 0.0) -> Child:
        """A free child; while none is, callers wait, and the lowest `urgency` (a task's
        stop time: the earliest deadline) gets the next one, the first come among
        equals."""
        while True:
            child = self.try_acquire()
            if child is None:
                waiter = asyncio.get_running_loop().create_future()
                heapq.heappush(self._waiters, (urgency, next(self._arrivals), waiter))
                try:
                    child = await waiter
                except asyncio.CancelledError:
                    if waiter.done() and not waiter.cancelled():
                        self._free(waiter.result())  # given one, then cancelled
                    raise
            if self._usable(child):
                return child

    def try_acquire(self) -> Child | None:
        """An idle child at once, unless there is none or others wait for one first."""
        while self._waiters and self._waiters[0][2].done():  # cancelled waiters
            heapq.heappop(self._waiters)
        if self._waiters:
            return None
        while self._idle:
            child = self._idle.popleft()
            if self._usable(child):
                return child
        return None

    def _free(self, child: Child) -> None:
        """An idle child: to the most urgent waiter, or among the idle ones."""
        while self._waiters:
            _, _, waiter = heapq.heappop(self._waiters)
            if not waiter.done():
                waiter.set_result(child)
                return
        self._idle.append(child)

    def _usable(self, child: Child) -> bool:
        """Whether an idle child is alive; one that died idle (with its fork server, say)
        goes to be replaced: a task given to it would fail as crashed without running."""
        if not child.alive:
            self.release(child)
        return child.alive

    def release(self, child: Child) -> None:
        if child.alive:
            self._free(child)
        else:
            self._replacing.spawn(self.replace(child))

    async def replace(self, dead: Child) -> None:
        """Puts the warm spare in the dead child's place and warms a new spare."""
        self._all.discard(dead)
        dead.proc.close()
        spare = self._spare
        self._spare = asyncio.create_task(self._spawn())
        try:
            child = await spare if spare is not None else await self._spawn()
        except Exception:
            child = await self._spawn()
        if not child.alive:  # the spare died meanwhile (with the fork server, say)
            child.proc.close()
            child = await self._spawn()
        self._all.add(child)
        self._free(child)

    def pids(self) -> list[int]:
        pids = [c.pid for c in self._all]
        if self.server.pid is not None:
            pids.append(self.server.pid)
        if self._spare is not None and self._spare.done() and not self._spare.exception():
            pids.append(self._spare.result().pid)
        return pids

    async def close(self, grace: float = 0.5) -> None:
        await self._ticking.cancel()
        await self._replacing.cancel()
        spare = self._spare
        if spare is not None:
            spare.cancel()
            with contextlib.suppress(BaseException):
                self._all.add(await spare)
        await asyncio.gather(*(c.stop(grace) for c in self._all), return_exceptions=True)
        self._all.clear()
        await self.server.close()
