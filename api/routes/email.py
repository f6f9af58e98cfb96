"""Links sent by e-mail: address confirmation and one-click unsubscribe (RFC 8058).

No API key: the token in the link is the capability. GET never changes a subscription's
delivery state except for the confirmation link (confirming is what that link is for);
unsubscribing takes a POST, so link scanners that follow every URL in a mail do not
unsubscribe anyone.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from api.deps import SessionDep
from api.problems import PROBLEM_SCHEMA
from domain import mail

router = APIRouter(prefix="/v1/email", tags=["e-mail"],
                   responses={404: {"description": "unknown or expired link",
                                    **PROBLEM_SCHEMA}})

#: Pages reached from a mail: not cached, not indexed, no referrer (the URL is a secret),
#: nothing loaded from elsewhere, forms only to this site.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": ("default-src 'none'; style-src 'unsafe-inline'; "
                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
}

_HTML = {"text/html": {"schema": {"type": "string"}}}


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


def _page(page: str, session: Any, sub: Any, **extra: Any) -> HTMLResponse:
    html = mail.render_page(page, sub, mail.organisation_of(session, sub), **extra)
    return HTMLResponse(html, headers=PAGE_HEADERS)


@router.get("/confirm/{token}", response_class=HTMLResponse,
            responses={200: {"description": "the address is confirmed", "content": {
                **_HTML, "application/json": {"schema": {
                    "type": "object", "properties": {"status": {"type": "string"},
                                                     "subscription_id": {"type": "string"}}}}}}},
            summary="Confirm an e-mail subscription's address")
def confirm(token: str, request: Request, session: SessionDep) -> Response:
    sub = mail.confirm_address(session, token)
    if _wants_json(request):
        return JSONResponse({"status": "confirmed", "subscription_id": str(sub.id)},
                            headers=PAGE_HEADERS)
    return _page("confirmed", session, sub)


@router.get("/unsubscribe/{token}", response_class=HTMLResponse,
            responses={200: {"description": "a page with the unsubscribe button",
                             "content": _HTML}},
            summary="Ask whether to unsubscribe (changes nothing)")
def unsubscribe_page(token: str, request: Request, session: SessionDep) -> Response:
    sub = mail.subscription_for_unsubscribe(session, token)
    if sub.suspended_at is not None and sub.suspended_reason == mail.UNSUBSCRIBED_REASON:
        return _page("unsubscribed", session, sub)
    return _page("unsubscribe", session, sub, action=request.url.path)


@router.post("/unsubscribe/{token}", response_class=HTMLResponse,
             responses={200: {"description": "unsubscribed", "content": _HTML}},
             summary="One-click unsubscribe (RFC 8058)",
             description=("Body `List-Unsubscribe=One-Click` (form-encoded), as mail clients "
                          "send it; the body is not required. Suspends this subscription "
                          "only; its organisation can undo it with PATCH "
                          "/v1/subscriptions/{id} `{\"active\": true}`."))
def unsubscribe(token: str, request: Request, session: SessionDep) -> Response:
    sub = mail.unsubscribe(session, token)
    if _wants_json(request):
        return JSONResponse({"status": "unsubscribed", "subscription_id": str(sub.id)},
                            headers=PAGE_HEADERS)
    return _page("unsubscribed", session, sub)
