"""Health endpoints and metrics."""

from __future__ import annotations

from datetime import timedelta

from domain import outbox
from domain.settings import get_settings


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["database"] == "ok"
    assert ready.json()["broker"] in {"ok", "unreachable"}


def test_metrics_report_the_oldest_undispatched_outbox_row(client, db_session):
    # An undispatched row two minutes old: the gauge must show at least that age.
    outbox.enqueue(db_session, "routing.route_update", {"update_id": "x"},
                   available_at=get_settings().now() - timedelta(minutes=2))
    db_session.commit()
    from api import metrics
    from domain.health import read_health_figures

    figures = read_health_figures(db_session)
    assert figures.oldest_outbox_age_seconds >= 120
    assert figures.outbox_undispatched >= 1
    body = client.get("/metrics").text
    assert "doorstroom_outbox_oldest_undispatched_age_seconds" in body
    assert "doorstroom_routing_latency_seconds" in body
    assert "doorstroom_deliveries" in body
    assert metrics is not None


def test_openapi_document_is_3_1_with_typed_responses(client):
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            ok = [s for s in operation["responses"] if s.startswith("2")]
            assert ok, (method, path)
