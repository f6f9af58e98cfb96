"""The pool hands out no connection the server has closed, without a ping per checkout."""

from __future__ import annotations

import time

import sqlalchemy as sa

from domain.db import make_engine


def _backend_pid(engine: sa.engine.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())


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
        deadline = time.monotonic() + 5
        with admin.connect() as conn:
            while conn.exec_driver_sql(
                    f"SELECT count(*) FROM pg_stat_activity WHERE pid = {doomed}").scalar():
                assert time.monotonic() < deadline, "the backend did not end"
                time.sleep(0.02)
        # No error for the caller: the pool noticed and opened another connection.
        replacement = _backend_pid(engine)
        assert replacement != doomed
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        engine.dispose()
        admin.dispose()
