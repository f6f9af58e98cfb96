"""The FastAPI application."""

from __future__ import annotations

import contextlib
import time

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import problems
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


def create_app() -> FastAPI:
    from domain.settings import get_settings

    settings = get_settings()
    app = FastAPI(title="Doorstroom", version="1.0.0", description=DESCRIPTION,
                  openapi_url="/openapi.json", docs_url="/docs", redoc_url=None)
    problems.install(app)
    app.include_router(health.router)
    app.include_router(directory.router)
    app.include_router(__import__("api.routes.feeds", fromlist=["router"]).router)
    for module in (updates, inbox, subscriptions, rules, webhooks, bundles):
        app.include_router(module.router)
    app.include_router(__import__("api.routes.email", fromlist=["router"]).router)

    @app.middleware("http")
    async def observe_latency(request, call_next):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        REQUEST_LATENCY.labels(request.method, getattr(route, "path", "unmatched")).observe(
            time.perf_counter() - started
        )
        return response

    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    return app


app = create_app()
