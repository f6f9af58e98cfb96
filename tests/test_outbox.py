"""The outbox sweeper: stuck work comes back, with growing pauses, and is never dropped."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from domain import outbox
from domain.models import OutboxMessage
from domain.settings import get_settings


def _row(session, *, dispatched_ago: timedelta, dispatches: int, completed: bool = False):
    now = get_settings().now()
    message = outbox.enqueue(session, "routing.route_update", {"update_id": "x"})
    session.flush()
    session.execute(sa.update(OutboxMessage).where(OutboxMessage.id == message.id).values(
        dispatched_at=now - dispatched_ago, dispatch_count=dispatches,
        completed_at=now if completed else None))
    return message.id


def _released(session, ids):
    return {i for i in ids if session.get(OutboxMessage, i, populate_existing=True)
            .dispatched_at is None}


def test_sweeper_releases_stale_rows_with_exponential_backoff(db_session):
    stale = timedelta(seconds=60)
    fresh = _row(db_session, dispatched_ago=timedelta(seconds=30), dispatches=1)
    stale_once = _row(db_session, dispatched_ago=timedelta(seconds=90), dispatches=1)
    twice_not_yet = _row(db_session, dispatched_ago=timedelta(seconds=90), dispatches=2)
    twice_due = _row(db_session, dispatched_ago=timedelta(seconds=130), dispatches=2)
    many_due = _row(db_session, dispatched_ago=timedelta(hours=2), dispatches=40)
    many_not_yet = _row(db_session, dispatched_ago=timedelta(minutes=30), dispatches=40)
    done = _row(db_session, dispatched_ago=timedelta(days=1), dispatches=1, completed=True)
    outbox.release_stuck(db_session, stale)
    ids = [fresh, stale_once, twice_not_yet, twice_due, many_due, many_not_yet, done]
    assert _released(db_session, ids) == {stale_once, twice_due, many_due}


def test_released_rows_are_due_for_the_relay_again(db_session):
    row = _row(db_session, dispatched_ago=timedelta(minutes=5), dispatches=1)
    outbox.release_stuck(db_session, timedelta(seconds=60))
    assert row in {m.id for m in outbox.claim_due(db_session, limit=10_000)}
