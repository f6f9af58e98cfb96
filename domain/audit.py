"""The append-only audit log: who did what to which object, and when."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from domain.models import AuditEntry
from domain.settings import get_settings


@dataclass(frozen=True)
class Actor:
    """Who is acting: an organisation through one of its keys, or the platform itself (CLI)."""

    organisation_id: uuid.UUID | None
    key_id: uuid.UUID | None
    scopes: frozenset[str]

    def has(self, scope: str) -> bool:
        return scope in self.scopes


SYSTEM = Actor(organisation_id=None, key_id=None, scopes=frozenset({"admin"}))


def record(
    session: Session,
    actor: Actor,
    action: str,
    object_type: str,
    object_id: object | None = None,
    **detail: Any,
) -> None:
    """Add an audit entry to the caller's transaction (it is committed with the change)."""
    session.add(AuditEntry(**entry(actor, action, object_type, object_id, **detail)))


def entry(actor: Actor, action: str, object_type: str, object_id: object | None = None,
          **detail: Any) -> dict[str, Any]:
    """An audit entry's column values, for a caller that writes it itself (a Core INSERT in
    its own transaction, as `record` would have it committed)."""
    return {"at": get_settings().now(), "actor_organisation_id": actor.organisation_id,
            "actor_key_id": actor.key_id, "action": action, "object_type": object_type,
            "object_id": None if object_id is None else str(object_id), "detail": detail}
