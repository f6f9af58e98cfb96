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

from domain.db import Base, UTCDateTime, UuidList


def new_id() -> uuid.UUID:
    """Time-ordered UUIDv7: ids sort by creation, which keyset pagination relies on."""
    return uuid.UUID(bytes=uuid_utils.uuid7().bytes)


class Level(enum.StrEnum):
    federal = "federal"
    flemish = "flemish"
    provincial = "provincial"
    local = "local"


class Kind(enum.StrEnum):
    policy_domain = "policy_domain"
    agency = "agency"
    federal_body = "federal_body"
    municipality = "municipality"
    province = "province"
    association = "association"
    platform = "platform"


class Scope(enum.StrEnum):
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


# ------------------------------------------------------------------ the publishing pipeline


class PreventionLevel(enum.StrEnum):
    primary = "primary"
    secondary = "secondary"
    tertiary = "tertiary"
    none = "none"


class Role(enum.StrEnum):
    all = "all"
    mayor = "mayor"
    livc_coordinator = "livc_coordinator"
    prevention_officer = "prevention_officer"
    policy_officer = "policy_officer"
    education_contact = "education_contact"
    welfare_contact = "welfare_contact"
    police_contact = "police_contact"


class Priority(enum.StrEnum):
    routine = "routine"
    important = "important"
    urgent = "urgent"


class Classification(enum.StrEnum):
    public = "public"
    internal = "internal"
    restricted = "restricted"


class Cadence(enum.StrEnum):
    immediate = "immediate"
    daily = "daily"
    weekly = "weekly"


class ChannelType(enum.StrEnum):
    inbox = "inbox"
    webhook = "webhook"
    email = "email"
    feed = "feed"


class UpdateStatus(enum.StrEnum):
    scheduled = "scheduled"
    published = "published"
    withdrawn = "withdrawn"


class Update(Base):
    """One version of an update. Versions of one update share `chain_id` (the first's id)."""

    __tablename__ = "updates"
    __table_args__ = (sa.UniqueConstraint("chain_id", "version"),)

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True, default=new_id)
    # Its own index, though the unique key above leads with it: without it, P5's bundle
    # run with 100 days of history took 1.4 times as long as with no history (37.6 s
    # against 26.2 s; 1.07 with it), which is worth one index insertion per publish.
    chain_id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, index=True)
    version: Mapped[int] = mapped_column(sa.Integer, default=1)
    supersedes_id: Mapped[uuid.UUID | None] = mapped_column(sa.ForeignKey("updates.id"))
    publisher_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("organisations.id"), index=True)
    title: Mapped[str] = mapped_column(sa.String(200))
    summary: Mapped[str] = mapped_column(sa.Text, default="")
    body: Mapped[str] = mapped_column(sa.Text, default="")
    topics: Mapped[list[str]] = mapped_column(sa.JSON, default=list)
    prevention_level: Mapped[PreventionLevel] = mapped_column(
        _enum(PreventionLevel, "prevention_level"))
    target_roles: Mapped[list[str]] = mapped_column(sa.JSON, default=list)
    #: Bit set of target roles (see domain.matching), so that SQL can match by intersection.
    roles_mask: Mapped[int] = mapped_column(sa.Integer)
    priority: Mapped[Priority] = mapped_column(_enum(Priority, "priority"))
    classification: Mapped[Classification] = mapped_column(_enum(Classification, "classification"))
    audience: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    links: Mapped[list[dict[str, Any]]] = mapped_column(sa.JSON, default=list)
    language: Mapped[str] = mapped_column(sa.String(2), default="nl")
    publish_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    status: Mapped[UpdateStatus] = mapped_column(_enum(UpdateStatus, "update_status"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    withdrawn_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Set by routing in the same transaction as the inbox rows it wrote: the state guard.
    routed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    recipient_count: Mapped[int | None] = mapped_column(sa.Integer)


class UpdateTopic(Base):
    __tablename__ = "update_topics"

    update_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("updates.id", ondelete="CASCADE"), primary_key=True)
    topic_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("topics.id"), primary_key=True, index=True)


class IdempotencyKey(Base):
    """A client's `Idempotency-Key`, per organisation: in flight, then bound to its update."""

    __tablename__ = "idempotency_keys"

    organisation_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("organisations.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(sa.String(200), primary_key=True)
    request_hash: Mapped[str] = mapped_column(sa.String(64))
    update_id: Mapped[uuid.UUID | None] = mapped_column(sa.ForeignKey("updates.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class OutboxMessage(Base):
    """Work to hand to the broker, written in the transaction that justifies it."""

    __tablename__ = "outbox"
    __table_args__ = (
        sa.Index("ix_outbox_pending", "available_at",
                 postgresql_where=sa.text("dispatched_at IS NULL"),
                 sqlite_where=sa.text("dispatched_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True)
    task: Mapped[str] = mapped_column(sa.String(100))
    args: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: Not handed to the broker before this time (a scheduled publication).
    available_at: Mapped[datetime] = mapped_column(UTCDateTime)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    dispatch_count: Mapped[int] = mapped_column(sa.Integer, default=0)
    #: Set by the task when its work is committed; the sweeper re-dispatches rows without it.
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)


class Subscription(Base):
    __tablename__ = "subscriptions"
    __table_args__ = (
        # Push subscriptions are few among many inbox ones: routing finds them through this.
        sa.Index("ix_subscriptions_push", "organisation_id",
                 postgresql_where=sa.text("channel_type IN ('webhook', 'email')"),
                 sqlite_where=sa.text("channel_type IN ('webhook', 'email')")),
        # Routing's matching reads every subscription in organisation order (it groups the
        # reasons per organisation): with the columns it tests included, from the index
        # alone, without visiting the wide rows (their filter and channel are JSON). Also
        # the index for finding an organisation's subscriptions.
        sa.Index("ix_subscriptions_matching", "organisation_id", postgresql_include=[
            "id", "active", "has_topic_filter", "has_publisher_filter", "publisher_levels_mask",
            "prevention_levels_mask", "min_priority_rank", "roles_mask"]),
    )

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True, default=new_id)
    organisation_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("organisations.id", ondelete="CASCADE"))
    name: Mapped[str | None] = mapped_column(sa.String(200))
    #: The filter as the subscriber gave it; the columns below are its matchable form.
    filter: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    has_topic_filter: Mapped[bool] = mapped_column(sa.Boolean)
    has_publisher_filter: Mapped[bool] = mapped_column(sa.Boolean)
    publisher_levels_mask: Mapped[int] = mapped_column(sa.Integer)
    prevention_levels_mask: Mapped[int] = mapped_column(sa.Integer)
    roles_mask: Mapped[int] = mapped_column(sa.Integer)
    min_priority_rank: Mapped[int] = mapped_column(sa.Integer)
    cadence: Mapped[Cadence] = mapped_column(_enum(Cadence, "cadence"))
    send_at: Mapped[str | None] = mapped_column(sa.String(5))
    weekday: Mapped[int | None] = mapped_column(sa.Integer)
    include_directed: Mapped[bool] = mapped_column(sa.Boolean, default=True)
    channel_type: Mapped[ChannelType] = mapped_column(_enum(ChannelType, "channel_type"))
    channel: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    #: The webhook channel's endpoint, as a column so that routing can join it.
    webhook_endpoint_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), index=True)
    #: A capability URL token for the Atom feed (like a private calendar URL); rotatable.
    feed_token: Mapped[str | None] = mapped_column(sa.String(64), unique=True)
    active: Mapped[bool] = mapped_column(sa.Boolean, default=True)
    #: E-mail channel: nothing is sent before the address is confirmed through its link.
    email_verified_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    email_confirm_token: Mapped[str | None] = mapped_column(sa.String(64), unique=True)
    #: One-click unsubscribe (RFC 8058) link token; suspends this subscription only.
    unsubscribe_token: Mapped[str | None] = mapped_column(sa.String(64), unique=True)
    suspended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    suspended_reason: Mapped[str | None] = mapped_column(sa.String(500))
    #: Daily and weekly: the end of the last window handled (built, or empty).
    bundled_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class SubscriptionTopic(Base):
    __tablename__ = "subscription_topics"

    subscription_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("subscriptions.id", ondelete="CASCADE"), primary_key=True)
    topic_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("topics.id"), primary_key=True, index=True)


class SubscriptionPublisher(Base):
    __tablename__ = "subscription_publishers"

    subscription_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("subscriptions.id", ondelete="CASCADE"), primary_key=True)
    publisher_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("organisations.id", ondelete="CASCADE"), primary_key=True, index=True)


class RuleAction(enum.StrEnum):
    route = "route"
    suppress = "suppress"


class RoutingRule(Base):
    """Admin routing: matching updates also go to targets, or never reach them."""

    __tablename__ = "routing_rules"

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(sa.String(200))
    description: Mapped[str | None] = mapped_column(sa.Text)
    action: Mapped[RuleAction] = mapped_column(_enum(RuleAction, "rule_action"))
    filter: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    #: {"organisations": [ids], "groups": [ids], "provinces": [NIS codes]}
    targets: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    active: Mapped[bool] = mapped_column(sa.Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Reasons:
    """Why an organisation received an update: the contract's `reasons`, kept as the ids of
    each kind of reason rather than as the JSON list the API shows (`reason_list` makes
    that). Routing writes them for every recipient in one INSERT … SELECT, where an array
    of ids is what the database builds cheapest: with the reasons as JSON text, that INSERT
    of 1,000 recipients took 2.5 ms more than a bare INSERT … SELECT of the same rows (6.4
    ms); with arrays, 1.6 ms more (pgbench on P1's database, 2026-11-30)."""

    #: The recipient's subscriptions whose filter matched.
    subscription_ids: Mapped[list[uuid.UUID]] = mapped_column(UuidList, default=list)
    #: The route rules that named the recipient.
    rule_ids: Mapped[list[uuid.UUID]] = mapped_column(UuidList, default=list)
    #: Reached as one of a restricted update's audience (the reason's id is the update's).
    via_audience: Mapped[bool] = mapped_column(sa.Boolean, default=False)

    def reasons(self) -> list[dict[str, str]]:
        """The contract's `reasons` of this row (`reason_list`; the audience reason's id is
        the row's `update_id`, which every class with these columns has)."""
        update_id: uuid.UUID = self.update_id  # type: ignore[attr-defined]
        return reason_list(self.subscription_ids, self.rule_ids, self.via_audience, update_id)


def reason_list(subscription_ids: list[uuid.UUID], rule_ids: list[uuid.UUID],
                via_audience: bool, update_id: uuid.UUID | None) -> list[dict[str, str]]:
    """The contract's `reasons` (`[{"kind", "id"}]`, sorted) from the `Reasons` columns."""
    reasons = ({("subscription", str(i)) for i in subscription_ids}
               | {("rule", str(i)) for i in rule_ids})
    if via_audience and update_id is not None:  # a draft's preview has no id yet
        reasons.add(("audience", str(update_id)))
    return [{"kind": kind, "id": source} for kind, source in sorted(reasons)]


def lists_id(dialect: str, ids: sa.ColumnElement[Any] | Mapped[Any],
             value: sa.ColumnElement[Any] | Mapped[Any]) -> sa.ColumnElement[bool]:
    """SQL: `value` is one of the `UuidList` `ids`."""
    if dialect == "postgresql":
        return value == sa.any_(ids)
    each = sa.func.json_each(ids).table_valued("value").alias("each_id")
    return sa.exists(sa.select(sa.literal(1)).select_from(each).where(each.c.value == value))


def reached_directly(dialect: str, reasons: type[Reasons]) -> sa.ColumnElement[bool]:
    """SQL: the recipient was reached through a route rule or the audience."""
    length = sa.func.cardinality if dialect == "postgresql" else sa.func.json_array_length
    return sa.or_(length(reasons.rule_ids) > 0, reasons.via_audience.is_(True))


class InboxItem(Reasons, Base):
    """One per (version chain, organisation): the recipient record. Shows the latest version
    routed to the organisation, with every reason it arrived and its read/ack state."""

    __tablename__ = "inbox_items"
    __table_args__ = (
        sa.Index("ix_inbox_items_org_received", "organisation_id", "received_at", "chain_id"),
    )

    chain_id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True)
    # No foreign keys on this fan-out table: checking them cost 3x the insert itself at a
    # million rows (docs/benchmarks.md). Routing writes only ids it has just read under a
    # lock, and organisations and updates are never deleted (only withdrawn); a future
    # deletion must remove the rows it leaves here.
    organisation_id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True)
    update_id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, index=True)
    needs_ack: Mapped[bool] = mapped_column(sa.Boolean)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    read_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    acked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


# ------------------------------------------------------------------------ delivery channels


class WebhookEndpoint(Base):
    """A subscriber's HTTPS receiver. Its signing secret is stored encrypted (see
    domain/secrets.py); during a rotation the previous secret signs too, until it expires."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True, default=new_id)
    organisation_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("organisations.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(sa.String(2000))
    description: Mapped[str | None] = mapped_column(sa.String(500))
    #: CloudEvents types this endpoint wants; empty means all.
    event_types: Mapped[list[str]] = mapped_column(sa.JSON, default=list)
    enabled: Mapped[bool] = mapped_column(sa.Boolean, default=True)
    secret_ciphertext: Mapped[str] = mapped_column(sa.Text)
    previous_secret_ciphertext: Mapped[str | None] = mapped_column(sa.Text)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Start of the current run of failed attempts; cleared by any success.
    failing_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_success_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    disabled_reason: Mapped[str | None] = mapped_column(sa.String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class DeliveryStatus(enum.StrEnum):
    pending = "pending"
    succeeded = "succeeded"
    #: Permanent failure (a 4xx, or retries exhausted); can be replayed.
    failed = "failed"
    #: Not sent on purpose: the endpoint does not take this event type.
    skipped = "skipped"


class Delivery(Base):
    """One logical push of one event to one subscription's channel. Retries are attempts of
    the same delivery and keep its `message_id` (the Standard Webhooks `webhook-id`)."""

    __tablename__ = "deliveries"
    __table_args__ = (
        sa.UniqueConstraint("update_id", "subscription_id", "event_type"),
        sa.Index("ix_deliveries_due", "next_attempt_at",
                 postgresql_where=sa.text("status = 'pending'"),
                 sqlite_where=sa.text("status = 'pending'")),
        # The sender's claim: the oldest due few of each endpoint (domain.deliveries).
        sa.Index("ix_deliveries_endpoint_due", "endpoint_id", "next_attempt_at", "id",
                 postgresql_where=sa.text("status = 'pending'"),
                 sqlite_where=sa.text("status = 'pending'")),
    )

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True, default=new_id)
    message_id: Mapped[str] = mapped_column(sa.String(64), unique=True)
    organisation_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("organisations.id", ondelete="CASCADE"), index=True)
    subscription_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("subscriptions.id", ondelete="SET NULL"), index=True)
    endpoint_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), index=True)
    update_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("updates.id", ondelete="CASCADE"), index=True)
    bundle_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("bundles.id", ondelete="CASCADE"), unique=True)
    channel: Mapped[ChannelType] = mapped_column(_enum(ChannelType, "delivery_channel"))
    event_type: Mapped[str] = mapped_column(sa.String(100))
    #: The exact body, fixed when the delivery is created, so every retry sends the same bytes.
    payload: Mapped[str | None] = mapped_column(sa.Text)
    status: Mapped[DeliveryStatus] = mapped_column(_enum(DeliveryStatus, "delivery_status"))
    attempt_count: Mapped[int] = mapped_column(sa.Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: A sender holds the delivery until then; a crashed sender's lease simply runs out.
    leased_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_status_code: Mapped[int | None] = mapped_column(sa.Integer)
    last_error: Mapped[str | None] = mapped_column(sa.String(1000))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    succeeded_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class DeliveryAttempt(Base):
    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True)
    delivery_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("deliveries.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    latency_ms: Mapped[int | None] = mapped_column(sa.Integer)
    status_code: Mapped[int | None] = mapped_column(sa.Integer)
    error: Mapped[str | None] = mapped_column(sa.String(1000))


# ---------------------------------------------------------------------------------- bundles


class Bundle(Base):
    """One daily or weekly digest of one subscription for one window (start, end].

    Unique per (subscription, window end): running the scheduler twice, or two at once,
    builds one. A window with nothing in it leaves no bundle (only the subscription's
    `bundled_until` moves on)."""

    __tablename__ = "bundles"
    __table_args__ = (sa.UniqueConstraint("subscription_id", "window_end"),)

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True, default=new_id)
    subscription_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("subscriptions.id", ondelete="CASCADE"))
    organisation_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("organisations.id", ondelete="CASCADE"))
    cadence: Mapped[Cadence] = mapped_column(_enum(Cadence, "bundle_cadence"))
    window_start: Mapped[datetime] = mapped_column(UTCDateTime)
    window_end: Mapped[datetime] = mapped_column(UTCDateTime)
    item_count: Mapped[int] = mapped_column(sa.Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: Set when its entries are written (the state guard for building).
    built_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


sa.Index("ix_bundles_org_window", Bundle.organisation_id, Bundle.window_end.desc())


class BundleEntry(Reasons, Base):
    """One update chain in a bundle, as it was when the bundle was built."""

    __tablename__ = "bundle_entries"
    __table_args__ = (
        # "Was this chain in an earlier bundle of this subscription?" stays an index lookup
        # however many bundles came before.
        sa.Index("ix_bundle_entries_subscription_chain", "subscription_id", "chain_id"),
    )

    #: No foreign key to bundles: checking it took 40 % of the INSERT of 10,000 daily bundles'
    #: entries (benchmark P5), and entries are only written by `run_due_bundles`, from the
    #: bundles it inserted in the same transaction. The trigger `bundles_delete_entries`
    #: (migration 04d198f3cacc) deletes them with their bundle, as ON DELETE CASCADE did.
    bundle_id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True)
    chain_id: Mapped[uuid.UUID] = mapped_column(sa.Uuid, primary_key=True)
    subscription_id: Mapped[uuid.UUID] = mapped_column(sa.Uuid)
    update_id: Mapped[uuid.UUID] = mapped_column(sa.Uuid)
    #: new | corrected (an earlier version went out before) | withdrawn (it had gone out) |
    #: already_sent (urgent: pushed at once)
    state: Mapped[str] = mapped_column(sa.String(20))
