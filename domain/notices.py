"""Platform notices: messages from Doorstroom itself to one organisation's inbox."""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from sqlalchemy.orm import Session

from domain.models import (
    Classification,
    InboxItem,
    Kind,
    Level,
    Organisation,
    PreventionLevel,
    Priority,
    Update,
    UpdateStatus,
    new_id,
)
from domain.settings import get_settings

PLATFORM_CODE = "PLATFORM"


def platform_organisation(session: Session) -> Organisation:
    """The platform's own organisation (seeded; created on first need otherwise)."""
    org = session.scalars(sa.select(Organisation).where(Organisation.kind == Kind.platform)
                          .order_by(Organisation.created_at).limit(1)).first()
    if org is None:
        now = get_settings().now()
        org = Organisation(name="Doorstroom platformbeheer", code=PLATFORM_CODE,
                           level=Level.flemish, kind=Kind.platform, created_at=now,
                           updated_at=now)
        session.add(org)
        session.flush()
    return org


def notify_organisation(session: Session, organisation_id: uuid.UUID, *, title: str,
                        body: str) -> Update:
    """Put an internal notice from the platform in one organisation's inbox (in the caller's
    transaction; the caller commits). It needs acknowledgement."""
    now = get_settings().now()
    platform = platform_organisation(session)
    update_id = new_id()
    audience = {"organisations": [str(organisation_id)], "groups": [], "provinces": []}
    update = Update(id=update_id, chain_id=update_id, version=1, publisher_id=platform.id,
                    title=title[:200], summary=body[:300], body=body, topics=[],
                    prevention_level=PreventionLevel.none, target_roles=["all"], roles_mask=0,
                    priority=Priority.important, classification=Classification.internal,
                    audience=audience, links=[], language="en", publish_at=now,
                    status=UpdateStatus.published, created_at=now, routed_at=now,
                    recipient_count=1)
    session.add(update)
    session.flush()
    session.add(InboxItem(chain_id=update.id, organisation_id=organisation_id,
                          update_id=update.id,
                          via_audience=True,
                          needs_ack=True, received_at=now, delivered_at=now))
    return update
