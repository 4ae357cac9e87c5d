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
