"""Publishing: updates, corrections, withdrawals, reach."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.responses import JSONResponse

from api.deps import CallerDep, PublisherDep, SessionDep
from api.dispatch import dispatch_soon
from api.ids import in_utc_range, parse_id, parse_ref
from api.pages import page_response
from api.problems import responses
from api.render import update_out
from api.schemas import ListOf, ReachOut, UpdateAccepted, UpdateCreate, UpdateOut, WithdrawBody
from domain import audit, inbox, publishing
from domain.errors import InvalidInput, NotFound
from domain.models import Classification, InboxItem, UpdateStatus

router = APIRouter(prefix="/v1", tags=["updates"], responses=responses(404))

_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")


def draft_from(body: UpdateCreate) -> publishing.Draft:
    """The domain's draft; refuses times without an offset or outside the UTC range (used by
    publish and by the routing preview alike)."""
    for field in ("publish_at", "expires_at"):
        value = getattr(body, field)
        if value is not None and value.tzinfo is None:
            raise InvalidInput(f"{field} needs a time zone offset", field=field)
        if value is not None and not in_utc_range(value):
            raise InvalidInput(f"{field} is out of range", field=field)
    return publishing.Draft(
        title=body.title, summary=body.summary, body=body.body, topics=body.topics,
        prevention_level=body.prevention_level, target_roles=body.target_roles,
        priority=body.priority, classification=body.classification,
        audience=body.audience.model_dump() if body.audience else None,
        supersedes=parse_ref(body.supersedes, "supersedes") if body.supersedes else None,
        publish_at=body.publish_at, expires_at=body.expires_at,
        links=[link.model_dump() for link in body.links], language=body.language)


# The answer is built here, complete and already in its documented shape: no response
# model to validate it against again (FastAPI would do that in another trip through the
# thread pool); `responses=` keeps it in the OpenAPI document.
@router.post("/updates", status_code=status.HTTP_202_ACCEPTED, response_model=None,
             response_class=JSONResponse,
             responses={202: {"description": "Successful Response", "model": UpdateAccepted},
                        **responses(409)})
def publish_update(body: UpdateCreate, actor: PublisherDep, session: SessionDep,
                   idempotency_key: Annotated[str | None, Header()] = None) -> JSONResponse:
    """Publish once; routing to every recipient happens in the workers (hence 202)."""
    if idempotency_key is not None and not _IDEMPOTENCY_KEY.match(idempotency_key):
        raise InvalidInput("Idempotency-Key is 1 to 200 visible ASCII characters",
                           header="Idempotency-Key")
    receipt = publishing.submit(session, actor, draft_from(body), idempotency_key)
    dispatch_soon()
    return JSONResponse(
        {"id": str(receipt.id), "chain_id": str(receipt.chain_id), "version": receipt.version,
         "status": receipt.status.value},
        status_code=status.HTTP_202_ACCEPTED,
        headers={"Location": f"/v1/updates/{receipt.id}"})


@router.get("/updates", response_model=ListOf[UpdateOut])
def list_updates(request: Request, response: Response, actor: PublisherDep,
                 session: SessionDep, status: UpdateStatus | None = None,
                 cursor: Annotated[str | None, Query(max_length=500)] = None,
                 limit: Annotated[int | None, Query(ge=1, le=200)] = None) -> dict[str, Any]:
    page = publishing.list_own_updates(session, actor, cursor, limit, status)
    return page_response(request, response, page, update_out)


@router.get("/updates/{update_id}", response_model=UpdateOut)
def get_update(update_id: str, actor: CallerDep, session: SessionDep) -> dict[str, Any]:
    """For its publisher, or an organisation that received it (any version of the chain)."""
    from domain.models import Update

    update = session.get(Update, parse_id(update_id, "update"))
    if update is None:
        raise NotFound("update not found")
    if update.publisher_id != actor.organisation_id:
        received = session.get(InboxItem, (update.chain_id, actor.organisation_id))
        if received is None:
            raise NotFound("update not found")
        if update.classification is Classification.restricted:
            audit.record(session, actor, "update.restricted_read", "update", update.id,
                         via="updates")
            session.commit()
    return update_out(update, versions=publishing.version_chain(session, update.chain_id))


@router.post("/updates/{update_id}/withdraw", response_model=UpdateOut)
def withdraw_update(update_id: str, actor: PublisherDep, session: SessionDep,
                    body: WithdrawBody | None = None) -> dict[str, Any]:
    update = publishing.withdraw(session, actor, parse_id(update_id, "update"),
                                 body.reason if body else None)
    dispatch_soon()
    return update_out(update, versions=publishing.version_chain(session, update.chain_id))


@router.get("/updates/{update_id}/reach", response_model=ReachOut)
def get_reach(update_id: str, actor: PublisherDep, session: SessionDep, request: Request,
              response: Response,
              cursor: Annotated[str | None, Query(max_length=500)] = None,
              limit: Annotated[int | None, Query(ge=1, le=200)] = None) -> dict[str, Any]:
    result = inbox.reach(session, actor, parse_id(update_id, "update"), cursor, limit)
    if result.next_cursor:
        response.headers["Link"] = (
            f'<{request.url.include_query_params(cursor=result.next_cursor)}>; rel="next"')
    return {"items": [{"organisation_id": str(r.organisation_id), "name": r.name,
                       "update_id": str(r.update_id), "reasons": r.reasons,
                       "delivered_at": r.delivered_at, "read_at": r.read_at,
                       "acked_at": r.acked_at, "needs_ack": r.needs_ack} for r in result.rows],
            "next_cursor": result.next_cursor, "totals": result.totals}
