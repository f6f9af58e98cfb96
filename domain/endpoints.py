"""Webhook endpoints: where an organisation's software receives pushes.

The signing secret is shown once (creation, rotation) and stored encrypted. A URL is checked
against SSRF when it is registered and again at every send (workers/webhooks.py).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from domain import audit, events, secrets, ssrf
from domain.errors import Conflict, InvalidInput, NotFound
from domain.models import Subscription, WebhookEndpoint
from domain.pagination import Page, paginate
from domain.settings import get_settings


@dataclass(frozen=True)
class EndpointWithSecret:
    endpoint: WebhookEndpoint
    secret: str


def require_https() -> bool:
    return get_settings().environment not in ("development", "test")


def check_url(url: str, resolver: ssrf.Resolver = ssrf.system_resolver) -> None:
    settings = get_settings()
    if len(url) > 2000:
        raise InvalidInput("the URL is at most 2000 characters", field="url")
    ssrf.resolve_target(url, allow_loopback=settings.webhook_allow_loopback,
                        require_https=require_https(), resolver=resolver)


def _check_event_types(event_types: list[str]) -> list[str]:
    unknown = sorted(set(event_types) - set(events.EVENT_TYPES))
    if unknown:
        raise InvalidInput(f"unknown event types: {', '.join(unknown)}", field="event_types")
    return sorted(set(event_types))


def create_endpoint(session: Session, actor: audit.Actor, *, url: str,
                    event_types: list[str] | None = None, description: str | None = None,
                    enabled: bool = True,
                    resolver: ssrf.Resolver = ssrf.system_resolver) -> EndpointWithSecret:
    """Register an endpoint; answers its `whsec_` secret, which is never shown again."""
    assert actor.organisation_id is not None
    check_url(url, resolver)
    secret = secrets.new_webhook_secret()
    now = get_settings().now()
    endpoint = WebhookEndpoint(organisation_id=actor.organisation_id, url=url,
                               description=description,
                               event_types=_check_event_types(event_types or []),
                               enabled=enabled, secret_ciphertext=secrets.encrypt(secret),
                               created_at=now, updated_at=now)
    session.add(endpoint)
    session.flush()
    audit.record(session, actor, "webhook_endpoint.created", "webhook_endpoint", endpoint.id,
                 url=url)
    session.commit()
    return EndpointWithSecret(endpoint, secret)


def get_endpoint(session: Session, actor: audit.Actor, endpoint_id: uuid.UUID) -> WebhookEndpoint:
    endpoint = session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None or endpoint.organisation_id != actor.organisation_id:
        raise NotFound("webhook endpoint not found")
    return endpoint


def list_endpoints(session: Session, actor: audit.Actor, cursor: str | None,
                   limit: int | None) -> Page[WebhookEndpoint]:
    stmt = sa.select(WebhookEndpoint).where(
        WebhookEndpoint.organisation_id == actor.organisation_id)
    return paginate(session, stmt, WebhookEndpoint.id, cursor, limit)


def update_endpoint(session: Session, actor: audit.Actor, endpoint_id: uuid.UUID,
                    changes: dict[str, Any],
                    resolver: ssrf.Resolver = ssrf.system_resolver) -> WebhookEndpoint:
    """Change url, event types, description or `enabled`. Re-enabling starts afresh."""
    endpoint = get_endpoint(session, actor, endpoint_id)
    if "url" in changes:
        check_url(changes["url"], resolver)
        endpoint.url = changes["url"]
    if "event_types" in changes:
        endpoint.event_types = _check_event_types(changes["event_types"] or [])
    if "description" in changes:
        endpoint.description = changes["description"]
    if "enabled" in changes:
        endpoint.enabled = bool(changes["enabled"])
        if endpoint.enabled:
            endpoint.disabled_at = None
            endpoint.disabled_reason = None
            endpoint.failing_since = None
    endpoint.updated_at = get_settings().now()
    audit.record(session, actor, "webhook_endpoint.updated", "webhook_endpoint", endpoint.id,
                 fields=sorted(changes))
    session.commit()
    return endpoint


def delete_endpoint(session: Session, actor: audit.Actor, endpoint_id: uuid.UUID) -> None:
    """Delete an endpoint that no subscription uses any more."""
    endpoint = get_endpoint(session, actor, endpoint_id)
    in_use = session.scalar(sa.select(sa.func.count()).select_from(Subscription)
                            .where(Subscription.webhook_endpoint_id == endpoint.id))
    if in_use:
        raise Conflict(f"{in_use} subscription(s) still deliver to this endpoint; "
                       "change or delete them first", field="id")
    session.delete(endpoint)
    audit.record(session, actor, "webhook_endpoint.deleted", "webhook_endpoint", endpoint_id)
    session.commit()


def rotate_secret(session: Session, actor: audit.Actor,
                  endpoint_id: uuid.UUID) -> EndpointWithSecret:
    """A new secret signs from now on; the previous one also signs for the grace period,
    so receivers can switch without losing a delivery (Standard Webhooks allows several
    signatures in one header)."""
    endpoint = get_endpoint(session, actor, endpoint_id)
    settings = get_settings()
    secret = secrets.new_webhook_secret()
    endpoint.previous_secret_ciphertext = endpoint.secret_ciphertext
    endpoint.previous_secret_expires_at = settings.now() + timedelta(
        seconds=settings.webhook_secret_grace_seconds)
    endpoint.secret_ciphertext = secrets.encrypt(secret)
    endpoint.updated_at = settings.now()
    audit.record(session, actor, "webhook_endpoint.secret_rotated", "webhook_endpoint",
                 endpoint.id)
    session.commit()
    return EndpointWithSecret(endpoint, secret)
