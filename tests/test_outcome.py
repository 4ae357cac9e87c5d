import pytest

from compute.outcome import Disposition, Kind, Outcome, settle
from contracts.events import EventType


@pytest.mark.parametrize(
    ("kind", "event", "disposition"),
    [
        (Kind.SUCCEEDED, EventType.SUCCEEDED, Disposition.ACK),
        (Kind.FAILED, EventType.FAILED, Disposition.ACK),
        (Kind.ABORTED, EventType.ABORTED, Disposition.ACK),
        (Kind.CRASHED, EventType.FAILED, Disposition.ACK),
        (Kind.EXPIRED, EventType.EXPIRED, Disposition.ACK),
        (Kind.CANCELLED, EventType.CANCELLED, Disposition.ACK),
        (Kind.INVALID, EventType.FAILED, Disposition.PARK),
    ],
)
def test_each_outcome_maps_to_one_event_and_one_disposition(
    kind: Kind, event: EventType, disposition: Disposition
) -> None:
    assert settle(Outcome(kind)) == (event, disposition)
    assert event.terminal


def test_every_outcome_kind_is_settled() -> None:
    for kind in Kind:
        settle(Outcome(kind))


def test_remembered_ids_are_forgotten_after_their_deadline() -> None:
    import time

    from compute.cancels import SLACK_MS, Remembered

    now_ms = int(time.time() * 1000)
    seen: Remembered[bool] = Remembered()
    seen.add("old", now_ms - SLACK_MS - 1000, True)
    seen.add("renewed", now_ms - SLACK_MS - 1000, True)
    seen.add("renewed", now_ms + 60_000, True)  # a later deadline replaces the first
    seen.add("fresh", now_ms + 60_000, True)
    assert "old" not in seen
    assert "renewed" in seen
    assert seen.get("fresh") is True
    assert len(seen) == 2
