"""An organisation's inbox: newest first, filters, read and acknowledge."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from api.deps import SessionDep, SubscriberDep
from api.ids import in_utc_range, parse_id
from api.problems import responses
from api.render import update_out
from api.schemas import InboxItemOut, ListOf
from domain import inbox
from domain.errors import InvalidInput
from domain.models import Priority

router = APIRouter(prefix="/v1/inbox", tags=["inbox"], responses=responses(404))


def item_out(entry: inbox.InboxEntry, *, full: bool) -> dict[str, Any]:
    item = entry.item
    return {"id": str(item.chain_id), "update": update_out(entry.update, full=full),
            "reasons": item.reasons(), "received_at": item.received_at,
            "delivered_at": item.delivered_at, "read_at": item.read_at,
            "acked_at": item.acked_at, "needs_ack": item.needs_ack}


@router.get("", response_model=ListOf[InboxItemOut])
def list_inbox(request: Request, response: Response, actor: SubscriberDep, session: SessionDep,
               unread: bool | None = None,
               topic: Annotated[str | None, Query(max_length=100)] = None,
               priority: Priority | None = None, needs_ack: bool | None = None,
               since: datetime | None = None, include_expired: bool = False,
               cursor: Annotated[str | None, Query(max_length=500)] = None,
               limit: Annotated[int | None, Query(ge=1, le=200)] = None) -> dict[str, Any]:
    """Restricted items appear as notices here; open one to read it (audited)."""
    if since is not None and since.tzinfo is None:
        raise InvalidInput("since needs a time zone offset", parameter="since")
    if since is not None and not in_utc_range(since):
        raise InvalidInput("since is out of range", parameter="since")
    filters = inbox.InboxFilters(unread=unread, topic=topic, priority=priority,
                                 needs_ack=needs_ack, since=since,
                                 include_expired=include_expired)
    entries, next_cursor = inbox.list_inbox(session, actor, filters, cursor, limit)
    if next_cursor:
        response.headers["Link"] = (
            f'<{request.url.include_query_params(cursor=next_cursor)}>; rel="next"')
    return {"items": [item_out(e, full=False) for e in entries], "next_cursor": next_cursor}


@router.get("/{update_id}", response_model=InboxItemOut)
def get_item(update_id: str, actor: SubscriberDep, session: SessionDep) -> dict[str, Any]:
    """`update_id` may be any version of the chain."""
    return item_out(inbox.read_item(session, actor, parse_id(update_id, "inbox item")),
                    full=True)


@router.post("/{update_id}/read", response_model=InboxItemOut)
def mark_read(update_id: str, actor: SubscriberDep, session: SessionDep) -> dict[str, Any]:
    return item_out(inbox.mark_read(session, actor, parse_id(update_id, "inbox item")),
                    full=False)


@router.post("/{update_id}/ack", response_model=InboxItemOut)
def acknowledge(update_id: str, actor: SubscriberDep, session: SessionDep) -> dict[str, Any]:
    return item_out(inbox.acknowledge(session, actor, parse_id(update_id, "inbox item")),
                    full=False)
