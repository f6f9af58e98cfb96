"""Prometheus metrics. Gauges that describe database state are read when scraped."""

from __future__ import annotations

import logging

from prometheus_client import Gauge, Histogram

log = logging.getLogger("doorstroom.metrics")

OUTBOX_OLDEST_AGE = Gauge(
    "doorstroom_outbox_oldest_undispatched_age_seconds",
    "Age of the oldest outbox row not yet dispatched to the broker (0 when none).",
)
OUTBOX_UNDISPATCHED = Gauge(
    "doorstroom_outbox_undispatched", "Outbox rows due but not yet handed to the broker.")
OUTBOX_POISONED = Gauge(
    "doorstroom_outbox_poisoned",
    "Outbox rows dispatched too often without completing, left for an operator.")
UPDATES_AWAITING_ROUTING = Gauge(
    "doorstroom_updates_awaiting_routing", "Published updates not yet routed.")
ROUTING_LATENCY = Gauge(
    "doorstroom_routing_latency_seconds",
    "Publish-to-routed latency over the last 15 minutes.", ["quantile"])
DELIVERIES = Gauge(
    "doorstroom_deliveries", "Push deliveries by channel and status.", ["channel", "status"])
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
    OUTBOX_UNDISPATCHED.set(figures.outbox_undispatched)
    OUTBOX_POISONED.set(figures.outbox_poisoned)
    UPDATES_AWAITING_ROUTING.set(figures.updates_awaiting_routing)
    for (channel, status), count in figures.deliveries.items():
        DELIVERIES.labels(channel, status).set(count)
    ordered = sorted(figures.routing_latency_seconds)
    for q in (0.5, 0.99):
        value = ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0
        ROUTING_LATENCY.labels(str(q)).set(value)
