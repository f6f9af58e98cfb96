"""Engine, sessions and the declarative base shared by every model."""

from __future__ import annotations

import os
import select
import uuid
from collections import namedtuple
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql
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


class UuidList(sa.TypeDecorator[list[uuid.UUID]]):
    """A list of UUIDs: `uuid[]` on PostgreSQL, a JSON array of hex strings on SQLite (the
    form SQLite's UUID columns have, so that SQL can compare the two). Never NULL in Python:
    NULL reads as []."""

    impl = sa.JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.ARRAY(sa.Uuid()))
        return dialect.type_descriptor(sa.JSON())

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        ids = [v if isinstance(v, uuid.UUID) else uuid.UUID(str(v)) for v in value]
        return ids if dialect.name == "postgresql" else [i.hex for i in ids]

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> list[uuid.UUID]:
        return [v if isinstance(v, uuid.UUID) else uuid.UUID(str(v)) for v in value or ()]


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


def autocommit_engine(session: Session) -> Engine | None:
    """The engine a single-statement unit of work of `session` may run on in autocommit
    (`execute_in_autocommit`): the session's own, when it may choose (bound to an engine,
    no transaction begun yet). None otherwise (a unit of work already begun, or a test's
    session inside an outer transaction): the statement then belongs in the session's
    transaction."""
    bind = session.get_bind()
    if not session.in_transaction() and isinstance(bind, Engine):
        return bind
    return None


@dataclass(frozen=True)
class DriverStatement:
    """A Core statement compiled once for a dialect, to run on the driver's own connection
    (`execute_in_autocommit`, `execute_in_transaction`).

    For the hottest statements (a publish, routing's writes): SQLAlchemy's execution layer
    (execution context, result wrapping, the connection's transaction bookkeeping) costs
    about as much CPU as the driver's own work on such a statement (docs/benchmarks.md, P1
    and P2). The values still go through each column type's bind processing, so they are
    stored exactly as a Core execution would store them; values written into the statement
    (`literal`, `.values(column=value)`) are its `defaults`."""

    sql: str
    processors: dict[str, Callable[[Any], Any]]
    defaults: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def compile(cls, statement: sa.Executable, dialect: sa.Dialect) -> DriverStatement:
        compiled = statement.compile(dialect=dialect)  # type: ignore[attr-defined]
        if compiled.positional or compiled.post_compile_params:
            raise ValueError("a DriverStatement takes named parameters, none expanded later")
        processors = {}
        defaults = {}
        for bind, name in compiled.bind_names.items():  # each parameter, by its name in SQL
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                processors[name] = processor
            if not bind.required:  # a value written into the statement, None included
                defaults[name] = bind.effective_value
        return cls(compiled.string, processors, defaults)

    def parameters(self, values: Mapping[str, Any]) -> dict[str, Any]:
        processors = self.processors
        return {name: processors[name](value) if name in processors else value
                for name, value in ({**self.defaults, **values} if self.defaults
                                    else values).items()}


def execute_in_autocommit(engine: Engine, statement: DriverStatement,
                          values: Mapping[str, Any]) -> int:
    """Run `statement` as a unit of work of its own, in autocommit on one of the engine's
    pooled connections: one round trip (no BEGIN, no COMMIT; one statement is atomic on
    its own). Answers the rows it touched. A database error is raised as SQLAlchemy's
    (`DBAPIError` and its kinds), as from any execution; a lost connection is discarded
    from the pool and flagged `connection_invalidated`."""
    parameters = statement.parameters(values)
    dialect = engine.dialect
    pooled = None
    try:
        pooled = engine.raw_connection()
        driver = pooled.driver_connection
        assert driver is not None
        driver.autocommit = True
        try:
            with driver.cursor() as cursor:
                cursor.execute(statement.sql, parameters)
                return max(cursor.rowcount, 0)
        finally:
            if not driver.closed:  # back in the pool's usual (transactional) mode
                driver.autocommit = False
    except dialect.loaded_dbapi.Error as exc:  # the pool's connect raises them unwrapped too
        lost = dialect.is_disconnect(exc, pooled.dbapi_connection if pooled else None, None)
        if lost and pooled is not None:
            pooled.invalidate(exc)
        raise sa.exc.DBAPIError.instance(
            statement.sql, parameters, exc, dialect.loaded_dbapi.Error,
            connection_invalidated=lost, dialect=dialect) from exc
    finally:
        if pooled is not None:
            pooled.close()


@dataclass(frozen=True)
class DriverQuery:
    """A Core SELECT compiled once for a dialect (`DriverStatement`) whose rows come back
    as named tuples of its selected columns, each value through its column type's result
    processing: as a Core execution would give them (`fetch_one_in_transaction`)."""

    statement: DriverStatement
    row_type: type[Any]
    processors: tuple[Callable[[Any], Any] | None, ...]

    @classmethod
    def compile(cls, select: sa.Select[Any], dialect: sa.Dialect) -> DriverQuery:
        columns = list(select.selected_columns)
        return cls(DriverStatement.compile(select, dialect),
                   namedtuple("DriverRow", [column.key for column in columns]),  # type: ignore[misc]
                   tuple(column.type.dialect_impl(dialect).result_processor(dialect, None)
                         for column in columns))

    def row(self, values: Iterable[Any]) -> Any:
        return self.row_type._make(value if process is None else process(value)
                                   for process, value in zip(self.processors, values,
                                                             strict=True))


@contextmanager
def _driver_errors(connection: sa.Connection, sql: str, parameters: Any) -> Iterator[None]:
    """Errors from the driver, raised as SQLAlchemy's (as from `execute_in_autocommit`); a
    lost connection is invalidated."""
    dialect = connection.dialect
    try:
        yield
    except dialect.loaded_dbapi.Error as exc:
        lost = dialect.is_disconnect(exc, connection.connection.dbapi_connection, None)
        if lost:
            connection.invalidate(exc)
        raise sa.exc.DBAPIError.instance(
            sql, parameters, exc, dialect.loaded_dbapi.Error, connection_invalidated=lost,
            dialect=dialect) from exc


def _driver_in_transaction(connection: sa.Connection) -> Any:
    """The driver's connection under `connection`, which is in a transaction: begun here
    if need be, as a Core execution would (autobegin), so that the connection's commit and
    rollback apply to what runs on the driver's cursor."""
    if not connection.in_transaction():
        connection.begin()
    driver = connection.connection.driver_connection
    assert driver is not None
    return driver


def execute_in_transaction(connection: sa.Connection, statement: DriverStatement,
                           values: Mapping[str, Any]) -> int:
    """Run `statement` on the driver's own cursor of `connection`, in the connection's
    transaction (`_driver_in_transaction`). Answers the rows it touched."""
    parameters = statement.parameters(values)
    driver = _driver_in_transaction(connection)
    with _driver_errors(connection, statement.sql, parameters), driver.cursor() as cursor:
        cursor.execute(statement.sql, parameters)
        return max(cursor.rowcount, 0)


def fetch_one_in_transaction(connection: sa.Connection, query: DriverQuery,
                             values: Mapping[str, Any]) -> Any:
    """`query`'s first row (a named tuple, `DriverQuery.row`) or None, read as
    `execute_in_transaction` runs a statement."""
    parameters = query.statement.parameters(values)
    driver = _driver_in_transaction(connection)
    with _driver_errors(connection, query.statement.sql, parameters), driver.cursor() as cursor:
        cursor.execute(query.statement.sql, parameters)
        found = cursor.fetchone()
    return None if found is None else query.row(found)


def rowcount(result: Any) -> int:
    """Rows a DML statement touched (0 when the driver does not say: -1 or missing)."""
    return max(int(getattr(result, "rowcount", 0) or 0), 0)
