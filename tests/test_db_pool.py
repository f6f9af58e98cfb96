"""The pool hands out no connection the server has closed, without a ping per checkout;
single statements run on the driver's connection in autocommit behave as Core executions."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from domain.db import (
    DriverQuery,
    DriverStatement,
    UTCDateTime,
    execute_in_autocommit,
    execute_in_transaction,
    fetch_one_in_transaction,
    make_engine,
)
from domain.models import Priority


def _backend_pid(engine: sa.engine.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())


def _wait_for(conn: sa.Connection, sql: str, until: bool, failure: str) -> None:
    """Poll `sql` (a count) until it is nonzero (`until` True) or zero, for 5 s at most."""
    deadline = time.monotonic() + 5
    while bool(conn.exec_driver_sql(sql).scalar()) is not until:
        assert time.monotonic() < deadline, failure
        time.sleep(0.02)


def test_a_healthy_pooled_connection_is_reused(migrated_database: str) -> None:
    engine = make_engine(migrated_database, pool_size=1, max_overflow=0)
    try:
        assert _backend_pid(engine) == _backend_pid(engine) == _backend_pid(engine)
    finally:
        engine.dispose()


def test_a_connection_the_server_closed_is_replaced_at_checkout(
        migrated_database: str) -> None:
    engine = make_engine(migrated_database, pool_size=1, max_overflow=0)
    admin = make_engine(migrated_database, pool_size=1, max_overflow=0)
    try:
        doomed = _backend_pid(engine)
        with admin.connect() as conn:
            assert conn.exec_driver_sql(f"SELECT pg_terminate_backend({doomed})").scalar()
        # The backend says goodbye and closes its end shortly after being told to.
        with admin.connect() as conn:
            _wait_for(conn, f"SELECT count(*) FROM pg_stat_activity WHERE pid = {doomed}",
                      until=False, failure="the backend did not end")
        # No error for the caller: the pool noticed and opened another connection.
        replacement = _backend_pid(engine)
        assert replacement != doomed
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        engine.dispose()
        admin.dispose()


# ---------------------------------------------------------------------- execute_in_autocommit


def test_a_driver_statement_stores_values_as_a_core_execution_would(
        migrated_database: str) -> None:
    """Each column type's bind processing still applies: an aware timestamp in another zone
    is stored as the same instant, a JSON value as JSON, an enum by its value."""
    engine = make_engine(migrated_database, pool_size=1, max_overflow=0)
    table = sa.Table("driver_statement_probe", sa.MetaData(),
                     sa.Column("at", UTCDateTime()), sa.Column("detail", sa.JSON()),
                     sa.Column("level", sa.Enum(Priority, native_enum=False)))
    try:
        table.create(engine)
        statement = DriverStatement.compile(sa.insert(table), engine.dialect)
        at = datetime(2026, 11, 29, 18, 0, tzinfo=timezone(timedelta(hours=1)))
        touched = execute_in_autocommit(engine, statement, {
            "at": at, "detail": {"topics": ["a", "b"]}, "level": Priority.urgent})
        assert touched == 1
        with engine.connect() as conn:
            row = conn.execute(sa.select(table)).one()
        assert row.at == at and row.at.tzinfo == UTC
        assert row.detail == {"topics": ["a", "b"]}
        assert row.level is Priority.urgent
    finally:
        table.drop(engine, checkfirst=True)
        engine.dispose()


def test_a_driver_statement_error_is_sqlalchemys_and_leaves_the_connection_usable(
        migrated_database: str) -> None:
    engine = make_engine(migrated_database, pool_size=1, max_overflow=0)
    try:
        statement = DriverStatement.compile(
            sa.text("INSERT INTO updates (id) VALUES (:id)"), engine.dialect)
        with pytest.raises(sa.exc.IntegrityError) as refused:
            execute_in_autocommit(engine, statement, {"id": uuid.uuid4()})
        assert not refused.value.connection_invalidated
        with engine.connect() as conn:  # the same connection, back in transactional mode
            assert conn.connection.dbapi_connection.autocommit is False  # type: ignore[union-attr]
            assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        engine.dispose()


def test_a_connection_lost_during_a_driver_statement_is_discarded(
        migrated_database: str) -> None:
    engine = make_engine(migrated_database, pool_size=1, max_overflow=0)
    admin = make_engine(migrated_database, pool_size=1, max_overflow=0)
    try:
        doomed = _backend_pid(engine)
        sleep = DriverStatement.compile(sa.text("SELECT pg_sleep(30)"), engine.dialect)
        outcome: dict[str, BaseException] = {}

        def run() -> None:
            try:
                execute_in_autocommit(engine, sleep, {})
            except BaseException as exc:  # noqa: BLE001 - inspected below
                outcome["error"] = exc

        runner = threading.Thread(target=run)
        runner.start()
        with admin.connect() as conn:
            _wait_for(conn, "SELECT count(*) FROM pg_stat_activity WHERE pid = "
                      f"{doomed} AND left(query, 15) = 'SELECT pg_sleep'",
                      until=True, failure="the statement never started")
            conn.exec_driver_sql(f"SELECT pg_terminate_backend({doomed})")
        runner.join(10)
        error = outcome.get("error")
        assert isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated, error
        # The pool discarded it: the next caller gets a new, working connection.
        assert _backend_pid(engine) != doomed
    finally:
        engine.dispose()
        admin.dispose()


def test_a_driver_statement_without_a_database_raises_sqlalchemys_operational_error(
        ) -> None:
    """What the API answers 503 for: no bare driver error when the pool cannot connect."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/test")
    try:
        with pytest.raises(sa.exc.OperationalError):
            execute_in_autocommit(engine, DriverStatement.compile(sa.text("SELECT 1"),
                                                                  engine.dialect), {})
    finally:
        engine.dispose()


# ------------------------------------------------------- the driver's cursor, in a transaction


def test_driver_statements_in_a_transaction_commit_and_roll_back_with_it(
        migrated_database: str) -> None:
    """`execute_in_transaction` writes in the connection's own transaction (kept on commit,
    gone on rollback); values written into the statement go in as Core would send them;
    `fetch_one_in_transaction` gives rows as a Core execution would (each type's result
    processing), or None."""
    engine = make_engine(migrated_database, pool_size=1, max_overflow=0)
    table = sa.Table("driver_transaction_probe", sa.MetaData(),
                     sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("at", UTCDateTime()),
                     sa.Column("level", sa.Enum(Priority, native_enum=False)))
    insert = DriverStatement.compile(
        sa.insert(table).values(id=sa.bindparam("id"), at=sa.bindparam("at", type_=UTCDateTime()),
                                level=Priority.urgent),  # a value in the statement itself
        engine.dialect)
    assert set(insert.parameters({"id": 1, "at": None})) == {"id", "at", "level"}
    read = DriverQuery.compile(
        sa.select(table.c.at, table.c.level, (table.c.id * 10).label("tenfold"))
        .where(table.c.id == sa.bindparam("id")), engine.dialect)
    at = datetime(2026, 11, 29, 18, 0, tzinfo=timezone(timedelta(hours=1)))
    try:
        table.create(engine)
        with engine.connect() as conn:
            assert execute_in_transaction(conn, insert, {"id": 1, "at": at}) == 1
            conn.rollback()
            assert execute_in_transaction(conn, insert, {"id": 2, "at": at}) == 1
            row = fetch_one_in_transaction(conn, read, {"id": 2})
            assert fetch_one_in_transaction(conn, read, {"id": 1}) is None  # rolled back
            conn.commit()
            with pytest.raises(sa.exc.IntegrityError):  # the driver's error, as SQLAlchemy's
                execute_in_transaction(conn, insert, {"id": 2, "at": at})
            conn.rollback()
        assert row.at == at and row.at.tzinfo == UTC
        assert row.level is Priority.urgent and row.tenfold == 20
        with engine.connect() as conn:
            assert conn.execute(sa.select(table.c.id)).scalars().all() == [2]
    finally:
        table.drop(engine, checkfirst=True)
        engine.dispose()
