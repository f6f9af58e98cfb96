"""Alembic is the only schema source: one head, up and down cleanly, in sync with the models."""

from __future__ import annotations

import json
import os
import uuid

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.script import ScriptDirectory

from domain import migrate
from domain.db import Base
from domain.models import BundleEntry, InboxItem, reason_list
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


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_reasons_become_id_arrays_and_back(database, tmp_path):
    """Migration 3f6c9d2a7b18 turns stored `reasons` into the three reason columns and back,
    in the inbox and in bundle entries (SQLite's routing stored ids as bare hex)."""
    if database == "sqlite":
        url, name = f"sqlite:///{tmp_path / 'db.sqlite3'}", None
    else:
        name = f"doorstroom_test_reasons_{os.getpid()}"
        url = recreate_database(name)
    before, after = "8b2e4f6a1c3d", "3f6c9d2a7b18"
    sub, rule, update, chain = (uuid.uuid4() for _ in range(4))
    stored_sub = sub.hex if database == "sqlite" else str(sub)
    reasons = json.dumps([{"kind": "subscription", "id": stored_sub},
                          {"kind": "rule", "id": str(rule)},
                          {"kind": "audience", "id": str(update)}])
    uuid_text = (lambda u: u.hex) if database == "sqlite" else str  # noqa: E731
    migrate.upgrade(url, before)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO inbox_items (chain_id, organisation_id, update_id, reasons, needs_ack, "
            "received_at) VALUES (:chain, :org, :update, :reasons, false, CURRENT_TIMESTAMP)"),
            {"chain": uuid_text(chain), "org": uuid_text(uuid.uuid4()),
             "update": uuid_text(update), "reasons": reasons})
        conn.execute(sa.text(
            "INSERT INTO bundle_entries (bundle_id, chain_id, subscription_id, update_id, state, "
            "reasons) VALUES (:bundle, :chain, :sub, :update, 'new', :reasons)"),
            {"bundle": uuid_text(uuid.uuid4()), "chain": uuid_text(chain),
             "sub": uuid_text(sub), "update": uuid_text(update), "reasons": reasons})
    migrate.upgrade(url, after)
    for table in (InboxItem.__table__, BundleEntry.__table__):
        with engine.connect() as conn:
            row = conn.execute(sa.select(table.c.subscription_ids, table.c.rule_ids,
                                         table.c.via_audience, table.c.update_id)).one()
        assert reason_list(*row) == sorted([
            {"kind": "subscription", "id": str(sub)}, {"kind": "rule", "id": str(rule)},
            {"kind": "audience", "id": str(update)}], key=lambda r: (r["kind"], r["id"]))
    migrate.downgrade(url, before)
    with engine.connect() as conn:
        for table in ("inbox_items", "bundle_entries"):
            stored = conn.execute(sa.text(f"SELECT reasons FROM {table}")).scalar_one()
            back = json.loads(stored) if isinstance(stored, str) else stored  # SQLite: text
            assert sorted((r["kind"], str(uuid.UUID(r["id"]))) for r in back) == sorted(
                [("subscription", str(sub)), ("rule", str(rule)), ("audience", str(update))])
    engine.dispose()
    if name:
        drop_database(name)
