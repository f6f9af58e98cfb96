"""Ids are opaque strings on the wire and UUIDs inside."""

from __future__ import annotations

import uuid

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
