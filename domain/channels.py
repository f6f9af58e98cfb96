"""Push channels (webhook, e-mail) configured on subscriptions."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.orm import Session

from domain.errors import InvalidInput


def check_webhook_channel(session: Session, organisation_id: uuid.UUID,
                          channel: dict[str, Any]) -> dict[str, Any]:
    """A webhook channel must name one of the organisation's own endpoints."""
    # Webhook endpoints are registered through /v1/webhook-endpoints, which is not served yet:
    # until then no endpoint id can be valid.
    raise InvalidInput("webhook endpoints are not available yet; use inbox, feed or email",
                       field="channel.endpoint_id")
