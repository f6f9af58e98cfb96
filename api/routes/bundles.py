"""The caller's bundles (daily and weekly digests)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from api.deps import SessionDep, SubscriberDep
from api.ids import parse_id
from api.pages import page_response
from api.problems import responses
from api.schemas import BundleOut, ListOf
from domain import bundles

router = APIRouter(prefix="/v1/bundles", tags=["bundles"], responses=responses(404))


@router.get("", response_model=ListOf[BundleOut])
def list_bundles(request: Request, response: Response, actor: SubscriberDep,
                 session: SessionDep, subscription_id: str | None = None,
                 cursor: Annotated[str | None, Query(max_length=500)] = None,
                 limit: Annotated[int | None, Query(ge=1, le=200)] = None) -> dict[str, Any]:
    """Newest first."""
    sub = parse_id(subscription_id, "subscription") if subscription_id else None
    page = bundles.list_bundles(session, actor, sub, cursor, limit)
    contents = bundles.bundle_contents(session, page.items)
    return page_response(request, response, page, lambda b: contents[b.id])


@router.get("/{bundle_id}", response_model=BundleOut)
def get_bundle(bundle_id: str, actor: SubscriberDep, session: SessionDep) -> dict[str, Any]:
    bundle = bundles.get_bundle(session, actor, parse_id(bundle_id, "bundle"))
    return bundles.bundle_contents(session, [bundle])[bundle.id]
