"""Webhook endpoints and deliveries through the API (sending itself: test_webhooks.py)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from domain import secrets
from domain.models import AuditEntry, Delivery, DeliveryStatus, WebhookEndpoint
from domain.settings import Settings, get_settings
from tests.factories import bearer, create_key, create_org, create_subscription

PROBLEM = "application/problem+json"


@pytest.fixture
def city(db_session):
    org = create_org(db_session)
    return org, create_key(db_session, org, "subscribe")


def make_endpoint(client, key, url="http://127.0.0.1:9/hook", **extra):
    response = client.post("/v1/webhook-endpoints", json={"url": url, **extra},
                           headers=bearer(key))
    assert response.status_code == 201, response.text
    return response.json()


def test_secret_is_shown_once_and_encrypted_at_rest(client, db_session, city):
    org, key = city
    created = make_endpoint(client, key)
    assert created["secret"].startswith("whsec_")
    shown = client.get(f"/v1/webhook-endpoints/{created['id']}", headers=bearer(key)).json()
    assert "secret" not in shown and created["secret"] not in str(shown)
    row = db_session.get(WebhookEndpoint, __import__("uuid").UUID(created["id"]))
    assert created["secret"] not in row.secret_ciphertext
    assert secrets.decrypt(row.secret_ciphertext) == created["secret"]


@pytest.mark.parametrize("url", ["http://10.0.0.1/x", "http://169.254.169.254/latest/meta-data",
                                 "http://[::ffff:10.0.0.1]/", "http://0x0a000001/",
                                 "ftp://example.org/", "http://user:pw@127.0.0.1/"])
def test_unsafe_urls_are_refused_at_creation(client, city, url):
    _, key = city
    response = client.post("/v1/webhook-endpoints", json={"url": url}, headers=bearer(key))
    assert response.status_code == 422, url
    assert response.headers["content-type"] == PROBLEM


def test_loopback_needs_the_development_switch_and_https_is_required_in_production(
        monkeypatch):
    from domain import endpoints
    from domain.errors import InvalidInput

    strict = Settings(webhook_allow_loopback=False, environment="production")
    monkeypatch.setattr(endpoints, "get_settings", lambda: strict)
    with pytest.raises(InvalidInput, match="loopback"):
        endpoints.check_url("https://127.0.0.1/hook")
    with pytest.raises(InvalidInput, match="https"):
        endpoints.check_url("http://receiver.example/hook", resolver=lambda h, p: ["8.8.8.8"])
    endpoints.check_url("https://receiver.example/hook", resolver=lambda h, p: ["8.8.8.8"])


def test_rotation_keeps_the_previous_secret_for_the_grace_period(client, db_session, city):
    _, key = city
    created = make_endpoint(client, key)
    rotated = client.post(f"/v1/webhook-endpoints/{created['id']}/rotate-secret",
                          headers=bearer(key))
    assert rotated.status_code == 200
    new_secret = rotated.json()["secret"]
    assert new_secret != created["secret"] and new_secret.startswith("whsec_")
    row = db_session.get(WebhookEndpoint, __import__("uuid").UUID(created["id"]))
    assert secrets.decrypt(row.secret_ciphertext) == new_secret
    assert secrets.decrypt(row.previous_secret_ciphertext) == created["secret"]
    grace = row.previous_secret_expires_at - get_settings().now()
    assert timedelta(hours=23) < grace <= timedelta(hours=24)


def test_patch_event_types_and_reenable(client, db_session, city):
    _, key = city
    created = make_endpoint(client, key)
    bad = client.patch(f"/v1/webhook-endpoints/{created['id']}",
                       json={"event_types": ["be.doorstroom.nope"]}, headers=bearer(key))
    assert bad.status_code == 422
    row = db_session.get(WebhookEndpoint, __import__("uuid").UUID(created["id"]))
    row.enabled, row.disabled_reason = False, "gone"
    db_session.commit()
    patched = client.patch(f"/v1/webhook-endpoints/{created['id']}",
                           json={"enabled": True,
                                 "event_types": ["be.doorstroom.update.published"]},
                           headers=bearer(key)).json()
    assert patched["enabled"] is True and patched["disabled_reason"] is None
    assert patched["event_types"] == ["be.doorstroom.update.published"]


def test_an_endpoint_in_use_cannot_be_deleted(client, db_session, city):
    org, key = city
    created = make_endpoint(client, key)
    sub = create_subscription(db_session, org,
                              channel={"type": "webhook", "endpoint_id": created["id"]})
    in_use = client.delete(f"/v1/webhook-endpoints/{created['id']}", headers=bearer(key))
    assert in_use.status_code == 409
    client.delete(f"/v1/subscriptions/{sub.id}", headers=bearer(key))
    assert client.delete(f"/v1/webhook-endpoints/{created['id']}",
                         headers=bearer(key)).status_code == 204


def test_another_organisations_endpoint_is_404_everywhere(client, db_session, city):
    _, key = city
    created = make_endpoint(client, key)
    other = create_org(db_session)
    other_key = create_key(db_session, other, "subscribe")
    base = f"/v1/webhook-endpoints/{created['id']}"
    for method, path, body in [("get", base, None), ("patch", base, {"enabled": False}),
                               ("delete", base, None), ("post", base + "/rotate-secret", None),
                               ("post", base + "/ping", None),
                               ("post", base + "/replay", {"since": "2026-01-01T00:00:00Z",
                                                           "until": "2026-12-01T00:00:00Z"})]:
        response = client.request(method, path, json=body, headers=bearer(other_key))
        assert response.status_code == 404, (method, path)
    # Nor can it be used as a subscription's channel.
    response = client.post("/v1/subscriptions", headers=bearer(other_key),
                           json={"channel": {"type": "webhook", "endpoint_id": created["id"]}})
    assert response.status_code == 422


def _delivery(db_session, org, endpoint_id, status=DeliveryStatus.failed, created=None):
    now = get_settings().now()
    delivery = Delivery(message_id="msg_" + __import__("uuid").uuid4().hex,
                        organisation_id=org.id, endpoint_id=endpoint_id,
                        channel="webhook", event_type="be.doorstroom.update.published",
                        payload="{}", status=status, attempt_count=3, next_attempt_at=None,
                        created_at=created or now)
    db_session.add(delivery)
    db_session.commit()
    return delivery


def test_replay_makes_failed_deliveries_of_the_period_due_again(client, db_session, city):
    org, key = city
    created = make_endpoint(client, key)
    endpoint_id = __import__("uuid").UUID(created["id"])
    now = get_settings().now()
    inside = _delivery(db_session, org, endpoint_id, created=now - timedelta(hours=2))
    before = _delivery(db_session, org, endpoint_id, created=now - timedelta(days=3))
    done = _delivery(db_session, org, endpoint_id, status=DeliveryStatus.succeeded,
                     created=now - timedelta(hours=2))
    response = client.post(f"/v1/webhook-endpoints/{created['id']}/replay", headers=bearer(key),
                           json={"since": (now - timedelta(days=1)).isoformat(),
                                 "until": now.isoformat()})
    assert response.status_code == 202 and response.json() == {"replayed": 1}
    for row in (inside, before, done):
        db_session.refresh(row)
    assert inside.status is DeliveryStatus.pending and inside.next_attempt_at is not None
    assert before.status is DeliveryStatus.failed
    assert done.status is DeliveryStatus.succeeded
    backwards = client.post(f"/v1/webhook-endpoints/{created['id']}/replay", headers=bearer(key),
                            json={"since": now.isoformat(),
                                  "until": (now - timedelta(days=1)).isoformat()})
    assert backwards.status_code == 422


def test_deliveries_are_listed_per_organisation_and_retried_under_the_same_id(
        client, db_session, city, admin_key):
    org, key = city
    created = make_endpoint(client, key)
    mine = _delivery(db_session, org, __import__("uuid").UUID(created["id"]))
    other = create_org(db_session)
    other_key = create_key(db_session, other, "subscribe")
    listed = client.get("/v1/deliveries", headers=bearer(key)).json()
    assert [d["id"] for d in listed["items"]] == [str(mine.id)]
    assert client.get("/v1/deliveries", headers=bearer(other_key)).json()["items"] == []
    assert client.get(f"/v1/deliveries/{mine.id}", headers=bearer(other_key)).status_code == 404
    assert client.post(f"/v1/deliveries/{mine.id}/retry",
                       headers=bearer(other_key)).status_code == 404
    admin_view = client.get(f"/v1/deliveries?organisation_id={org.id}",
                            headers=bearer(admin_key)).json()
    assert [d["id"] for d in admin_view["items"]] == [str(mine.id)]
    retried = client.post(f"/v1/deliveries/{mine.id}/retry", headers=bearer(key))
    assert retried.status_code == 202
    assert retried.json()["status"] == "pending"
    assert retried.json()["message_id"] == mine.message_id
    assert db_session.scalar(sa.select(sa.func.count()).select_from(AuditEntry).where(
        AuditEntry.action == "delivery.retried", AuditEntry.object_id == str(mine.id))) == 1
