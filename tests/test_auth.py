"""API keys, authentication, scopes and problem responses."""

from __future__ import annotations

import hashlib

import sqlalchemy as sa

from domain import keys
from domain.audit import SYSTEM
from domain.models import ApiKey, AuditEntry
from tests.factories import bearer, create_key, create_org

PROBLEM = "application/problem+json"


def test_key_has_256_random_bits_and_is_stored_only_as_its_sha256(db_session):
    org = create_org(db_session)
    issued = keys.issue_key(db_session, SYSTEM, org.id, ["publish"])
    # ds_<8 visible characters>_<43 secret characters> (URL-safe base64 may hold "_").
    prefix, secret = issued.plaintext[:11], issued.plaintext[12:]
    assert prefix == issued.key.prefix and prefix.startswith("ds_")
    assert issued.plaintext[11] == "_"
    assert len(secret) >= 43  # 32 bytes of URL-safe base64
    stored = db_session.get(ApiKey, issued.key.id)
    assert stored.key_hash == hashlib.sha256(issued.plaintext.encode()).hexdigest()
    assert issued.plaintext not in str(
        db_session.execute(sa.select(ApiKey.__table__)).all()
    )


def test_two_keys_never_share_a_prefix_or_secret(db_session):
    org = create_org(db_session)
    made = {create_key(db_session, org, "subscribe") for _ in range(20)}
    assert len(made) == 20
    assert len({k[:11] for k in made}) == 20


def test_authenticate_finds_the_key_by_hash_and_refuses_a_revoked_one(db_session):
    org = create_org(db_session)
    issued = keys.issue_key(db_session, SYSTEM, org.id, ["subscribe", "publish"])
    found, actor = keys.authenticate(db_session, issued.plaintext)
    assert found.id == issued.key.id and actor.organisation_id == org.id
    assert actor.scopes == {"subscribe", "publish"}
    keys.revoke_key(db_session, SYSTEM, issued.key.id)
    import pytest

    from domain.errors import Unauthenticated

    with pytest.raises(Unauthenticated):
        keys.authenticate(db_session, issued.plaintext)
    with pytest.raises(Unauthenticated):
        keys.authenticate(db_session, issued.plaintext[:-1] + "x")


def test_an_authenticated_key_is_remembered_for_a_few_seconds_and_revocation_evicts_it(
        db_session, monkeypatch):
    import time

    import pytest

    from domain.errors import Unauthenticated

    org = create_org(db_session)
    issued = keys.issue_key(db_session, SYSTEM, org.id, ["publish"])
    first = keys.authenticate_cached(db_session, issued.plaintext)
    assert first.key_id == issued.key.id and first.actor.organisation_id == org.id
    # Revoked behind this process's back (another worker, the CLI): still remembered...
    db_session.execute(sa.update(ApiKey).where(ApiKey.id == issued.key.id)
                       .values(revoked_at=sa.func.now()))
    assert keys.authenticate_cached(db_session, issued.plaintext) is first
    # ...for at most CACHE_SECONDS after the lookup, then refused.
    later = time.monotonic() + keys.CACHE_SECONDS + 0.01
    monkeypatch.setattr(keys.time, "monotonic", lambda: later)
    with pytest.raises(Unauthenticated, match="revoked"):
        keys.authenticate_cached(db_session, issued.plaintext)
    monkeypatch.undo()

    # Revoked through this process: refused at once.
    other = keys.issue_key(db_session, SYSTEM, org.id, ["publish"])
    keys.authenticate_cached(db_session, other.plaintext)
    keys.revoke_key(db_session, SYSTEM, other.key.id)
    assert keys.cached_key(other.plaintext) is None
    with pytest.raises(Unauthenticated, match="revoked"):
        keys.authenticate_cached(db_session, other.plaintext)
    # Unknown keys are never remembered.
    with pytest.raises(Unauthenticated):
        keys.authenticate_cached(db_session, other.plaintext[:-1] + "x")
    assert keys.cached_key(other.plaintext[:-1] + "x") is None


def test_missing_wrong_and_revoked_keys_get_401_problem(client, db_session, admin_key):
    org = create_org(db_session)
    key = create_key(db_session, org, "subscribe")
    for headers in ({}, {"Authorization": "Basic abc"}, bearer("ds_nope_nope"),
                    bearer(key[:-2] + "zz")):
        response = client.get("/v1/topics", headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["content-type"] == PROBLEM
        assert response.json()["type"] == "urn:doorstroom:problem:unauthenticated"
    assert client.get("/v1/topics", headers=bearer(key)).status_code == 200

    key_id = db_session.scalars(sa.select(ApiKey.id).where(ApiKey.organisation_id == org.id)).one()
    revoked = client.delete(f"/v1/keys/{key_id}", headers=bearer(admin_key))
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    response = client.get("/v1/topics", headers=bearer(key))
    assert response.status_code == 401
    assert "revoked" in response.json()["detail"]


def test_under_scoped_key_gets_403_before_any_lookup(client, db_session):
    org = create_org(db_session)
    key = create_key(db_session, org, "subscribe")
    # An id that does not exist still answers 403, not 404: the scope is checked first.
    for method, path, body in [
        ("post", "/v1/organisations", {"name": "X", "level": "local", "kind": "municipality"}),
        ("patch", "/v1/organisations/00000000-0000-0000-0000-000000000000", {"name": "Y"}),
        ("post", "/v1/topics", {"slug": "x", "name_nl": "x", "name_en": "x"}),
        ("delete", "/v1/keys/00000000-0000-0000-0000-000000000000", None),
        ("get", f"/v1/organisations/{org.id}/keys", None),
    ]:
        response = client.request(method, path, json=body, headers=bearer(key))
        assert response.status_code == 403, (method, path)
        assert response.headers["content-type"] == PROBLEM
        assert response.json()["type"] == "urn:doorstroom:problem:forbidden"


def test_admin_issues_a_key_shown_once_and_lists_prefixes_only(client, db_session, admin_key):
    org = create_org(db_session)
    response = client.post(f"/v1/organisations/{org.id}/keys", json={"scopes": ["publish"]},
                           headers=bearer(admin_key))
    assert response.status_code == 201
    issued = response.json()
    assert issued["key"].startswith(issued["prefix"] + "_")
    listed = client.get(f"/v1/organisations/{org.id}/keys", headers=bearer(admin_key)).json()
    assert [k["prefix"] for k in listed["items"]] == [issued["prefix"]]
    assert "key" not in listed["items"][0] and issued["key"] not in str(listed)
    assert client.get("/v1/topics", headers=bearer(issued["key"])).status_code == 200
    actions = db_session.scalars(sa.select(AuditEntry.action)
                                 .where(AuditEntry.object_id == issued["id"])).all()
    assert actions == ["key.issued"]


def test_unknown_scope_and_unknown_fields_are_422(client, db_session, admin_key):
    org = create_org(db_session)
    bad_scope = client.post(f"/v1/organisations/{org.id}/keys", json={"scopes": ["root"]},
                            headers=bearer(admin_key))
    assert bad_scope.status_code == 422
    extra = client.post(f"/v1/organisations/{org.id}/keys",
                        json={"scopes": ["publish"], "organisation_id": "x"},
                        headers=bearer(admin_key))
    assert extra.status_code == 422
    assert extra.headers["content-type"] == PROBLEM
    assert db_session.scalar(sa.select(sa.func.count()).select_from(ApiKey)
                             .where(ApiKey.organisation_id == org.id)) == 0


def test_malformed_json_is_400_and_oversized_body_is_413(client, admin_key):
    malformed = client.post("/v1/organisations", content=b"{not json",
                            headers={**bearer(admin_key), "content-type": "application/json"})
    assert malformed.status_code == 400
    assert malformed.json()["type"] == "urn:doorstroom:problem:malformed-request"
    huge = client.post("/v1/organisations", content=b"x" * (200 * 1024),
                       headers={**bearer(admin_key), "content-type": "application/json"})
    assert huge.status_code == 413
    assert huge.headers["content-type"] == PROBLEM


def test_last_used_time_is_recorded(client, db_session):
    org = create_org(db_session)
    key = create_key(db_session, org, "subscribe")
    assert client.get("/v1/topics", headers=bearer(key)).status_code == 200
    stored = db_session.scalars(sa.select(ApiKey).where(ApiKey.organisation_id == org.id)).one()
    db_session.refresh(stored)
    assert stored.last_used_at is not None


def test_audit_log_is_append_only(db_session):
    create_org(db_session)
    entry_id = db_session.scalar(sa.select(sa.func.max(AuditEntry.id)))
    import pytest
    from sqlalchemy.exc import DBAPIError

    with pytest.raises(DBAPIError, match="append-only"), db_session.begin_nested():
        db_session.execute(sa.update(AuditEntry).where(AuditEntry.id == entry_id)
                           .values(action="tampered"))
    with pytest.raises(DBAPIError, match="append-only"), db_session.begin_nested():
        db_session.execute(sa.delete(AuditEntry).where(AuditEntry.id == entry_id))
