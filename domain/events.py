"""CloudEvents 1.0 payloads (structured JSON) for push channels, built with the SDK."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from domain.models import Classification, PreventionLevel, Priority, UpdateStatus
from domain.settings import get_settings

PUBLISHED = "be.doorstroom.update.published"
CORRECTED = "be.doorstroom.update.corrected"
WITHDRAWN = "be.doorstroom.update.withdrawn"
BUNDLE = "be.doorstroom.bundle"
PING = "be.doorstroom.endpoint.ping"
EVENT_TYPES = (PUBLISHED, CORRECTED, WITHDRAWN, BUNDLE, PING)
CONTENT_TYPE = "application/cloudevents+json"


class UpdateFields(Protocol):
    """What an event reads of an update: an `Update`, or a row of the `updates` table (routing
    reads plain rows)."""

    @property
    def id(self) -> uuid.UUID: ...
    @property
    def chain_id(self) -> uuid.UUID: ...
    @property
    def version(self) -> int: ...
    @property
    def priority(self) -> Priority: ...
    @property
    def classification(self) -> Classification: ...
    @property
    def status(self) -> UpdateStatus: ...
    @property
    def title(self) -> str: ...
    @property
    def summary(self) -> str: ...
    @property
    def body(self) -> str: ...
    @property
    def topics(self) -> list[str]: ...
    @property
    def prevention_level(self) -> PreventionLevel: ...
    @property
    def target_roles(self) -> list[str]: ...
    @property
    def language(self) -> str: ...
    @property
    def links(self) -> list[dict[str, Any]]: ...
    @property
    def publish_at(self) -> datetime: ...
    @property
    def expires_at(self) -> datetime | None: ...
    @property
    def supersedes_id(self) -> uuid.UUID | None: ...


class PublisherFields(Protocol):
    """What an event reads of the publishing organisation (an `Organisation` will do)."""

    @property
    def id(self) -> uuid.UUID: ...
    @property
    def name(self) -> str: ...


class Publisher(NamedTuple):
    id: uuid.UUID
    name: str


def _source() -> str:
    return get_settings().public_url.rstrip("/") + "/v1"


def structured(event_type: str, event_id: str, time: datetime, subject: str | None,
               data: dict[str, Any]) -> str:
    """One event in structured JSON mode, as text (stored, then sent byte for byte)."""
    attributes: dict[str, Any] = {"specversion": "1.0", "type": event_type, "source": _source(),
                                  "id": event_id, "time": time,
                                  "datacontenttype": "application/json"}
    if subject:
        attributes["subject"] = subject
    return JSONFormat().write(CloudEvent(attributes=attributes, data=data)).decode()


def update_link(update_id: object) -> str:
    return f"{get_settings().public_url.rstrip('/')}/v1/inbox/{update_id}"


def update_data(update: UpdateFields, publisher: PublisherFields) -> dict[str, Any]:
    """The event data. A restricted update is a notice: id, publisher, priority, link."""
    base: dict[str, Any] = {
        "id": str(update.id), "chain_id": str(update.chain_id), "version": update.version,
        "publisher": {"id": str(publisher.id), "name": publisher.name},
        "priority": update.priority.value, "classification": update.classification.value,
        "status": update.status.value, "url": update_link(update.id),
    }
    if update.classification is Classification.restricted:
        return {"update": base, "notice": True}
    base.update({
        "title": update.title, "summary": update.summary, "body": update.body,
        "topics": update.topics, "prevention_level": update.prevention_level.value,
        "target_roles": update.target_roles, "language": update.language,
        "links": update.links, "publish_at": update.publish_at.isoformat(),
        "expires_at": update.expires_at.isoformat() if update.expires_at else None,
        "supersedes": str(update.supersedes_id) if update.supersedes_id else None,
    })
    return {"update": base, "notice": False}


def update_event(update: UpdateFields, publisher: PublisherFields, event_type: str,
                 at: datetime) -> str:
    return structured(event_type, f"{update.id}.{event_type.rsplit('.', 1)[-1]}", at,
                      f"updates/{update.id}", update_data(update, publisher))


def ping_event(endpoint_id: object, event_id: str, at: datetime) -> str:
    return structured(PING, event_id, at, f"webhook-endpoints/{endpoint_id}",
                      {"endpoint_id": str(endpoint_id), "message": "ping"})
