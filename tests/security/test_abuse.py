"""Abuse: rate limits, constant-time key comparison, secrets at rest and in logs, and the
audit trail of admin actions and restricted reads.

The basic rate-limit cases (429 with Retry-After, another key unaffected, failing open when
Redis is unreachable) are in tests/test_publishing_api.py; these add the feed's own limit,
a Redis that accepts connections but never answers, and keys of one organisation counted
apart.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from domain import keys, routing, secrets
from domain.models import ApiKey, AuditEntry, Classification, Kind, Level, WebhookEndpoint
from tests.conftest import REDIS_URL
from tests.factories import (
    bearer,
    create_feed_subscription,
    create_key,
    create_org,
    create_topic,
    key_id_of,
    org_with_key,
    publish_update,
)
from tests.receivers import Receiver
from workers import webhooks

PROBLEM = "application/problem+json"


def secret_part(key: str) -> str:
    """The random part of a key, after its visible prefix `ds_<8 chars>_` (either part may
    itself contain "_")."""
    start = len(keys.KEY_PREFIX) + keys._PREFIX_CHARS + 1
    assert key[start - 1] == "_" and len(key) - start >= 22
    return key[start:]


def assert_problem(response, status: int, kind: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status
    if kind is not None:
        assert body["type"].endswith(kind), body["type"]
    return body


# ---------------------------------------------------------------------------- rate limits


@pytest.fixture
def rate_limit(monkeypatch):
    """Set the limit (and Redis) for this test, ten seconds into a fresh window so that it
    cannot roll over mid-test; the cached Redis client is reset around it."""
    from api import ratelimit
    from domain.settings import Settings

    window_start = (int(time.time()) // 60 + 1) * 60
    monkeypatch.setattr(ratelimit, "time", SimpleNamespace(time=lambda: window_start + 10.0))

    def configure(per_minute: int, redis_url: str = REDIS_URL) -> None:
        settings = Settings(rate_limit_per_minute=per_minute, redis_url=redis_url)
        monkeypatch.setattr(ratelimit, "get_settings", lambda: settings)
        ratelimit._client.cache_clear()

    yield configure
    ratelimit._client.cache_clear()


def test_keys_of_one_organisation_are_limited_apart_and_the_limit_is_per_key(
        client, db_session, rate_limit):
    rate_limit(2)
    org = create_org(db_session)
    first, second = create_key(db_session, org, "subscribe"), create_key(db_session, org,
                                                                         "subscribe")
    assert [client.get("/v1/inbox", headers=bearer(first)).status_code
            for _ in range(2)] == [200, 200]
    limited = client.get("/v1/subscriptions", headers=bearer(first))  # any route counts
    assert_problem(limited, 429, "rate-limited")
    assert int(limited.headers["Retry-After"]) == 51
    assert client.get("/v1/inbox", headers=bearer(second)).status_code == 200
    # A refused request does not reach the handler (nothing written, no last-use bump).
    assert_problem(client.post("/v1/subscriptions", json={"filter": {}},
                               headers=bearer(first)), 429)


def test_a_feed_has_a_limit_of_its_own(client, db_session, rate_limit):
    rate_limit(2)
    town = create_org(db_session)
    feed, other = (create_feed_subscription(db_session, town, filter={}) for _ in range(2))
    answers = [client.get(f"/v1/feeds/{feed.feed_token}").status_code for _ in range(3)]
    assert answers == [200, 200, 429]
    limited = client.get(f"/v1/feeds/{feed.feed_token}")
    assert_problem(limited, 429, "rate-limited")
    assert limited.headers["Retry-After"]
    assert client.get(f"/v1/feeds/{other.feed_token}").status_code == 200


@contextlib.contextmanager
def silent_redis():
    """A TCP server on 127.0.0.1 that accepts connections and never answers (a hung Redis)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    finally:
        stop.set()
        thread.join(timeout=2)
        for conn in accepted:
            conn.close()
        server.close()


def test_a_hung_redis_fails_open_quickly(client, db_session, rate_limit, caplog):
    _, key = org_with_key(db_session, "subscribe")
    with silent_redis() as url:
        rate_limit(1, url)
        started = time.monotonic()
        answers = [client.get("/v1/subscriptions", headers=bearer(key)).status_code
                   for _ in range(3)]
        elapsed = time.monotonic() - started
    assert answers == [200, 200, 200]
    assert elapsed < 3.0, f"a hung Redis held three requests up for {elapsed:.1f} s"
    assert "rate limiter unavailable" in caplog.text


def test_unknown_keys_are_refused_without_a_lookup_per_character(client, db_session):
    """401 for anything that is not a live key, with the same answer whatever is wrong."""
    _, key = org_with_key(db_session, "subscribe")
    tail = secret_part(key)
    prefix = key[:-len(tail) - 1]
    near_misses = [key[:-1] + ("A" if key[-1] != "A" else "B"), prefix + "_", prefix,
                   "ds_" + "x" * 300, "Bearer " + key, key.upper(), key + "x"]
    bodies = set()
    for presented in near_misses:
        response = client.get("/v1/subscriptions", headers=bearer(presented))
        body = assert_problem(response, 401, "unauthenticated")
        assert response.headers["WWW-Authenticate"] == "Bearer"
        bodies.add(body.get("detail"))
        assert tail not in response.text
    assert len(bodies) == 1, bodies


# ------------------------------------------------------------------ constant-time compare


def test_authenticate_compares_the_hash_with_hmac_compare_digest(db_session, monkeypatch):
    import hmac

    _, key = org_with_key(db_session, "subscribe")
    calls: list[tuple[object, object]] = []

    def spy(a, b):
        calls.append((a, b))
        return hmac.compare_digest(a, b)

    monkeypatch.setattr(keys, "hmac", SimpleNamespace(compare_digest=spy))
    found, actor = keys.authenticate(db_session, key)
    digest = keys.hash_key(key)
    assert calls == [(found.key_hash, digest)]
    assert found.key_hash == digest and actor.key_id == found.id

    # A failed comparison is a refusal: the spy answering False stands for a hash mismatch.
    monkeypatch.setattr(keys, "hmac", SimpleNamespace(compare_digest=lambda a, b: False))
    from domain.errors import Unauthenticated

    with pytest.raises(Unauthenticated):
        keys.authenticate(db_session, key)


def test_no_plain_equality_on_secrets_in_the_key_module():
    """The only comparison of hashes in Python is `hmac.compare_digest` (the SQL lookup by
    the unique index is the other, and compares hashes, not keys)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(keys))
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, ast.Eq | ast.NotEq)
                                                 for op in node.ops):
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
                n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
            if {"presented", "digest", "key_hash", "plaintext"} & names:
                # Only inside a SQL expression: `ApiKey.key_hash == digest`.
                assert "ApiKey" in names, ast.unparse(node)


# --------------------------------------------------------------------- secrets at rest


def _rows_containing(session, needle: str) -> list[str]:
    """Every table and column whose text contains `needle` (the whole database)."""
    from domain.db import Base

    found = []
    for table in Base.metadata.sorted_tables:
        for column in table.columns:
            if isinstance(column.type, sa.String | sa.Text | sa.JSON | sa.Enum):
                hit = session.execute(sa.select(sa.func.count()).select_from(table).where(
                    sa.cast(column, sa.Text).contains(needle, autoescape=True))).scalar()
                if hit:
                    found.append(f"{table.name}.{column.name}")
    return found


def test_webhook_secrets_are_encrypted_at_rest_and_never_stored_in_clear(
        client, db_session):
    _, key = org_with_key(db_session, "subscribe")
    created = client.post("/v1/webhook-endpoints", json={"url": "http://127.0.0.1:9/x"},
                          headers=bearer(key))
    assert created.status_code == 201, created.text
    endpoint_id, secret = created.json()["id"], created.json()["secret"]
    assert secret.startswith("whsec_")
    rotated = client.post(f"/v1/webhook-endpoints/{endpoint_id}/rotate-secret",
                          headers=bearer(key))
    assert rotated.status_code == 200
    new_secret = rotated.json()["secret"]
    assert new_secret != secret

    endpoint = db_session.get(WebhookEndpoint, uuid.UUID(endpoint_id))
    db_session.refresh(endpoint)
    assert secrets.decrypt(endpoint.secret_ciphertext) == new_secret
    assert secrets.decrypt(endpoint.previous_secret_ciphertext) == secret
    for plain in (secret, new_secret):
        body = plain.removeprefix("whsec_")
        for ciphertext in (endpoint.secret_ciphertext, endpoint.previous_secret_ciphertext):
            assert plain not in ciphertext and body not in ciphertext
        assert _rows_containing(db_session, body) == []
    # Nor does any read show it again.
    shown = client.get(f"/v1/webhook-endpoints/{endpoint_id}", headers=bearer(key)).text
    listed = client.get("/v1/webhook-endpoints", headers=bearer(key)).text
    for plain in (secret, new_secret):
        assert plain.removeprefix("whsec_") not in shown + listed
    # A ciphertext under another DOORSTROOM_SECRET_KEY does not decrypt.
    from cryptography.fernet import InvalidToken

    with pytest.raises(InvalidToken):
        secrets._fernet("another-secret-key-0123456789abcdef").decrypt(
            endpoint.secret_ciphertext.encode())


def test_api_keys_are_stored_as_a_hash_only(client, db_session, admin_key):
    org = create_org(db_session)
    issued = client.post(f"/v1/organisations/{org.id}/keys", json={"scopes": ["subscribe"]},
                         headers=bearer(admin_key))
    assert issued.status_code == 201
    plaintext = issued.json()["key"]
    tail = secret_part(plaintext)
    assert len(tail) >= 22  # at least 128 random bits
    assert _rows_containing(db_session, tail) == []
    row = db_session.get(ApiKey, uuid.UUID(issued.json()["id"]))
    assert row.key_hash == keys.hash_key(plaintext)
    listed = client.get(f"/v1/organisations/{org.id}/keys", headers=bearer(admin_key)).text
    assert tail not in listed


# ------------------------------------------------------------------------ secrets in logs


@contextlib.contextmanager
def the_session(db_session):
    yield db_session


def _no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"no DNS in tests (asked for {host})")


def test_no_key_secret_or_token_reaches_the_logs(client, db_session, admin_key, caplog,
                                                 capfd):
    """A whole scenario with every logger at DEBUG: issue keys, create and rotate webhook
    secrets, feed and e-mail tokens, publish, route, send webhooks (one failing), ping,
    revoke, use wrong and revoked keys. No secret may appear in any log record."""
    caplog.set_level(logging.DEBUG)
    for name in ("doorstroom", "httpx", "httpcore", "aiohttp", "celery", "kombu", "uvicorn"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        found_secrets = _scenario(client, db_session, admin_key)
    finally:
        for name in ("doorstroom", "httpx", "httpcore", "aiohttp", "celery", "kombu", "uvicorn"):
            logging.getLogger(name).setLevel(logging.NOTSET)

    # The test client's own request lines (httpx logs the URL it fetched, feed tokens
    # included) are the caller's logs, not the API's.
    records = [r for r in caplog.records
               if not (r.name == "httpx" and "http://testserver" in r.getMessage())]
    text = "\n".join(f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''} "
                     f"{getattr(r, 'stack_info', '') or ''}" for r in records)
    captured = capfd.readouterr()
    text += captured.out + captured.err
    # The sender's own record ("webhooks: … sent") proves that logging is captured at all.
    assert any(r.name == "doorstroom.webhooks" for r in records), "nothing captured"
    leaked = {name: text[max(0, text.index(value) - 300):text.index(value) + 100]
              for name, value in found_secrets.items() if value in text}
    assert not leaked, leaked


def _scenario(client, db_session, admin_key) -> dict[str, str]:
    found: dict[str, str] = {}
    topic = create_topic(db_session).slug
    publisher = create_org(db_session, level=Level.flemish, kind=Kind.agency)
    town = create_org(db_session)
    issued_keys = {}
    for label, scopes, org in (("publish", ["publish"], publisher),
                               ("subscribe", ["subscribe"], town),
                               ("both", ["subscribe", "publish"], town)):
        issued = client.post(f"/v1/organisations/{org.id}/keys", json={"scopes": scopes},
                             headers=bearer(admin_key))
        assert issued.status_code == 201
        issued_keys[label] = issued.json()["key"]
        found[f"{label} key"] = secret_part(issued.json()["key"])
    publish_key, town_key = issued_keys["publish"], issued_keys["subscribe"]
    found["admin key"] = secret_part(admin_key)

    with Receiver() as receiver:
        created = client.post("/v1/webhook-endpoints", json={"url": receiver.url("/ok")},
                              headers=bearer(town_key))
        assert created.status_code == 201, created.text
        endpoint_id = created.json()["id"]
        found["first whsec"] = created.json()["secret"].removeprefix("whsec_")
        failing = client.post("/v1/webhook-endpoints",
                              json={"url": receiver.url("/fail")}, headers=bearer(town_key))
        from tests.receivers import status

        receiver.route("/fail", status(500))
        found["failing whsec"] = failing.json()["secret"].removeprefix("whsec_")
        rotated = client.post(f"/v1/webhook-endpoints/{endpoint_id}/rotate-secret",
                              headers=bearer(town_key))
        found["rotated whsec"] = rotated.json()["secret"].removeprefix("whsec_")
        receiver.secrets[:] = [rotated.json()["secret"], created.json()["secret"]]
        for ep in (endpoint_id, failing.json()["id"]):
            sub = client.post("/v1/subscriptions", json={
                "filter": {}, "channel": {"type": "webhook", "endpoint_id": ep}},
                headers=bearer(town_key))
            assert sub.status_code == 201, sub.text
        feed = client.post("/v1/subscriptions", json={"channel": {"type": "feed"}},
                           headers=bearer(town_key)).json()
        found["feed token"] = feed["feed_url"].rsplit("/", 1)[1]
        rotated_feed = client.post(f"/v1/subscriptions/{feed['id']}/rotate-feed-token",
                                   headers=bearer(town_key)).json()
        found["rotated feed token"] = rotated_feed["feed_url"].rsplit("/", 1)[1]
        email_sub = client.post("/v1/subscriptions", json={
            "channel": {"type": "email", "address": "ops@gemeente.example"}},
            headers=bearer(town_key))
        assert email_sub.status_code == 201
        from domain.models import Subscription

        row = db_session.get(Subscription, uuid.UUID(email_sub.json()["id"]))
        found["e-mail confirm token"] = row.email_confirm_token
        found["unsubscribe token"] = row.unsubscribe_token

        published = client.post("/v1/updates", json={"title": "Logged?", "topics": [topic]},
                                headers=bearer(publish_key))
        assert published.status_code == 202, published.text
        routing.route_update(db_session, uuid.UUID(published.json()["id"]))
        sent = webhooks.send_due(session_factory=lambda: the_session(db_session),
                                 resolver=_no_dns)
        assert sent >= 2
        assert receiver.received("/ok") and all(r.verified for r in receiver.received("/ok"))
        ping = client.post(f"/v1/webhook-endpoints/{endpoint_id}/ping",
                           headers=bearer(town_key))
        assert ping.status_code == 200, ping.text

    client.get(f"/v1/feeds/{found['rotated feed token']}")
    client.get(f"/v1/feeds/{found['feed token']}")  # rotated away: 404
    client.get(f"/v1/email/confirm/{found['e-mail confirm token']}")
    client.post(f"/v1/email/unsubscribe/{found['unsubscribe token']}")
    # Wrong, revoked and malformed keys.
    revoked = create_key(db_session, town, "subscribe")
    found["revoked key"] = secret_part(revoked)
    client.delete(f"/v1/keys/{key_id_of(db_session, revoked)}", headers=bearer(admin_key))
    for presented in (revoked, town_key[:-2] + "zz", "ds_" + found["subscribe key"]):
        assert client.get("/v1/inbox", headers=bearer(presented)).status_code == 401
    from domain.settings import get_settings

    found["DOORSTROOM_SECRET_KEY"] = get_settings().secret_key
    return found


@pytest.fixture
def served_api(db_session):
    """The API under a real uvicorn server on 127.0.0.1, with the logging `doorstroom api`
    gives it (access log on), sharing the test's rolled-back session."""
    import uvicorn

    from api.app import app
    from api.deps import get_session
    from tests.smtp import free_port

    app.dependency_overrides[get_session] = lambda: db_session
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="info",
                                           log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        app.dependency_overrides.clear()


def test_the_access_log_keeps_no_capability_token(served_api, db_session, caplog):
    """Feed and e-mail link tokens are credentials in the URL: the server's access log
    must not keep them (it keeps the path with the token redacted)."""
    import httpx

    from tests.factories import create_email_subscription

    caplog.set_level(logging.INFO)
    town = create_org(db_session)
    feed = create_feed_subscription(db_session, town, filter={})
    email_sub = create_email_subscription(db_session, town)
    tokens = [feed.feed_token, email_sub.email_confirm_token, email_sub.unsubscribe_token]
    with httpx.Client(base_url=served_api, timeout=10) as http:
        assert http.get(f"/v1/feeds/{feed.feed_token}?limit=5").status_code == 200
        assert http.get(f"/v1/email/unsubscribe/{email_sub.unsubscribe_token}").status_code \
            == 200
        assert http.get(f"/v1/email/confirm/{email_sub.email_confirm_token}").status_code \
            == 200
        assert http.get("/healthz").status_code == 200
    time.sleep(0.1)
    access = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
    assert any("/healthz" in line for line in access), access
    assert any("/v1/feeds/" in line for line in access), access
    leaked = [t for t in tokens if any(t in line for line in access)]
    assert not leaked, access


# --------------------------------------------------------------------------- audit log


def test_admin_actions_and_restricted_reads_are_in_the_audit_log(client, db_session,
                                                                 admin_key):
    admin_key_id = key_id_of(db_session, admin_key)
    started = datetime.now(UTC) - timedelta(seconds=1)
    created = client.post("/v1/organisations", json={
        "name": f"Audited {uuid.uuid4().hex[:6]}", "level": "local", "kind": "municipality"},
        headers=bearer(admin_key))
    assert created.status_code == 201
    org_id = created.json()["id"]
    client.patch(f"/v1/organisations/{org_id}", json={"name": "Audited, renamed"},
                 headers=bearer(admin_key))
    issued = client.post(f"/v1/organisations/{org_id}/keys", json={"scopes": ["subscribe"]},
                         headers=bearer(admin_key)).json()
    client.delete(f"/v1/keys/{issued['id']}", headers=bearer(admin_key))
    topic = client.post("/v1/topics", json={"slug": f"audited-{uuid.uuid4().hex[:6]}",
                                            "name_nl": "A", "name_en": "A"},
                        headers=bearer(admin_key)).json()
    group = client.post("/v1/groups", json={"name": f"audited {uuid.uuid4().hex[:6]}"},
                        headers=bearer(admin_key)).json()
    client.put(f"/v1/groups/{group['id']}/members", json={"members": [org_id]},
               headers=bearer(admin_key))
    rule = client.post("/v1/routing-rules", json={
        "name": "audited", "filter": {"topics": [topic["slug"]]},
        "targets": {"organisations": [org_id]}}, headers=bearer(admin_key)).json()
    client.delete(f"/v1/routing-rules/{rule['id']}", headers=bearer(admin_key))

    # A restricted update read by its recipient, once through each read path.
    publisher = create_org(db_session)
    reader, reader_key = org_with_key(db_session, "subscribe")
    update = publish_update(db_session, publisher, title="Vertrouwelijk",
                            topics=[topic["slug"]], classification=Classification.restricted,
                            audience={"organisations": [str(reader.id)]})
    assert client.get(f"/v1/inbox/{update.id}", headers=bearer(reader_key)).status_code == 200
    assert client.get(f"/v1/updates/{update.id}", headers=bearer(reader_key)).status_code == 200
    # Listing the inbox shows a notice and is not a read.
    assert client.get("/v1/inbox", headers=bearer(reader_key)).status_code == 200

    log = client.get("/v1/audit", params={"actor": str(admin_key_id), "limit": 200},
                     headers=bearer(admin_key))
    assert log.status_code == 200, log.text
    actions = [e["action"] for e in log.json()["items"]]
    for action in ("organisation.created", "organisation.updated", "key.issued",
                   "key.revoked", "topic.created", "group.created", "group.members_set",
                   "routing_rule.created", "routing_rule.deleted"):
        assert action in actions, (action, actions)
    assert all(e["actor_key_id"] == str(admin_key_id) for e in log.json()["items"])
    # Newest first.
    ats = [e["at"] for e in log.json()["items"]]
    assert ats == sorted(ats, reverse=True)

    reads = client.get("/v1/audit", params={"action": "update.restricted_read",
                                            "object": str(update.id)},
                       headers=bearer(admin_key)).json()["items"]
    assert len(reads) == 2
    assert {e["actor_organisation_id"] for e in reads} == {str(reader.id)}
    assert {e["actor_key_id"] for e in reads} == {str(key_id_of(db_session, reader_key))}
    assert {e["detail"].get("via") for e in reads} >= {"updates"}

    by_prefix = client.get("/v1/audit", params={"action": "key.*", "since": started.isoformat()},
                           headers=bearer(admin_key)).json()["items"]
    assert {e["action"] for e in by_prefix} <= {"key.issued", "key.revoked"}
    assert {"key.issued", "key.revoked"} <= {e["action"] for e in by_prefix}
    by_object = client.get("/v1/audit", params={"object": org_id, "object_type": "organisation"},
                           headers=bearer(admin_key)).json()["items"]
    assert [e["action"] for e in by_object] == ["organisation.updated", "organisation.created"]
    future = client.get("/v1/audit", params={
        "since": (datetime.now(UTC) + timedelta(days=1)).isoformat()},
        headers=bearer(admin_key)).json()
    assert future["items"] == [] and future["next_cursor"] is None
    until = client.get("/v1/audit", params={"until": started.isoformat(),
                                            "actor": str(admin_key_id)},
                       headers=bearer(admin_key)).json()["items"]
    assert until == []
    # The audit log holds no secret either.
    assert secret_part(issued["key"]) not in client.get(
        "/v1/audit", params={"limit": 200}, headers=bearer(admin_key)).text


def test_the_audit_log_pages_with_a_cursor_and_is_admin_only(client, db_session, admin_key):
    admin_key_id = key_id_of(db_session, admin_key)
    org = create_org(db_session)
    for n in range(5):
        client.patch(f"/v1/organisations/{org.id}", json={"name": f"Name {n}"},
                     headers=bearer(admin_key))
    seen, cursor, pages = [], None, 0
    while True:
        params = {"actor": str(admin_key_id), "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/audit", params=params, headers=bearer(admin_key))
        assert page.status_code == 200, page.text
        seen += [e["id"] for e in page.json()["items"]]
        cursor = page.json()["next_cursor"]
        pages += 1
        if cursor is None:
            assert "Link" not in page.headers
            break
        assert 'rel="next"' in page.headers["Link"]
    assert len(seen) == len(set(seen)) == 5 and pages == 3
    assert seen == sorted(seen, key=int, reverse=True)

    _, publish_key = org_with_key(db_session, "publish", "subscribe")
    assert_problem(client.get("/v1/audit", headers=bearer(publish_key)), 403, "forbidden")
    assert_problem(client.get("/v1/audit"), 401, "unauthenticated")
    for bad in ({"cursor": "not-a-cursor"}, {"actor": "not-an-id"}, {"since": "2026-01-01T00:00"},
                {"action": "DROP TABLE"}, {"limit": 0}, {"limit": 201}):
        assert_problem(client.get("/v1/audit", params=bad, headers=bearer(admin_key)), 422)
    assert db_session.scalar(sa.select(sa.func.count()).select_from(AuditEntry)) >= 5
