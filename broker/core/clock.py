"""The wall clock: code takes a `now` callable (a Clock), and tests pass their own."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]
"""Returns the current time, timezone-aware in UTC."""


def utc_now() -> datetime:
    """The current time in UTC: the default clock."""
    return datetime.now(UTC)
