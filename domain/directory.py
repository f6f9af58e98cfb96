"""Use cases for the platform's directory: organisations, groups and the topic taxonomy.

Each use case validates, changes state, writes its audit entry and commits once.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from domain import audit
from domain.errors import Conflict, InvalidInput, NotFound
from domain.models import Group, GroupMember, Kind, Level, Organisation, Topic, new_id
from domain.pagination import Page, paginate
from domain.settings import get_settings

# ---------------------------------------------------------------------------- organisations

_NIS = re.compile(r"^\d{5}$")


@dataclass
class OrganisationFields:
    name: str
    level: Level
    kind: Kind
    nis_code: str | None = None
    province_nis: str | None = None
    region_nis: str | None = None
    parent_id: uuid.UUID | None = None
    email: str | None = None
    escalation_email: str | None = None
    abbreviation: str | None = None
    name_en: str | None = None
    code: str | None = None


def _check_organisation(session: Session, org: Organisation) -> None:
    for field in ("nis_code", "province_nis", "region_nis"):
        value = getattr(org, field)
        if value is not None and not _NIS.match(value):
            raise InvalidInput(f"{field} must be a five-digit NIS code", field=field)
    if org.parent_id is not None:
        if org.parent_id == org.id:
            raise InvalidInput("an organisation cannot be its own parent", field="parent_id")
        if session.get(Organisation, org.parent_id) is None:
            raise InvalidInput("parent organisation not found", field="parent_id")
    for field in ("nis_code", "code"):
        value = getattr(org, field)
        if value is None:
            continue
        clash = session.scalars(
            sa.select(Organisation.id).where(getattr(Organisation, field) == value)
            .where(Organisation.id != org.id)
        ).first()
        if clash is not None:
            raise Conflict(f"another organisation already has {field} {value}", field=field)


def create_organisation(
    session: Session, actor: audit.Actor, fields: OrganisationFields
) -> Organisation:
    """Create an organisation (admin). Not idempotent: two calls make two organisations."""
    now = get_settings().now()
    org = Organisation(id=new_id(), **vars(fields), created_at=now, updated_at=now)
    _check_organisation(session, org)
    session.add(org)
    session.flush()
    audit.record(session, actor, "organisation.created", "organisation", org.id,
                 name=org.name, level=org.level.value, kind=org.kind.value)
    session.commit()
    return org


def update_organisation(
    session: Session, actor: audit.Actor, organisation_id: uuid.UUID, changes: dict[str, Any]
) -> Organisation:
    """Change the given fields of an organisation (admin)."""
    org = get_organisation(session, organisation_id)
    for field, value in changes.items():
        setattr(org, field, value)
    _check_organisation(session, org)
    org.updated_at = get_settings().now()
    audit.record(session, actor, "organisation.updated", "organisation", org.id,
                 fields=sorted(changes))
    session.commit()
    return org


def get_organisation(session: Session, organisation_id: uuid.UUID) -> Organisation:
    org = session.get(Organisation, organisation_id)
    if org is None:
        raise NotFound("organisation not found")
    return org


def list_organisations(
    session: Session,
    *,
    kind: Kind | None = None,
    level: Level | None = None,
    province_nis: str | None = None,
    nis_code: str | None = None,
    cursor: str | None = None,
    limit: int | None = None,
) -> Page[Organisation]:
    stmt = sa.select(Organisation)
    if kind is not None:
        stmt = stmt.where(Organisation.kind == kind)
    if level is not None:
        stmt = stmt.where(Organisation.level == level)
    if province_nis is not None:
        stmt = stmt.where(Organisation.province_nis == province_nis)
    if nis_code is not None:
        stmt = stmt.where(Organisation.nis_code == nis_code)
    return paginate(session, stmt, Organisation.id, cursor, limit)


# ---------------------------------------------------------------------------------- groups


def create_group(
    session: Session,
    actor: audit.Actor,
    name: str,
    description: str | None = None,
    members: list[uuid.UUID] | None = None,
) -> Group:
    """Create a named group of organisations (admin), optionally with its first members."""
    if session.scalars(sa.select(Group.id).where(Group.name == name)).first() is not None:
        raise Conflict(f"a group named {name!r} already exists", field="name")
    group = Group(name=name, description=description, created_at=get_settings().now())
    session.add(group)
    session.flush()
    _replace_members(session, group.id, members or [])
    audit.record(session, actor, "group.created", "group", group.id, name=name,
                 members=len(members or []))
    session.commit()
    return group


def set_group_members(
    session: Session, actor: audit.Actor, group_id: uuid.UUID, members: list[uuid.UUID]
) -> Group:
    """Replace a group's members with exactly this list (admin; idempotent)."""
    group = get_group(session, group_id)
    _replace_members(session, group.id, members)
    audit.record(session, actor, "group.members_set", "group", group.id, members=len(members))
    session.commit()
    return group


def _replace_members(session: Session, group_id: uuid.UUID, members: list[uuid.UUID]) -> None:
    wanted = set(members)
    if wanted:
        found = set(session.scalars(sa.select(Organisation.id)
                                    .where(Organisation.id.in_(wanted))))
        missing = sorted(str(m) for m in wanted - found)
        if missing:
            raise InvalidInput("unknown organisations: " + ", ".join(missing), field="members")
    session.execute(sa.delete(GroupMember).where(GroupMember.group_id == group_id))
    session.add_all(GroupMember(group_id=group_id, organisation_id=m) for m in sorted(wanted))
    session.flush()


def get_group(session: Session, group_id: uuid.UUID) -> Group:
    group = session.get(Group, group_id)
    if group is None:
        raise NotFound("group not found")
    return group


def group_member_ids(session: Session, group_id: uuid.UUID) -> list[uuid.UUID]:
    return list(session.scalars(
        sa.select(GroupMember.organisation_id).where(GroupMember.group_id == group_id)
        .order_by(GroupMember.organisation_id)
    ))


def list_groups(session: Session, cursor: str | None, limit: int | None) -> Page[Group]:
    return paginate(session, sa.select(Group), Group.id, cursor, limit)


# ---------------------------------------------------------------------------------- topics

_SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")


def _topic_by_slug(session: Session, slug: str) -> Topic | None:
    return session.scalars(sa.select(Topic).where(Topic.slug == slug)).one_or_none()


def get_topic(session: Session, slug: str) -> Topic:
    topic = _topic_by_slug(session, slug)
    if topic is None:
        raise NotFound("topic not found")
    return topic


def create_topic(session: Session, actor: audit.Actor, slug: str, parent: str | None,
                 name_nl: str, name_en: str, definition_nl: str = "",
                 definition_en: str = "") -> Topic:
    """Add a topic to the shared taxonomy (admin). Takes effect for routing at once."""
    if not _SLUG.match(slug) or len(slug) > 100:
        raise InvalidInput("slug must be lower-case words joined by hyphens", field="slug")
    if _topic_by_slug(session, slug) is not None:
        raise Conflict(f"topic {slug!r} already exists", field="slug")
    parent_id = _parent_id(session, parent)
    now = get_settings().now()
    topic = Topic(slug=slug, parent_id=parent_id, name_nl=name_nl, name_en=name_en,
                  definition_nl=definition_nl, definition_en=definition_en,
                  deprecated=False, created_at=now, updated_at=now)
    session.add(topic)
    session.flush()
    audit.record(session, actor, "topic.created", "topic", slug, parent=parent)
    session.commit()
    return topic


def update_topic(session: Session, actor: audit.Actor, slug: str,
                 changes: dict[str, Any]) -> Topic:
    """Rename, redefine, move or deprecate a topic (admin). A move may not create a cycle."""
    topic = get_topic(session, slug)
    if "parent" in changes:
        parent_id = _parent_id(session, changes.pop("parent"))
        if parent_id is not None and topic.id in _ancestor_ids(session, parent_id) | {parent_id}:
            raise InvalidInput("a topic cannot be moved under its own descendant",
                               field="parent")
        topic.parent_id = parent_id
    for field, value in changes.items():
        setattr(topic, field, value)
    topic.updated_at = get_settings().now()
    audit.record(session, actor, "topic.updated", "topic", slug, fields=sorted(changes))
    session.commit()
    return topic


def _parent_id(session: Session, parent: str | None) -> uuid.UUID | None:
    if parent is None:
        return None
    found = _topic_by_slug(session, parent)
    if found is None:
        raise InvalidInput(f"parent topic {parent!r} not found", field="parent")
    return found.id


def _ancestor_ids(session: Session, topic_id: uuid.UUID) -> set[uuid.UUID]:
    seen: set[uuid.UUID] = set()
    current: uuid.UUID | None = topic_id
    while current is not None and current not in seen:
        seen.add(current)
        current = session.scalar(sa.select(Topic.parent_id).where(Topic.id == current))
    return seen


def list_topics(session: Session, *, include_deprecated: bool = True, parent: str | None = None,
                cursor: str | None = None, limit: int | None = None) -> Page[Topic]:
    stmt = sa.select(Topic)
    if not include_deprecated:
        stmt = stmt.where(Topic.deprecated.is_(False))
    if parent is not None:
        stmt = stmt.where(Topic.parent_id == _parent_id(session, parent))
    return paginate(session, stmt, Topic.slug, cursor, limit)


def topic_slugs_by_id(session: Session, ids: set[uuid.UUID]) -> dict[uuid.UUID, str]:
    if not ids:
        return {}
    return dict(session.execute(sa.select(Topic.id, Topic.slug).where(Topic.id.in_(ids))).all())
