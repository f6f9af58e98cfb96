"""Plain factory functions for tests: each makes one real row through the use cases."""

from __future__ import annotations

import itertools
import uuid

from sqlalchemy.orm import Session

from domain import directory, keys
from domain.audit import SYSTEM
from domain.models import Kind, Level, Organisation

_counter = itertools.count(1)


def create_org(session: Session, *, name: str | None = None, level: Level = Level.local,
               kind: Kind = Kind.municipality, nis_code: str | None = None,
               province_nis: str | None = None, email: str | None = None) -> Organisation:
    n = next(_counter)
    return directory.create_organisation(
        session, SYSTEM,
        directory.OrganisationFields(name=name or f"Test organisation {n} {uuid.uuid4().hex[:6]}",
                                     level=level, kind=kind, nis_code=nis_code,
                                     province_nis=province_nis, email=email),
    )


def create_key(session: Session, org: Organisation | uuid.UUID, *scopes: str) -> str:
    org_id = org.id if isinstance(org, Organisation) else org
    return keys.issue_key(session, SYSTEM, org_id, list(scopes) or ["subscribe"]).plaintext


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def create_topic(session: Session, slug: str | None = None, parent: str | None = None):
    slug = slug or f"topic-{next(_counter)}-{uuid.uuid4().hex[:6]}"
    return directory.create_topic(session, SYSTEM, slug=slug, parent=parent,
                                  name_nl=slug, name_en=slug)


def actor_for(org: Organisation, *scopes: str):
    from domain.audit import Actor

    return Actor(org.id, None, frozenset(scopes or ("publish", "subscribe")))


def create_subscription(session: Session, org: Organisation, **kwargs):
    from domain import subscriptions

    data = subscriptions.SubscriptionInput(filter=kwargs.pop("filter", {}), **kwargs)
    return subscriptions.create_subscription(session, actor_for(org, "subscribe"), data)


def publish_update(session: Session, publisher: Organisation, *, route: bool = True,
                   idempotency_key: str | None = None, **kwargs):
    """Publish through the use case and, unless route=False, route it in-process."""
    from domain import publishing, routing

    kwargs.setdefault("title", "An update")
    draft = publishing.Draft(**kwargs)
    update = publishing.publish(session, actor_for(publisher, "publish"), draft,
                                idempotency_key=idempotency_key)
    if route:
        routing.route_update(session, update.id)
    return update


def create_rule(session: Session, *, action: str = "route", filter: dict | None = None,
                targets: dict | None = None, name: str = "rule"):
    from domain import rules

    return rules.create_rule(session, SYSTEM, name=name, action=action, filter=filter or {},
                             targets=targets or {})


def create_group_with(session: Session, members: list[Organisation], name: str | None = None):
    return directory.create_group(session, SYSTEM, name or f"group-{uuid.uuid4().hex[:8]}",
                                  None, [m.id for m in members])


def key_id_of(session: Session, plaintext: str) -> uuid.UUID:
    """The id of the API key with this plaintext (as the audit log records it)."""
    import sqlalchemy as sa

    from domain.models import ApiKey

    return session.scalars(sa.select(ApiKey.id)
                           .where(ApiKey.key_hash == keys.hash_key(plaintext))).one()


def org_with_key(session: Session, *scopes: str, **org_kwargs) -> tuple[Organisation, str]:
    """An organisation and one API key for it (default scope: subscribe)."""
    org = create_org(session, **org_kwargs)
    return org, create_key(session, org, *scopes)


def create_feed_subscription(session: Session, org: Organisation, **kwargs):
    """A feed subscription (channel `feed`, so it has a feed token) for `org`."""
    kwargs.setdefault("channel", {"type": "feed"})
    return create_subscription(session, org, **kwargs)


def feed_path(subscription) -> str:
    """The path of a feed subscription's Atom feed (its token is the credential)."""
    return f"/v1/feeds/{subscription.feed_token}"


def insert_webhook_endpoint(session: Session, org: Organisation, url: str, *,
                            secret: str | None = None, event_types: list[str] | None = None,
                            enabled: bool = True, previous_secret: str | None = None,
                            previous_expires_at=None):
    """A webhook endpoint row written directly (no API, no URL check): answers
    (endpoint, plaintext secret). `previous_secret` sets up a rotation's grace period
    (expiring in an hour unless `previous_expires_at` says otherwise)."""
    from datetime import timedelta

    from domain import secrets
    from domain.models import WebhookEndpoint
    from domain.settings import get_settings

    now = get_settings().now()
    secret = secret or secrets.new_webhook_secret()
    endpoint = WebhookEndpoint(
        organisation_id=org.id, url=url, event_types=event_types or [], enabled=enabled,
        secret_ciphertext=secrets.encrypt(secret),
        previous_secret_ciphertext=secrets.encrypt(previous_secret) if previous_secret else None,
        previous_secret_expires_at=(previous_expires_at or now + timedelta(hours=1))
        if previous_secret else None,
        created_at=now, updated_at=now)
    session.add(endpoint)
    session.flush()
    return endpoint, secret


def create_webhook_subscription(session: Session, org: Organisation, endpoint, **kwargs):
    """A subscription of `org` that pushes to one of its webhook endpoints."""
    return create_subscription(session, org,
                               channel={"type": "webhook", "endpoint_id": str(endpoint.id)},
                               **kwargs)


def create_email_subscription(session: Session, org: Organisation, *, address: str | None = None,
                              language: str | None = None, confirmed: bool = False, **kwargs):
    """An e-mail subscription for `org` (a unique address unless given); `confirmed=True`
    follows its confirmation link through the use case."""
    channel = {"type": "email",
               "address": address or f"ops-{uuid.uuid4().hex[:10]}@gemeente.example"}
    if language:
        channel["language"] = language
    kwargs.setdefault("channel", channel)
    sub = create_subscription(session, org, **kwargs)
    if confirmed:
        from domain import mail

        mail.confirm_address(session, sub.email_confirm_token)
    return sub
