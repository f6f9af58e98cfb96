"""Alembic is the only schema source: one head, up and down cleanly, in sync with the models."""

from __future__ import annotations

import os

import sqlalchemy as sa
from alembic import command
from alembic.script import ScriptDirectory

from domain import migrate
from domain.db import Base
from tests.conftest import drop_database, recreate_database


def test_one_head_and_dated_file_names():
    script = ScriptDirectory.from_config(migrate.alembic_config())
    assert len(script.get_heads()) == 1
    for revision in script.walk_revisions():
        assert revision.path.rsplit("/", 1)[-1][:8].isdigit(), revision.path


def test_up_down_up_on_an_empty_postgres_database_and_models_match():
    name = f"doorstroom_test_migrations_{os.getpid()}"
    url = recreate_database(name)
    migrate.upgrade(url)
    tables = set(sa.inspect(sa.create_engine(url)).get_table_names())
    assert set(Base.metadata.tables) <= tables
    command.check(migrate.alembic_config(url))  # raises when models and migrations differ
    migrate.downgrade(url, "base")
    engine = sa.create_engine(url)
    assert set(sa.inspect(engine).get_table_names()) == {"alembic_version"}
    migrate.upgrade(url)
    engine.dispose()
    drop_database(name)


def test_up_down_on_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    migrate.upgrade(url)
    command.check(migrate.alembic_config(url))
    migrate.downgrade(url, "base")
    assert set(sa.inspect(sa.create_engine(url)).get_table_names()) == {"alembic_version"}
