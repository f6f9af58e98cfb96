"""Domain objects to response bodies."""

from __future__ import annotations

import uuid
from typing import Any

from domain.models import Classification, Subscription, Update
from domain.settings import get_settings


def update_out(update: Update, *, full: bool = True,
               versions: list[Update] | None = None) -> dict[str, Any]:
    """An update; `full=False` withholds a restricted update's content (a notice)."""
    withhold = not full and update.classification is Classification.restricted
    return {
        "id": str(update.id), "chain_id": str(update.chain_id), "version": update.version,
        "supersedes": str(update.supersedes_id) if update.supersedes_id else None,
        "publisher_id": str(update.publisher_id),
        "title": "Restricted update" if withhold else update.title,
        "summary": None if withhold else update.summary,
        "body": None if withhold else update.body,
        "topics": [] if withhold else update.topics,
        "prevention_level": update.prevention_level, "target_roles": update.target_roles,
        "priority": update.priority, "classification": update.classification,
        "audience": None if withhold else update.audience,
        "links": [] if withhold else update.links, "language": update.language,
        "publish_at": update.publish_at, "expires_at": update.expires_at,
        "status": update.status, "created_at": update.created_at,
        "withdrawn_at": update.withdrawn_at, "recipient_count": update.recipient_count,
        "versions": None if versions is None else [
            {"id": str(v.id), "version": v.version, "created_at": v.created_at}
            for v in versions],
        "notice": withhold,
    }


def subscription_out(sub: Subscription) -> dict[str, Any]:
    feed_url = (f"{get_settings().public_url.rstrip('/')}/v1/feeds/{sub.feed_token}"
                if sub.feed_token and sub.channel_type.value == "feed" else None)
    return {"id": str(sub.id), "name": sub.name, "filter": sub.filter, "cadence": sub.cadence,
            "send_at": sub.send_at, "weekday": sub.weekday,
            "include_directed": sub.include_directed, "channel": sub.channel,
            "active": sub.active, "feed_url": feed_url,
            "email_verified_at": sub.email_verified_at, "suspended_at": sub.suspended_at,
            "suspended_reason": sub.suspended_reason, "bundled_until": sub.bundled_until,
            "created_at": sub.created_at, "updated_at": sub.updated_at}


def uuid_str(value: uuid.UUID | None) -> str | None:
    return str(value) if value else None
