"""The broker fails, and nothing is lost: real API, scheduler and worker processes, the test
PostgreSQL database, a throwaway Redis broker (never the shared one) and a real webhook
receiver.

5. The broker is stopped while updates are published: the API keeps answering 202 at once,
   the work waits in the outbox (`/metrics` shows its age growing) and is all routed and
   delivered once the broker is back.
6. Redis restarts without persistence while work is queued in it (dispatched, not yet
   consumed: the worker was stopped): the queue is gone, the sweeper hands the work out
   again, everything is routed and delivered and nothing stays stuck past the sweeper
   period.

The API and the scheduler are shared by the module's tests (`shared_stack`), each test gets
a worker of its own; both tests put the broker back before they end.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import sqlalchemy as sa

from tests.faults import judge
from tests.faults.conftest import (
    SWEEPER_STALE_SECONDS,
    Clock,
    FaultWorld,
    Stack,
    publish,
    queue_state,
    queued_tasks,
)
from tests.processes import wait_until
from tests.receivers import Receiver, slow

pytestmark = [pytest.mark.faults, pytest.mark.worker, pytest.mark.timeout(90)]

OLDEST = "doorstroom_outbox_oldest_undispatched_age_seconds"
UNDISPATCHED = "doorstroom_outbox_undispatched"
DELIVERIES = "doorstroom_deliveries"


class Scenario:
    """A publisher, two inbox subscribers and one webhook subscriber on a topic of the
    test's own; a receiver that verifies signatures."""

    def __init__(self, world: FaultWorld, receiver: Receiver) -> None:
        self.world = world
        self.receiver = receiver
        self.topic = world.topic()
        self.publisher = world.publisher()
        self.inbox_orgs = [world.org("first"), world.org("second")]
        for org in self.inbox_orgs:
            world.subscribe(org, [self.topic])
        self.hooked = world.org("hooked")
        endpoint, secret = world.endpoint(self.hooked, receiver.url("/hook"))
        receiver.secrets.append(secret)
        world.webhook_subscription(self.hooked, endpoint, [self.topic])
        self.publish_key = world.key(self.publisher, "publish")
        self.accepted: list[str] = []
        self.refused: list[str] = []
        #: Seconds each publish took to answer.
        self.latencies: list[float] = []

    def publish(self, stack: Stack, count: int, label: str) -> list[str]:
        ids = []
        with stack.api.client(self.publish_key, timeout=10) as client:
            for n in range(count):
                title = f"{label} {self.world.tag} {n}"
                started = time.monotonic()
                status, update_id = publish(client, self.topic, title)
                self.latencies.append(time.monotonic() - started)
                if status == 202 and update_id:
                    self.accepted.append(update_id)
                    ids.append(update_id)
                else:
                    self.refused.append(title)
        return ids

    def settle(self, stack: Stack, timeout: float = 40.0) -> dict[str, Any]:
        return judge.settle(accepted=self.accepted, refused=self.refused,
                            requests=self.receiver.received,
                            recipients=[o.id for o in [*self.inbox_orgs, self.hooked]],
                            webhooks=["/hook"], publisher_ids=[self.publisher.id],
                            since=self.world.started, stale_seconds=SWEEPER_STALE_SECONDS,
                            timeout=timeout, on_wait=stack.check_alive)


def outbox_rows(update_ids: list[str]) -> list[Any]:
    from domain.db import session_scope
    from domain.models import OutboxMessage

    with session_scope() as session:
        rows = list(session.scalars(sa.select(OutboxMessage).where(
            OutboxMessage.task == "routing.route_update",
            OutboxMessage.args["update_id"].as_string().in_(update_ids))))
        session.expunge_all()
        return rows


def outbox_drained(stack: Stack, timeout: float = 15.0) -> dict[Any, float]:
    """/metrics once it shows no outbox row waiting for the broker (bounded wait)."""
    def drained() -> dict[Any, float] | None:
        samples = judge.read_metrics(stack.api.base_url)
        return samples if judge.metric(samples, OLDEST) == 0 else None

    samples = wait_until(drained, timeout, interval=0.5,
                         message="the outbox age did not return to 0 on /metrics")
    assert samples is not None
    return samples


def webhook_deliveries(samples: dict[Any, float], status: str) -> float:
    return judge.metric(samples, DELIVERIES, channel="webhook", status=status) or 0.0


# ------------------------------------------------------------------------------ 5


def test_broker_down_while_publishing(world: FaultWorld, worker_stack: Stack) -> None:
    clock = Clock()
    with Receiver(routes={"/hook": slow(0.05)}) as receiver:
        scenario = Scenario(world, receiver)
        clock.mark("setup")
        stack = worker_stack
        before = scenario.publish(stack, 3, "Before")
        wait_until(lambda: len({r.headers["webhook-id"] for r in receiver.received("/hook")})
                   >= len(before), 20,
                   message=lambda: f"not delivered before the outage\n{stack.describe()}")
        baseline = judge.read_metrics(stack.api.base_url)

        stack.broker.stop()
        outage_started = time.monotonic()
        during = scenario.publish(stack, 10, "During")
        assert len(during) == 10 and not scenario.refused, scenario.refused
        slowest = max(scenario.latencies[len(before):])
        assert slowest < 3.0, f"a publish took {slowest:.2f} s with the broker down"

        # The work waits in PostgreSQL, visibly: its age grows on /metrics.
        def waiting() -> dict[Any, float] | None:
            samples = judge.read_metrics(stack.api.base_url)
            return samples if (judge.metric(samples, OLDEST) or 0) >= 2.0 else None

        outage = wait_until(waiting, 15, interval=0.5,
                            message="the outbox age never showed on /metrics")
        assert outage is not None
        assert (judge.metric(outage, UNDISPATCHED) or 0) >= len(during)
        rows = outbox_rows(during)
        assert len(rows) == 10 and all(r.dispatched_at is None for r in rows)
        assert not any(u in r.body.decode() for u in during for r in receiver.received())
        outage_seconds = time.monotonic() - outage_started

        stack.broker.start()  # same port, empty
        figures = scenario.settle(stack)
        after = outbox_drained(stack)
    succeeded = webhook_deliveries(after, "succeeded") - webhook_deliveries(baseline, "succeeded")
    assert succeeded >= len(during)
    assert webhook_deliveries(after, "pending") <= webhook_deliveries(baseline, "pending")
    assert figures["delivered"] == figures["published"] == 13
    judge.record("broker stopped while publishing", figures,
                 slowest_publish_seconds=round(slowest, 2),
                 outage_seconds=round(outage_seconds, 1),
                 metrics_oldest_undispatched_during=judge.metric(outage, OLDEST),
                 metrics_undispatched_during=judge.metric(outage, UNDISPATCHED),
                 metrics_oldest_undispatched_after=judge.metric(after, OLDEST),
                 metrics_webhook_succeeded_delta=succeeded,
                 **clock.figures())


# ------------------------------------------------------------------------------ 6


def test_redis_restart_without_persistence_loses_no_queued_work(
        world: FaultWorld, worker_stack: Stack) -> None:
    clock = Clock()
    with Receiver(routes={"/hook": slow(0.05)}) as receiver:
        scenario = Scenario(world, receiver)
        clock.mark("setup")
        stack = worker_stack
        before = scenario.publish(stack, 2, "Before")
        wait_until(lambda: len(receiver.received("/hook")) >= len(before), 20,
                   message=lambda: f"not delivered before the fault\n{stack.describe()}")

        # No consumer: what is published now is dispatched into Redis and waits there.
        assert stack.worker is not None
        stack.worker.stop()
        queued_ids = scenario.publish(stack, 10, "Queued")
        assert len(queued_ids) == 10
        wait_until(lambda: all(r.dispatched_at is not None for r in outbox_rows(queued_ids)),
                   15, message="the relay never dispatched the rows")
        queued = queue_state(stack.broker)
        waiting = queued_tasks(stack.broker).count("routing.route_update")
        assert waiting == 10, queued

        stack.broker.stop()
        stack.broker.start()  # no persistence: the queue is gone
        # (The scheduler may already have sent a periodic task to the new server.)
        assert "routing.route_update" not in queued_tasks(stack.broker)
        restarted = time.monotonic()

        stack.start_worker()
        clock.mark("worker_restarted")
        figures = scenario.settle(stack)
        recovered = time.monotonic() - restarted
        after = outbox_drained(stack)
    rows = outbox_rows(queued_ids)
    assert all(r.completed_at is not None for r in rows)
    assert all(r.dispatch_count >= 2 for r in rows), "handed out again by the sweeper"
    assert figures["delivered"] == figures["published"] == 12
    judge.record("redis restarted without persistence, work queued", figures,
                 routings_queued_at_restart=waiting, queued_at_restart=queued["queued"],
                 recovered_seconds=round(recovered, 1),
                 max_dispatches=max(r.dispatch_count for r in rows),
                 metrics_oldest_undispatched_after=judge.metric(after, OLDEST),
                 **clock.figures())
