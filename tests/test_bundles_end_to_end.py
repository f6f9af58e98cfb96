"""Bundles built by the real scheduler in a real worker, on a clock the test controls."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from domain.db import get_sessionmaker
from domain.models import (
    Bundle,
    BundleEntry,
    InboxItem,
    Kind,
    Level,
    Organisation,
    Subscription,
    Topic,
    Update,
)
from tests.factories import create_org, create_subscription, create_topic, publish_update
from tests.processes import Worker, process_env, wait_until

pytestmark = [pytest.mark.worker, pytest.mark.timeout(120)]

BROKER = "redis://127.0.0.1:6379/11"
#: Tuesday 24 November 2026, 08:00 in Brussels; the clock stands just after it.
DUE = datetime(2026, 11, 24, 7, tzinfo=UTC)


def test_the_beat_schedule_builds_each_due_bundle_once(migrated_database, tmp_path: Path):
    redis.Redis.from_url(BROKER).flushdb()
    session = get_sessionmaker()()
    orgs: list[Organisation] = []
    topic = create_topic(session)
    try:
        publisher = create_org(session, level=Level.flemish, kind=Kind.agency)
        city = create_org(session)
        orgs += [publisher, city]
        sub = create_subscription(session, city, cadence="daily", send_at="08:00",
                                  filter={"topics": [topic.slug]})
        sub.created_at, sub.bundled_until = DUE - timedelta(days=5), DUE - timedelta(days=1)
        updates = [publish_update(session, publisher, topics=[topic.slug], title=f"u{n}")
                   for n in range(3)]
        session.execute(sa.update(InboxItem).where(InboxItem.organisation_id == city.id)
                        .values(received_at=DUE - timedelta(hours=3)))
        session.commit()

        env = process_env({"DOORSTROOM_BROKER_URL": BROKER,
                           "DOORSTROOM_CLOCK": (DUE + timedelta(seconds=30)).isoformat(),
                           "DOORSTROOM_BUNDLE_POLL_SECONDS": "1",
                           "DOORSTROOM_OUTBOX_POLL_SECONDS": "0.5",
                           "DOORSTROOM_BEAT_SCHEDULE_FILE": tmp_path / "beat"})

        def built() -> list[Bundle]:
            with get_sessionmaker()() as check:
                return list(check.scalars(sa.select(Bundle)
                                          .where(Bundle.subscription_id == sub.id)))

        with Worker(env, tmp_path, beat=True, concurrency=2) as worker:
            worker.start()
            found = wait_until(lambda: built() or None, timeout=30,
                               message=lambda: worker.log())
            # Several more scheduler ticks come and go; nothing is built twice.
            import time

            time.sleep(3)
        with Worker(env, tmp_path, beat=True, concurrency=1, name="restarted") as again:
            again.start()
            time.sleep(3)
        final = built()
        assert len(found) == 1 and len(final) == 1
        [bundle] = final
        assert (bundle.window_start, bundle.window_end) == (DUE - timedelta(days=1), DUE)
        assert bundle.item_count == 3
        with get_sessionmaker()() as check:
            chains = set(check.scalars(sa.select(BundleEntry.chain_id)
                                       .where(BundleEntry.bundle_id == bundle.id)))
            assert chains == {u.chain_id for u in updates}
            until = check.scalar(sa.select(Subscription.bundled_until)
                                 .where(Subscription.id == sub.id))
            assert until == DUE
    finally:
        session.rollback()
        org_ids = [o.id for o in orgs]
        session.execute(sa.delete(Bundle).where(Bundle.organisation_id.in_(org_ids)))
        session.execute(sa.delete(InboxItem).where(InboxItem.organisation_id.in_(org_ids)))
        session.execute(sa.delete(Update).where(Update.publisher_id.in_(org_ids)))
        session.execute(sa.delete(Subscription).where(Subscription.organisation_id.in_(org_ids)))
        session.execute(sa.delete(Organisation).where(Organisation.id.in_(org_ids)))
        session.execute(sa.delete(Topic).where(Topic.id == topic.id))
        session.commit()
        session.close()
