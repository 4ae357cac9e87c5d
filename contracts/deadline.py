"""The deadline: an absolute wall-clock instant, fixed once at the edge."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Self

from contracts.errors import InvalidTimeout

DEADLINE_HEADER = "x-deadline"
DEADLINE_ISO_HEADER = "x-deadline-iso"


@dataclass(frozen=True, slots=True, order=True)
class Deadline:
    """An absolute instant in epoch milliseconds.

    Made once from a relative timeout (`after`) or decoded from a message header
    (`from_header`); every layer then asks it how much time is left.
    """

    epoch_ms: int

    def __post_init__(self) -> None:
        if not isinstance(self.epoch_ms, int) or isinstance(self.epoch_ms, bool):
            raise InvalidTimeout(
                f"deadline must be integer epoch milliseconds, not {self.epoch_ms!r}"
            )
        if self.epoch_ms <= 0:
            raise InvalidTimeout(f"deadline must be a positive epoch time, not {self.epoch_ms}")

    @classmethod
    def after(cls, seconds: float, *, maximum: float, now: float | None = None) -> Self:
        """The instant `seconds` from now; refuses NaN, infinities, zero, negatives, > maximum."""
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise InvalidTimeout(f"timeout must be a number of seconds, not {seconds!r}")
        if not math.isfinite(seconds):
            raise InvalidTimeout(f"timeout must be a finite number of seconds, not {seconds}")
        if seconds <= 0:
            raise InvalidTimeout(f"timeout must be greater than 0 seconds, not {seconds}")
        if seconds > maximum:
            raise InvalidTimeout(
                f"timeout of {seconds:g} s is over the maximum of {maximum:g} s", maximum=maximum
            )
        start = time.time() if now is None else now
        return cls(math.ceil((start + seconds) * 1000))

    @classmethod
    def from_timeout_header(
        cls, raw: str | None, *, default: float, maximum: float, now: float | None = None
    ) -> Self:
        """Parses a `Request-Timeout` header value (seconds); None means the default."""
        if raw is None:
            return cls.after(default, maximum=maximum, now=now)
        try:
            seconds = float(raw.strip())
        except ValueError:
            raise InvalidTimeout(
                f"Request-Timeout must be a number of seconds, not {raw!r}"
            ) from None
        return cls.after(seconds, maximum=maximum, now=now)

    @classmethod
    def from_header(cls, value: object) -> Self:
        """Decodes the `x-deadline` message header (epoch milliseconds)."""
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise InvalidTimeout(f"x-deadline is not an integer: {value!r}") from None
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidTimeout(f"x-deadline must be epoch milliseconds, not {value!r}")
        return cls(value)

    @property
    def epoch(self) -> float:
        return self.epoch_ms / 1000

    def remaining(self, now: float | None = None) -> float:
        """Seconds left (negative once passed)."""
        return self.epoch - (time.time() if now is None else now)

    def expired(self, margin: float = 0.0, now: float | None = None) -> bool:
        """True when fewer than `margin` seconds are left."""
        return self.remaining(now) <= margin

    def ttl_ms(self, now: float | None = None) -> int:
        """Milliseconds left, at least 1: the per-message `expiration` for RabbitMQ."""
        return max(1, math.floor(self.remaining(now) * 1000))

    def iso(self) -> str:
        return datetime.fromtimestamp(self.epoch, tz=UTC).isoformat(timespec="milliseconds")

    def headers(self) -> dict[str, int | str]:
        return {DEADLINE_HEADER: self.epoch_ms, DEADLINE_ISO_HEADER: self.iso()}
