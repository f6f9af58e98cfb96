"""A plain publish on PostgreSQL is one statement in autocommit (`_insert_publication_pg`).

The API's sessions are bound to the engine, so a plain publish runs its one statement
without BEGIN and COMMIT. The in-process API tests share a rolled-back test session (bound
to a connection), which takes the transactional branch instead; these tests drive the
autocommit branch with a session bound to the engine, as the API's are, commit for real
and remove what they wrote.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from psycopg import pq
from sqlalchemy.orm import Session

from domain import publishing
from domain.errors import InvalidInput
from domain.models import AuditEntry, Organisation, OutboxMessage, Topic, Update, UpdateTopic
from tests.factories import actor_for, create_org, create_topic


@pytest.fixture
def committed(engine: sa.engine.Engine) -> Iterator[dict[str, object]]:
    """A publisher and two topics, committed; everything published under them is removed
    afterwards (but for the audit entries: the audit log is append-only)."""
    with Session(engine, expire_on_commit=False) as session:
        publisher = create_org(session)
        topics = [create_topic(session).slug, create_topic(session).slug]
        session.commit()
    made: dict[str, object] = {"publisher": publisher, "topics": topics}
    yield made
    with Session(engine) as session:
        updates = list(session.scalars(sa.select(Update.id)
                                       .where(Update.publisher_id == publisher.id)))
        session.execute(sa.delete(UpdateTopic).where(UpdateTopic.update_id.in_(updates)))
        session.execute(sa.delete(OutboxMessage).where(
            OutboxMessage.args["update_id"].as_string().in_([str(u) for u in updates])))
        session.execute(sa.delete(Update).where(Update.id.in_(updates)))
        session.execute(sa.delete(Topic).where(Topic.slug.in_(topics)))
        session.execute(sa.delete(Organisation).where(Organisation.id == publisher.id))
        session.commit()


def _written(engine: sa.engine.Engine, update_id: uuid.UUID) -> dict[str, int]:
    with engine.connect() as conn:
        count = {
            "updates": Update.id == update_id,
            "update_topics": UpdateTopic.update_id == update_id,
        }
        result = {name: conn.scalar(sa.select(sa.func.count()).where(condition))
                  for name, condition in count.items()}
        result["outbox"] = conn.scalar(sa.select(sa.func.count()).select_from(OutboxMessage)
                                       .where(OutboxMessage.args["update_id"].as_string()
                                              == str(update_id)))
        result["audit"] = conn.scalar(sa.select(sa.func.count()).select_from(AuditEntry)
                                      .where(AuditEntry.object_id == str(update_id)))
    return {k: int(v or 0) for k, v in result.items()}


def test_a_plain_publish_commits_its_rows_in_one_autocommit_statement(
        engine: sa.engine.Engine, committed: dict[str, object]) -> None:
    from domain.db import make_engine

    publisher, topics = committed["publisher"], committed["topics"]
    # One pooled connection, so that the trace follows the very one publish uses.
    single = make_engine(engine.url.render_as_string(hide_password=False), pool_size=1,
                         max_overflow=0)
    try:
        with single.connect() as conn:
            driver = conn.connection.driver_connection
        # libpq's trace of the protocol: every message the client sent, BEGIN and COMMIT
        # included (the driver sends those itself, so no SQLAlchemy event would show them).
        with tempfile.TemporaryFile("w+") as trace:
            driver.pgconn.trace(trace.fileno())
            driver.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
            try:
                with Session(single, expire_on_commit=False) as session:
                    update = publishing.publish(
                        session, actor_for(publisher, "publish"),  # type: ignore[arg-type]
                        publishing.Draft(title="One statement", topics=[topics[1], topics[0]]))
            finally:
                driver.pgconn.untrace()
            trace.seek(0)
            # "F <length> <message> <fields>" for each message the client sent.
            sent = [(line.split("\t") + [""])[2:4] for line in trace.read().splitlines()
                    if line.startswith("F\t")]
        # One statement (no topic lookup before it), no BEGIN before it, no COMMIT after.
        statements = [text for kind, text in sent if kind in ("Query", "Parse")]
        assert len(statements) == 1 and "WITH" in statements[0][:20], sent
        assert [kind for kind, _ in sent].count("Execute") == 1, sent
        # The pooled connection went back in its usual (transactional) mode.
        with single.connect() as conn:
            assert conn.get_isolation_level() != "AUTOCOMMIT"
            assert conn.connection.dbapi_connection.autocommit is False  # type: ignore[union-attr]
    finally:
        single.dispose()
    assert _written(engine, update.id) == {"updates": 1, "update_topics": 2, "outbox": 1,
                                           "audit": 1}
    assert update.topics == sorted(topics)  # type: ignore[type-var]


def test_an_unknown_topic_writes_nothing_and_is_named(
        engine: sa.engine.Engine, committed: dict[str, object]) -> None:
    publisher, topics = committed["publisher"], committed["topics"]
    with Session(engine) as session, pytest.raises(InvalidInput) as refused:
        publishing.publish(session, actor_for(publisher, "publish"),  # type: ignore[arg-type]
                           publishing.Draft(title="Unknown topic",
                                            topics=[topics[0], "no-such-topic"]))
    assert "no-such-topic" in str(refused.value)
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(Update)
                           .where(Update.publisher_id == publisher.id)) == 0  # type: ignore[attr-defined]


def test_submit_answers_the_receipt_of_what_it_stored_and_keeps_nothing_in_the_session(
        engine: sa.engine.Engine, committed: dict[str, object]) -> None:
    """The API's publish: the receipt, without an object of the session."""
    publisher, topics = committed["publisher"], committed["topics"]
    with Session(engine) as session:
        receipt = publishing.submit(session, actor_for(publisher, "publish"),  # type: ignore[arg-type]
                                    publishing.Draft(title="Receipt", topics=[topics[0]]))
        assert not session.identity_map and not session.in_transaction()
    with Session(engine) as session:
        stored = session.get(Update, receipt.id)
        assert stored is not None
        assert (stored.chain_id, stored.version, stored.status, stored.title) == (
            receipt.chain_id, receipt.version, receipt.status, "Receipt")
    assert _written(engine, receipt.id) == {"updates": 1, "update_topics": 1, "outbox": 1,
                                            "audit": 1}
