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
