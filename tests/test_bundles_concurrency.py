"""Two `digests run` at once build each bundle exactly once (real commits, real threads)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from domain import bundles
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

MON = datetime(2026, 11, 23, 7, tzinfo=UTC)


def test_two_concurrent_runs_build_each_bundle_once(migrated_database):
    session = get_sessionmaker()()
    orgs: list[Organisation] = []
    topic = create_topic(session)
    try:
        publisher = create_org(session, level=Level.flemish, kind=Kind.agency)
        orgs.append(publisher)
        subs = []
        for _ in range(30):
            city = create_org(session)
            orgs.append(city)
            sub = create_subscription(session, city, cadence="daily", send_at="08:00",
                                      filter={"topics": [topic.slug]})
            sub.created_at, sub.bundled_until = MON - timedelta(days=7), MON
            subs.append(sub)
        session.commit()
        for n in range(3):
            publish_update(session, publisher, topics=[topic.slug], title=f"u{n}")
        session.execute(sa.update(InboxItem).where(InboxItem.organisation_id.in_(
            [o.id for o in orgs])).values(received_at=MON + timedelta(hours=2)))
        session.commit()

        barrier = threading.Barrier(2)
        reports: list[bundles.RunReport] = []
        errors: list[BaseException] = []

        def run() -> None:
            worker_session = get_sessionmaker()()
            try:
                barrier.wait(timeout=10)
                reports.append(bundles.run_due_bundles(worker_session,
                                                       MON + timedelta(days=2, hours=1)))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
            finally:
                worker_session.close()

        threads = [threading.Thread(target=run) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        sub_ids = [s.id for s in subs]
        built = session.execute(
            sa.select(Bundle.subscription_id, Bundle.window_end, sa.func.count())
            .where(Bundle.subscription_id.in_(sub_ids))
            .group_by(Bundle.subscription_id, Bundle.window_end)).all()
        # Monday's window has the three updates; Tuesday's is empty and leaves no bundle.
        assert len(built) == 30 and all(count == 1 for _, _, count in built)
        assert {end for _, end, _ in built} == {MON + timedelta(days=1)}
        entries = session.scalar(sa.select(sa.func.count()).select_from(BundleEntry)
                                 .where(BundleEntry.subscription_id.in_(sub_ids)))
        assert entries == 30 * 3
        assert sum(r.bundles for r in reports) == 30
        assert sum(r.windows for r in reports) == 60  # two windows each, built by one run
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
