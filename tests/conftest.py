"""Test fixtures: real PostgreSQL and Redis.

Each pytest process gets its own database, migrated once. A test that stays in-process uses
`db_session`: everything it does is rolled back at the end (the use cases' commits become
savepoints). A test that goes through another process (a worker, a served API) commits for
real and must clean up after itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

PG_ADMIN_URL = os.environ.get(
    "DOORSTROOM_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("DOORSTROOM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
_worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
# The pid keeps two pytest runs on one machine (a developer's and CI's) out of each other's way.
TEST_DB_NAME = f"doorstroom_test_{_worker}_{os.getpid()}"
TEST_DB_URL = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + TEST_DB_NAME

# Settings are read once: point them at the test services before anything imports them.
os.environ["DOORSTROOM_DATABASE_URL"] = TEST_DB_URL
os.environ["DOORSTROOM_REDIS_URL"] = REDIS_URL
os.environ["DOORSTROOM_BROKER_URL"] = REDIS_URL.rsplit("/", 1)[0] + "/14"
os.environ["DOORSTROOM_WEBHOOK_ALLOW_LOOPBACK"] = "true"
os.environ["DOORSTROOM_SECRET_KEY"] = "test-secret-key-0123456789abcdef"
os.environ.setdefault("DOORSTROOM_ENVIRONMENT", "test")


def recreate_database(name: str) -> str:
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="session")
def migrated_database() -> Iterator[str]:
    from domain import migrate

    url = recreate_database(TEST_DB_NAME)
    migrate.upgrade(url)
    yield url
    from domain.db import get_engine

    get_engine().dispose()
    drop_database(TEST_DB_NAME)


def drop_database(name: str) -> None:
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(scope="session")
def engine(migrated_database: str) -> Iterator[sa.engine.Engine]:
    from domain.db import get_engine

    yield get_engine()
    get_engine().dispose()


@pytest.fixture
def db_session(engine: sa.engine.Engine) -> Iterator[sa.orm.Session]:
    """A session whose work is rolled back after the test, commits included."""
    from sqlalchemy.orm import Session

    connection = engine.connect()
    transaction = connection.begin()
    session = Session(bind=connection, join_transaction_mode="create_savepoint",
                      expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()
        transaction.rollback()
        connection.close()


@pytest.fixture
def client(db_session: sa.orm.Session) -> Iterator[object]:
    """An in-process API client whose requests share the test's rolled-back session."""
    from fastapi.testclient import TestClient

    from api.app import app
    from api.deps import get_session

    app.dependency_overrides[get_session] = lambda: db_session
    with TestClient(app) as test_client:
        yield test_client
    app.dependency_overrides.clear()


@pytest.fixture
def admin_key(db_session: sa.orm.Session) -> str:
    from domain.models import Kind, Level
    from tests.factories import create_key, create_org

    platform = create_org(db_session, level=Level.flemish, kind=Kind.platform)
    return create_key(db_session, platform, "admin")
