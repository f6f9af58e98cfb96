"""The transactional outbox: work for the broker, written with the change that justifies it.

`enqueue` adds a row inside the caller's transaction. The relay (`workers/relay.py`) hands
committed rows to the broker, right after commit and by polling; a task marks its row
completed in the same transaction as its work; the sweeper hands out again what was
dispatched but never completed. So a broker outage delays work and loses none.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Claimed:
    """An outbox row claimed for dispatch: what the broker needs."""

    id: int
    task: str
    args: dict[str, Any]


_DUE = (sa.select(_TABLE.c.id)
        .where(_TABLE.c.dispatched_at.is_(None),
               _TABLE.c.available_at <= sa.bindparam("now", type_=_TABLE.c.available_at.type))
        .order_by(_TABLE.c.id).limit(sa.bindparam("limit", type_=sa.Integer()))
        # Two relays never claim the same row; SQLite (one writer) renders no FOR UPDATE.
        .with_for_update(skip_locked=True))
_CLAIM = (sa.update(_TABLE).where(_TABLE.c.id.in_(_DUE.scalar_subquery()))
          .values(dispatched_at=sa.bindparam("now"), dispatch_count=_TABLE.c.dispatch_count + 1)
          .returning(_TABLE.c.id, _TABLE.c.task, _TABLE.c.args))
_UNCLAIM = (sa.update(_TABLE).where(_TABLE.c.id.in_(sa.bindparam("ids", expanding=True)))
            .values(dispatched_at=None, dispatch_count=_TABLE.c.dispatch_count - 1))


def claim_due(session: Session, limit: int = 500) -> list[Claimed]:
    """Claim the rows due for dispatch, oldest first, and mark them dispatched, in one
    statement (built once); they stay locked until the caller's transaction ends.

    The caller sends them, gives back (`unclaim`) those it could not send and commits."""
    rows = session.execute(_CLAIM, {"now": get_settings().now(), "limit": limit}).all()
    return sorted((Claimed(id, task, args) for id, task, args in rows), key=lambda c: c.id)


def unclaim(session: Session, ids: list[int]) -> None:
    """Undo `claim_due` for rows that did not reach the broker: due again for the poller."""
    if ids:
        session.execute(_UNCLAIM, {"ids": ids})


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
