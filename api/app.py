"""The FastAPI application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from urllib.parse import unquote_to_bytes

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import problems
from api.deps import close_request_sessions
from api.metrics import REQUEST_LATENCY
from api.routes import (
    bundles,
    directory,
    health,
    inbox,
    rules,
    subscriptions,
    updates,
    webhooks,
)

DESCRIPTION = """Doorstroom routes information updates from Flemish policy domains and federal
bodies to the local governments that need them: publish once, reach every subscribed
municipality, on its channel and in its rhythm, with a record of who received, read and
acknowledged what.

Authenticate with `Authorization: Bearer <api key>`. Errors are RFC 9457 problem documents."""


class BodySizeLimit:
    """Refuse bodies over the limit with 413 before anything parses them.

    Checks `Content-Length` up front and counts streamed bytes for chunked requests.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        received = 0
        too_large = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _TooLarge
            return message

        async def guarded_send(message: Message) -> None:
            # FastAPI turns an error while reading the body into its own 400 answer: once
            # the body is over the limit, that answer is dropped and the 413 goes out instead.
            nonlocal started
            if too_large:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(_TooLarge):
            await self.app(scope, counting_receive, guarded_send)
        if too_large and not started:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problems.problem(
            "payload-too-large", f"request bodies are limited to {self.max_bytes} bytes"
        )
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


class RequestDeadline:
    """Answer 503 when a request has run out of time, instead of hanging with the client.

    Meant for a database that stopped answering without closing its connections (a stalled
    disk, a paused machine): psycopg has no client-side read timeout, so the request's
    thread waits until the server returns, but the client gets a problem response and can
    retry (with its Idempotency-Key) elsewhere or later."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.seconds <= 0:
            await self.app(scope, receive, send)
            return
        started = False
        answer: asyncio.Future[None] | None = None  # the 503, once the deadline passed

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if answer is not None:  # we answered already; the late output goes nowhere
                return
            started = True
            await send(message)

        def deadline() -> None:
            nonlocal answer
            if started:
                return
            response = problems.problem(
                "service-unavailable",
                f"the request did not complete within {self.seconds:g} s; retry later",
                headers={"Retry-After": "5"})
            # Held in `answer` (this request's frame keeps it alive) and awaited below.
            answer = asyncio.ensure_future(response(scope, receive, send))

        # A timer, not a task per request or wait_for: a handler blocked in a worker thread
        # cannot be cancelled (the thread runs on), so the timer answers in its stead and
        # the handler's own answer, when it comes, is dropped.
        timer = asyncio.get_running_loop().call_later(self.seconds, deadline)
        try:
            await self.app(scope, receive, guarded_send)
        except Exception as exc:
            if answer is None:
                raise
            logging.getLogger("doorstroom.api").warning(
                "a request abandoned after its deadline failed later: %s", type(exc).__name__)
        finally:
            timer.cancel()
        if answer is not None:
            # The handler may end in the very turn the deadline passed: the 503 must be out
            # before this returns, or the server would find no response and send a 500.
            await answer



class RefuseNulInUrl:
    """No id, slug, token or filter holds a NUL, and PostgreSQL cannot even compare text
    with one (it would be a 500): a path with a NUL names nothing (404, like any unknown
    id), a query string with one is malformed (400)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            response = None
            if "\x00" in scope.get("path", ""):
                response = problems.problem("not-found")
            elif b"\x00" in unquote_to_bytes(scope.get("query_string", b"")):
                response = problems.problem("malformed-request",
                                            "the query string must not contain NUL characters")
            if response is not None:
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ObserveLatency:
    """Record each request's latency in the histogram, by method and route template, and
    close the request's database sessions (`api.deps.get_session`) once it is answered.

    A plain ASGI middleware: starlette's BaseHTTPMiddleware (`@app.middleware("http")`)
    costs a task group and memory streams per request, a measurable share of a publish."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            await close_request_sessions(scope)
            route = scope.get("route")  # set by the router on this same scope
            REQUEST_LATENCY.labels(scope["method"], getattr(route, "path", "unmatched")
                                   ).observe(time.perf_counter() - started)


#: Paths whose last segment is a credential (a feed token, an e-mail link token).
_CAPABILITY_PATH = re.compile(r"(/v1/(?:feeds|email/confirm|email/unsubscribe)/)[^/\s?\"]+")


class RedactCapabilityTokens(logging.Filter):
    """Keep feed and e-mail link tokens out of the access log: they are credentials."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_CAPABILITY_PATH.sub(r"\1[redacted]", a)
                                if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = _CAPABILITY_PATH.sub(r"\1[redacted]", record.msg)
        return True


def create_app() -> FastAPI:
    from domain.settings import get_settings

    settings = get_settings()

    app = FastAPI(title="Doorstroom", version="1.0.0", description=DESCRIPTION,
                  openapi_url="/openapi.json", docs_url="/docs", redoc_url=None)
    problems.install(app)
    # The router tries routes in order: the busiest (publishing, then the inboxes) first.
    app.include_router(updates.router)
    app.include_router(inbox.router)
    app.include_router(health.router)
    app.include_router(directory.router)
    app.include_router(__import__("api.routes.feeds", fromlist=["router"]).router)
    for module in (subscriptions, rules, webhooks, bundles):
        app.include_router(module.router)
    app.include_router(__import__("api.routes.email", fromlist=["router"]).router)
    app.include_router(__import__("api.routes.audit", fromlist=["router"]).router)

    app.add_middleware(ObserveLatency)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestDeadline, seconds=settings.request_timeout_seconds)
    app.add_middleware(RefuseNulInUrl)
    access_log = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactCapabilityTokens) for f in access_log.filters):
        access_log.addFilter(RedactCapabilityTokens())
    return app


app = create_app()
