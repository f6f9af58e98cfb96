"""The audit log (admin): who did what to which object, and when."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from api.deps import AdminDep, SessionDep
from api.ids import in_utc_range, parse_ref
from api.pages import page_response
from api.problems import responses
from api.schemas import ListOf
from api.schemas import Response as ResponseModel
from domain import audit_log
from domain.errors import InvalidInput
from domain.models import AuditEntry

router = APIRouter(prefix="/v1/audit", tags=["audit"], responses=responses(404))


class AuditEntryOut(ResponseModel):
    id: str
    at: datetime
    actor_organisation_id: str | None
    actor_key_id: str | None
    action: str
    object_type: str
    object_id: str | None
    detail: dict[str, Any]


def entry_out(entry: AuditEntry) -> dict[str, Any]:
    return {"id": str(entry.id), "at": entry.at,
            "actor_organisation_id": _str(entry.actor_organisation_id),
            "actor_key_id": _str(entry.actor_key_id), "action": entry.action,
            "object_type": entry.object_type, "object_id": entry.object_id,
            "detail": entry.detail or {}}


def _str(value: uuid.UUID | None) -> str | None:
    return str(value) if value else None


Text = Annotated[str | None, Query(max_length=100, pattern=r"^[\x21-\x7e]+$")]


@router.get("", response_model=ListOf[AuditEntryOut])
def list_audit(request: Request, response: Response, _actor: AdminDep, session: SessionDep,
               actor: Annotated[str | None, Query(
                   max_length=100, description="An organisation id or an API key id")] = None,
               action: Annotated[str | None, Query(
                   max_length=100, pattern=r"^[a-z_.]+\*?$",
                   description="An action (`key.issued`) or a prefix (`key.*`)")] = None,
               object_type: Text = None,
               object: Annotated[str | None, Query(  # noqa: A002 - the contract's name
                   max_length=100, pattern=r"^[\x21-\x7e]+$",
                   description="The id of the object acted on")] = None,
               since: datetime | None = None, until: datetime | None = None,
               cursor: Annotated[str | None, Query(max_length=500)] = None,
               limit: Annotated[int | None, Query(ge=1, le=200)] = None) -> dict[str, Any]:
    """Newest first. Admin actions, restricted reads (`update.restricted_read`) and every
    other audited change."""
    for value, name in ((since, "since"), (until, "until")):
        if value is not None and (value.tzinfo is None or not in_utc_range(value)):
            raise InvalidInput(f"{name} needs a time zone offset and a valid date",
                               parameter=name)
    filters = audit_log.AuditFilters(
        actor=parse_ref(actor, "actor") if actor else None, action=action,
        object_type=object_type, object_id=object, since=since, until=until)
    page = audit_log.list_audit(session, filters, cursor, limit)
    return page_response(request, response, page, entry_out)
