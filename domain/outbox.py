"""The transactional outbox: work for the broker, written with the change that justifies it.

`enqueue` adds a row inside the caller's transaction. The relay (`workers/relay.py`) hands
committed rows to the broker, right after commit and by polling; a task marks its row
completed in the same transaction as its work; the sweeper hands out again what was
dispatched but never completed. So a broker outage delays work and loses none.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from domain.db import rowcount
from domain.models import OutboxMessage
from domain.settings import get_settings

_TABLE: sa.Table = OutboxMessage.__table__  # type: ignore[assignment]


def enqueue(session: Session, task: str, args: dict[str, Any],
            available_at: datetime | None = None) -> OutboxMessage:
    now = get_settings().now()
    message = OutboxMessage(task=task, args=args, created_at=now,
                            available_at=available_at or now, dispatch_count=0)
    session.add(message)
    return message


def row(task: str, args: dict[str, Any], available_at: datetime | None = None
        ) -> dict[str, Any]:
    """An outbox row's column values (without its id), for a caller that writes it itself
    (a Core INSERT in its own transaction, as `enqueue` would have it committed)."""
    now = get_settings().now()
    return {"task": task, "args": args, "created_at": now, "available_at": available_at or now,
            "dispatch_count": 0}


def claim_due(session: Session, limit: int = 500) -> list[OutboxMessage]:
    """Rows due for dispatch, locked so that two relays do not both send them.

    The caller sends them and calls `mark_dispatched` in the same transaction.
    """
    now = get_settings().now()
    stmt = (sa.select(OutboxMessage)
            .where(OutboxMessage.dispatched_at.is_(None), OutboxMessage.available_at <= now)
            .order_by(OutboxMessage.id).limit(limit))
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    return list(session.scalars(stmt))


_MARK_DISPATCHED = (sa.update(_TABLE).where(_TABLE.c.id.in_(sa.bindparam("ids", expanding=True)))
                    .values(dispatched_at=sa.bindparam("now", type_=_TABLE.c.dispatched_at.type),
                            dispatch_count=_TABLE.c.dispatch_count + 1))


def mark_dispatched(session: Session, ids: list[int]) -> None:
    """A Core UPDATE, built once: the claimed rows' objects in the session are not
    refreshed (the relay drops them with its session)."""
    if ids:
        session.execute(_MARK_DISPATCHED, {"ids": ids, "now": get_settings().now()})


def mark_completed(session: Session, outbox_id: int | None) -> None:
    """Called by a task inside the transaction that commits its work."""
    if outbox_id is not None:
        session.execute(sa.update(OutboxMessage).where(OutboxMessage.id == outbox_id)
                        .where(OutboxMessage.completed_at.is_(None))
                        .values(completed_at=get_settings().now()))


#: A row dispatched this often without completing counts as poisoned in the metrics.
POISON_DISPATCHES = 5
#: The sweeper waits longer after each fruitless dispatch, doubling up to this many times
#: (60 s stale period: at most about an hour between tries). It never gives up: a row is
#: only finished by the task that completes it.
_MAX_BACKOFF_DOUBLINGS = 6


def release_stuck(session: Session, stale_after: timedelta | None = None) -> int:
    """Sweeper: make dispatched-but-unfinished rows due again (lost in a dead broker or a
    killed worker). Tasks are idempotent, so a second run of finished work changes nothing.
    Rows that keep coming back wait exponentially longer, so a poison message cannot flood
    its queue."""
    stale = stale_after or timedelta(seconds=get_settings().sweeper_stale_seconds)
    now = get_settings().now()
    released = 0
    for doublings in range(_MAX_BACKOFF_DOUBLINGS + 1):
        dispatches = OutboxMessage.dispatch_count
        tier = (dispatches >= doublings + 1 if doublings == _MAX_BACKOFF_DOUBLINGS
                else dispatches == doublings + 1)
        result = session.execute(
            sa.update(OutboxMessage)
            .where(OutboxMessage.completed_at.is_(None),
                   OutboxMessage.dispatched_at.is_not(None),
                   OutboxMessage.dispatched_at < now - stale * (2 ** doublings), tier)
            .values(dispatched_at=None)
        )
        released += rowcount(result)
    session.commit()
    return released


def oldest_undispatched_age(session: Session) -> float:
    now = get_settings().now()
    oldest = session.scalar(sa.select(sa.func.min(OutboxMessage.available_at))
                            .where(OutboxMessage.dispatched_at.is_(None),
                                   OutboxMessage.available_at <= now))
    return max(0.0, (now - oldest).total_seconds()) if oldest else 0.0
