"""Scheduler faults: two schedulers firing at once, and a poison message in the outbox.

1. Two `doorstroom beat` processes (each with its own schedule file, as after a botched
   deployment or a failover that left the old one running) and one worker, on a fixed clock
   just after a daily window closed: every (subscription, window) gets exactly one bundle,
   and every outbox row the two relays race for is dispatched once and routed once.
2. A poison message: outbox rows whose task always fails. They do not block the queue
   (updates published afterwards are routed promptly), the sweeper hands them out again
   ever more slowly, and `/metrics` counts them once they were dispatched five times.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.faults import judge
from tests.faults.conftest import FaultWorld, Stack, fault_env, needs_redis_server
from tests.processes import Beat, RedisServer, Worker, running, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(90), needs_redis_server]

#: Tuesday 24 November 2026, 08:00 in Brussels; the processes' clock stands just after it.
DUE = datetime(2026, 11, 24, 7, tzinfo=UTC)
DAILY_SUBSCRIPTIONS = 20
ITEMS_IN_WINDOW = 3
ROUTED_UPDATES = 30
ROUTED_RECIPIENTS = 5


def _routing_rows(update_ids: list[str]) -> list[Any]:
    from domain.db import get_sessionmaker
    from domain.models import OutboxMessage

    with get_sessionmaker()() as session:
        return list(session.scalars(sa.select(OutboxMessage).where(
            OutboxMessage.task == "routing.route_update",
            OutboxMessage.args["update_id"].as_string().in_(update_ids))))


def test_two_schedulers_build_each_bundle_once_and_dispatch_each_row_once(
        world: FaultWorld, broker: RedisServer, tmp_path: Path) -> None:
    from domain.models import Bundle, BundleEntry, InboxItem, OutboxMessage, Subscription, Update
    from tests.factories import publish_update

    session = world.session
    topic, route_topic = world.topic(), world.topic()
    publisher = world.publisher()
    daily_orgs = [world.org(f"daily {n}") for n in range(DAILY_SUBSCRIPTIONS)]
    subs = [world.subscribe(org, [topic], cadence="daily", send_at="08:00")
            for org in daily_orgs]
    for sub in subs:
        sub.created_at, sub.bundled_until = DUE - timedelta(days=5), DUE - timedelta(days=1)
    in_window = [publish_update(session, publisher, topics=[topic], title=f"In window {n}")
                 for n in range(ITEMS_IN_WINDOW)]
    session.execute(sa.update(InboxItem)
                    .where(InboxItem.organisation_id.in_([o.id for o in daily_orgs]))
                    .values(received_at=DUE - timedelta(hours=3)))
    recipients = [world.org(f"immediate {n}") for n in range(ROUTED_RECIPIENTS)]
    for org in recipients:
        world.subscribe(org, [route_topic])
    session.commit()
    sub_ids = [s.id for s in subs]

    clock = {"DOORSTROOM_CLOCK": (DUE + timedelta(seconds=30)).isoformat(),
             "DOORSTROOM_BUNDLE_POLL_SECONDS": "1"}
    beats = [Beat(fault_env(tmp_path, broker.url(0), **clock,
                            DOORSTROOM_BEAT_SCHEDULE_FILE=tmp_path / f"beat-{n}"), tmp_path)
             for n in range(2)]
    worker = Worker(fault_env(tmp_path, broker.url(0), **clock), tmp_path, beat=False,
                    concurrency=2)

    def bundles() -> list[Any]:
        with world.session.bind.connect() as conn:  # type: ignore[union-attr]
            return list(conn.execute(sa.select(Bundle).where(
                Bundle.subscription_id.in_(sub_ids))))

    started = time.monotonic()
    with running(worker, *beats):
        ready = time.monotonic() - started
        # Committed while both relays poll: they race for the same rows.
        routed = [publish_update(session, publisher, route=False, topics=[route_topic],
                                 title=f"Raced {n}") for n in range(ROUTED_UPDATES)]
        routed_ids = [str(u.id) for u in routed]
        session.execute(sa.update(Update).where(Update.id.in_([u.id for u in routed]))
                        .values(publish_at=DUE - timedelta(hours=1)))
        session.execute(sa.update(OutboxMessage).where(
            OutboxMessage.args["update_id"].as_string().in_(routed_ids))
            .values(available_at=DUE - timedelta(hours=1), created_at=DUE))
        session.commit()

        def done() -> bool:
            worker.check_alive()
            for beat in beats:
                beat.check_alive()
            rows = _routing_rows(routed_ids)
            return (len(bundles()) == DAILY_SUBSCRIPTIONS
                    and all(r.completed_at is not None for r in rows))

        wait_until(done, 30, interval=0.25,
                   message=lambda: f"{len(bundles())} bundles\n{worker.describe()}\n"
                                   + "\n".join(b.describe() for b in beats))
        settled = time.monotonic() - started
        # Several more ticks of both schedulers come and go; nothing is built twice.
        time.sleep(3)
        worker.check_alive()
        beat_logs = [b.current_log() for b in beats]
        worker_log = worker.current_log()

    final = bundles()
    assert len(final) == DAILY_SUBSCRIPTIONS
    assert {b.subscription_id for b in final} == set(sub_ids), "one bundle per subscription"
    assert {(b.window_start, b.window_end) for b in final} == {(DUE - timedelta(days=1), DUE)}
    assert {b.item_count for b in final} == {ITEMS_IN_WINDOW}
    with world.session.bind.connect() as conn:  # type: ignore[union-attr]
        chains = conn.execute(sa.select(BundleEntry.bundle_id, sa.func.count())
                              .where(BundleEntry.bundle_id.in_([b.id for b in final]))
                              .group_by(BundleEntry.bundle_id)).all()
        until = set(conn.scalars(sa.select(Subscription.bundled_until)
                                 .where(Subscription.id.in_(sub_ids))))
        entry_chains = set(conn.scalars(sa.select(BundleEntry.chain_id).distinct()
                                        .where(BundleEntry.bundle_id.in_([b.id for b in final]))))
    assert sorted(n for _, n in chains) == [ITEMS_IN_WINDOW] * DAILY_SUBSCRIPTIONS
    assert entry_chains == {u.chain_id for u in in_window}
    assert until == {DUE}

    # Both schedulers really fired the bundle run, repeatedly, and the worker ran them.
    fired = [log.count("Sending due task bundles-run-due") for log in beat_logs]
    assert min(fired) >= 2, fired
    runs = worker_log.count("bundles.run_due[") // 2  # "received" and "succeeded" lines

    # Each routing row: dispatched exactly once (the relays' row locks), routed once.
    rows = _routing_rows(routed_ids)
    assert len(rows) == ROUTED_UPDATES
    assert [r.dispatch_count for r in rows] == [1] * ROUTED_UPDATES, [
        (r.id, r.dispatch_count) for r in rows]
    assert "(already routed)" not in worker_log
    figures = judge.measure(accepted=routed_ids, recipients=[o.id for o in recipients],
                            publisher_ids=[publisher.id],
                            ignore=[str(u.id) for u in in_window], stale_seconds=3)
    assert figures["lost"] == 0 and figures["phantom"] == 0, figures
    assert figures["inbox_items"] == ROUTED_UPDATES * ROUTED_RECIPIENTS, figures
    judge.record("two_schedulers_bundles_and_relays", figures,
                 subscriptions=DAILY_SUBSCRIPTIONS, bundles=len(final),
                 duplicate_bundles=len(final) - len({b.subscription_id for b in final}),
                 bundle_runs_fired_per_beat=fired, bundle_runs_in_worker=runs,
                 outbox_rows=len(rows), max_dispatch_count=max(r.dispatch_count for r in rows),
                 seconds_to_ready=round(ready, 1), seconds_to_settle=round(settled, 1))


# ------------------------------------------------------------------------------ poison

POISON_ROWS = 3
STALE_SECONDS = 1.0
OBSERVE_SECONDS = 14.0
LATER_UPDATES = 10


def test_a_poison_message_does_not_block_the_queue(world: FaultWorld, make_stack: Any) -> None:
    from domain.db import get_sessionmaker
    from domain.models import OutboxMessage, Update
    from domain.outbox import POISON_DISPATCHES

    topic = world.topic()
    publisher = world.publisher()
    recipients = [world.org(f"recipient {n}") for n in range(3)]
    for org in recipients:
        world.subscribe(org, [topic])
    publish_key = world.key(publisher, "publish")
    world.session.commit()

    stack: Stack = make_stack(DOORSTROOM_SWEEPER_STALE_SECONDS=str(STALE_SECONDS))
    poison_ids: list[int] = []
    try:
        with get_sessionmaker()() as session:
            now = datetime.now(UTC)
            rows = [OutboxMessage(task="routing.route_update",
                                  args={"update_id": "not-a-uuid"},
                                  created_at=now, available_at=now, dispatch_count=0)
                    for _ in range(POISON_ROWS)]
            session.add_all(rows)
            session.commit()
            poison_ids = [r.id for r in rows]
        inserted = time.monotonic()

        def poison() -> list[Any]:
            with get_sessionmaker()() as session:
                return list(session.scalars(sa.select(OutboxMessage)
                                            .where(OutboxMessage.id.in_(poison_ids))
                                            .order_by(OutboxMessage.id)))

        # Every dispatch stamps `dispatched_at`, which stays at least STALE seconds: sampled
        # more often than that, each distinct stamp is one dispatch.
        stamps: set[datetime] = set()
        stop_sampling = threading.Event()

        def sample() -> None:
            while not stop_sampling.wait(0.2):
                try:
                    first = poison()[0]
                except Exception:  # noqa: BLE001 - sample again
                    continue
                if first.dispatched_at is not None:
                    stamps.add(first.dispatched_at)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            # Updates published after the poison are routed promptly.
            wait_until(lambda: all(r.dispatch_count >= 1 for r in poison()), 10,
                       message=lambda: stack.describe())
            accepted: list[str] = []
            with stack.api.client(publish_key) as client:
                for n in range(LATER_UPDATES):
                    response = client.post("/v1/updates", json={
                        "title": f"After poison {n}", "topics": [topic]})
                    assert response.status_code == 202, response.text
                    accepted.append(response.json()["id"])
                    time.sleep(0.3)
            figures = judge.settle(accepted=accepted, recipients=[o.id for o in recipients],
                                   publisher_ids=[publisher.id],
                                   stale_seconds=STALE_SECONDS * 3, timeout=20, quiet=0,
                                   on_wait=stack.check_alive)
            with get_sessionmaker()() as session:
                routed = session.execute(
                    sa.select(Update.publish_at, Update.routed_at)
                    .where(Update.id.in_([uuid.UUID(u) for u in accepted])))
                latencies = [(r - p).total_seconds() if r else float("inf")
                             for p, r in routed]
            # Watch the poison rows come back, ever more slowly.
            while time.monotonic() - inserted < OBSERVE_SECONDS:
                time.sleep(0.25)
        finally:
            stop_sampling.set()
            sampler.join(5)
        observed = time.monotonic() - inserted
        final_rows = poison()
        if final_rows[0].dispatched_at is not None:  # a dispatch after the last sample
            stamps.add(final_rows[0].dispatched_at)
        counts = [r.dispatch_count for r in final_rows]
        assert all(r.completed_at is None for r in final_rows), "a failing task never completes"
        # Each re-dispatch waits STALE * 2^(n-1) after the n-th: within `observed` seconds at
        # most about log2(observed / STALE) + 2 dispatches, where a sweeper without back-off
        # would have made one every STALE seconds or so.
        bound = int(math.log2(observed / STALE_SECONDS)) + 2
        assert min(counts) >= 2, f"the sweeper hands poison out again: {counts}"
        assert max(counts) <= bound, f"{counts} dispatches in {observed:.1f} s (bound {bound})"
        times = sorted(stamps)
        assert len(times) == counts[0], (len(times), counts)
        gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:], strict=False)]
        assert all(g >= STALE_SECONDS for g in gaps), gaps
        if len(gaps) >= 2:
            assert gaps[-1] > 1.5 * gaps[0], f"the back-off does not grow: {gaps}"

        # /metrics counts a row as poisoned from its fifth dispatch on.
        before = judge.metric(judge.read_metrics(stack.api.base_url),
                              "doorstroom_outbox_poisoned")
        with get_sessionmaker()() as session:
            session.execute(sa.update(OutboxMessage).where(OutboxMessage.id.in_(poison_ids))
                            .values(dispatch_count=POISON_DISPATCHES))
            session.commit()
            expected = session.scalar(sa.select(sa.func.count()).select_from(OutboxMessage)
                                      .where(OutboxMessage.completed_at.is_(None),
                                             OutboxMessage.dispatch_count >= POISON_DISPATCHES))
        after = judge.metric(judge.read_metrics(stack.api.base_url),
                             "doorstroom_outbox_poisoned")
        assert after == expected and after is not None and after >= POISON_ROWS, (before, after)
        assert stack.worker is not None
        stack.worker.check_alive()
        failures = stack.worker.current_log().count("raised unexpected: ValueError")
        assert failures >= 1, stack.worker.describe()
    finally:
        if poison_ids:
            with get_sessionmaker()() as session:
                session.execute(sa.delete(OutboxMessage)
                                .where(OutboxMessage.id.in_(poison_ids)))
                session.commit()

    p50, worst = statistics.median(latencies), max(latencies)
    judge.record("poison_message", figures, poison_rows=POISON_ROWS,
                 poison_dispatch_counts=counts, observed_seconds=round(observed, 1),
                 dispatch_bound=bound, redispatch_gaps_s=[round(g, 2) for g in gaps],
                 routing_latency_p50_s=round(p50, 3), routing_latency_max_s=round(worst, 3),
                 poisoned_metric_before=before, poisoned_metric_after=after,
                 task_failures_logged=failures)
    assert p50 < 1.0 and worst < 3.0, f"routing latency behind poison: {sorted(latencies)}"
