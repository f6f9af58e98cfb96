"""The caller's own subscriptions."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status

from api.deps import SessionDep, SubscriberDep
from api.ids import parse_id
from api.pages import page_response
from api.problems import responses
from api.render import subscription_out
from api.schemas import ListOf, SubscriptionCreate, SubscriptionOut, SubscriptionPatch
from domain import subscriptions

router = APIRouter(prefix="/v1/subscriptions", tags=["subscriptions"], responses=responses(404))


def _channel(body: Any) -> dict[str, Any]:
    return {k: v for k, v in body.model_dump().items() if v is not None}


@router.post("", status_code=status.HTTP_201_CREATED, response_model=SubscriptionOut)
def create(body: SubscriptionCreate, actor: SubscriberDep, session: SessionDep,
           response: Response) -> dict[str, Any]:
    data = subscriptions.SubscriptionInput(
        filter=body.filter.model_dump(mode="json"), cadence=body.cadence, send_at=body.send_at,
        weekday=body.weekday, include_directed=body.include_directed,
        channel=_channel(body.channel), name=body.name)
    sub = subscriptions.create_subscription(session, actor, data)
    response.headers["Location"] = f"/v1/subscriptions/{sub.id}"
    return subscription_out(sub)


@router.get("", response_model=ListOf[SubscriptionOut])
def list_(request: Request, response: Response, actor: SubscriberDep, session: SessionDep,
          cursor: Annotated[str | None, Query(max_length=500)] = None,
          limit: Annotated[int | None, Query(ge=1, le=200)] = None) -> dict[str, Any]:
    page = subscriptions.list_subscriptions(session, actor, cursor, limit)
    return page_response(request, response, page, subscription_out)


@router.get("/{subscription_id}", response_model=SubscriptionOut)
def get(subscription_id: str, actor: SubscriberDep, session: SessionDep) -> dict[str, Any]:
    return subscription_out(subscriptions.get_subscription(
        session, actor, parse_id(subscription_id, "subscription")))


@router.patch("/{subscription_id}", response_model=SubscriptionOut)
def patch(subscription_id: str, body: SubscriptionPatch, actor: SubscriberDep,
          session: SessionDep) -> dict[str, Any]:
    changes = body.model_dump(mode="json", exclude_unset=True)
    if body.channel is not None:
        changes["channel"] = _channel(body.channel)
    for field in ("cadence", "include_directed", "active", "filter"):
        if field in changes and changes[field] is None:
            changes.pop(field)
    sub = subscriptions.update_subscription(session, actor,
                                            parse_id(subscription_id, "subscription"), changes)
    return subscription_out(sub)


@router.post("/{subscription_id}/rotate-feed-token", response_model=SubscriptionOut)
def rotate_feed_token(subscription_id: str, actor: SubscriberDep,
                      session: SessionDep) -> dict[str, Any]:
    return subscription_out(subscriptions.rotate_feed_token(
        session, actor, parse_id(subscription_id, "subscription")))


@router.delete("/{subscription_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete(subscription_id: str, actor: SubscriberDep, session: SessionDep) -> Response:
    subscriptions.delete_subscription(session, actor, parse_id(subscription_id, "subscription"))
    return Response(status_code=status.HTTP_204_NO_CONTENT)
