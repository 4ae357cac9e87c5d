import math

import pytest

from contracts.deadline import DEADLINE_HEADER, DEADLINE_ISO_HEADER, Deadline
from contracts.errors import InvalidTimeout

NOW = 1_700_000_000.0


def test_a_deadline_is_fixed_once_as_an_absolute_instant() -> None:
    deadline = Deadline.after(2.5, maximum=60, now=NOW)
    assert deadline.epoch_ms == 1_700_000_002_500
    assert deadline.remaining(now=NOW + 1) == pytest.approx(1.5)
    assert not deadline.expired(now=NOW + 2.4)
    assert deadline.expired(now=NOW + 2.5)
    assert deadline.expired(margin=0.2, now=NOW + 2.4)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 0, -1, 0.0, 61, True, "5"])
def test_bad_timeouts_are_refused_when_the_deadline_is_made(bad: object) -> None:
    with pytest.raises(InvalidTimeout):
        Deadline.after(bad, maximum=60, now=NOW)  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", ["nan", "inf", "-3", "0", "abc", "", "1e9"])
def test_bad_request_timeout_headers_are_refused(raw: str) -> None:
    with pytest.raises(InvalidTimeout):
        Deadline.from_timeout_header(raw, default=60, maximum=600, now=NOW)


def test_a_missing_request_timeout_means_the_default() -> None:
    deadline = Deadline.from_timeout_header(None, default=60, maximum=600, now=NOW)
    assert deadline.remaining(now=NOW) == pytest.approx(60)
    assert Deadline.from_timeout_header(" 1.5 ", default=60, maximum=600, now=NOW).remaining(
        now=NOW
    ) == pytest.approx(1.5)


def test_ttl_is_the_milliseconds_left_and_never_zero() -> None:
    deadline = Deadline.after(2, maximum=60, now=NOW)
    assert deadline.ttl_ms(now=NOW) == 2000
    assert deadline.ttl_ms(now=NOW + 5) == 1


def test_headers_round_trip() -> None:
    deadline = Deadline.after(3, maximum=60, now=NOW)
    headers = deadline.headers()
    assert Deadline.from_header(headers[DEADLINE_HEADER]) == deadline
    assert Deadline.from_header(str(headers[DEADLINE_HEADER]).encode()) == deadline
    assert headers[DEADLINE_ISO_HEADER] == "2023-11-14T22:13:23.000+00:00"


@pytest.mark.parametrize("bad", [None, "soon", 1.5, -5, b"x", True])
def test_undecodable_deadline_headers_are_refused(bad: object) -> None:
    with pytest.raises(InvalidTimeout):
        Deadline.from_header(bad)
