"""The data model. Alembic migrations in `migrations/` are the only source of the schema;
these classes must match them (`alembic check` guards that)."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
import uuid_utils
from sqlalchemy.orm import Mapped, mapped_column, relationship

from domain.db import Base, UTCDateTime


def new_id() -> uuid.UUID:
    """Time-ordered UUIDv7: ids sort by creation, which keyset pagination relies on."""
    return uuid.UUID(bytes=uuid_utils.uuid7().bytes)


class Level(str, enum.Enum):
    federal = "federal"
    flemish = "flemish"
    provincial = "provincial"
    local = "local"


class Kind(str, enum.Enum):
    policy_domain = "policy_domain"
    agency = "agency"
    federal_body = "federal_body"
    municipality = "municipality"
    province = "province"
    association = "association"
    platform = "platform"


class Scope(str, enum.Enum):
    publish = "publish"
    subscribe = "subscribe"
    admin = "admin"


def _enum(cls: type[enum.Enum], name: str) -> sa.Enum:
    # Stored as plain strings with a CHECK constraint: adding a value is a one-line migration.
    return sa.Enum(cls, name=name, native_enum=False, create_constraint=True, length=32,
                   values_callable=lambda e: [m.value for m in e])


class Organisation(Base):
    __tablename__ = "organisations"

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(sa.String(300))
    #: A stable code for seeded bodies ("ABB", "OCAD", "VVSG"), so that seeding is idempotent.
    code: Mapped[str | None] = mapped_column(sa.String(64), unique=True)
    abbreviation: Mapped[str | None] = mapped_column(sa.String(64))
    name_en: Mapped[str | None] = mapped_column(sa.String(300))
    level: Mapped[Level] = mapped_column(_enum(Level, "level"))
    kind: Mapped[Kind] = mapped_column(_enum(Kind, "kind"))
    nis_code: Mapped[str | None] = mapped_column(sa.String(5), unique=True)
    #: NIS code of the province; None for Brussels municipalities and non-local bodies.
    province_nis: Mapped[str | None] = mapped_column(sa.String(5), index=True)
    region_nis: Mapped[str | None] = mapped_column(sa.String(5))
    parent_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("organisations.id", ondelete="SET NULL"), index=True
    )
    email: Mapped[str | None] = mapped_column(sa.String(320))
    escalation_email: Mapped[str | None] = mapped_column(sa.String(320))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Group(Base):
    __tablename__ = "groups"

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    description: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    members: Mapped[list[GroupMember]] = relationship(
        lazy="raise", cascade="all, delete-orphan", passive_deletes=True
    )


class GroupMember(Base):
    __tablename__ = "group_members"

    group_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True
    )
    organisation_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("organisations.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True, default=new_id)
    organisation_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("organisations.id", ondelete="CASCADE"), index=True
    )
    #: The visible start of the key (`ds_` + 8 characters), shown in lists to recognise it.
    prefix: Mapped[str] = mapped_column(sa.String(16), unique=True)
    #: Hex SHA-256 of the whole key. The key has 256 random bits, so a fast hash is safe.
    key_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(sa.JSON)
    name: Mapped[str | None] = mapped_column(sa.String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Topic(Base):
    __tablename__ = "topics"

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True, default=new_id)
    slug: Mapped[str] = mapped_column(sa.String(100), unique=True)
    parent_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("topics.id", ondelete="RESTRICT"), index=True
    )
    name_nl: Mapped[str] = mapped_column(sa.String(200))
    name_en: Mapped[str] = mapped_column(sa.String(200))
    definition_nl: Mapped[str] = mapped_column(sa.Text, default="")
    definition_en: Mapped[str] = mapped_column(sa.Text, default="")
    deprecated: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class AuditEntry(Base):
    """Append-only: on PostgreSQL a trigger refuses UPDATE and DELETE."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    actor_organisation_id: Mapped[uuid.UUID | None] = mapped_column(sa.Uuid, index=True)
    actor_key_id: Mapped[uuid.UUID | None] = mapped_column(sa.Uuid)
    action: Mapped[str] = mapped_column(sa.String(100), index=True)
    object_type: Mapped[str] = mapped_column(sa.String(50))
    object_id: Mapped[str | None] = mapped_column(sa.String(100), index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
