"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.problems import problem
from domain.db import get_engine
from domain.settings import get_settings

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up. Says nothing about its dependencies."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "database unreachable"}})
def readyz() -> Any:
    """Ready when the database answers. The broker's state is reported but not fatal: the
    outbox keeps work in the database until the broker is back."""
    try:
        with get_engine().connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception:  # noqa: BLE001 - any failure means not ready
        return problem("database-unavailable", "the database does not answer")
    return JSONResponse({"status": "ready", "database": "ok", "broker": _broker_state()})


def _broker_state() -> str:
    from workers.relay import broker_reachable

    return "ok" if broker_reachable() else "unreachable"


@router.get("/metrics", include_in_schema=True, response_class=PlainTextResponse)
def metrics(request: Request) -> Any:
    """Prometheus metrics; only served to the hosts in DOORSTROOM_METRICS_ALLOWED_HOSTS."""
    client = request.client.host if request.client else ""
    if client not in get_settings().metrics_allowed_hosts:
        return problem("not-found")
    from api.metrics import refresh_gauges

    refresh_gauges()
    return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)
