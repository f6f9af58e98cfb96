"""The relay hands a committed outbox row to the broker at once: PostgreSQL notifies it when
the transaction commits (the outbox's trigger), long before its next poll."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from domain import outbox
from domain.models import OutboxMessage
from workers.celery_app import DEFAULT_QUEUE, celery_app
from workers.relay import relay_forever

#: A task no worker knows: the message only has to reach the broker.
PROBE_TASK = "tests.relay_probe"


def _dispatched_at(engine: sa.engine.Engine, row_id: int) -> object:
    with engine.connect() as conn:
        return conn.scalar(sa.select(OutboxMessage.dispatched_at)
                           .where(OutboxMessage.id == row_id))


def test_a_committed_row_reaches_the_broker_long_before_the_next_poll(
        engine: sa.engine.Engine) -> None:
    stop = threading.Event()
    relay = threading.Thread(target=relay_forever, args=(stop,),
                             kwargs={"poll_seconds": 60.0}, daemon=True)
    relay.start()
    row_id = None
    try:
        time.sleep(0.5)  # past its first pass: now it waits, for up to a minute
        with Session(engine) as session:
            row = outbox.enqueue(session, PROBE_TASK, {})
            session.commit()
            row_id = row.id
        committed = time.monotonic()
        while _dispatched_at(engine, row_id) is None:
            assert time.monotonic() - committed < 5, "not dispatched within 5 s of its commit"
            time.sleep(0.02)
    finally:
        stop.set()
        relay.join(timeout=5)
        with engine.begin() as conn:
            if row_id is not None:
                conn.execute(sa.delete(OutboxMessage).where(OutboxMessage.id == row_id))
        with celery_app.connection_for_write() as broker:
            broker.default_channel.queue_purge(DEFAULT_QUEUE)
    assert not relay.is_alive(), "the relay did not stop within 5 s of being told to"


def test_a_stopped_relay_closes_its_listening_connection(
        engine: sa.engine.Engine) -> None:
    def listeners() -> int:
        with engine.connect() as conn:
            return int(conn.scalar(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE query ILIKE 'LISTEN %'")) or 0)

    before = listeners()
    stop = threading.Event()
    relay = threading.Thread(target=relay_forever, args=(stop,),
                             kwargs={"poll_seconds": 60.0}, daemon=True)
    relay.start()
    try:
        deadline = time.monotonic() + 5
        while listeners() == before:
            assert time.monotonic() < deadline, "the relay never listened"
            time.sleep(0.02)
    finally:
        stop.set()
        relay.join(timeout=5)
    assert not relay.is_alive()
    assert listeners() == before


def test_doorstroom_relay_runs_the_relay_as_a_process_of_its_own(
        engine: sa.engine.Engine, migrated_database: str, tmp_path: Path) -> None:
    """`doorstroom relay` (how P2 runs it, and a deployment that separates it) dispatches
    a committed row at once and stops on SIGTERM."""
    from tests.processes import Relay, process_env, wait_until

    relay = Relay(process_env({"DOORSTROOM_DATABASE_URL": migrated_database,
                               "DOORSTROOM_OUTBOX_POLL_SECONDS": "60"}), tmp_path)
    row_id = None
    try:
        relay.start()
        with Session(engine) as session:
            row = outbox.enqueue(session, PROBE_TASK, {})
            session.commit()
            row_id = row.id
        wait_until(lambda: _dispatched_at(engine, row_id) is not None, 5,
                   interval=0.02, message=lambda: f"not dispatched: {relay.describe()}")
        relay.stop()
        assert relay.proc is not None and relay.proc.returncode == 0, relay.describe()
    finally:
        relay.stop()
        with engine.begin() as conn:
            if row_id is not None:
                conn.execute(sa.delete(OutboxMessage).where(OutboxMessage.id == row_id))
        with celery_app.connection_for_write() as broker:
            broker.default_channel.queue_purge(DEFAULT_QUEUE)
