"""Workers die, and nothing is lost: real API, scheduler and worker processes, the test
PostgreSQL database, a throwaway Redis broker and a real webhook receiver.

1. SIGKILL of the whole worker while the routing INSERT of one update to 100,000 recipients
   runs in PostgreSQL: the transaction rolls back, the sweeper hands the routing out again,
   the restarted worker routes it exactly once per recipient.
2. SIGKILL of the whole worker half-way through a batch of 200 webhooks to one endpoint:
   after the lease runs out every webhook arrives; the ones sent but not yet recorded when
   the worker died arrive again, with the same webhook-id and body.
3. SIGKILL of the whole worker with work queued in the broker and taken by the worker
   (Redis would hand the taken work out again only after its one-hour visibility timeout):
   the sweeper and the delivery leases recover all of it.
4. SIGTERM (warm shutdown) during a batch: the running sender finishes what it started and
   records it; not one webhook arrives twice, none is lost after the restart.

The API and the scheduler (outbox relay, sweeper) run as processes of their own, shared by
the module's tests (`shared_stack`); each test kills or stops its own worker. Each test
judges its outcome with tests/faults/judge.py and records its figures in
var/reliability/results.jsonl.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from tests.faults import judge
from tests.faults.conftest import (
    DELIVERY_LEASE_SECONDS,
    SWEEPER_STALE_SECONDS,
    Clock,
    FaultWorld,
    Stack,
    backend_gone,
    publish,
    queue_state,
    routing_statement_running,
)
from tests.processes import wait_until
from tests.receivers import Receiver, slow

pytestmark = [pytest.mark.faults, pytest.mark.worker, pytest.mark.timeout(90)]

#: Recipients of the update whose routing is killed. Measured on this 2-core machine:
#: routing to 100,000 topic subscriptions takes about 1 s (300,000: 3-5 s, with 20 s of
#: loading and over a minute of cleaning up), long enough to be caught running.
FANOUT = 100_000
#: Webhook deliveries in one batch, and how long the receiver takes to answer each.
BATCH = 200
RECEIVER_DELAY = 0.2


def database_name(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?", 1)[0]


def update_row(update_id: str) -> Any:
    from domain.db import session_scope
    from domain.models import Update

    with session_scope() as session:
        update = session.get(Update, uuid.UUID(update_id))
        session.expunge_all()
        return update


def inbox_count(update_id: str) -> tuple[int, int]:
    """(inbox items, distinct recipients) of an update."""
    from domain.db import session_scope
    from domain.models import InboxItem

    with session_scope() as session:
        total, distinct = session.execute(
            sa.select(sa.func.count(), sa.func.count(sa.distinct(InboxItem.organisation_id)))
            .where(InboxItem.update_id == uuid.UUID(update_id))).one()
    return int(total), int(distinct)


def outbox_rows(update_id: str) -> list[Any]:
    from domain.db import session_scope
    from domain.models import OutboxMessage

    with session_scope() as session:
        rows = list(session.scalars(sa.select(OutboxMessage).where(
            OutboxMessage.task == "routing.route_update",
            OutboxMessage.args["update_id"].as_string() == update_id)))
        session.expunge_all()
        return rows


def succeeded(update_id: str) -> int:
    """Deliveries of an update recorded as succeeded."""
    from domain.db import session_scope
    from domain.models import Delivery, DeliveryStatus

    with session_scope() as session:
        return session.scalar(sa.select(sa.func.count()).select_from(Delivery).where(
            Delivery.update_id == uuid.UUID(update_id),
            Delivery.status == DeliveryStatus.succeeded)) or 0


def leased(update_id: str) -> int:
    """Pending deliveries of an update leased to a sender right now."""
    from datetime import UTC, datetime

    from domain.db import session_scope
    from domain.models import Delivery, DeliveryStatus

    with session_scope() as session:
        return session.scalar(sa.select(sa.func.count()).select_from(Delivery).where(
            Delivery.update_id == uuid.UUID(update_id),
            Delivery.status == DeliveryStatus.pending,
            Delivery.leased_until > datetime.now(UTC))) or 0


def batch_world(world: FaultWorld, receiver: Receiver, path: str, size: int
                ) -> tuple[str, str, list[str], Any]:
    """One subscriber organisation whose `size` webhook subscriptions all push to one
    endpoint on the receiver (so one update makes one batch of `size` deliveries, sent at
    most `webhook_per_endpoint_concurrency` at a time). Answers (topic, publish key,
    subscription ids, subscriber)."""
    topic = world.topic()
    publisher = world.publisher()
    subscriber = world.org("subscriber")
    endpoint, secret = world.endpoint(subscriber, receiver.url(path))
    receiver.secrets.append(secret)
    subscriptions = [str(world.webhook_subscription(subscriber, endpoint, [topic],
                                                    name=f"batch {i}").id)
                     for i in range(size)]
    return topic, world.key(publisher, "publish"), subscriptions, subscriber


# ------------------------------------------------------------------------------ 1


def test_sigkill_during_the_routing_insert_routes_exactly_once(
        world: FaultWorld, worker_stack: Stack, migrated_database: str) -> None:
    clock = Clock()
    topic = world.topic()
    publisher = world.publisher()
    publish_key = world.key(publisher, "publish")
    loading = time.monotonic()
    recipients = world.bulk_subscribers(topic, FANOUT)
    load_seconds = time.monotonic() - loading

    clock.mark("setup")
    stack = worker_stack
    database = database_name(migrated_database)
    with stack.api.client(publish_key) as client:
        status, update_id = publish(client, topic, f"Fan-out {world.tag}")
    assert status == 202 and update_id

    # Catch the routing INSERT while PostgreSQL runs it, then kill the worker's whole group.
    running = wait_until(lambda: routing_statement_running(database), 30, interval=0.005,
                         message=lambda: f"the routing INSERT never showed up in "
                                         f"pg_stat_activity\n{stack.describe()}")
    assert running is not None
    stack.kill_worker()
    clock.mark("killed")
    assert inbox_count(update_id) == (0, 0), "nothing may be visible before a commit"
    # The replacement starts at once (it takes seconds to get ready, and could not route
    # before the orphaned backend below lets go of the update's row lock anyway).
    replacement = stack.start_worker(wait=False)

    # The orphaned backend finishes its statement, finds its client gone and rolls back.
    wait_until(lambda: backend_gone(running["pid"]), 30, interval=0.1,
               message=f"backend {running['pid']} of the killed worker never ended")
    assert inbox_count(update_id) == (0, 0), "the killed transaction must roll back"
    assert update_row(update_id).routed_at is None
    (row,) = outbox_rows(update_id)
    assert row.completed_at is None and row.dispatched_at is not None

    # Redis would hand the taken message out again only after its visibility timeout (an
    # hour): the sweeper makes the outbox row due again and the new worker routes it.
    replacement.wait_ready()
    clock.mark("worker_restarted")
    figures = judge.settle(accepted=[update_id], recipients={update_id: recipients},
                           publisher_ids=[publisher.id], since=world.started,
                           stale_seconds=SWEEPER_STALE_SECONDS, timeout=45,
                           on_wait=stack.check_alive)
    recovered = clock.since("killed")

    assert inbox_count(update_id) == (FANOUT, FANOUT), "exactly one item per recipient"
    update = update_row(update_id)
    assert update.routed_at is not None
    assert update.recipient_count == FANOUT
    (row,) = outbox_rows(update_id)
    assert row.completed_at is not None
    assert row.dispatch_count >= 2, "handed out again after the kill"
    assert figures["inbox_items"] == FANOUT and figures["unexpected_inbox_items"] == 0
    judge.record("worker SIGKILL during the routing INSERT", figures,
                 recipients=FANOUT, insert_running_seconds=running["running"].total_seconds(),
                 dispatches=row.dispatch_count, recovered_seconds=recovered,
                 load_seconds=round(load_seconds, 1),
                 **clock.figures())


# ------------------------------------------------------------------------------ 2


def test_sigkill_mid_webhook_batch_delivers_everything_after_the_lease(
        world: FaultWorld, worker_stack: Stack) -> None:
    clock = Clock()
    with Receiver(routes={"/slow": slow(RECEIVER_DELAY)}) as receiver:
        topic, publish_key, subscriptions, _ = batch_world(world, receiver, "/slow", BATCH)
        clock.mark("setup")
        stack = worker_stack
        with stack.api.client(publish_key) as client:
            status, update_id = publish(client, topic, f"Batch {world.tag}")
        assert status == 202 and update_id

        wait_until(lambda: len(receiver.received("/slow")) >= 40, 30, interval=0.02,
                   message=lambda: f"the batch never started\n{stack.describe()}")
        stack.kill_worker()
        clock.mark("killed")
        before_kill = len(receiver.received("/slow"))
        held, recorded = leased(update_id), succeeded(update_id)
        assert before_kill < BATCH, "killed after the batch had ended"
        assert held >= 1, "no delivery was leased to the killed worker"

        stack.start_worker()
        clock.mark("worker_restarted")
        figures = judge.settle(accepted=[update_id], requests=receiver.received,
                               webhooks={update_id: subscriptions},
                               publisher_ids=[], since=world.started,
                               stale_seconds=SWEEPER_STALE_SECONDS,
                               timeout=DELIVERY_LEASE_SECONDS + 30, on_wait=stack.check_alive)
    assert figures["delivered"] == BATCH
    # What the killed sender had sent but not yet recorded is sent again after the lease,
    # under the same webhook-id (the duplicates the judge counts).
    judge.record("worker SIGKILL mid webhook batch", figures, batch=BATCH,
                 received_before_kill=before_kill, leased_at_kill=held,
                 recorded_at_kill=recorded,
                 lease_seconds=DELIVERY_LEASE_SECONDS,
                 **clock.figures())


# ------------------------------------------------------------------------------ 3


def test_sigkill_of_the_whole_worker_with_work_queued(world: FaultWorld, worker_stack: Stack
                                                     ) -> None:
    clock = Clock()
    with Receiver(routes={"/hook": slow(0.3)}) as receiver:
        topic = world.topic()
        publisher = world.publisher()
        inbox_orgs = [world.org("first"), world.org("second")]
        for org in inbox_orgs:
            world.subscribe(org, [topic])
        hooked = world.org("hooked")
        endpoint, secret = world.endpoint(hooked, receiver.url("/hook"))
        receiver.secrets.append(secret)
        world.webhook_subscription(hooked, endpoint, [topic])
        publish_key = world.key(publisher, "publish")
        clock.mark("setup")
        stack = worker_stack

        accepted: list[str] = []
        refused: list[str] = []
        with stack.api.client(publish_key) as client:

            def publish_one(title: str) -> None:
                status, update_id = publish(client, topic, title)
                if status == 202 and update_id:
                    accepted.append(update_id)
                else:
                    refused.append(title)

            for n in range(10):
                publish_one(f"Before {world.tag} {n}")
            # A webhook batch is in flight (the receiver answers slowly) ...
            wait_until(lambda: receiver.received("/hook"), 20, interval=0.02,
                       message=lambda: f"no webhook sent\n{stack.describe()}")
            # ... when the worker freezes, so that work piles up in the broker: the
            # messages it had taken stay unacknowledged, new ones queue.
            assert stack.worker is not None
            os.killpg(stack.worker.pid, signal.SIGSTOP)
            try:
                for n in range(20):
                    publish_one(f"Queued {world.tag} {n}")
                wait_until(lambda: queue_state(stack.broker)["queued"] >= 10, 15,
                           message=lambda: f"work never queued: {queue_state(stack.broker)}")
            finally:
                queued = queue_state(stack.broker)
                stack.kill_worker()
        clock.mark("killed")
        assert not refused
        assert queued["unacked"] >= 1, f"the worker had taken nothing: {queued}"
        received_before = len(receiver.received("/hook"))
        assert received_before < len(accepted)
        time.sleep(1)
        assert queue_state(stack.broker)["unacked"] >= 1, "Redis kept the taken messages"

        stack.start_worker()
        clock.mark("worker_restarted")
        figures = judge.settle(accepted=accepted, refused=refused, requests=receiver.received,
                               recipients=[org.id for org in inbox_orgs + [hooked]],
                               webhooks=["/hook"], publisher_ids=[publisher.id],
                               since=world.started, stale_seconds=SWEEPER_STALE_SECONDS,
                               timeout=DELIVERY_LEASE_SECONDS + 30, on_wait=stack.check_alive)
    assert figures["delivered"] == len(accepted) == 30
    judge.record("worker SIGKILL (main and pool) with work queued", figures,
                 queued_at_kill=queued["queued"], unacked_at_kill=queued["unacked"],
                 received_before_kill=received_before,
                 **clock.figures())


# ------------------------------------------------------------------------------ 4


def test_sigterm_during_a_batch_sends_nothing_twice(world: FaultWorld, worker_stack: Stack
                                                   ) -> None:
    clock = Clock()
    with Receiver(routes={"/slow": slow(RECEIVER_DELAY)}) as receiver:
        topic, publish_key, subscriptions, _ = batch_world(world, receiver, "/slow", BATCH)
        clock.mark("setup")
        stack = worker_stack
        with stack.api.client(publish_key) as client:
            status, update_id = publish(client, topic, f"Batch {world.tag}")
        assert status == 202 and update_id

        wait_until(lambda: len(receiver.received("/slow")) >= 40, 30, interval=0.02,
                   message=lambda: f"the batch never started\n{stack.describe()}")
        worker = stack.worker
        assert worker is not None and worker.proc is not None
        # Warm shutdown: the running sender finishes what is in flight (it runs a few seconds
        # at most), records the outcomes and gives back what it did not start. It must not
        # need SIGKILL. The replacement is launched at the same moment, as a rolling
        # restart would: the leases keep the two apart.
        worker.stop_grace = 30.0
        worker.proc.send_signal(signal.SIGTERM)
        clock.mark("sigterm")
        at_term = len(receiver.received("/slow"))
        held = leased(update_id)
        replacement = stack.start_worker(wait=False)
        returncode = worker.proc.wait(30)
        shutdown_seconds = clock.since("sigterm")
        worker.stop()
        after_shutdown = len(receiver.received("/slow"))
        assert returncode == 0, worker.describe()
        assert at_term < BATCH and held >= 1, "the batch had ended before SIGTERM"

        replacement.wait_ready()
        clock.mark("worker_restarted")
        figures = judge.settle(accepted=[update_id], requests=receiver.received,
                               webhooks={update_id: subscriptions}, since=world.started,
                               stale_seconds=SWEEPER_STALE_SECONDS, allow_duplicates=False,
                               timeout=30, on_wait=stack.check_alive)
    ids = [r.headers["webhook-id"] for r in receiver.received("/slow")]
    assert len(ids) == len(set(ids)) == BATCH, "each webhook-id exactly once"
    judge.record("worker SIGTERM (warm shutdown) during a batch", figures, batch=BATCH,
                 received_at_sigterm=at_term, leased_at_sigterm=held,
                 received_by_shutdown=after_shutdown, shutdown_seconds=shutdown_seconds,
                 **clock.figures())

