"""Request and response bodies. Requests forbid unknown fields (422, no mass assignment)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, EmailStr, Field, StringConstraints

from domain.models import Kind, Level, Scope

T = TypeVar("T")

Id = str
Nis = Annotated[str, StringConstraints(pattern=r"^\d{5}$")]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=300, strip_whitespace=True)]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Response(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ListOf(Response, Generic[T]):
    items: list[T]
    next_cursor: str | None


# --------------------------------------------------------------------------- organisations


class OrganisationCreate(Request):
    name: ShortText
    level: Level
    kind: Kind
    nis_code: Nis | None = None
    province_nis: Nis | None = None
    region_nis: Nis | None = None
    parent_id: Id | None = None
    email: EmailStr | None = None
    escalation_email: EmailStr | None = None
    abbreviation: Annotated[str, StringConstraints(max_length=64)] | None = None
    name_en: ShortText | None = None


class OrganisationPatch(Request):
    name: ShortText | None = None
    level: Level | None = None
    kind: Kind | None = None
    nis_code: Nis | None = None
    province_nis: Nis | None = None
    region_nis: Nis | None = None
    parent_id: Id | None = None
    email: EmailStr | None = None
    escalation_email: EmailStr | None = None
    abbreviation: Annotated[str, StringConstraints(max_length=64)] | None = None
    name_en: ShortText | None = None


class OrganisationOut(Response):
    id: Id
    name: str
    name_en: str | None
    abbreviation: str | None
    code: str | None
    level: Level
    kind: Kind
    nis_code: str | None
    province_nis: str | None
    region_nis: str | None
    parent_id: Id | None
    email: str | None
    escalation_email: str | None
    created_at: datetime
    updated_at: datetime


# ------------------------------------------------------------------------------------ keys


class KeyCreate(Request):
    scopes: list[Scope] = Field(min_length=1, max_length=3)
    name: Annotated[str, StringConstraints(max_length=200)] | None = None


class KeyOut(Response):
    id: Id
    organisation_id: Id
    prefix: str
    scopes: list[Scope]
    name: str | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class KeyIssued(KeyOut):
    key: str = Field(description="The API key itself. Shown once; store it now.")


# ---------------------------------------------------------------------------------- groups


class GroupCreate(Request):
    name: ShortText
    description: Annotated[str, StringConstraints(max_length=2000)] | None = None
    members: list[Id] = Field(default_factory=list, max_length=10_000)


class GroupMembers(Request):
    members: list[Id] = Field(max_length=10_000)


class GroupOut(Response):
    id: Id
    name: str
    description: str | None
    members: list[Id]
    created_at: datetime


# ---------------------------------------------------------------------------------- topics

Slug = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]+(?:-[a-z0-9]+)*$", max_length=100)]
Definition = Annotated[str, StringConstraints(max_length=5000)]


class TopicCreate(Request):
    slug: Slug
    parent: Slug | None = None
    name_nl: ShortText
    name_en: ShortText
    definition_nl: Definition = ""
    definition_en: Definition = ""


class TopicPatch(Request):
    parent: Slug | None = None
    name_nl: ShortText | None = None
    name_en: ShortText | None = None
    definition_nl: Definition | None = None
    definition_en: Definition | None = None
    deprecated: bool | None = None


class TopicOut(Response):
    slug: str
    parent: str | None
    name_nl: str
    name_en: str
    definition_nl: str
    definition_en: str
    deprecated: bool
