"""An organisation's inbox, and a publisher's view of its reach.

Restricted updates are shown in lists as a notice; their content is read one at a time
through `read_item`, and every such read is audited.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from domain import audit
from domain.errors import InvalidInput, NotFound
from domain.models import (
    Classification,
    InboxItem,
    Organisation,
    Priority,
    Update,
    UpdateTopic,
)
from domain.pagination import (
    clamp_limit,
    decode_cursor,
    decode_time_cursor,
    encode_cursor,
    encode_time_cursor,
)
from domain.settings import get_settings


@dataclass(frozen=True)
class InboxEntry:
    item: InboxItem
    update: Update


@dataclass(frozen=True)
class InboxFilters:
    unread: bool | None = None
    topic: str | None = None
    priority: Priority | None = None
    needs_ack: bool | None = None
    since: datetime | None = None
    include_expired: bool = False


def list_inbox(session: Session, actor: audit.Actor, filters: InboxFilters,
               cursor: str | None, limit: int | None) -> tuple[list[InboxEntry], str | None]:
    """Newest first (by when the latest version arrived), keyset-paginated."""
    size = clamp_limit(limit)
    now = get_settings().now()
    stmt = (sa.select(InboxItem, Update).join(Update, Update.id == InboxItem.update_id)
            .where(InboxItem.organisation_id == actor.organisation_id))
    if not filters.include_expired:
        stmt = stmt.where(sa.or_(Update.expires_at.is_(None), Update.expires_at > now))
    if filters.unread is not None:
        stmt = stmt.where(InboxItem.read_at.is_(None) if filters.unread
                          else InboxItem.read_at.is_not(None))
    if filters.needs_ack is not None:
        pending = sa.and_(InboxItem.needs_ack.is_(True), InboxItem.acked_at.is_(None))
        stmt = stmt.where(pending if filters.needs_ack else sa.not_(pending))
    if filters.priority is not None:
        stmt = stmt.where(Update.priority == filters.priority)
    if filters.since is not None:
        stmt = stmt.where(InboxItem.received_at >= filters.since)
    if filters.topic is not None:
        stmt = stmt.where(_in_topic(session, filters.topic))
    if cursor:
        at, chain = decode_time_cursor(cursor)
        stmt = stmt.where(sa.or_(InboxItem.received_at < at,
                                 sa.and_(InboxItem.received_at == at,
                                         InboxItem.chain_id < chain)))
    rows = session.execute(stmt.order_by(InboxItem.received_at.desc(),
                                         InboxItem.chain_id.desc()).limit(size + 1)).all()
    entries = [InboxEntry(item, update) for item, update in rows]
    last = entries[size - 1].item if len(entries) > size else None
    next_cursor = encode_time_cursor(last.received_at, last.chain_id) if last else None
    return entries[:size], next_cursor


def _in_topic(session: Session, slug: str) -> sa.ColumnElement[bool]:
    """Updates on this topic or any of its descendants."""
    from domain.models import Topic

    topic_id = session.scalar(sa.select(Topic.id).where(Topic.slug == slug))
    if topic_id is None:
        raise InvalidInput(f"unknown topic {slug!r}", parameter="topic")
    tree = sa.select(Topic.id).where(Topic.id == topic_id).cte("descendants", recursive=True)
    tree = tree.union(sa.select(Topic.id).join(tree, Topic.parent_id == tree.c.id))
    return sa.exists().where(UpdateTopic.update_id == Update.id,
                             UpdateTopic.topic_id.in_(sa.select(tree.c.id)))


def _item_for(session: Session, actor: audit.Actor, any_update_id: uuid.UUID,
              lock: bool = False) -> InboxEntry:
    """The caller's inbox item for the chain of any of its versions; 404 for anyone else."""
    chain_id = session.scalar(sa.select(Update.chain_id).where(Update.id == any_update_id))
    if chain_id is None:
        raise NotFound("inbox item not found")
    item = session.get(InboxItem, (chain_id, actor.organisation_id), with_for_update=lock)
    if item is None:
        raise NotFound("inbox item not found")
    update = session.get(Update, item.update_id)
    assert update is not None
    return InboxEntry(item, update)


def read_item(session: Session, actor: audit.Actor, any_update_id: uuid.UUID) -> InboxEntry:
    """One inbox item in full. Reading a restricted update is audited (who, key, when)."""
    entry = _item_for(session, actor, any_update_id)
    if entry.update.classification is Classification.restricted:
        audit.record(session, actor, "update.restricted_read", "update", entry.update.id,
                     via="inbox")
        session.commit()
    return entry


def mark_read(session: Session, actor: audit.Actor, any_update_id: uuid.UUID) -> InboxEntry:
    """Mark read (idempotent: the first time is kept)."""
    entry = _item_for(session, actor, any_update_id, lock=True)
    if entry.item.read_at is None:
        entry.item.read_at = get_settings().now()
    session.commit()
    return entry


def acknowledge(session: Session, actor: audit.Actor, any_update_id: uuid.UUID) -> InboxEntry:
    """Acknowledge (implies read; idempotent). Audited: an ack is a statement to the publisher."""
    entry = _item_for(session, actor, any_update_id, lock=True)
    now = get_settings().now()
    if entry.item.acked_at is None:
        entry.item.acked_at = now
        entry.item.read_at = entry.item.read_at or now
        audit.record(session, actor, "inbox.acknowledged", "update", entry.update.id)
    session.commit()
    return entry


@dataclass(frozen=True)
class ReachRow:
    organisation_id: uuid.UUID
    name: str
    update_id: uuid.UUID
    reasons: list[dict[str, str]]
    delivered_at: datetime | None
    read_at: datetime | None
    acked_at: datetime | None
    needs_ack: bool


@dataclass(frozen=True)
class Reach:
    rows: list[ReachRow]
    totals: dict[str, int]
    next_cursor: str | None


def reach(session: Session, actor: audit.Actor, update_id: uuid.UUID, cursor: str | None,
          limit: int | None) -> Reach:
    """Every recipient of an update's chain with its delivered/read/acked times, and totals."""
    update = session.get(Update, update_id)
    if update is None or update.publisher_id != actor.organisation_id:
        raise NotFound("update not found")
    totals_row = session.execute(
        sa.select(sa.func.count(), sa.func.count(InboxItem.delivered_at),
                  sa.func.count(InboxItem.read_at), sa.func.count(InboxItem.acked_at),
                  sa.func.count(sa.case((InboxItem.needs_ack.is_(True), 1))))
        .where(InboxItem.chain_id == update.chain_id)).one()
    totals = dict(zip(("recipients", "delivered", "read", "acknowledged", "needs_ack"),
                      (int(v) for v in totals_row), strict=True))
    size = clamp_limit(limit)
    stmt = (sa.select(InboxItem, Organisation.name)
            .join(Organisation, Organisation.id == InboxItem.organisation_id)
            .where(InboxItem.chain_id == update.chain_id))
    if cursor:
        try:
            after = uuid.UUID(decode_cursor(cursor))
        except ValueError as exc:
            raise InvalidInput("the pagination cursor is not valid", parameter="cursor") from exc
        stmt = stmt.where(InboxItem.organisation_id > after)
    rows = session.execute(stmt.order_by(InboxItem.organisation_id).limit(size + 1)).all()
    next_cursor = encode_cursor(rows[size - 1][0].organisation_id) if len(rows) > size else None
    return Reach(
        rows=[ReachRow(i.organisation_id, name, i.update_id, i.reasons(), i.delivered_at,
                       i.read_at, i.acked_at, i.needs_ack) for i, name in rows[:size]],
        totals=totals, next_cursor=next_cursor)
