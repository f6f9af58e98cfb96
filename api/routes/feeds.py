"""Atom feeds: `GET /v1/feeds/{token}`. No API key: the unguessable token in the URL is the
credential (see domain/feeds.py)."""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from api.deps import SessionDep
from api.problems import PROBLEM_SCHEMA
from domain import feeds

router = APIRouter(prefix="/v1/feeds", tags=["feeds"])

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "An Atom 1.0 feed (RFC 4287), paged per RFC 5005",
          "content": {"application/atom+xml": {"schema": {"type": "string"}}}},
    304: {"description": "Not modified (If-None-Match matched the ETag)"},
    **{status: {"description": "problem", **PROBLEM_SCHEMA}
       for status in (400, 404, 422, 429, 503)},
}


def _matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    candidates = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in candidates or etag in candidates


@router.get("/{token}", response_class=Response, responses=_RESPONSES)
def get_feed(token: str, request: Request, session: SessionDep,
             cursor: Annotated[str | None, Query(max_length=500)] = None,
             limit: Annotated[int | None, Query(ge=1, le=200)] = None) -> Response:
    """The Atom feed of one feed subscription: newest first, one entry per update (the latest
    version), withdrawn updates as RFC 6721 tombstones, restricted updates as notices.
    An unknown or rotated-away token is 404."""
    from api.ratelimit import enforce_rate_limit

    subscription = feeds.subscription_for_token(session, token)
    enforce_rate_limit(f"feed:{subscription.id}")
    if subscription.cadence.value == "immediate":
        body = feeds.render(feeds.feed_page(session, subscription, cursor, limit))
    else:
        body = feeds.bundle_feed(session, subscription, cursor, limit)
    headers = {
        "ETag": f'"{hashlib.sha256(body).hexdigest()[:32]}"',
        # The URL is a credential: shared caches must not keep it; readers revalidate.
        "Cache-Control": "private, no-cache",
        "X-Robots-Tag": "noindex",
        "Referrer-Policy": "no-referrer",
    }
    if _matches(request.headers.get("if-none-match"), headers["ETag"]):
        return Response(status_code=304, headers=headers)
    return Response(content=body, media_type=feeds.MEDIA_TYPE, headers=headers)
