"""Request-scoped dependencies: the database session and the authenticated caller."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.types import Scope

from api import ratelimit
from domain import keys
from domain.audit import Actor
from domain.db import get_sessionmaker
from domain.errors import Forbidden, Unauthenticated
from domain.settings import get_settings


async def get_session(request: Request) -> Session:
    """The request's session, made on the event loop (that touches no database) and closed
    by `close_request_sessions` once the response has gone out. A plain dependency: one
    with `yield` costs FastAPI an exit stack and a shielded cancel scope per request, a
    measurable share of a publish."""
    session = get_sessionmaker()()
    request.scope.setdefault(SESSIONS_KEY, []).append(session)
    return session


#: Where the request's scope keeps the sessions to close.
SESSIONS_KEY = "doorstroom.sessions"


async def close_request_sessions(scope: Scope) -> None:
    """Close the sessions `get_session` made for this request. Closing with a transaction
    open rolls back, a database round trip, so that goes to the thread pool; otherwise it
    touches no database and stays on the event loop."""
    for session in scope.pop(SESSIONS_KEY, ()):
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("send an API key as 'Authorization: Bearer <key>'")
    return token.strip()


async def authenticated(request: Request, session: SessionDep) -> Actor:
    """Who is calling; 401 for a missing, unknown or revoked key.

    A key authenticated in the last few seconds is answered from the process's cache
    (`domain.keys.CACHE_SECONDS`, which also bounds how long a revocation through another
    process takes to reach this one) on the event loop; the database lookup, the rate
    limiter (Redis) and the once-a-minute `last_used_at` write go to the thread pool."""
    presented = _bearer(request)
    entry = keys.cached_key(presented)
    if (entry is None or ratelimit.rate_limiting()
            or entry.touch_due(get_settings().now())):
        entry = await run_in_threadpool(_authenticate, session, presented)
    request.state.actor = entry.actor
    return entry.actor


def _authenticate(session: Session, presented: str) -> keys.CachedKey:
    entry = keys.authenticate_cached(session, presented)
    ratelimit.enforce_rate_limit(str(entry.key_id))
    keys.touch_last_used(session, entry)
    return entry


CallerDep = Annotated[Actor, Depends(authenticated)]


def require(*scopes: str) -> Callable[[Actor], Actor]:
    """The caller must hold one of `scopes`. Checked before any lookup, so a 403 reveals
    nothing about whether an id exists."""

    def check(actor: CallerDep) -> Actor:
        if not any(actor.has(s) for s in scopes):
            raise Forbidden(f"this operation needs the scope {' or '.join(scopes)}")
        return actor

    return check


def requiring(*scopes: str) -> Callable[[Request, Session], Coroutine[Any, Any, Actor]]:
    """`require` as a dependency: authenticates and checks in one (each level of FastAPI's
    dependency tree costs a measurable share of a publish). Async, since the check does no
    I/O: a sync dependency would cost a trip through the thread pool per request."""
    check = require(*scopes)

    async def dependency(request: Request, session: SessionDep) -> Actor:
        return check(await authenticated(request, session))

    return dependency


AdminDep = Annotated[Actor, Depends(requiring("admin"))]
PublisherDep = Annotated[Actor, Depends(requiring("publish"))]
SubscriberDep = Annotated[Actor, Depends(requiring("subscribe"))]
