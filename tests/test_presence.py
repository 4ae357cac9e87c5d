"""A client's presence, a tied task's second deadline, as a worker judges it: on a fake
clock, with a round trip to the broker that succeeds or not."""

from __future__ import annotations

import asyncio

import pytest

from compute import presence as module
from compute.presence import Presences
from contracts.messages import Presence

GRACE = 1.0


class Clock:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        monkeypatch.setattr(module.time, "time", lambda: self.now)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    return Clock(monkeypatch)


def presences(hearing: list[bool]) -> Presences:
    """Presences whose round trip succeeds while `hearing[0]`."""

    async def probe() -> None:
        if not hearing[0]:
            raise TimeoutError("no confirm")

    return Presences(probe, clock_skew=0.0)


def gone(presences: Presences, task_id: str = "t", until: float = 1001.0) -> bool:
    return asyncio.run(presences.tie(task_id, until, GRACE).gone())


def test_a_tied_task_is_held_to_a_grace_after_the_last_word_of_its_client(clock: Clock) -> None:
    hearing = [True]
    p = presences(hearing)
    clock.now = 1000.9
    assert not gone(p)  # its presence at publish still holds
    clock.now = 1001.1
    assert gone(p)  # nobody said a word of its client
    p.heard(Presence(gateway="g", grace=GRACE, tasks=["t"]))  # a client is back somewhere
    assert not gone(p)
    clock.now = 1002.0
    assert not gone(p)
    clock.now = 1002.2
    assert gone(p)


def test_a_task_answered_202_is_untied(clock: Clock) -> None:
    p = presences([True])
    p.heard(Presence(gateway="g", grace=GRACE, released={"t": 1_000_000_000}))
    clock.now = 5000.0
    assert not gone(p)
    assert p.tie("t", 1001.0, GRACE).lapses_at() == float("inf")


def test_silence_is_not_absence_while_the_worker_cannot_hear(clock: Clock) -> None:
    """A broker alarm holds the gateways' words and the worker's round trip alike: no
    task is taken for abandoned meanwhile, and once it hears again every tied task has
    a grace from then for the next word to come."""
    hearing = [False]
    p = presences(hearing)
    clock.now = 1005.0
    assert not gone(p)  # lapsed long ago, but the worker cannot hear
    assert p.tie("t", 1001.0, GRACE).lapses_at() == pytest.approx(1006.0)  # asks again then
    clock.now = 1010.0
    hearing[0] = True
    assert not gone(p)  # it hears again: a grace from now
    clock.now = 1010.9
    assert not gone(p)
    clock.now = 1011.1
    assert gone(p)


def test_a_worker_just_started_or_reconnected_gives_every_tied_task_a_grace(
    clock: Clock,
) -> None:
    """It cannot have heard what was said before: a task queued long ago whose client
    is still followed somewhere is not taken for abandoned before the next word."""
    clock.now = 2000.0
    p = presences([True])
    assert not gone(p)  # its presence at publish lapsed at 1001
    clock.now = 2001.1
    assert gone(p)
    p.resumed()  # the connection came back: what was said meanwhile was missed
    assert not gone(p)
