"""The reference-data seed: complete, idempotent, and the same on PostgreSQL and SQLite."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from domain import migrate
from domain.db import make_engine
from domain.models import Kind, Level, Organisation, Topic
from domain.seed import (
    NOT_SINGLE_ORGANISATIONS,
    POLICY_DOMAIN_PREFIX,
    load_topics,
    read_csv,
    seed_reference_data,
)


def _expected_codes() -> set[str]:
    """Every organisation code the reference files should produce."""
    codes = {"PLATFORM"}
    for row in read_csv("policy_domains.csv"):
        if row["status"] == "current":
            prefix = "" if row["level"] == "federal" else POLICY_DOMAIN_PREFIX
            codes.add(prefix + row["code"])
    codes |= {r["code"] for r in read_csv("organisations.csv")} - NOT_SINGLE_ORGANISATIONS
    return codes


def _municipalities(session: Session) -> list[Organisation]:
    return list(session.scalars(
        sa.select(Organisation).where(Organisation.kind == Kind.municipality)
    ))


def test_seed_twice_gives_the_complete_reference_data(db_session: Session) -> None:
    first = seed_reference_data(db_session)
    second = seed_reference_data(db_session)

    assert first.created["municipality"] == 304
    assert second.total_created == 0
    assert second.total_updated == 0

    municipalities = _municipalities(db_session)
    assert len(municipalities) == 304
    assert Counter(m.region_nis for m in municipalities) == {"02000": 285, "04000": 19}
    assert all(m.level == Level.local and m.code is None for m in municipalities)
    brussels = [m for m in municipalities if m.region_nis == "04000"]
    assert all(m.province_nis is None and m.parent_id is None for m in brussels)

    provinces = {o.id: o for o in db_session.scalars(
        sa.select(Organisation).where(Organisation.kind == Kind.province)
    )}
    assert sorted(p.nis_code or "" for p in provinces.values()) == [
        "10000", "20001", "30000", "40000", "70000"
    ]
    flemish = [m for m in municipalities if m.region_nis == "02000"]
    # Each Flemish municipality hangs under the province its NIS code says.
    assert all(provinces[m.parent_id].nis_code == m.province_nis for m in flemish if m.parent_id)
    assert all(m.parent_id for m in flemish)
    assert Counter(m.province_nis for m in flemish) == {
        "10000": 67, "20001": 63, "30000": 62, "40000": 55, "70000": 38
    }

    nis_codes = db_session.scalars(
        sa.select(Organisation.nis_code).where(Organisation.nis_code.is_not(None))
    ).all()
    assert len(nis_codes) == len(set(nis_codes)) == 309

    codes = Counter(db_session.scalars(
        sa.select(Organisation.code).where(Organisation.code.is_not(None))
    ))
    expected = _expected_codes()
    assert set(codes) == expected
    assert all(n == 1 for n in codes.values())
    assert not NOT_SINGLE_ORGANISATIONS & set(codes)


def test_seed_kinds_levels_and_parents(db_session: Session) -> None:
    seed_reference_data(db_session)
    by_code = {o.code: o for o in db_session.scalars(
        sa.select(Organisation).where(Organisation.code.is_not(None))
    )}
    assert (by_code["PLATFORM"].kind, by_code["PLATFORM"].level) == (Kind.platform, Level.flemish)
    assert (by_code["VVSG"].kind, by_code["VVSG"].level) == (Kind.association, Level.flemish)
    assert (by_code["PD-OV"].kind, by_code["PD-OV"].level) == (Kind.policy_domain, Level.flemish)
    assert (by_code["OCAD"].kind, by_code["OCAD"].level) == (Kind.federal_body, Level.federal)
    assert by_code["FOD-BIZA"].kind == Kind.federal_body
    assert by_code["ABB"].kind == Kind.agency
    assert by_code["ABB"].parent_id == by_code["PD-KBBJ"].id
    assert by_code["VDAB"].parent_id == by_code["PD-WEWILS"].id
    assert by_code["ADVP"].parent_id == by_code["FOD-BIZA"].id
    assert by_code["OCAD"].parent_id is None
    # Merged and historical policy domains are not seeded.
    assert "PD-EWI" not in by_code and "PD-KB" not in by_code


def test_topic_tree_is_intact(db_session: Session) -> None:
    seed_reference_data(db_session)
    topics = list(db_session.scalars(sa.select(Topic)))
    ids = {t.id for t in topics}
    assert len(topics) == len(load_topics())
    assert 25 <= len(topics) <= 40
    assert all(t.parent_id is None or t.parent_id in ids for t in topics)
    assert all(t.definition_nl.strip() and t.definition_en.strip() for t in topics)
    assert all(t.name_nl.strip() and t.name_en.strip() for t in topics)
    by_slug = {t.slug: t for t in topics}
    assert by_slug["violent-radicalisation"].parent_id == by_slug["radicalisation"].id
    assert by_slug["right-wing-extremism"].parent_id == by_slug["extremism"].id


def test_reseeding_restores_changed_names_and_keeps_the_rows(db_session: Session) -> None:
    seed_reference_data(db_session)
    aartselaar = db_session.scalars(
        sa.select(Organisation).where(Organisation.nis_code == "11001")
    ).one()
    topic = db_session.scalars(sa.select(Topic).where(Topic.slug == "polarisation")).one()
    ids = (aartselaar.id, topic.id)
    aartselaar.name = "Aartselaar (oud)"
    topic.name_en = "Old name"
    topic.deprecated = True
    db_session.commit()

    report = seed_reference_data(db_session)

    assert report.total_created == 0
    assert report.updated == {"municipality": 1, "topic": 1}
    assert (aartselaar.id, topic.id) == ids
    assert aartselaar.name == "Aartselaar"
    assert topic.name_en == "Polarisation"
    # Retiring a topic is an admin decision: the seed leaves it retired.
    assert topic.deprecated is True


def test_seed_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'seed.sqlite3'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            seed_reference_data(session)
            assert seed_reference_data(session).total_created == 0
        with Session(engine) as session:
            assert len(_municipalities(session)) == 304
            assert session.scalar(sa.select(sa.func.count()).select_from(Topic)) == len(
                load_topics()
            )
    finally:
        engine.dispose()
