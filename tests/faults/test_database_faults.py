"""The database goes away under a running API, and comes back.

A throwaway PostgreSQL (tests/faults/pgserver.py, never the shared server) backs a real API,
scheduler and worker. While it is down, every request that needs it answers 503 with a
problem document at once (no hang, no 500, no stack trace) and /readyz says not ready; once
it is back, a client retrying its publish with the same Idempotency-Key gets 202 and exactly
one update, which the worker routes; what was refused during the outage never shows up.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from tests.faults import judge, pgserver
from tests.faults.conftest import Stack, needs_redis_server
from tests.processes import Api, RedisServer, process_env, wait_until

pytestmark = [
    pytest.mark.faults,
    pytest.mark.timeout(90),
    pytest.mark.skipif(not pgserver.available(), reason="needs PostgreSQL server binaries"),
    needs_redis_server,
]

#: Each request while the database is down must answer within this many seconds.
ANSWER_WITHIN = 5.0
#: How long the client waits for an answer while the database is frozen.
FROZEN_WAIT = ANSWER_WITHIN + 3.0


@pytest.fixture(scope="module")
def pg() -> Iterator[pgserver.PgServer]:
    """One throwaway PostgreSQL for the module, migrated; removed afterwards."""
    from domain import migrate

    server = pgserver.PgServer().start()
    try:
        migrate.upgrade(server.url)
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_session(pg: pgserver.PgServer) -> Iterator[Session]:
    """A committing session on the throwaway database (the product's cached engine points
    at the test process's own database, so this one is made here)."""
    from domain.db import make_engine

    engine = make_engine(pg.url, pool_size=2, max_overflow=0)
    session = Session(bind=engine, expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()
        engine.dispose()


def _timed(call) -> tuple[httpx.Response, float]:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def _assert_unavailable(response: httpx.Response, elapsed: float, what: str) -> None:
    assert elapsed < ANSWER_WITHIN, f"{what} took {elapsed:.2f} s with the database down"
    assert response.status_code == 503, f"{what}: {response.status_code} {response.text}"
    assert response.headers["content-type"].startswith("application/problem+json"), what
    body = response.json()
    assert body["type"] == "urn:doorstroom:problem:database-unavailable", body
    assert body["status"] == 503
    text = response.text
    for leak in ("Traceback", "psycopg", "sqlalchemy", "OperationalError", "127.0.0.1"):
        assert leak not in text, f"{what} leaks {leak!r}: {text}"


def test_database_outage_answers_503_and_an_idempotent_retry_publishes_once(
        pg: pgserver.PgServer, pg_session: Session, broker: RedisServer,
        tmp_path: Path) -> None:
    from domain.models import IdempotencyKey, Kind, Level, Update
    from tests.factories import create_key, create_org, create_subscription, create_topic

    publisher = create_org(pg_session, level=Level.flemish, kind=Kind.agency)
    publish_key = create_key(pg_session, publisher, "publish")
    topic = create_topic(pg_session).slug
    subscriber = create_org(pg_session)
    create_subscription(pg_session, subscriber, filter={"topics": [topic]})
    pg_session.commit()
    started_at = datetime.now(UTC)

    # API, scheduler (relay, sweeper) and worker, all on the throwaway database.
    stack = Stack(tmp_path, broker, concurrency=2, DOORSTROOM_DATABASE_URL=pg.url)
    key = f"outage-{uuid.uuid4().hex}"
    body = {"title": f"Published through a database outage {key[-6:]}", "topics": [topic]}
    refused_title = f"Refused during the outage {key[-6:]}"
    outage_answers: list[float] = []

    def session_factory() -> Session:
        return Session(bind=pg_session.get_bind(), expire_on_commit=False)

    try:
        stack.start()
        with stack.api.client(publish_key, timeout=30) as client:
            # Before the outage: routed, and the pools of every process hold live
            # connections, which the outage then breaks.
            before = client.post("/v1/updates", json={"title": "Before", "topics": [topic]})
            assert before.status_code == 202, before.text
            before_id = before.json()["id"]
            judge.settle(accepted=[before_id], recipients=[subscriber.id], quiet=0,
                         session_factory=session_factory, timeout=20)

            pg.stop("fast")
            outage_began = time.monotonic()
            try:
                for attempt in range(3):
                    response, elapsed = _timed(lambda: client.post(
                        "/v1/updates", json=body, headers={"Idempotency-Key": key}))
                    _assert_unavailable(response, elapsed, f"POST /v1/updates #{attempt}")
                    assert response.headers.get("retry-after"), response.headers
                    outage_answers.append(elapsed)
                response, elapsed = _timed(lambda: client.post(
                    "/v1/updates", json={"title": refused_title, "topics": [topic]}))
                _assert_unavailable(response, elapsed, "POST /v1/updates without a key")
                outage_answers.append(elapsed)
                for path in (f"/v1/updates/{before_id}", "/v1/updates"):
                    response, elapsed = _timed(lambda: client.get(path))  # noqa: B023
                    _assert_unavailable(response, elapsed, f"GET {path}")
                    outage_answers.append(elapsed)
                response, elapsed = _timed(lambda: httpx.get(
                    f"{stack.api.base_url}/readyz", timeout=30))
                _assert_unavailable(response, elapsed, "GET /readyz")
                outage_answers.append(elapsed)
                # Metrics still answer (without the database-backed figures).
                response, elapsed = _timed(lambda: httpx.get(
                    f"{stack.api.base_url}/metrics", timeout=30))
                assert response.status_code == 200 and elapsed < ANSWER_WITHIN, (
                    response.status_code, elapsed)
                # Stay down through several relay polls, sweeps and scheduled tasks.
                time.sleep(max(0.0, 3.0 - (time.monotonic() - outage_began)))
                stack.check_alive()
            finally:
                pg.start()
            outage_seconds = time.monotonic() - outage_began

            # The client retries with the same key until the database answers again.
            retries = 0

            def retried() -> httpx.Response | None:
                nonlocal retries
                retries += 1
                response = client.post("/v1/updates", json=body,
                                       headers={"Idempotency-Key": key})
                assert response.status_code in (202, 503), (
                    f"{response.status_code} {response.text}")
                return response if response.status_code == 202 else None

            recovering = time.monotonic()
            first = wait_until(retried, 20, interval=0.25,
                               message=lambda: f"never published again\n{stack.describe()}")
            recovery_seconds = time.monotonic() - recovering
            assert first is not None
            first_id = first.json()["id"]
            second = client.post("/v1/updates", json=body, headers={"Idempotency-Key": key})
            assert second.status_code == 202, second.text
            assert second.json()["id"] == first_id
            ready = httpx.get(f"{stack.api.base_url}/readyz", timeout=10)
            assert ready.status_code == 200, ready.text

            # Everything accepted is routed, nothing refused shows up: the worker and the
            # scheduler came through the outage too.
            worker = stack.worker
            assert worker is not None

            def all_alive() -> None:
                stack.check_alive()
                worker.check_alive()

            figures = judge.settle(
                accepted=[before_id, first_id], refused=[refused_title],
                recipients=[subscriber.id], publisher_ids=[publisher.id], since=started_at,
                stale_seconds=3, timeout=30, session_factory=session_factory,
                on_wait=all_alive)
        api_log = stack.api.log(200_000)
    finally:
        stack.close()
    assert "unhandled error" not in api_log, api_log[-4000:]

    pg_session.rollback()
    bound = pg_session.scalars(sa.select(IdempotencyKey).where(
        IdempotencyKey.organisation_id == publisher.id, IdempotencyKey.key == key)).all()
    assert len(bound) == 1 and bound[0].completed_at is not None
    rows = pg_session.scalars(sa.select(Update).where(Update.publisher_id == publisher.id,
                                                      Update.title == body["title"])).all()
    assert [str(r.id) for r in rows] == [first_id], "exactly one update for the key"
    assert bound[0].update_id == rows[0].id

    judge.record("database_outage_idempotent_publish", figures,
                 updates_for_the_key=len(rows), outage_seconds=round(outage_seconds, 1),
                 outage_answer_max_s=round(max(outage_answers), 3),
                 outage_answers_s=[round(s, 3) for s in outage_answers],
                 recovery_s=round(recovery_seconds, 3), retries_after_restart=retries)


def test_a_frozen_database_answers_503_without_hanging(
        pg: pgserver.PgServer, pg_session: Session, broker: RedisServer,
        tmp_path: Path) -> None:
    from domain.models import Kind, Level
    from tests.factories import create_key, create_org, create_topic

    publisher = create_org(pg_session, level=Level.flemish, kind=Kind.agency)
    publish_key = create_key(pg_session, publisher, "publish")
    topic = create_topic(pg_session).slug
    pg_session.commit()
    # A frozen server never answers; the request deadline (api/app.py) does instead.
    env = process_env({"DOORSTROOM_DATABASE_URL": pg.url,
                       "DOORSTROOM_BROKER_URL": broker.url(0),
                       "DOORSTROOM_REQUEST_TIMEOUT_SECONDS": "3",
                       "DOORSTROOM_BEAT_SCHEDULE_FILE": tmp_path / "beat"})
    outcome: tuple[int | str, float]
    api = Api(env, tmp_path)
    with api, api.client(publish_key, timeout=FROZEN_WAIT) as client:
        api.start()
        for _ in range(3):  # pooled connections, which the freeze then strands
            assert client.get("/v1/updates").status_code == 200
        pids = pg.freeze()
        try:
            started = time.monotonic()
            try:
                response = client.post("/v1/updates", json={"title": "Frozen",
                                                            "topics": [topic]})
                outcome = (response.status_code, time.monotonic() - started)
            except httpx.TimeoutException:
                outcome = ("no answer", time.monotonic() - started)
        finally:
            pg.thaw(pids)
        # Thawed, the API serves again.
        wait_until(lambda: client.get("/v1/updates").status_code == 200, 20,
                   message=lambda: api.describe())
    judge.record("database_frozen", {"published": 0, "refused": 1, "delivered": 0, "lost": 0,
                                     "phantom": 0, "duplicate_deliveries": 0,
                                     "conflicting_duplicates": 0},
                 answer=outcome[0], answer_seconds=round(outcome[1], 2))
    assert outcome[0] == 503 and outcome[1] < ANSWER_WITHIN, (
        f"with the database frozen the API answered {outcome[0]} after {outcome[1]:.1f} s")
