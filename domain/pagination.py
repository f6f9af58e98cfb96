"""Keyset pagination with opaque cursors.

A cursor only says "after this key"; every query is still filtered by the caller's
organisation, so a tampered cursor can move within one's own data but never outside it.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session

from domain.errors import InvalidInput

T = TypeVar("T")
MAX_LIMIT = 200
DEFAULT_LIMIT = 50


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


def encode_time_cursor(at: datetime, key: uuid.UUID) -> str:
    """A cursor after (a time, an id): lists ordered newest first, ties broken by id."""
    raw = f"{at.astimezone(UTC).isoformat()}|{key}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_time_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, key = raw.split("|")
        parsed = datetime.fromisoformat(at)
        if parsed.tzinfo is None:
            raise ValueError
        return parsed.astimezone(UTC), uuid.UUID(key)
    except (ValueError, UnicodeDecodeError, OverflowError) as exc:
        raise InvalidInput("the pagination cursor is not valid", parameter="cursor") from exc


def encode_cursor(value: Any) -> str:
    raw = json.dumps({"k": str(value)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        value = data["k"]
        if not isinstance(value, str):
            raise ValueError
        return value
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise InvalidInput("the pagination cursor is not valid", parameter="cursor") from exc


def clamp_limit(limit: int | None) -> int:
    if limit is None:
        return DEFAULT_LIMIT
    if limit < 1 or limit > MAX_LIMIT:
        raise InvalidInput(f"limit must be between 1 and {MAX_LIMIT}", parameter="limit")
    return limit


def paginate(
    session: Session,
    stmt: sa.Select[Any],
    key: Any,  # a mapped attribute or a column: the unique sort key
    cursor: str | None,
    limit: int | None,
    *,
    descending: bool = False,
    scalars: bool = True,
) -> Page[Any]:
    """Run `stmt` ordered by the unique `key`, after the cursor's key, one page long."""
    size = clamp_limit(limit)
    if cursor:
        after: Any = decode_cursor(cursor)
        if isinstance(key.type, sa.Uuid):
            try:
                after = uuid.UUID(after)
            except ValueError as exc:
                raise InvalidInput("the pagination cursor is not valid",
                                   parameter="cursor") from exc
        stmt = stmt.where(key < after if descending else key > after)
    stmt = stmt.order_by(key.desc() if descending else key.asc()).limit(size + 1)
    result = session.execute(stmt)
    rows: list[Any] = list(result.scalars() if scalars else result.all())
    next_cursor = None
    if len(rows) > size:
        rows = rows[:size]
        last = rows[-1]
        next_cursor = encode_cursor(_key_of(last, key))
    return Page(items=rows, next_cursor=next_cursor)


def _key_of(row: Any, key: Any) -> Any:
    name = getattr(key, "key", None) or key.name
    if hasattr(row, name):
        return getattr(row, name)
    return row[0] if isinstance(row, tuple) else getattr(row[0], name)
