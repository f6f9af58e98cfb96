"""The caller's webhook endpoints, and delivery attempts with replay."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Query, Request, Response, status

from api.deps import CallerDep, SessionDep, SubscriberDep, require
from api.dispatch import dispatch_soon
from api.ids import parse_id
from api.pages import page_response
from api.problems import responses
from api.schemas import (
    DeliveryOut,
    EndpointCreate,
    EndpointCreated,
    EndpointOut,
    EndpointPatch,
    ListOf,
    PingOut,
    ReplayIn,
    ReplayOut,
)
from domain import deliveries, endpoints
from domain.errors import Forbidden, InvalidInput
from domain.models import ChannelType, Delivery, DeliveryAttempt, DeliveryStatus, WebhookEndpoint
from domain.pagination import paginate

router = APIRouter(prefix="/v1", responses=responses(404))


def endpoint_out(endpoint: WebhookEndpoint) -> dict[str, Any]:
    return {"id": str(endpoint.id), "url": endpoint.url, "description": endpoint.description,
            "event_types": endpoint.event_types, "enabled": endpoint.enabled,
            "disabled_at": endpoint.disabled_at, "disabled_reason": endpoint.disabled_reason,
            "failing_since": endpoint.failing_since,
            "last_success_at": endpoint.last_success_at,
            "secret_rotating_until": endpoint.previous_secret_expires_at,
            "created_at": endpoint.created_at, "updated_at": endpoint.updated_at}


@router.post("/webhook-endpoints", status_code=status.HTTP_201_CREATED, tags=["webhooks"],
             response_model=EndpointCreated)
def create_endpoint(body: EndpointCreate, actor: SubscriberDep, session: SessionDep,
                    response: Response) -> dict[str, Any]:
    """Register an endpoint. The answer holds its signing `secret`: shown this once."""
    created = endpoints.create_endpoint(session, actor, url=str(body.url),
                                        event_types=list(body.event_types),
                                        description=body.description, enabled=body.enabled)
    response.headers["Location"] = f"/v1/webhook-endpoints/{created.endpoint.id}"
    return {**endpoint_out(created.endpoint), "secret": created.secret}


@router.get("/webhook-endpoints", tags=["webhooks"], response_model=ListOf[EndpointOut])
def list_endpoints(request: Request, response: Response, actor: SubscriberDep,
                   session: SessionDep,
                   cursor: Annotated[str | None, Query(max_length=500)] = None,
                   limit: Annotated[int | None, Query(ge=1, le=200)] = None) -> dict[str, Any]:
    page = endpoints.list_endpoints(session, actor, cursor, limit)
    return page_response(request, response, page, endpoint_out)


@router.get("/webhook-endpoints/{endpoint_id}", tags=["webhooks"], response_model=EndpointOut)
def get_endpoint(endpoint_id: str, actor: SubscriberDep, session: SessionDep) -> dict[str, Any]:
    return endpoint_out(endpoints.get_endpoint(session, actor,
                                               parse_id(endpoint_id, "webhook endpoint")))


@router.patch("/webhook-endpoints/{endpoint_id}", tags=["webhooks"], response_model=EndpointOut)
def patch_endpoint(endpoint_id: str, body: EndpointPatch, actor: SubscriberDep,
                   session: SessionDep) -> dict[str, Any]:
    changes = body.model_dump(exclude_unset=True)
    if "url" in changes:
        changes["url"] = str(body.url)
    if changes.get("enabled") is None:
        changes.pop("enabled", None)
    endpoint = endpoints.update_endpoint(session, actor,
                                         parse_id(endpoint_id, "webhook endpoint"), changes)
    return endpoint_out(endpoint)


@router.delete("/webhook-endpoints/{endpoint_id}", status_code=status.HTTP_204_NO_CONTENT,
               tags=["webhooks"], responses=responses(409))
def delete_endpoint(endpoint_id: str, actor: SubscriberDep, session: SessionDep) -> Response:
    endpoints.delete_endpoint(session, actor, parse_id(endpoint_id, "webhook endpoint"))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/webhook-endpoints/{endpoint_id}/rotate-secret", tags=["webhooks"],
             response_model=EndpointCreated)
def rotate_secret(endpoint_id: str, actor: SubscriberDep, session: SessionDep) -> dict[str, Any]:
    """A new secret (shown once); the old one keeps signing during the grace period."""
    rotated = endpoints.rotate_secret(session, actor, parse_id(endpoint_id, "webhook endpoint"))
    return {**endpoint_out(rotated.endpoint), "secret": rotated.secret}


@router.post("/webhook-endpoints/{endpoint_id}/ping", tags=["webhooks"], response_model=PingOut)
def ping(endpoint_id: str, actor: SubscriberDep, session: SessionDep) -> dict[str, Any]:
    """Send one signed `be.doorstroom.endpoint.ping` event now and report what came back."""
    endpoint = endpoints.get_endpoint(session, actor, parse_id(endpoint_id, "webhook endpoint"))
    from workers.webhooks import send_ping

    outcome = send_ping(endpoint.id, session=session)
    return {"ok": outcome.succeeded, "status_code": outcome.status_code,
            "latency_ms": outcome.latency_ms, "error": outcome.error}


@router.post("/webhook-endpoints/{endpoint_id}/replay", tags=["webhooks"],
             response_model=ReplayOut, status_code=status.HTTP_202_ACCEPTED)
def replay(endpoint_id: str, body: ReplayIn, actor: SubscriberDep,
           session: SessionDep) -> dict[str, Any]:
    """Send again every failed delivery of this endpoint created in [since, until)."""
    for value, name in ((body.since, "since"), (body.until, "until")):
        if value.tzinfo is None:
            raise InvalidInput(f"{name} needs a time zone offset", field=name)
    count = deliveries.replay_endpoint(session, actor, parse_id(endpoint_id, "webhook endpoint"),
                                       body.since, body.until)
    dispatch_soon()
    return {"replayed": count}


# ------------------------------------------------------------------------------ deliveries


def delivery_out(delivery: Delivery, attempts: list[DeliveryAttempt] | None = None
                 ) -> dict[str, Any]:
    return {"id": str(delivery.id), "message_id": delivery.message_id,
            "organisation_id": str(delivery.organisation_id),
            "subscription_id": str(delivery.subscription_id) if delivery.subscription_id else None,
            "endpoint_id": str(delivery.endpoint_id) if delivery.endpoint_id else None,
            "update_id": str(delivery.update_id) if delivery.update_id else None,
            "channel": str(delivery.channel), "event_type": delivery.event_type,
            "status": str(delivery.status), "attempt_count": delivery.attempt_count,
            "next_attempt_at": delivery.next_attempt_at,
            "last_attempt_at": delivery.last_attempt_at,
            "last_status_code": delivery.last_status_code, "last_error": delivery.last_error,
            "created_at": delivery.created_at, "succeeded_at": delivery.succeeded_at,
            "attempts": None if attempts is None else [
                {"at": a.at, "latency_ms": a.latency_ms, "status_code": a.status_code,
                 "error": a.error} for a in attempts]}


_ANY_SCOPE = require("subscribe", "admin")


@router.get("/deliveries", tags=["deliveries"], response_model=ListOf[DeliveryOut])
def list_deliveries(request: Request, response: Response, actor: CallerDep,
                    session: SessionDep, status: DeliveryStatus | None = None,
                    channel: ChannelType | None = None, endpoint_id: str | None = None,
                    update_id: str | None = None, organisation_id: str | None = None,
                    since: datetime | None = None,
                    cursor: Annotated[str | None, Query(max_length=500)] = None,
                    limit: Annotated[int | None, Query(ge=1, le=200)] = None) -> dict[str, Any]:
    """Admins see every delivery; a subscriber sees its own organisation's."""
    _ANY_SCOPE(actor)
    stmt = _visible_deliveries(actor, organisation_id)
    if status is not None:
        stmt = stmt.where(Delivery.status == status)
    if channel is not None:
        stmt = stmt.where(Delivery.channel == channel)
    if endpoint_id is not None:
        stmt = stmt.where(Delivery.endpoint_id == parse_id(endpoint_id, "webhook endpoint"))
    if update_id is not None:
        stmt = stmt.where(Delivery.update_id == parse_id(update_id, "update"))
    if since is not None:
        if since.tzinfo is None:
            raise InvalidInput("since needs a time zone offset", parameter="since")
        stmt = stmt.where(Delivery.created_at >= since)
    page = paginate(session, stmt, Delivery.id, cursor, limit, descending=True)
    return page_response(request, response, page, delivery_out)


def _visible_deliveries(actor: Any, organisation_id: str | None) -> Any:
    """Admins see every delivery (optionally one organisation's); others their own."""
    stmt = sa.select(Delivery)
    if actor.has("admin"):
        if organisation_id is not None:
            stmt = stmt.where(Delivery.organisation_id == parse_id(organisation_id,
                                                                   "organisation"))
        return stmt
    if organisation_id is not None and parse_id(organisation_id, "organisation") != \
            actor.organisation_id:
        raise Forbidden("only admins list other organisations' deliveries")
    return stmt.where(Delivery.organisation_id == actor.organisation_id)


@router.get("/deliveries/{delivery_id}", tags=["deliveries"], response_model=DeliveryOut)
def get_delivery(delivery_id: str, actor: CallerDep, session: SessionDep) -> dict[str, Any]:
    _ANY_SCOPE(actor)
    delivery = deliveries.get_delivery(session, actor, parse_id(delivery_id, "delivery"))
    attempts = list(session.scalars(sa.select(DeliveryAttempt)
                                    .where(DeliveryAttempt.delivery_id == delivery.id)
                                    .order_by(DeliveryAttempt.id)))
    return delivery_out(delivery, attempts)


@router.post("/deliveries/{delivery_id}/retry", tags=["deliveries"], response_model=DeliveryOut,
             status_code=status.HTTP_202_ACCEPTED)
def retry_delivery(delivery_id: str, actor: CallerDep, session: SessionDep) -> dict[str, Any]:
    """Send again now, under the same `webhook-id`."""
    _ANY_SCOPE(actor)
    delivery = deliveries.retry_delivery(session, actor, parse_id(delivery_id, "delivery"))
    dispatch_soon()
    return delivery_out(delivery)
