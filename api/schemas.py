"""Request and response bodies. Requests forbid unknown fields (422, no mass assignment)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, EmailStr, Field, StringConstraints, field_validator

from domain.models import Kind, Level, Scope

T = TypeVar("T")

Id = str
Nis = Annotated[str, StringConstraints(pattern=r"^\d{5}$")]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=300, strip_whitespace=True)]
#: Names stored in 200-character columns (groups, topics, routing rules).
Name = Annotated[str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True)]


def _clean_text(value: Any) -> Any:
    """Refuse text that no database or mail header should hold: NUL and lone surrogates."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("text must not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError("text must be valid Unicode (no lone surrogates)") from exc
    elif isinstance(value, list):
        for item in value:
            _clean_text(item)
    return value


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _no_unstorable_text(cls, value: Any) -> Any:
        return _clean_text(value)


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
    name: Name
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
    name_nl: Name
    name_en: Name
    definition_nl: Definition = ""
    definition_en: Definition = ""


class TopicPatch(Request):
    parent: Slug | None = None
    name_nl: Name | None = None
    name_en: Name | None = None
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


# --------------------------------------------------------------------------------- updates

from domain.models import (  # noqa: E402
    Cadence,
    Classification,
    PreventionLevel,
    Priority,
    Role,
    UpdateStatus,
)

Title = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Markdown = Annotated[str, StringConstraints(max_length=100 * 1024)]


class Audience(Request):
    organisations: list[Id] = Field(default_factory=list, max_length=5000)
    groups: list[Id] = Field(default_factory=list, max_length=100)
    provinces: list[Nis] = Field(default_factory=list, max_length=10)


class Link(Request):
    url: Annotated[str, StringConstraints(max_length=2000, pattern=r"^https?://")]
    title: Annotated[str, StringConstraints(max_length=300)] | None = None


class UpdateCreate(Request):
    title: Title
    summary: Annotated[str, StringConstraints(max_length=2000)] = ""
    body: Markdown = ""
    topics: list[Slug] = Field(min_length=1, max_length=20)
    prevention_level: PreventionLevel = PreventionLevel.none
    target_roles: list[Role] = Field(default_factory=lambda: [Role.all], max_length=8)
    priority: Priority = Priority.routine
    classification: Classification = Classification.public
    audience: Audience | None = None
    supersedes: Id | None = None
    publish_at: datetime | None = None
    expires_at: datetime | None = None
    links: list[Link] = Field(default_factory=list, max_length=20)
    language: Literal["nl", "fr", "en"] = "nl"


class UpdateAccepted(Response):
    id: Id
    chain_id: Id
    version: int
    status: UpdateStatus


class VersionRef(Response):
    id: Id
    version: int
    created_at: datetime


class UpdateOut(Response):
    id: Id
    chain_id: Id
    version: int
    supersedes: Id | None
    publisher_id: Id
    title: str
    summary: str | None
    body: str | None
    topics: list[str]
    prevention_level: PreventionLevel
    target_roles: list[Role]
    priority: Priority
    classification: Classification
    audience: dict[str, list[str]] | None
    links: list[dict[str, Any]]
    language: str
    publish_at: datetime
    expires_at: datetime | None
    status: UpdateStatus
    created_at: datetime
    withdrawn_at: datetime | None
    recipient_count: int | None
    versions: list[VersionRef] | None = None
    notice: bool = Field(False, description="True when the content is withheld (restricted).")


class WithdrawBody(Request):
    reason: Annotated[str, StringConstraints(max_length=2000)] | None = None


class Reason(Response):
    kind: Literal["subscription", "rule", "audience"]
    id: Id


class ReachItem(Response):
    organisation_id: Id
    name: str
    update_id: Id
    reasons: list[Reason]
    delivered_at: datetime | None
    read_at: datetime | None
    acked_at: datetime | None
    needs_ack: bool


class ReachTotals(Response):
    recipients: int
    delivered: int
    read: int
    acknowledged: int
    needs_ack: int


class ReachOut(Response):
    items: list[ReachItem]
    next_cursor: str | None
    totals: ReachTotals


class InboxItemOut(Response):
    id: Id
    update: UpdateOut
    reasons: list[Reason]
    received_at: datetime
    delivered_at: datetime | None
    read_at: datetime | None
    acked_at: datetime | None
    needs_ack: bool


# --------------------------------------------------------------------------- subscriptions


class FilterIn(Request):
    topics: list[Slug] = Field(default_factory=list, max_length=100)
    publishers: list[Id] = Field(default_factory=list, max_length=200)
    publisher_levels: list[Level] = Field(default_factory=list, max_length=4)
    prevention_levels: list[PreventionLevel] = Field(default_factory=list, max_length=4)
    min_priority: Priority = Priority.routine
    target_roles: list[Role] = Field(default_factory=list, max_length=8)


class ChannelIn(Request):
    type: Literal["inbox", "webhook", "email", "feed"]
    endpoint_id: Id | None = None
    address: Annotated[str, StringConstraints(max_length=320)] | None = None
    language: Literal["nl", "fr", "en"] | None = None


HHMM = Annotated[str, StringConstraints(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")]


class SubscriptionCreate(Request):
    name: Annotated[str, StringConstraints(max_length=200)] | None = None
    filter: FilterIn = Field(default_factory=FilterIn)
    cadence: Cadence = Cadence.immediate
    send_at: HHMM | None = None
    weekday: Annotated[int, Field(ge=1, le=7)] | None = None
    include_directed: bool = True
    channel: ChannelIn = Field(default_factory=lambda: ChannelIn(type="inbox"))


class SubscriptionPatch(Request):
    name: Annotated[str, StringConstraints(max_length=200)] | None = None
    filter: FilterIn | None = None
    cadence: Cadence | None = None
    send_at: HHMM | None = None
    weekday: Annotated[int, Field(ge=1, le=7)] | None = None
    include_directed: bool | None = None
    channel: ChannelIn | None = None
    active: bool | None = None


class SubscriptionOut(Response):
    id: Id
    name: str | None
    filter: dict[str, Any]
    cadence: Cadence
    send_at: str | None
    weekday: int | None
    include_directed: bool
    channel: dict[str, Any]
    active: bool
    feed_url: str | None
    #: E-mail channel: when the address was confirmed through its link (None while the
    #: confirmation is pending; nothing is sent until then).
    email_verified_at: datetime | None = None
    #: Set when the recipient unsubscribed or the address was refused (see the reason);
    #: nothing is pushed until the organisation resumes the subscription (`active: true`).
    suspended_at: datetime | None = None
    suspended_reason: str | None = None
    #: Daily and weekly: the end of the last window bundled.
    bundled_until: datetime | None = None
    created_at: datetime
    updated_at: datetime


# --------------------------------------------------------------------------- routing rules


class Targets(Request):
    organisations: list[Id] = Field(default_factory=list, max_length=5000)
    groups: list[Id] = Field(default_factory=list, max_length=100)
    provinces: list[Nis] = Field(default_factory=list, max_length=10)


class RuleCreate(Request):
    name: Name
    description: Annotated[str, StringConstraints(max_length=2000)] | None = None
    action: Literal["route", "suppress"] = "route"
    filter: FilterIn = Field(default_factory=FilterIn)
    targets: Targets


class RuleOut(Response):
    id: Id
    name: str
    description: str | None
    action: Literal["route", "suppress"]
    filter: dict[str, Any]
    targets: dict[str, Any]
    active: bool
    created_at: datetime


class PreviewIn(UpdateCreate):
    publisher_id: Id | None = Field(None, description="Preview as this publisher "
                                    "(default: the caller's organisation).")


class PreviewRecipientOut(Response):
    organisation_id: Id
    name: str
    reasons: list[Reason]


class PreviewOut(Response):
    items: list[PreviewRecipientOut]
    next_cursor: str | None = None
    total: int


# -------------------------------------------------------------------------------- webhooks

from pydantic import AnyHttpUrl  # noqa: E402

EventType = Literal["be.doorstroom.update.published", "be.doorstroom.update.corrected",
                    "be.doorstroom.update.withdrawn", "be.doorstroom.bundle",
                    "be.doorstroom.endpoint.ping"]


class EndpointCreate(Request):
    url: AnyHttpUrl
    description: Annotated[str, StringConstraints(max_length=500)] | None = None
    event_types: list[EventType] = Field(default_factory=list, max_length=5)
    enabled: bool = True


class EndpointPatch(Request):
    url: AnyHttpUrl | None = None
    description: Annotated[str, StringConstraints(max_length=500)] | None = None
    event_types: list[EventType] | None = None
    enabled: bool | None = None


class EndpointOut(Response):
    id: Id
    url: str
    description: str | None
    event_types: list[str]
    enabled: bool
    disabled_at: datetime | None
    disabled_reason: str | None
    failing_since: datetime | None
    last_success_at: datetime | None
    secret_rotating_until: datetime | None
    created_at: datetime
    updated_at: datetime


class EndpointCreated(EndpointOut):
    secret: str = Field(description="The whsec_ signing secret. Shown once; store it now.")


class PingOut(Response):
    ok: bool
    status_code: int | None
    latency_ms: int | None
    error: str | None


class ReplayIn(Request):
    since: datetime
    until: datetime


class ReplayOut(Response):
    replayed: int


class AttemptOut(Response):
    at: datetime
    latency_ms: int | None
    status_code: int | None
    error: str | None


class DeliveryOut(Response):
    id: Id
    message_id: str
    organisation_id: Id
    subscription_id: Id | None
    endpoint_id: Id | None
    update_id: Id | None
    channel: str
    event_type: str
    status: str
    attempt_count: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    succeeded_at: datetime | None
    attempts: list[AttemptOut] | None = None


# --------------------------------------------------------------------------------- bundles


class BundleItem(Response):
    update_id: Id
    chain_id: Id
    version: int
    state: Literal["new", "corrected", "withdrawn", "already_sent"]
    title: str
    summary: str | None
    priority: str
    classification: str
    notice: bool
    url: str
    reasons: list[Reason]


class BundleSection(Response):
    topic: str | None
    topic_name: str | None
    publisher: str
    count: int
    items: list[BundleItem]


class BundleWindow(Response):
    start: datetime
    end: datetime


class BundleOut(Response):
    id: Id
    subscription_id: Id
    cadence: str
    window: BundleWindow
    count: int
    sections: list[BundleSection]
