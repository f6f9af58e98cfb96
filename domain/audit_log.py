"""Reading the audit log (admin): filters by actor, action, object and time; newest first,
cursor-paginated by the entry's id."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from domain.errors import InvalidInput
from domain.models import AuditEntry
from domain.pagination import Page, clamp_limit, decode_cursor, encode_cursor


@dataclass(frozen=True)
class AuditFilters:
    #: an organisation id or an API key id: entries by that organisation or through that key
    actor: uuid.UUID | None = None
    #: an exact action (`key.issued`), or a prefix ending in `*` (`key.*`)
    action: str | None = None
    object_type: str | None = None
    object_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def list_audit(session: Session, filters: AuditFilters, cursor: str | None = None,
               limit: int | None = None) -> Page[AuditEntry]:
    size = clamp_limit(limit)
    stmt = sa.select(AuditEntry)
    if filters.actor is not None:
        stmt = stmt.where(sa.or_(AuditEntry.actor_organisation_id == filters.actor,
                                 AuditEntry.actor_key_id == filters.actor))
    if filters.action:
        if filters.action.endswith("*"):
            prefix = filters.action[:-1].replace("\\", "\\\\").replace("%", "\\%") \
                .replace("_", "\\_")
            stmt = stmt.where(AuditEntry.action.like(prefix + "%", escape="\\"))
        else:
            stmt = stmt.where(AuditEntry.action == filters.action)
    if filters.object_type:
        stmt = stmt.where(AuditEntry.object_type == filters.object_type)
    if filters.object_id:
        stmt = stmt.where(AuditEntry.object_id == filters.object_id)
    for value, name in ((filters.since, "since"), (filters.until, "until")):
        if value is not None and value.tzinfo is None:
            raise InvalidInput(f"{name} needs a time zone offset", parameter=name)
    if filters.since is not None:
        stmt = stmt.where(AuditEntry.at >= filters.since)
    if filters.until is not None:
        stmt = stmt.where(AuditEntry.at < filters.until)
    if cursor:
        try:
            after = int(decode_cursor(cursor))
        except ValueError as exc:
            raise InvalidInput("the pagination cursor is not valid",
                               parameter="cursor") from exc
        stmt = stmt.where(AuditEntry.id < after)
    rows = list(session.scalars(stmt.order_by(AuditEntry.id.desc()).limit(size + 1)))
    next_cursor = encode_cursor(rows[size - 1].id) if len(rows) > size else None
    return Page(items=rows[:size], next_cursor=next_cursor)
