"""Prometheus metrics. Gauges that describe database state are read when scraped."""

from __future__ import annotations

import logging

from prometheus_client import Gauge, Histogram

log = logging.getLogger("doorstroom.metrics")

OUTBOX_OLDEST_AGE = Gauge(
    "doorstroom_outbox_oldest_undispatched_age_seconds",
    "Age of the oldest outbox row not yet dispatched to the broker (0 when none).",
)
REQUEST_LATENCY = Histogram(
    "doorstroom_http_request_duration_seconds", "HTTP request latency.", ["method", "route"]
)


def refresh_gauges() -> None:
    """Read the database-backed gauges at scrape time."""
    from domain.db import session_scope
    from domain.health import read_health_figures

    try:
        with session_scope() as session:
            figures = read_health_figures(session)
    except Exception as exc:  # noqa: BLE001 - metrics must answer even when the db does not
        log.warning("could not read metrics from the database: %s", type(exc).__name__)
        return
    OUTBOX_OLDEST_AGE.set(figures.oldest_outbox_age_seconds)
