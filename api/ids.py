"""Ids are opaque strings on the wire and UUIDs inside."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from domain.errors import InvalidInput, NotFound


def parse_id(value: str, what: str = "object") -> uuid.UUID:
    """An id in a path: anything that is not one of ours simply does not exist (404)."""
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError) as exc:
        raise NotFound(f"{what} not found") from exc


def parse_ref(value: str, field: str) -> uuid.UUID:
    """An id in a body: a malformed one is invalid input (422)."""
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError) as exc:
        raise InvalidInput(f"{field}: {value!r} is not a valid id", field=field) from exc


def in_utc_range(value: datetime) -> bool:
    """An aware instant that is still a valid datetime in UTC (year 1 to 9999): a date such
    as 0001-01-01T00:00+14:00 parses, but cannot be stored or compared."""
    try:
        value.astimezone(UTC)
    except OverflowError:
        return False
    return True
