"""Subscriptions: what an organisation wants to receive, in which rhythm, on which channel.

Subscriptions belong to organisations, not people, so staff turnover needs no migration.
"""

from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from domain import audit, mail
from domain.errors import InvalidInput, NotFound
from domain.filters import normalise_filter
from domain.models import (
    Cadence,
    ChannelType,
    Subscription,
    SubscriptionPublisher,
    SubscriptionTopic,
)
from domain.pagination import Page, paginate
from domain.settings import get_settings

_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")
#: One plain addr-spec: no spaces, control characters or the specials that would make a
#: header list ("a,b@c.be") or a display name of it.
_EMAIL = re.compile(r'^[^@\s\x00-\x1f\x7f,;:<>()\[\]\\"]+@[^@\s\x00-\x1f\x7f,;:<>()\[\]\\"]+'
                    r'\.[^@\s\x00-\x1f\x7f,;:<>()\[\]\\"]+$')


@dataclass
class SubscriptionInput:
    filter: dict[str, Any]
    cadence: Cadence = Cadence.immediate
    send_at: str | None = None
    weekday: int | None = None
    include_directed: bool = True
    channel: dict[str, Any] | None = None
    name: str | None = None


def _check_schedule(cadence: Cadence, send_at: str | None, weekday: int | None
                    ) -> tuple[str | None, int | None]:
    if cadence is Cadence.immediate:
        return None, None
    send_at = send_at or "08:00"
    if not _HHMM.match(send_at):
        raise InvalidInput("send_at must be a local time HH:MM", field="send_at")
    if cadence is Cadence.weekly:
        weekday = 1 if weekday is None else weekday
        if not 1 <= weekday <= 7:
            raise InvalidInput("weekday is 1 (Monday) to 7 (Sunday)", field="weekday")
        return send_at, weekday
    return send_at, None


def _check_channel(session: Session, organisation_id: uuid.UUID,
                   channel: dict[str, Any] | None) -> tuple[ChannelType, dict[str, Any]]:
    channel = dict(channel or {"type": "inbox"})
    try:
        kind = ChannelType(str(channel.get("type")))
    except ValueError as exc:
        raise InvalidInput("channel.type is inbox, webhook, email or feed",
                           field="channel.type") from exc
    allowed = {ChannelType.inbox: {"type"}, ChannelType.feed: {"type"},
               ChannelType.email: {"type", "address", "language"},
               ChannelType.webhook: {"type", "endpoint_id"}}[kind]
    unknown = sorted(set(channel) - allowed)
    if unknown:
        raise InvalidInput(f"unknown channel fields: {', '.join(unknown)}", field="channel")
    if kind is ChannelType.email:
        address = channel.get("address")
        if not isinstance(address, str) or not _EMAIL.match(address) or len(address) > 320:
            raise InvalidInput("channel.address must be an e-mail address",
                               field="channel.address")
        language = channel.get("language", "nl")
        if language not in ("nl", "fr", "en"):
            raise InvalidInput("channel.language is nl, fr or en", field="channel.language")
        return kind, {"type": kind.value, "address": address.strip(), "language": language}
    if kind is ChannelType.webhook:
        from domain.channels import check_webhook_channel

        return kind, check_webhook_channel(session, organisation_id, channel)
    return kind, {"type": kind.value}


def create_subscription(session: Session, actor: audit.Actor,
                        data: SubscriptionInput) -> Subscription:
    """Create one of the caller's subscriptions. Not idempotent (two calls, two rows)."""
    assert actor.organisation_id is not None
    canonical, compiled = normalise_filter(session, data.filter)
    try:
        data.cadence = Cadence(data.cadence)
    except ValueError as exc:
        raise InvalidInput("cadence is immediate, daily or weekly", field="cadence") from exc
    send_at, weekday = _check_schedule(data.cadence, data.send_at, data.weekday)
    channel_type, channel = _check_channel(session, actor.organisation_id, data.channel)
    now = get_settings().now()
    sub = Subscription(
        organisation_id=actor.organisation_id, name=data.name, filter=canonical,
        has_topic_filter=bool(compiled.topic_ids),
        has_publisher_filter=bool(compiled.publisher_ids),
        publisher_levels_mask=compiled.publisher_levels,
        prevention_levels_mask=compiled.prevention_levels, roles_mask=compiled.roles,
        min_priority_rank=_rank(compiled.min_priority), cadence=data.cadence,
        send_at=send_at, weekday=weekday, include_directed=data.include_directed,
        channel_type=channel_type, channel=channel,
        webhook_endpoint_id=_endpoint_id(channel),
        feed_token=secrets.token_urlsafe(32) if channel_type is ChannelType.feed else None,
        active=True, created_at=now, updated_at=now,
    )
    session.add(sub)
    session.flush()
    _store_filter_rows(session, sub.id, compiled.topic_ids, compiled.publisher_ids)
    if channel_type is ChannelType.email:
        # Nothing is sent before the address is confirmed through the mailed link.
        mail.start_email_verification(session, sub)
    audit.record(session, actor, "subscription.created", "subscription", sub.id,
                 cadence=sub.cadence.value, channel=channel_type.value)
    session.commit()
    return sub


def update_subscription(session: Session, actor: audit.Actor, subscription_id: uuid.UUID,
                        changes: dict[str, Any]) -> Subscription:
    """Change a subscription's filter, rhythm, channel or `active` state."""
    sub = get_subscription(session, actor, subscription_id)
    if "filter" in changes:
        canonical, compiled = normalise_filter(session, changes["filter"])
        sub.filter = canonical
        sub.has_topic_filter = bool(compiled.topic_ids)
        sub.has_publisher_filter = bool(compiled.publisher_ids)
        sub.publisher_levels_mask = compiled.publisher_levels
        sub.prevention_levels_mask = compiled.prevention_levels
        sub.roles_mask = compiled.roles
        sub.min_priority_rank = _rank(compiled.min_priority)
        session.execute(sa.delete(SubscriptionTopic)
                        .where(SubscriptionTopic.subscription_id == sub.id))
        session.execute(sa.delete(SubscriptionPublisher)
                        .where(SubscriptionPublisher.subscription_id == sub.id))
        _store_filter_rows(session, sub.id, compiled.topic_ids, compiled.publisher_ids)
    if {"cadence", "send_at", "weekday"} & set(changes):
        cadence = Cadence(changes.get("cadence", sub.cadence))
        sub.send_at, sub.weekday = _check_schedule(
            cadence, changes.get("send_at", sub.send_at), changes.get("weekday", sub.weekday))
        sub.cadence = cadence
    if "channel" in changes:
        channel_type, channel = _check_channel(session, sub.organisation_id, changes["channel"])
        if channel_type is ChannelType.feed and sub.feed_token is None:
            sub.feed_token = secrets.token_urlsafe(32)
        elif channel_type is not ChannelType.feed:
            sub.feed_token = None  # leaving the feed channel retires its URL for good
        old_type, old_address = sub.channel_type, (sub.channel or {}).get("address")
        sub.channel_type, sub.channel = channel_type, channel
        sub.webhook_endpoint_id = _endpoint_id(channel)
        if channel_type is ChannelType.email and (
                old_type is not ChannelType.email
                or str(old_address or "").lower() != channel["address"].lower()):
            # A new address is confirmed again before anything is sent to it.
            lifted = mail.start_email_verification(session, sub)
            audit.record(session, actor, "subscription.email_verification_started",
                         "subscription", sub.id, address=channel["address"],
                         lifted_suspension=lifted)
        elif channel_type is not ChannelType.email and old_type is ChannelType.email:
            mail.clear_email_state(sub)
    for simple in ("include_directed", "active", "name"):
        if simple in changes:
            setattr(sub, simple, changes[simple])
    if changes.get("active") is True and sub.suspended_at is not None:
        # The organisation undoes a suspension (an unsubscribe link, a rejected address).
        audit.record(session, actor, "subscription.resumed", "subscription", sub.id,
                     previous_reason=sub.suspended_reason)
        sub.suspended_at = None
        sub.suspended_reason = None
    sub.updated_at = get_settings().now()
    audit.record(session, actor, "subscription.updated", "subscription", sub.id,
                 fields=sorted(changes))
    session.commit()
    return sub


def rotate_feed_token(session: Session, actor: audit.Actor,
                      subscription_id: uuid.UUID) -> Subscription:
    """Give a feed subscription a new token; the old feed URL stops working at once."""
    sub = get_subscription(session, actor, subscription_id)
    if sub.channel_type is not ChannelType.feed:
        raise InvalidInput("only feed subscriptions have a feed token", field="channel")
    sub.feed_token = secrets.token_urlsafe(32)
    sub.updated_at = get_settings().now()
    audit.record(session, actor, "subscription.feed_token_rotated", "subscription", sub.id)
    session.commit()
    return sub


def delete_subscription(session: Session, actor: audit.Actor,
                        subscription_id: uuid.UUID) -> None:
    """Delete a subscription. Inbox items already received stay (they belong to the org)."""
    sub = get_subscription(session, actor, subscription_id)
    session.delete(sub)
    audit.record(session, actor, "subscription.deleted", "subscription", subscription_id)
    session.commit()


def get_subscription(session: Session, actor: audit.Actor,
                     subscription_id: uuid.UUID) -> Subscription:
    sub = session.get(Subscription, subscription_id)
    if sub is None or sub.organisation_id != actor.organisation_id:
        raise NotFound("subscription not found")
    return sub


def list_subscriptions(session: Session, actor: audit.Actor, cursor: str | None,
                       limit: int | None) -> Page[Subscription]:
    stmt = sa.select(Subscription).where(Subscription.organisation_id == actor.organisation_id)
    return paginate(session, stmt, Subscription.id, cursor, limit)


def _store_filter_rows(session: Session, subscription_id: uuid.UUID,
                       topic_ids: frozenset[uuid.UUID],
                       publisher_ids: frozenset[uuid.UUID]) -> None:
    session.add_all(SubscriptionTopic(subscription_id=subscription_id, topic_id=t)
                    for t in topic_ids)
    session.add_all(SubscriptionPublisher(subscription_id=subscription_id, publisher_id=p)
                    for p in publisher_ids)
    session.flush()


def _endpoint_id(channel: dict[str, Any]) -> uuid.UUID | None:
    return uuid.UUID(channel["endpoint_id"]) if channel.get("type") == "webhook" else None


def _rank(priority: Any) -> int:
    from domain.matching import PRIORITY_RANK

    return PRIORITY_RANK[priority]
