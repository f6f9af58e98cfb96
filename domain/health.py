"""Figures about the platform's own health, read from the database for `/metrics`.

They are computed at scrape time from committed state, so they are the same whichever API
process answers, and they show work that waits in PostgreSQL while the broker is down.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from domain.models import Delivery, OutboxMessage, Update
from domain.outbox import POISON_DISPATCHES, oldest_undispatched_age
from domain.settings import get_settings

#: Routing latency is reported over the updates routed in this recent window.
LATENCY_WINDOW = timedelta(minutes=15)


@dataclass(frozen=True)
class HealthFigures:
    oldest_outbox_age_seconds: float
    outbox_undispatched: int
    outbox_poisoned: int
    updates_awaiting_routing: int
    routing_latency_seconds: list[float]
    #: (channel, status) -> number of deliveries
    deliveries: dict[tuple[str, str], int]


def read_health_figures(session: Session) -> HealthFigures:
    now = get_settings().now()
    undispatched = session.scalar(
        sa.select(sa.func.count()).select_from(OutboxMessage)
        .where(OutboxMessage.dispatched_at.is_(None), OutboxMessage.available_at <= now)) or 0
    poisoned = session.scalar(
        sa.select(sa.func.count()).select_from(OutboxMessage)
        .where(OutboxMessage.completed_at.is_(None),
               OutboxMessage.dispatch_count >= POISON_DISPATCHES)) or 0
    awaiting = session.scalar(
        sa.select(sa.func.count()).select_from(Update)
        .where(Update.routed_at.is_(None), Update.publish_at <= now,
               Update.status == "published")) or 0
    recent = session.execute(
        sa.select(Update.publish_at, Update.routed_at)
        .where(Update.routed_at >= now - LATENCY_WINDOW).limit(10_000)).all()
    latencies = [max(0.0, (routed - published).total_seconds()) for published, routed in recent
                 if routed is not None]
    by_status = {(str(channel), str(status)): int(count) for channel, status, count in
                 session.execute(sa.select(Delivery.channel, Delivery.status, sa.func.count())
                                 .group_by(Delivery.channel, Delivery.status)).all()}
    return HealthFigures(oldest_undispatched_age(session), int(undispatched), int(poisoned),
                         int(awaiting), latencies, by_status)
