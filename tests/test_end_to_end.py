"""End to end through real processes: the API, a Celery worker with the scheduler embedded
(so the outbox relay thread runs), Redis as the broker and the test PostgreSQL database.

These tests commit for real (another process cannot see a rolled-back transaction). Every
organisation and topic they make is uniquely named and deleted again afterwards, with the
updates, inbox items and outbox rows that hang off them; no subscription here is without a
topic filter, so nothing they commit can match another test's updates. The broker is a Redis
database of its own (flushed first) or a throwaway redis-server, never the shared broker db.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session

from tests.processes import Api, RedisServer, Worker, process_env, running, wait_until

pytestmark = [pytest.mark.worker, pytest.mark.timeout(120)]

#: A broker database of its own, so stray messages of other tests never reach these workers.
E2E_BROKER_URL = os.environ.get("DOORSTROOM_TEST_E2E_BROKER_URL", "redis://127.0.0.1:6379/13")

PROCESS_SETTINGS = {
    "DOORSTROOM_OUTBOX_POLL_SECONDS": "0.5",
    "DOORSTROOM_SWEEPER_STALE_SECONDS": "5",
}

ROUTE_WAIT = 20.0


# ------------------------------------------------------------------------------- fixtures


def env_for(tmp_path: Path, broker_url: str) -> dict[str, str]:
    return process_env({
        **PROCESS_SETTINGS,
        "DOORSTROOM_BROKER_URL": broker_url,
        # One scheduler state file per test: never the one a developer's `make run` uses.
        "DOORSTROOM_BEAT_SCHEDULE_FILE": tmp_path / "celerybeat-schedule",
    })


@pytest.fixture
def e2e_broker() -> str:
    client = redis.Redis.from_url(E2E_BROKER_URL, socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()
    return E2E_BROKER_URL


@pytest.fixture
def stack(migrated_database: str, e2e_broker: str, tmp_path: Path) -> Iterator[Api]:
    """The API and `doorstroom worker --beat --concurrency 2`, stopped after the test."""
    env = env_for(tmp_path, e2e_broker)
    api = Api(env, tmp_path)
    worker = Worker(env, tmp_path, beat=True, concurrency=2)
    with running(api, worker):
        yield api


class World:
    """Organisations, keys, topics and subscriptions made on a committing session, and
    removed again (with everything that hangs off them) by `cleanup`."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.tag = uuid.uuid4().hex[:8]
        self.org_ids: list[uuid.UUID] = []
        self.topic_ids: list[uuid.UUID] = []

    def org(self, role: str, **kwargs: Any):
        from tests.factories import create_org

        org = create_org(self.session, name=f"e2e {role} {self.tag} {len(self.org_ids)}",
                         **kwargs)
        self.org_ids.append(org.id)
        return org

    def publisher(self):
        from domain.models import Kind, Level

        return self.org("publisher", level=Level.flemish, kind=Kind.agency)

    def key(self, org, *scopes: str) -> str:
        from tests.factories import create_key

        return create_key(self.session, org, *scopes)

    def topic(self) -> str:
        from tests.factories import create_topic

        topic = create_topic(self.session, f"e2e-{self.tag}-{len(self.topic_ids)}")
        self.topic_ids.append(topic.id)
        return topic.slug

    def subscribe(self, org, topics: list[str]):
        from tests.factories import create_subscription

        assert topics, "a committed subscription without a topic filter would match anything"
        return create_subscription(self.session, org, filter={"topics": topics})

    def cleanup(self) -> None:
        from domain.models import (
            IdempotencyKey,
            InboxItem,
            Organisation,
            OutboxMessage,
            Topic,
            Update,
        )

        session = self.session
        session.rollback()
        if not self.org_ids and not self.topic_ids:
            return
        update_ids = list(session.scalars(sa.select(Update.id)
                                          .where(Update.publisher_id.in_(self.org_ids))))
        session.execute(sa.delete(IdempotencyKey)
                        .where(IdempotencyKey.organisation_id.in_(self.org_ids)))
        if update_ids:
            session.execute(sa.delete(OutboxMessage).where(
                OutboxMessage.args["update_id"].as_string().in_([str(u) for u in update_ids])))
            session.execute(sa.delete(InboxItem).where(InboxItem.update_id.in_(update_ids)))
        session.execute(sa.delete(InboxItem).where(InboxItem.organisation_id.in_(self.org_ids)))
        session.execute(sa.delete(Update).where(Update.publisher_id.in_(self.org_ids)))
        # Subscriptions (and their topic rows), keys and group memberships cascade.
        session.execute(sa.delete(Organisation).where(Organisation.id.in_(self.org_ids)))
        session.execute(sa.delete(Topic).where(Topic.id.in_(self.topic_ids)))
        session.commit()


@pytest.fixture
def world(migrated_database: str) -> Iterator[World]:
    from domain.db import get_sessionmaker

    session = get_sessionmaker()()
    world = World(session)
    try:
        yield world
    finally:
        try:
            world.cleanup()
        finally:
            session.close()


# -------------------------------------------------------------------------------- helpers


def inbox_items(api: Api, key: str) -> list[dict[str, Any]]:
    with api.client(key) as client:
        response = client.get("/v1/inbox", params={"limit": 200})
    assert response.status_code == 200, response.text
    return response.json()["items"]


def wait_for_item(api: Api, key: str, update_id: str, timeout: float = ROUTE_WAIT,
                  logs: Worker | None = None) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        if logs is not None:
            logs.check_alive()
        return next((i for i in inbox_items(api, key) if i["update"]["id"] == update_id), None)

    return wait_until(found, timeout, interval=0.25,
                      message=lambda: f"update {update_id} never reached the inbox"
                                      + (f"\n{logs.describe()}" if logs else ""))


def publish(client: httpx.Client, **body: Any) -> dict[str, Any]:
    body.setdefault("title", f"End-to-end update {uuid.uuid4().hex[:6]}")
    response = client.post("/v1/updates", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def outbox_rows(update_ids: list[str]) -> list[Any]:
    from domain.db import session_scope
    from domain.models import OutboxMessage

    with session_scope() as session:
        return list(session.scalars(sa.select(OutboxMessage).where(
            OutboxMessage.task == "routing.route_update",
            OutboxMessage.args["update_id"].as_string().in_(update_ids))))


def inbox_pairs(update_ids: list[str]) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """(update, recipient) of every inbox item of these updates, duplicates kept."""
    from domain.db import session_scope
    from domain.models import InboxItem

    with session_scope() as session:
        return [tuple(row) for row in session.execute(
            sa.select(InboxItem.update_id, InboxItem.organisation_id)
            .where(InboxItem.update_id.in_([uuid.UUID(u) for u in update_ids])))]


def sub_reason(subscription) -> list[dict[str, str]]:
    return [{"kind": "subscription", "id": str(subscription.id)}]


# ---------------------------------------------------------------------------------- tests


def test_publish_reaches_the_inbox_through_a_running_worker(stack: Api, world: World) -> None:
    topic, other_topic = world.topic(), world.topic()
    publisher = world.publisher()
    first, second, bystander = world.org("first"), world.org("second"), world.org("bystander")
    first_sub = world.subscribe(first, [topic])
    second_sub = world.subscribe(second, [topic])
    world.subscribe(bystander, [other_topic])
    publish_key = world.key(publisher, "publish")
    keys = {org.id: world.key(org, "subscribe") for org in (first, second, bystander)}

    with stack.client(publish_key) as client:
        accepted = publish(client, topics=[topic])
    assert accepted["status"] == "published"
    update_id = accepted["id"]

    for org, sub in ((first, first_sub), (second, second_sub)):
        item = wait_for_item(stack, keys[org.id], update_id)
        assert item["reasons"] == sub_reason(sub)
        assert item["update"]["id"] == update_id
        assert item["delivered_at"] is not None

    assert inbox_items(stack, keys[bystander.id]) == []

    with stack.client(publish_key) as client:
        reach = client.get(f"/v1/updates/{update_id}/reach")
    assert reach.status_code == 200, reach.text
    body = reach.json()
    assert body["totals"]["recipients"] == 2
    assert {i["organisation_id"] for i in body["items"]} == {str(first.id), str(second.id)}
    assert all(row.completed_at is not None for row in outbox_rows([update_id]))


@pytest.mark.skipif(shutil.which("redis-server") is None,
                    reason="needs redis-server to run a throwaway broker")
def test_publishing_keeps_working_while_the_broker_is_down(
        migrated_database: str, world: World, tmp_path: Path) -> None:
    """The broker (a throwaway redis-server, without persistence) goes down while the API
    and a worker run: publishing still answers at once, the work waits in the outbox and is
    all routed, exactly once per recipient, when the broker is back."""
    topic = world.topic()
    publisher = world.publisher()
    subscribers = [world.org("first"), world.org("second")]
    for org in subscribers:
        world.subscribe(org, [topic])
    publish_key = world.key(publisher, "publish")
    subscribe_keys = [world.key(org, "subscribe") for org in subscribers]

    broker = RedisServer(tmp_path)
    env = env_for(tmp_path, broker.url(0))
    api = Api(env, tmp_path)
    worker = Worker(env, tmp_path, beat=True, concurrency=2)
    with running(broker, api, worker):
        # Before the outage: one update through the API's fast path and one (scheduled a
        # moment ahead) through the relay thread, so that both hold broker connections that
        # the outage then breaks.
        with api.client(publish_key) as client:
            before = [publish(client, topics=[topic])["id"],
                      publish(client, topics=[topic], publish_at=(
                          datetime.now(UTC) + timedelta(seconds=1)).isoformat())["id"]]
        wait_until(lambda: len(inbox_pairs(before)) == 4, ROUTE_WAIT,
                   message=lambda: f"not routed before the outage\n{worker.describe()}")

        broker.stop()

        update_ids = []
        with api.client(publish_key, timeout=10) as client:
            for n in range(5):
                started = time.monotonic()
                accepted = publish(client, topics=[topic], title=f"During the outage {n}")
                elapsed = time.monotonic() - started
                assert elapsed < 3, f"publish {n} took {elapsed:.2f} s with the broker down"
                update_ids.append(accepted["id"])

        def undispatched() -> None:
            rows = outbox_rows(update_ids)
            assert len(rows) == 5
            assert all(r.dispatched_at is None and r.completed_at is None for r in rows), [
                (r.id, r.dispatched_at, r.completed_at) for r in rows]

        undispatched()
        # Stay down through several relay polls and a sweep: a failed send must leave the
        # rows waiting (not marked dispatched, which would park them until the sweeper).
        time.sleep(3)
        undispatched()
        assert inbox_pairs(update_ids) == []
        worker.check_alive()
        assert "wait for the poller" in worker.current_log(), worker.describe()

        broker.start()  # same port, empty: whatever it held before is gone

        expected = {(uuid.UUID(u), org.id) for u in update_ids for org in subscribers}
        wait_until(lambda: set(inbox_pairs(update_ids)) == expected, 30, interval=0.25,
                   message=lambda: f"routed {len(inbox_pairs(update_ids))} of "
                                   f"{len(expected)} items\n{worker.describe()}")
        pairs = inbox_pairs(update_ids)
        assert len(pairs) == len(set(pairs)) == 10, "exactly one item per (update, recipient)"
        wait_until(lambda: all(r.completed_at is not None for r in outbox_rows(update_ids)),
                   10, message="outbox rows not completed")
        for key in subscribe_keys:
            received = {i["update"]["id"] for i in inbox_items(api, key)}
            assert received == set(update_ids) | set(before)


def test_scheduled_update_is_published_when_due(stack: Api, world: World) -> None:
    topic = world.topic()
    publisher = world.publisher()
    subscriber = world.org("subscriber")
    sub = world.subscribe(subscriber, [topic])
    publish_key = world.key(publisher, "publish")
    subscribe_key = world.key(subscriber, "subscribe")

    publish_at = datetime.now(UTC) + timedelta(seconds=3)
    with stack.client(publish_key) as client:
        accepted = publish(client, topics=[topic], publish_at=publish_at.isoformat())
    assert accepted["status"] == "scheduled"
    update_id = accepted["id"]

    # Not delivered early: watch the inbox until just before it is due.
    while datetime.now(UTC) < publish_at - timedelta(seconds=0.4):
        assert inbox_items(stack, subscribe_key) == [], "delivered before publish_at"
        time.sleep(0.25)

    item = wait_for_item(stack, subscribe_key, update_id, timeout=15)
    assert item["reasons"] == sub_reason(sub)
    delivered = datetime.fromisoformat(item["delivered_at"])
    assert delivered >= publish_at, (delivered, publish_at)
    with stack.client(publish_key) as client:
        update = client.get(f"/v1/updates/{update_id}")
    assert update.status_code == 200, update.text
    assert update.json()["status"] == "published"


def test_sweeper_redispatches_lost_routing(stack: Api, world: World) -> None:
    """A routing message lost with the broker (dispatched, never completed) is sent again."""
    from domain.models import OutboxMessage, Update, UpdateStatus
    from tests.factories import publish_update

    topic = world.topic()
    publisher = world.publisher()
    subscriber = world.org("subscriber")
    sub = world.subscribe(subscriber, [topic])
    subscribe_key = world.key(subscriber, "subscribe")

    # Scheduled far ahead first, so that the running relay leaves its outbox row alone while
    # it is turned, in one transaction, into a message handed to a broker that then lost it.
    session = world.session
    update = publish_update(session, publisher, route=False, topics=[topic],
                            publish_at=datetime.now(UTC) + timedelta(hours=1))
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    session.execute(sa.update(Update).where(Update.id == update.id)
                    .values(publish_at=long_ago, status=UpdateStatus.published))
    lost = session.execute(
        sa.update(OutboxMessage)
        .where(OutboxMessage.args["update_id"].as_string() == str(update.id))
        .values(available_at=long_ago, dispatched_at=long_ago, dispatch_count=1)
        .returning(OutboxMessage.id)).scalar_one()
    session.commit()

    item = wait_for_item(stack, subscribe_key, str(update.id))
    assert item["reasons"] == sub_reason(sub)
    row = outbox_rows([str(update.id)])[0]
    assert row.id == lost
    assert row.completed_at is not None
    assert row.dispatch_count == 2
