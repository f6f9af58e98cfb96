"""Push channels configured on subscriptions."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.orm import Session

from domain.errors import InvalidInput
from domain.models import WebhookEndpoint


def check_webhook_channel(session: Session, organisation_id: uuid.UUID,
                          channel: dict[str, Any]) -> dict[str, Any]:
    """A webhook channel must name one of the organisation's own endpoints."""
    try:
        endpoint_id = uuid.UUID(str(channel.get("endpoint_id")))
    except ValueError as exc:
        raise InvalidInput("channel.endpoint_id must name one of your webhook endpoints",
                           field="channel.endpoint_id") from exc
    endpoint = session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None or endpoint.organisation_id != organisation_id:
        raise InvalidInput("channel.endpoint_id must name one of your webhook endpoints",
                           field="channel.endpoint_id")
    return {"type": "webhook", "endpoint_id": str(endpoint.id)}
