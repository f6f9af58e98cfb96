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
