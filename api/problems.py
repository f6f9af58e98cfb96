"""RFC 9457 problem responses: the one place where errors become HTTP.

Each kind of error has a stable `type` URI (listed in the README); routes never raise
HTTPException for business cases, they let domain errors travel here.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from domain import errors

log = logging.getLogger("doorstroom.api")

PROBLEM_BASE = "urn:doorstroom:problem:"

#: kind of error -> (status, title). The README lists these; the slugs are stable.
PROBLEM_TYPES: dict[str, tuple[int, str]] = {
    "malformed-request": (400, "Malformed request"),
    "unauthenticated": (401, "Missing, unknown or revoked API key"),
    "forbidden": (403, "The API key lacks the required scope"),
    "not-found": (404, "Not found"),
    "method-not-allowed": (405, "Method not allowed"),
    "conflict": (409, "Conflict with the current state"),
    "request-in-flight": (409, "A request with this Idempotency-Key is still being processed"),
    "payload-too-large": (413, "Request body too large"),
    "unsupported-media-type": (415, "Unsupported media type"),
    "validation-error": (422, "Invalid request"),
    "idempotency-key-reused": (422, "Idempotency-Key reused with a different request"),
    "rate-limited": (429, "Too many requests"),
    "internal-error": (500, "Internal error"),
    "database-unavailable": (503, "The database is unreachable; retry later"),
    "service-unavailable": (503, "The service could not answer in time; retry later"),
}


def problem(kind: str, detail: str | None = None, *, headers: dict[str, str] | None = None,
            **extra: Any) -> JSONResponse:
    status, title = PROBLEM_TYPES[kind]
    body: dict[str, Any] = {"type": PROBLEM_BASE + kind, "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers,
                        media_type="application/problem+json")


_DOMAIN_KINDS: list[tuple[type[errors.DomainError], str]] = [
    (errors.InFlight, "request-in-flight"),
    (errors.IdempotencyMismatch, "idempotency-key-reused"),
    (errors.NotFound, "not-found"),
    (errors.InvalidInput, "validation-error"),
    (errors.Conflict, "conflict"),
    (errors.Unauthenticated, "unauthenticated"),
    (errors.Forbidden, "forbidden"),
]


def _domain_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.DomainError)
    for cls, kind in _DOMAIN_KINDS:
        if isinstance(exc, cls):
            headers = {"WWW-Authenticate": "Bearer"} if kind == "unauthenticated" else None
            return problem(kind, exc.detail, headers=headers, **exc.extra)
    return problem("validation-error", exc.detail, **exc.extra)


def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    issues = [
        {"location": [str(p) for p in e.get("loc", ())], "message": e.get("msg", ""),
         "code": e.get("type", "")}
        for e in exc.errors()
    ]
    if any(e["code"] == "json_invalid" for e in issues):
        return problem("malformed-request", "the body is not valid JSON", errors=issues)
    return problem("validation-error", "the request has invalid or unknown fields",
                   errors=issues)


def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = {404: "not-found", 405: "method-not-allowed", 413: "payload-too-large",
            415: "unsupported-media-type", 400: "malformed-request"}.get(exc.status_code)
    if kind is None:
        kind = "internal-error" if exc.status_code >= 500 else "malformed-request"
    return problem(kind, str(exc.detail) if exc.detail else None)


def _database_error(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable: %s", type(exc).__name__)
    return problem("database-unavailable", headers={"Retry-After": "5"})


def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return problem("internal-error")


def install(app: FastAPI) -> None:
    from api.ratelimit import RateLimited

    app.add_exception_handler(RateLimited, _rate_limited)
    app.add_exception_handler(errors.DomainError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OperationalError, _database_error)
    app.add_exception_handler(PoolTimeout, _database_error)
    app.add_exception_handler(DBAPIError, _dbapi_error)
    app.add_exception_handler(Exception, _unexpected)


def _dbapi_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DBAPIError)
    if exc.connection_invalidated:
        return _database_error(request, exc)
    return _unexpected(request, exc)


#: OpenAPI description of a problem response, reused by every route.
PROBLEM_SCHEMA = {
    "content": {
        "application/problem+json": {
            "schema": {
                "type": "object",
                "required": ["type", "title", "status"],
                "properties": {
                    "type": {"type": "string"},
                    "title": {"type": "string"},
                    "status": {"type": "integer"},
                    "detail": {"type": "string"},
                },
            }
        }
    }
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    common = {400, 401, 403, 413, 422, 429, 503}
    return {s: {"description": "problem", **PROBLEM_SCHEMA} for s in sorted(common | set(statuses))}


def _rate_limited(_request: Request, exc: Exception) -> JSONResponse:
    from api.ratelimit import RateLimited

    assert isinstance(exc, RateLimited)
    return problem("rate-limited", str(exc), headers={"Retry-After": str(exc.retry_after)})
