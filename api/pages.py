"""Cursor-paginated list responses with an RFC 8288 `Link: rel="next"` header."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request, Response

from domain.pagination import Page


def page_response(request: Request, response: Response, page: Page[Any],
                  render: Callable[[Any], Any], **extra: Any) -> dict[str, Any]:
    if page.next_cursor:
        url = request.url.include_query_params(cursor=page.next_cursor)
        response.headers["Link"] = f'<{url}>; rel="next"'
    return {"items": [render(i) for i in page.items], "next_cursor": page.next_cursor, **extra}
