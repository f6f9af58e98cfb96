"""Engine, sessions and the declarative base shared by every model."""

from __future__ import annotations

import os
import select
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from domain.settings import get_settings

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python, on PostgreSQL and SQLite alike."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; pass an aware datetime")
        value = value.astimezone(UTC)
        # SQLite keeps text: store it without offset so that text comparisons order correctly.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


#: Connections kept open for reuse: at least the API's thread pool (anyio's default limiter,
#: 40 threads; a request's thread holds at most one connection), so that a busy API does not
#: open and close a connection per request. Connections are opened on demand, so a worker
#: process that needs few keeps few.
POOL_SIZE = 40
#: Beyond the pool, closed again when returned: a handler still running after its
#: request's deadline, the SQLite dispatch thread, a burst of async work.
MAX_OVERFLOW = 10


def make_engine(url: str, **kwargs: Any) -> Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL lets the API read while the worker writes; foreign keys are off by default.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    kwargs.setdefault("pool_size", POOL_SIZE)
    kwargs.setdefault("max_overflow", MAX_OVERFLOW)
    kwargs.setdefault("pool_timeout", 5)
    kwargs.setdefault("connect_args", {"connect_timeout": 3})
    # JIT off for every session, set when connecting (so it costs no round trip per use): the
    # statements are OLTP, and the planner overestimates some of them (routing's OR'd EXISTS
    # filters), which would then be JIT-compiled at a cost far above what compiling saves.
    # The operator's options (PGOPTIONS, `?options=` in the URL) and the caller's come after,
    # so they are kept and can still turn it on: libpq takes one `options`, not several.
    connect_args = kwargs["connect_args"] = dict(kwargs["connect_args"])
    url_options = sa.engine.make_url(url).query.get("options")
    connect_args["options"] = " ".join(
        part for part in ("-c jit=off", os.environ.get("PGOPTIONS"),
                          url_options if isinstance(url_options, str) else None,
                          connect_args.get("options")) if part)
    engine = sa.create_engine(url, **kwargs)
    event.listen(engine, "connect", _mark_fresh)
    event.listen(engine, "checkout", _replace_if_closed_by_server)
    return engine


def _mark_fresh(_dbapi_connection: Any, record: Any) -> None:
    record.info["fresh"] = True


def _replace_if_closed_by_server(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """Hand out no connection the server has closed (a restart, a failover, an idle
    timeout), without a round trip per checkout as `pool_pre_ping` would make.

    A pooled connection at rest has nothing to read: the server speaks only when asked, and
    pooled connections LISTEN to nothing. If its socket is readable, the server has sent its
    goodbye (an error message, then end of file) or closed it; the pool then discards the
    connection and takes or opens another (`DisconnectionError`). A peer that vanished
    without closing is not seen here (a ping would hang as well): the request deadline
    (api/app.py) answers for that case. A connection just opened is not checked: whatever
    its handshake left unread must not send the pool round in circles."""
    if record.info.pop("fresh", False):
        return
    if dbapi_connection.closed:
        raise sa.exc.DisconnectionError("the connection was closed")
    try:
        descriptor = dbapi_connection.fileno()
    except Exception as exc:  # noqa: BLE001 - no socket: nothing to hand out
        raise sa.exc.DisconnectionError("the connection's socket is gone") from exc
    # poll, not select: select cannot watch a descriptor numbered 1024 or higher.
    poller = select.poll()
    poller.register(descriptor, select.POLLIN | select.POLLPRI)
    if poller.poll(0):  # readable, or hung up / in error (always reported)
        raise sa.exc.DisconnectionError("the server closed the connection")


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().database_url)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session for one task or command; the use case inside commits, this only closes."""
    session = get_sessionmaker()()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def single_statement_connection(session: Session) -> sa.Connection:
    """The session's connection for a unit of work that is a single statement: in
    autocommit when the session may choose (bound to an engine, no transaction begun yet),
    which spares the BEGIN and COMMIT round trips (one statement is atomic on its own);
    otherwise in the session's transaction (a unit of work already begun, or a test's
    session inside an outer transaction). The session's commit ends it either way."""
    if not session.in_transaction() and isinstance(session.get_bind(), Engine):
        return session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
    return session.connection()


def rowcount(result: Any) -> int:
    """Rows a DML statement touched (0 when the driver does not say: -1 or missing)."""
    return max(int(getattr(result, "rowcount", 0) or 0), 0)
