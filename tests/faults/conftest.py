"""Fixtures for fault tests: a committing world that cleans up after itself, a throwaway
broker, and a stack of real processes (API, scheduler, worker) whose worker can be killed.

Everything here goes through real processes and commits for real, so every organisation and
topic is uniquely named (`FaultWorld.tag`) and removed again with all that hangs off it;
every subscription has a topic filter of the test's own topics, so nothing it commits can
match another test's updates. The broker is always a throwaway redis-server on a free port
(never the shared one on 6379, which other tests use concurrently).

The scheduler runs as a process of its own (`doorstroom beat`, with the outbox relay thread
and the sweeper), so that killing a worker does not also kill the relay: the sweeper is what
recovers work a dead worker had taken (Redis would only hand it out again after its
visibility timeout, an hour).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from tests.processes import Api, Beat, ProcessError, RedisServer, Worker, process_env, wait_until

#: Settings of the processes under test: a fast relay and sweeper, short leases and timeouts,
#: so that recovery takes seconds instead of minutes.
SWEEPER_STALE_SECONDS = 3.0
#: What a killed sender had claimed is sent again once its lease runs out (14 s, not the
#: production 120 s); a claimed delivery that could not start within `lease - timeout - 10 s`
#: (2 s here) is given back unsent.
DELIVERY_LEASE_SECONDS = 14.0
WEBHOOK_TIMEOUT_SECONDS = 2.0
PROCESS_SETTINGS: dict[str, str] = {
    "DOORSTROOM_OUTBOX_POLL_SECONDS": "0.5",
    "DOORSTROOM_SWEEPER_STALE_SECONDS": str(SWEEPER_STALE_SECONDS),
    "DOORSTROOM_DELIVERY_POLL_SECONDS": "1",
    "DOORSTROOM_DELIVERY_LEASE_SECONDS": str(DELIVERY_LEASE_SECONDS),
    "DOORSTROOM_WEBHOOK_TIMEOUT_SECONDS": str(WEBHOOK_TIMEOUT_SECONDS),
    "DOORSTROOM_WEBHOOK_PER_ENDPOINT_CONCURRENCY": "8",
    "DOORSTROOM_WEBHOOK_ALLOW_LOOPBACK": "true",
    "DOORSTROOM_ENVIRONMENT": "test",
    # Hundreds of publishes per test from one key: no rate limit in the way.
    "DOORSTROOM_RATE_LIMIT_PER_MINUTE": "0",
}

needs_redis_server = pytest.mark.skipif(shutil.which("redis-server") is None,
                                        reason="needs redis-server for a throwaway broker")


# ------------------------------------------------------------------------------ the world


class FaultWorld:
    """Organisations, keys, topics, endpoints and subscriptions made on a committing
    session, and removed again (with updates, inbox items, deliveries and outbox rows) by
    `cleanup`."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.tag = uuid.uuid4().hex[:8]
        self.org_ids: list[uuid.UUID] = []
        self.topic_ids: list[uuid.UUID] = []
        #: Organisations loaded in bulk (COPY): removed set-based.
        self.bulk_org_ids: list[uuid.UUID] = []
        self.started = datetime.now(UTC)

    # -- through the use cases
    def org(self, role: str, **kwargs: Any):
        from tests.factories import create_org

        org = create_org(self.session, name=f"fault {role} {self.tag} {len(self.org_ids)}",
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

        topic = create_topic(self.session, f"fault-{self.tag}-{len(self.topic_ids)}")
        self.topic_ids.append(topic.id)
        return topic.slug

    def subscribe(self, org, topics: list[str], **kwargs: Any):
        from tests.factories import create_subscription

        assert topics, "a committed subscription without a topic filter would match anything"
        return create_subscription(self.session, org, filter={"topics": topics}, **kwargs)

    def endpoint(self, org, url: str) -> tuple[Any, str]:
        """A webhook endpoint of `org` (written directly: no URL check); (endpoint, secret)."""
        from tests.factories import insert_webhook_endpoint

        endpoint, secret = insert_webhook_endpoint(self.session, org, url)
        self.session.commit()
        return endpoint, secret

    def webhook_subscription(self, org, endpoint, topics: list[str], **kwargs: Any):
        return self.subscribe(org, topics, channel={"type": "webhook",
                                                    "endpoint_id": str(endpoint.id)}, **kwargs)

    # -- in bulk
    def bulk_subscribers(self, topic_slug: str, n: int) -> list[uuid.UUID]:
        """n organisations with one inbox subscription each on `topic_slug`, loaded with COPY
        (as bench/fanout.py does); answers their ids."""
        from domain import matching
        from domain.filters import normalise_filter
        from domain.models import Topic, new_id

        session = self.session
        canonical, compiled = normalise_filter(session, {"topics": [topic_slug]})
        topic_id = session.scalars(sa.select(Topic.id).where(Topic.slug == topic_slug)).one()
        session.commit()
        filter_text = json.dumps(canonical, separators=(",", ":"))
        tail = (f"\tt\tf\t{compiled.publisher_levels}\t{compiled.prevention_levels}"
                f"\t{compiled.roles}\t{matching.PRIORITY_RANK[compiled.min_priority]}"
                "\timmediate\t\\N\t\\N\tt\tinbox\t{\"type\":\"inbox\"}\t\\N\tt\t")
        now = datetime.now(UTC).isoformat()
        org_ids = [new_id() for _ in range(n)]
        sub_ids = [new_id() for _ in range(n)]
        orgs, subs, links = io.StringIO(), io.StringIO(), io.StringIO()
        for i, (org, sub) in enumerate(zip(org_ids, sub_ids, strict=True)):
            orgs.write(f"{org}\tfault bulk {self.tag} {i}\tlocal\tmunicipality\t{now}\t{now}\n")
            subs.write(f"{sub}\t{org}\t{filter_text}{tail}{now}\t{now}\n")
            links.write(f"{sub}\t{topic_id}\n")
        self.bulk_org_ids.extend(org_ids)  # before loading: cleaned up even if COPY fails
        from domain.db import get_engine

        raw = get_engine().raw_connection()
        try:
            conn = raw.driver_connection
            assert conn is not None
            with conn.cursor() as cur:
                # Test data of our own, consistent by construction: skip the per-row
                # foreign-key triggers (the test database is ours as superuser).
                cur.execute("SET LOCAL session_replication_role = replica")
                with cur.copy("COPY organisations (id, name, level, kind, created_at, "
                              "updated_at) FROM STDIN") as copy:
                    copy.write(orgs.getvalue())
                with cur.copy("COPY subscriptions (id, organisation_id, filter, "
                              "has_topic_filter, has_publisher_filter, publisher_levels_mask, "
                              "prevention_levels_mask, roles_mask, min_priority_rank, cadence, "
                              "send_at, weekday, include_directed, channel_type, channel, "
                              "feed_token, active, created_at, updated_at) FROM STDIN") as copy:
                    copy.write(subs.getvalue())
                with cur.copy("COPY subscription_topics (subscription_id, topic_id) "
                              "FROM STDIN") as copy:
                    copy.write(links.getvalue())
                cur.execute("ANALYZE organisations")
                cur.execute("ANALYZE subscriptions")
                cur.execute("ANALYZE subscription_topics")
            conn.commit()
        finally:
            raw.close()
        return org_ids

    # -- cleanup
    def cleanup(self) -> None:
        from domain.models import (
            Delivery,
            IdempotencyKey,
            InboxItem,
            Organisation,
            OutboxMessage,
            Topic,
            Update,
        )

        session = self.session
        session.rollback()
        org_ids = self.org_ids
        if org_ids:
            update_ids = list(session.scalars(sa.select(Update.id)
                                              .where(Update.publisher_id.in_(org_ids))))
            session.execute(sa.delete(IdempotencyKey)
                            .where(IdempotencyKey.organisation_id.in_(org_ids)))
            if update_ids:
                session.execute(sa.delete(OutboxMessage).where(
                    OutboxMessage.args["update_id"].as_string()
                    .in_([str(u) for u in update_ids])))
                session.execute(sa.delete(Delivery).where(Delivery.update_id.in_(update_ids)))
                session.execute(sa.delete(InboxItem).where(InboxItem.update_id.in_(update_ids)))
            session.execute(sa.delete(Delivery).where(Delivery.organisation_id.in_(org_ids)))
            session.execute(sa.delete(InboxItem).where(InboxItem.organisation_id.in_(org_ids)))
            session.execute(sa.delete(Update).where(Update.publisher_id.in_(org_ids)))
            session.commit()
        if self.bulk_org_ids:
            # Set-based, children first; the per-row foreign-key triggers are skipped (they
            # would cost seconds per hundred thousand rows and find nothing left to do).
            ids = sa.bindparam("ids", self.bulk_org_ids, type_=sa.ARRAY(sa.Uuid))
            session.execute(sa.text("SET LOCAL session_replication_role = replica"))
            for statement in (
                "DELETE FROM subscription_topics WHERE subscription_id IN "
                "(SELECT id FROM subscriptions WHERE organisation_id = ANY(:ids))",
                "DELETE FROM subscriptions WHERE organisation_id = ANY(:ids)",
                "DELETE FROM inbox_items WHERE organisation_id = ANY(:ids)",
                "DELETE FROM organisations WHERE id = ANY(:ids)",
            ):
                session.execute(sa.text(statement).bindparams(ids))
            session.commit()
            self.bulk_org_ids = []
        if org_ids:
            # Subscriptions, endpoints, keys and group memberships cascade.
            session.execute(sa.delete(Organisation).where(Organisation.id.in_(org_ids)))
        if self.topic_ids:
            session.execute(sa.delete(Topic).where(Topic.id.in_(self.topic_ids)))
        session.commit()


@pytest.fixture
def world(migrated_database: str) -> Iterator[FaultWorld]:
    from domain.db import get_sessionmaker

    session = get_sessionmaker()()
    world = FaultWorld(session)
    try:
        yield world
    finally:
        try:
            world.cleanup()
        finally:
            session.close()


# ------------------------------------------------------------------------------ processes


def fault_env(tmp_path: Path, broker_url: str, **overrides: Any) -> dict[str, str]:
    return process_env({
        **PROCESS_SETTINGS,
        "DOORSTROOM_BROKER_URL": broker_url,
        "DOORSTROOM_BEAT_SCHEDULE_FILE": tmp_path / "celerybeat-schedule",
        **overrides,
    })


def children_of(pid: int) -> list[int]:
    """Direct children of a process (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its ")".
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies still count for killpg(0); look for a live member.
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def queue_worker(worker: Worker, queues: str) -> Worker:
    """The same worker, consuming only `queues` (comma-separated)."""
    worker.argv = [*worker.argv, "--queues", queues]
    return worker


class Stack:
    """API, scheduler and worker of one test, on one broker; the worker can be killed,
    stopped and started again. `close()` stops everything (bounded).

    By default the worker consumes every queue. With `sender=True` the stack runs as
    production does (compose.yaml): the worker takes the default queue (routing) and a sender
    worker of its own the `deliveries` queue (webhooks, e-mail); the sender is started and
    stopped with the stack, not by the worker methods."""

    def __init__(self, tmp_path: Path, broker: RedisServer, concurrency: int = 2,
                 sender: bool = False, **overrides: Any) -> None:
        self.tmp_path = tmp_path
        self.broker = broker
        self.env = fault_env(tmp_path, broker.url(0), **overrides)
        self.concurrency = concurrency
        self.api = Api(self.env, tmp_path)
        self.beat = Beat(self.env, tmp_path)
        self.worker: Worker | None = None
        self.workers: list[Worker] = []
        self.sender: Worker | None = None
        if sender:
            from workers.celery_app import DELIVERIES_QUEUE

            self.sender = queue_worker(Worker(self.env, tmp_path, beat=False,
                                              concurrency=concurrency, name="sender"),
                                       DELIVERIES_QUEUE)

    def start(self, worker: bool = True) -> Stack:
        """Launch the API, the scheduler and (unless `worker=False`) a worker together;
        answer once all are ready."""
        try:
            self.api.launch()
            self.beat.launch()
            if self.sender is not None:
                self.sender.launch()
            if worker:
                self.start_worker(wait=False)
            self.api.wait_ready()
            self.beat.wait_ready()
            if self.sender is not None:
                self.sender.wait_ready()
            if worker:
                assert self.worker is not None
                self.worker.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def stop_workers(self) -> None:
        """Stop every worker (SIGTERM to all at once, then bounded waits)."""
        for worker in self.workers:
            if worker.alive():
                assert worker.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.terminate()
        for worker in self.workers:
            worker.stop()
        self.worker = None

    def new_worker(self) -> Worker:
        worker = Worker(self.env, self.tmp_path, beat=False, concurrency=self.concurrency,
                        name=f"worker{len(self.workers)}")
        if self.sender is not None:
            from workers.celery_app import DEFAULT_QUEUE

            queue_worker(worker, DEFAULT_QUEUE)
        self.workers.append(worker)
        return worker

    def start_worker(self, wait: bool = True) -> Worker:
        self.worker = self.new_worker()
        if wait:
            self.worker.start()
        else:
            self.worker.launch()
        return self.worker

    def kill_worker(self) -> int:
        """SIGKILL the worker's whole process group (main process and pool) at once and wait
        until every member is gone; answers the group id."""
        assert self.worker is not None and self.worker.alive(), "no worker to kill"
        pgid = self.worker.pid
        os.killpg(pgid, signal.SIGKILL)
        assert self.worker.proc is not None
        self.worker.proc.wait(10)
        wait_until(lambda: not group_alive(pgid), 10,
                   message=f"worker process group {pgid} outlived SIGKILL")
        return pgid

    def pool_pids(self) -> list[int]:
        assert self.worker is not None
        return children_of(self.worker.pid)

    def describe(self) -> str:
        parts = [self.api.describe(), self.beat.describe()]
        parts += [w.describe() for w in self.workers[-2:]]
        if self.sender is not None:
            parts.append(self.sender.describe())
        return "\n\n".join(parts)

    def check_alive(self) -> None:
        self.api.check_alive()
        self.beat.check_alive()
        if self.sender is not None:
            self.sender.check_alive()

    def close(self) -> None:
        """SIGTERM to every process at once (warm shutdowns overlap), then the bounded
        `stop()` of each (SIGKILL to whatever does not leave in time)."""
        processes = [*reversed(self.workers), *([self.sender] if self.sender else []),
                     self.beat, self.api]
        for process in processes:
            if process.alive():
                assert process.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    process.proc.terminate()
        for process in processes:
            process.stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    """A throwaway redis-server (no persistence) on a free port."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server for a throwaway broker")
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def shared_stack(migrated_database: str, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Stack]:
    """An API and a scheduler on a throwaway broker, shared by the tests of a module that
    only kill, stop and start workers (saves starting them per test); see `worker_stack`."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server for a throwaway broker")
    folder = tmp_path_factory.mktemp("shared-stack")
    broker = RedisServer(folder)
    broker.start()
    # 16 requests at once to one endpoint: 200 webhooks to a receiver that answers in
    # 0.2 s take a few seconds, long enough to be interrupted half-way.
    stack = Stack(folder, broker, concurrency=2,
                  DOORSTROOM_WEBHOOK_PER_ENDPOINT_CONCURRENCY="16")
    try:
        stack.start(worker=True)  # the first test's worker starts with the rest
        yield stack
    finally:
        try:
            stack.close()
        finally:
            broker.stop()


@pytest.fixture
def worker_stack(shared_stack: Stack) -> Iterator[Stack]:
    """The module's shared API and scheduler plus a fresh worker (concurrency 2); every
    worker started during the test is stopped after it."""
    if not shared_stack.broker.alive():  # a broker test that failed half-way
        shared_stack.broker.start()
    shared_stack.check_alive()
    if not (shared_stack.worker is not None and shared_stack.worker.alive()
            and len(shared_stack.workers) == 1):
        shared_stack.start_worker()
    try:
        yield shared_stack
    finally:
        shared_stack.stop_workers()


@pytest.fixture
def make_stack(broker: RedisServer, tmp_path: Path) -> Iterator[Any]:
    """make_stack(concurrency=2, sender=False, **env overrides) -> a started Stack, closed
    after the test."""
    stacks: list[Stack] = []

    def make(concurrency: int = 2, sender: bool = False, **overrides: Any) -> Stack:
        stack = Stack(tmp_path, broker, concurrency, sender=sender, **overrides)
        stacks.append(stack)
        return stack.start()

    try:
        yield make
    finally:
        for stack in reversed(stacks):
            stack.close()


# ------------------------------------------------------------------------------ helpers


def publish(client: httpx.Client, topic: str, title: str, **body: Any) -> tuple[int, str | None]:
    """POST /v1/updates; answers (status, update id or None). Connection errors and
    timeouts count as refused (status 0)."""
    try:
        response = client.post("/v1/updates", json={"title": title, "topics": [topic], **body})
    except httpx.HTTPError:
        return 0, None
    if response.status_code == 202:
        return 202, response.json()["id"]
    return response.status_code, None


def queue_state(broker: RedisServer, queue: str = "doorstroom") -> dict[str, int]:
    """Messages waiting in the broker's queue (`queued`; the sending queue: `deliveries`) and
    messages taken by a worker but not acknowledged (`unacked`)."""
    import redis

    client = redis.Redis.from_url(broker.url(0), socket_timeout=2)
    try:
        return {"queued": int(client.llen(queue)), "deliveries": int(client.llen("deliveries")),
                "unacked": int(client.hlen("unacked"))}
    finally:
        client.close()


def queued_tasks(broker: RedisServer, queue: str = "doorstroom") -> list[str]:
    """The task names of the messages waiting in a queue of the broker."""
    import redis

    client = redis.Redis.from_url(broker.url(0), socket_timeout=2)
    try:
        raw = client.lrange(queue, 0, -1)
    finally:
        client.close()
    return [str(json.loads(message).get("headers", {}).get("task")) for message in raw]


def routing_statement_running(database: str) -> dict[str, Any] | None:
    """The routing INSERT of inbox items, if a backend of `database` is running it now."""
    from domain.db import get_engine

    with get_engine().connect() as conn:
        row = conn.execute(sa.text(
            "SELECT pid, state, now() - query_start AS running FROM pg_stat_activity "
            "WHERE datname = :db AND state = 'active' AND query ILIKE '%INSERT INTO inbox_items%'"
            " AND pid <> pg_backend_pid()"), {"db": database}).mappings().first()
    return dict(row) if row else None


def backend_gone(pid: int) -> bool:
    from domain.db import get_engine

    with get_engine().connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"),
                            {"pid": pid}).scalar() == 0


class Clock:
    """Seconds since the test began at named moments, for the recorded results."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> float:
        self.marks[name] = round(time.monotonic() - self.started, 1)
        return self.marks[name]

    def since(self, name: str) -> float:
        return round(time.monotonic() - self.started - self.marks[name], 1)

    def figures(self) -> dict[str, Any]:
        return {"phases_s": dict(self.marks),
                "runtime_seconds": round(time.monotonic() - self.started, 1)}


__all__ = ["Clock", "FaultWorld", "Stack", "ProcessError", "publish", "queue_state",
           "queued_tasks", "fault_env", "needs_redis_server", "routing_statement_running",
           "backend_gone", "children_of", "SWEEPER_STALE_SECONDS", "DELIVERY_LEASE_SECONDS",
           "PROCESS_SETTINGS"]
