"""Runs at the same time divide the work and build each bundle exactly once (real commits,
real threads, real row locks)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
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
#: Wednesday 08:00 in Brussels plus an hour: Monday's and Tuesday's windows are due.
RUN_AT = MON + timedelta(days=2, hours=1)
SUBSCRIPTIONS = 30
UPDATES = 3


@pytest.fixture
def daily_subs(migrated_database) -> Iterator[list[Subscription]]:
    """SUBSCRIPTIONS committed daily subscriptions (last bundle on Monday), each with
    UPDATES items in Monday's window and none in Tuesday's; removed afterwards."""
    session = get_sessionmaker()()
    orgs: list[Organisation] = []
    topic = create_topic(session)
    try:
        publisher = create_org(session, level=Level.flemish, kind=Kind.agency)
        orgs.append(publisher)
        subs = []
        for _ in range(SUBSCRIPTIONS):
            city = create_org(session)
            orgs.append(city)
            sub = create_subscription(session, city, cadence="daily", send_at="08:00",
                                      filter={"topics": [topic.slug]})
            sub.created_at, sub.bundled_until = MON - timedelta(days=7), MON
            subs.append(sub)
        session.commit()
        for n in range(UPDATES):
            publish_update(session, publisher, topics=[topic.slug], title=f"u{n}")
        session.execute(sa.update(InboxItem).where(InboxItem.organisation_id.in_(
            [o.id for o in orgs])).values(received_at=MON + timedelta(hours=2)))
        session.commit()
        yield sorted(subs, key=lambda s: s.id)
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


def built_once(subs: list[Subscription]) -> list[tuple]:
    """(subscription, window end, count) of every bundle of `subs`, after checking each
    exists once, for Monday's window, with UPDATES entries."""
    with get_sessionmaker()() as session:
        sub_ids = [s.id for s in subs]
        built = session.execute(
            sa.select(Bundle.subscription_id, Bundle.window_end, sa.func.count())
            .where(Bundle.subscription_id.in_(sub_ids))
            .group_by(Bundle.subscription_id, Bundle.window_end)).all()
        # Monday's window has the updates; Tuesday's is empty and leaves no bundle.
        assert all(count == 1 for _, _, count in built)
        assert {end for _, end, _ in built} <= {MON + timedelta(days=1)}
        entries = session.scalar(sa.select(sa.func.count()).select_from(BundleEntry)
                                 .where(BundleEntry.subscription_id.in_(sub_ids)))
        assert entries == len(built) * UPDATES
        return built


def run_in_threads(count: int) -> list[bundles.RunReport]:
    barrier = threading.Barrier(count)
    reports: list[bundles.RunReport] = []
    errors: list[BaseException] = []

    def run() -> None:
        worker_session = get_sessionmaker()()
        try:
            barrier.wait(timeout=10)
            reports.append(bundles.run_due_bundles(worker_session, RUN_AT))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            worker_session.close()

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(reports) == count
    return reports


def test_two_concurrent_runs_build_each_bundle_once(daily_subs):
    reports = run_in_threads(2)
    assert len(built_once(daily_subs)) == SUBSCRIPTIONS
    assert sum(r.bundles for r in reports) == SUBSCRIPTIONS
    assert sum(r.windows for r in reports) == 2 * SUBSCRIPTIONS  # each window by one run


def test_four_concurrent_runs_in_small_batches_build_each_bundle_once(daily_subs,
                                                                      monkeypatch):
    monkeypatch.setattr(bundles, "BATCH_SIZE", 4)
    reports = run_in_threads(4)
    assert len(built_once(daily_subs)) == SUBSCRIPTIONS
    assert sum(r.bundles for r in reports) == SUBSCRIPTIONS
    assert sum(r.windows for r in reports) == 2 * SUBSCRIPTIONS
    assert sum(r.empty for r in reports) == SUBSCRIPTIONS


def run_once(now: datetime = RUN_AT) -> bundles.RunReport:
    with get_sessionmaker()() as session:
        return bundles.run_due_bundles(session, now)


def test_a_second_run_takes_the_batches_the_first_does_not_hold(daily_subs, monkeypatch):
    """While one run is building its first batch, a second run started then builds every
    other batch: the work divides (one transaction over every subscription would leave the
    second run nothing but locked rows)."""
    monkeypatch.setattr(bundles, "BATCH_SIZE", 10)
    holding, release = threading.Event(), threading.Event()
    write_entries = bundles._write_entries

    def slow_first_batch(*args, **kwargs):
        written = write_entries(*args, **kwargs)
        if threading.current_thread().name == "first" and not holding.is_set():
            holding.set()
            assert release.wait(30)
        return written

    monkeypatch.setattr(bundles, "_write_entries", slow_first_batch)
    reports: dict[str, bundles.RunReport] = {}
    errors: list[BaseException] = []

    def first() -> None:
        try:
            reports["first"] = run_once()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            holding.set()

    thread = threading.Thread(target=first, name="first")
    thread.start()
    try:
        assert holding.wait(30)
        reports["second"] = run_once()
    finally:
        release.set()
        thread.join(60)
    assert errors == []
    assert reports["first"].bundles == 10
    assert reports["second"].bundles == SUBSCRIPTIONS - 10
    assert len(built_once(daily_subs)) == SUBSCRIPTIONS


def test_a_run_skips_the_rows_another_holds_and_builds_the_others(daily_subs, monkeypatch):
    """Rows another transaction holds (here in the middle of a batch) are skipped; the run
    goes on to the later batches and commits; the held ones are built by a later run."""
    monkeypatch.setattr(bundles, "BATCH_SIZE", 7)
    held = daily_subs[10:20]
    with get_sessionmaker()() as holder:
        holder.execute(sa.select(Subscription.id).where(
            Subscription.id.in_([s.id for s in held])).with_for_update())
        report = run_once()
        assert report.bundles == SUBSCRIPTIONS - len(held)
        assert report.windows == 2 * (SUBSCRIPTIONS - len(held))
        built = {sub for sub, _, _ in built_once(daily_subs)}
        assert built == {s.id for s in daily_subs} - {s.id for s in held}
        holder.rollback()
    again = run_once()
    assert (again.bundles, again.windows, again.empty) == (len(held), 2 * len(held), len(held))
    assert len(built_once(daily_subs)) == SUBSCRIPTIONS
    assert run_once().windows == 0  # nothing is due any more


def test_a_failing_batch_keeps_the_batches_committed_before_it(daily_subs, monkeypatch):
    """Each batch commits on its own: a failure in one loses only that batch's work, which
    the next run builds (nothing twice)."""
    monkeypatch.setattr(bundles, "BATCH_SIZE", 10)
    write_entries = bundles._write_entries
    calls = []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return write_entries(*args, **kwargs)

    monkeypatch.setattr(bundles, "_write_entries", fail_second)
    with pytest.raises(RuntimeError):
        run_once()
    assert len(built_once(daily_subs)) == 10
    monkeypatch.setattr(bundles, "_write_entries", write_entries)
    assert run_once().bundles == SUBSCRIPTIONS - 10
    assert len(built_once(daily_subs)) == SUBSCRIPTIONS
