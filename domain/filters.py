"""Turning a filter as clients write it into its matchable form, validated."""

from __future__ import annotations

import enum
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from domain import matching
from domain.errors import InvalidInput
from domain.models import Level, Organisation, PreventionLevel, Priority, Role, Topic

_TOPICS: sa.Table = Topic.__table__  # type: ignore[assignment]
#: Built once: a Core select on the table (two columns need none of the ORM's loading
#: machinery), its cache key computed once.
_TOPIC_IDS = (sa.select(_TOPICS.c.slug, _TOPICS.c.id)
              .where(_TOPICS.c.slug.in_(sa.bindparam("slugs", expanding=True))))

FILTER_FIELDS = {"topics", "publishers", "publisher_levels", "prevention_levels",
                 "min_priority", "target_roles"}


def topic_ids_for_slugs(session: Session, slugs: list[str], field: str = "topics"
                        ) -> dict[str, uuid.UUID]:
    if not slugs:
        return {}
    # Topics are created in transactions of their own (committed), so no pending one is
    # missed for want of an autoflush (a Core statement does not flush the session).
    found = dict(session.execute(_TOPIC_IDS, {"slugs": sorted(set(slugs))}).all())
    missing = sorted(set(slugs) - set(found))
    if missing:
        raise InvalidInput(f"unknown topics: {', '.join(missing)}", field=field)
    return found


def existing_organisations(session: Session, ids: list[uuid.UUID], field: str) -> set[uuid.UUID]:
    if not ids:
        return set()
    found = set(session.scalars(sa.select(Organisation.id).where(Organisation.id.in_(set(ids)))))
    missing = sorted(str(i) for i in set(ids) - found)
    if missing:
        raise InvalidInput(f"unknown organisations: {', '.join(missing)}", field=field)
    return found


def _parse_uuid(value: Any, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError as exc:
        raise InvalidInput(f"{field}: {value!r} is not a valid id", field=field) from exc


def _enum_list(values: Any, cls: type[enum.Enum], field: str) -> list[Any]:
    if values is None:
        return []
    if not isinstance(values, list):
        raise InvalidInput(f"{field} must be a list", field=field)
    try:
        return [cls(v) for v in values]
    except ValueError as exc:
        allowed = ", ".join(m.value for m in cls)
        raise InvalidInput(f"{field} takes only: {allowed}", field=field) from exc


def normalise_filter(session: Session, raw: dict[str, Any] | None
                     ) -> tuple[dict[str, Any], matching.Filter]:
    """Validate a filter; answer its canonical JSON form and its matchable form."""
    raw = dict(raw or {})
    unknown = sorted(set(raw) - FILTER_FIELDS)
    if unknown:
        raise InvalidInput(f"unknown filter fields: {', '.join(unknown)}", field="filter")
    topics = raw.get("topics") or []
    if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
        raise InvalidInput("filter.topics must be a list of topic slugs", field="filter.topics")
    topic_ids = topic_ids_for_slugs(session, topics, "filter.topics")
    publishers = [_parse_uuid(p, "filter.publishers") for p in raw.get("publishers") or []]
    existing_organisations(session, publishers, "filter.publishers")
    levels = _enum_list(raw.get("publisher_levels"), Level, "filter.publisher_levels")
    prevention = _enum_list(raw.get("prevention_levels"), PreventionLevel,
                            "filter.prevention_levels")
    roles = _enum_list(raw.get("target_roles"), Role, "filter.target_roles")
    try:
        min_priority = Priority(raw.get("min_priority") or Priority.routine)
    except ValueError as exc:
        raise InvalidInput("filter.min_priority must be routine, important or urgent",
                           field="filter.min_priority") from exc
    canonical = {
        "topics": sorted(set(topics)),
        "publishers": sorted({str(p) for p in publishers}),
        "publisher_levels": sorted({lv.value for lv in levels}),
        "prevention_levels": sorted({p.value for p in prevention}),
        "min_priority": min_priority.value,
        "target_roles": sorted({r.value for r in roles}),
    }
    compiled = matching.Filter(
        topic_ids=frozenset(topic_ids.values()),
        publisher_ids=frozenset(publishers),
        publisher_levels=matching.publisher_levels_mask(levels),
        prevention_levels=matching.prevention_mask(prevention),
        min_priority=min_priority,
        roles=matching.roles_mask(roles),
    )
    return canonical, compiled


def compile_stored_filter(session: Session, canonical: dict[str, Any]) -> matching.Filter:
    """The matchable form of a stored filter. Unknown slugs (never deleted) are skipped."""
    slugs = canonical.get("topics") or []
    topic_ids = dict(session.execute(sa.select(Topic.slug, Topic.id)
                                     .where(Topic.slug.in_(slugs))).all()) if slugs else {}
    return matching.Filter(
        topic_ids=frozenset(topic_ids.values()),
        publisher_ids=frozenset(uuid.UUID(p) for p in canonical.get("publishers") or []),
        publisher_levels=matching.publisher_levels_mask(canonical.get("publisher_levels") or []),
        prevention_levels=matching.prevention_mask(canonical.get("prevention_levels") or []),
        min_priority=Priority(canonical.get("min_priority") or "routine"),
        roles=matching.roles_mask(canonical.get("target_roles") or []),
    )
