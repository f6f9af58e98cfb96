"""The inbox through the HTTP API: order, pagination, filters, expiry, restricted reads,
subscriptions CRUD and isolation between organisations.

Routing runs in a worker in production; here each update is routed in-process with
`routing.route_update` right after it is published through the API.
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from domain import routing
from domain.models import AuditEntry, Kind, Level, Subscription
from tests.factories import (
    bearer,
    create_subscription,
    create_topic,
    key_id_of,
    org_with_key,
)

PROBLEM = "application/problem+json"


# ------------------------------------------------------------------------------- helpers


def now() -> datetime:
    return datetime.now(UTC)


def count(session, model, *where) -> int:
    return session.scalar(sa.select(sa.func.count()).select_from(model).where(*where))


def assert_problem(response, status: int, kind: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status
    if kind is not None:
        assert body["type"].endswith(kind), body["type"]
    return body


def deliver(client, session, key: str, **fields) -> str:
    """Publish through the API, route in-process; answers the update id."""
    fields.setdefault("title", "Update")
    response = client.post("/v1/updates", json=fields, headers=bearer(key))
    assert response.status_code == 202, response.text
    update_id = response.json()["id"]
    routing.route_update(session, uuid.UUID(update_id))
    return update_id


def inbox(client, key: str, **params) -> list[dict]:
    response = client.get("/v1/inbox", params=params, headers=bearer(key))
    assert response.status_code == 200, response.text
    return response.json()["items"]


def ids(items: list[dict]) -> list[str]:
    return [i["id"] for i in items]


def next_link(response) -> str | None:
    header = response.headers.get("Link")
    if header is None:
        return None
    url, _, rel = header.partition(">;")
    assert rel.strip() == 'rel="next"'
    return url.lstrip("<")


def cursor_of(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.fixture
def topics(db_session):
    """root > child, and an unrelated `other` tree."""
    root = create_topic(db_session)
    child = create_topic(db_session, parent=root.slug)
    other = create_topic(db_session)
    return SimpleNamespace(root=root.slug, child=child.slug, other=other.slug)


@pytest.fixture
def publisher(db_session):
    org, key = org_with_key(db_session, "publish", level=Level.flemish, kind=Kind.agency)
    return SimpleNamespace(org=org, key=key)


@pytest.fixture
def city(db_session):
    """A municipality that takes everything, with a subscribe key."""
    org, key = org_with_key(db_session, "subscribe")
    sub = create_subscription(db_session, org, filter={})
    return SimpleNamespace(org=org, key=key, sub=sub)


# ------------------------------------------------------------------ order and pagination


def test_inbox_is_newest_first_with_cursor_pagination_and_link_header(
        client, db_session, publisher, city, topics):
    published = [deliver(client, db_session, publisher.key, title=f"Nr {n}",
                         topics=[topics.root]) for n in range(3)]
    newest_first = list(reversed(published))
    assert ids(inbox(client, city.key)) == newest_first

    first = client.get("/v1/inbox", params={"limit": 2}, headers=bearer(city.key))
    assert ids(first.json()["items"]) == newest_first[:2]
    link = next_link(first)
    assert link is not None and first.json()["next_cursor"] in link
    second = client.get(link, headers=bearer(city.key))
    assert second.status_code == 200
    assert ids(second.json()["items"]) == newest_first[2:]
    assert second.json()["next_cursor"] is None and next_link(second) is None


def test_an_inbox_item_has_the_contracted_shape(client, db_session, publisher, city, topics):
    update_id = deliver(client, db_session, publisher.key, title="Vorm", summary="Kort",
                        body="# Lang", topics=[topics.child])
    [item] = inbox(client, city.key)
    assert item["id"] == update_id
    assert item["update"]["title"] == "Vorm" and item["update"]["summary"] == "Kort"
    assert item["reasons"] == [{"kind": "subscription", "id": str(city.sub.id)}]
    assert item["received_at"] and item["delivered_at"]
    assert item["read_at"] is None and item["acked_at"] is None
    assert item["needs_ack"] is False


# --------------------------------------------------------------------------------- filters


@pytest.fixture
def three_updates(client, db_session, publisher, city, topics):
    """routine on child, important on other, urgent on child; delivered in that order."""
    routine = deliver(client, db_session, publisher.key, title="Routine", topics=[topics.child])
    important = deliver(client, db_session, publisher.key, title="Important",
                        priority="important", topics=[topics.other])
    urgent = deliver(client, db_session, publisher.key, title="Urgent", priority="urgent",
                     topics=[topics.child])
    return SimpleNamespace(routine=routine, important=important, urgent=urgent)


def test_unread_filter(client, city, three_updates):
    u = three_updates
    assert client.post(f"/v1/inbox/{u.routine}/read", headers=bearer(city.key)).status_code \
        == 200
    assert set(ids(inbox(client, city.key, unread="true"))) == {u.important, u.urgent}
    assert ids(inbox(client, city.key, unread="false")) == [u.routine]


def test_topic_filter_includes_descendants(client, city, topics, three_updates):
    u = three_updates
    assert set(ids(inbox(client, city.key, topic=topics.root))) == {u.routine, u.urgent}
    assert set(ids(inbox(client, city.key, topic=topics.child))) == {u.routine, u.urgent}
    assert ids(inbox(client, city.key, topic=topics.other)) == [u.important]
    assert_problem(client.get("/v1/inbox", params={"topic": "no-such-topic"},
                              headers=bearer(city.key)), 422)


def test_priority_filter(client, city, three_updates):
    u = three_updates
    assert ids(inbox(client, city.key, priority="urgent")) == [u.urgent]
    assert ids(inbox(client, city.key, priority="important")) == [u.important]
    assert ids(inbox(client, city.key, priority="routine")) == [u.routine]
    assert_problem(client.get("/v1/inbox", params={"priority": "whenever"},
                              headers=bearer(city.key)), 422)


def test_urgent_items_need_acknowledgement(client, city, three_updates):
    u = three_updates
    by_id = {i["id"]: i for i in inbox(client, city.key)}
    assert by_id[u.urgent]["needs_ack"] is True
    assert by_id[u.routine]["needs_ack"] is False and by_id[u.important]["needs_ack"] is False
    assert ids(inbox(client, city.key, needs_ack="true")) == [u.urgent]
    assert set(ids(inbox(client, city.key, needs_ack="false"))) == {u.routine, u.important}


def test_since_filter(client, city, three_updates):
    u = three_updates
    items = inbox(client, city.key)
    middle = next(i for i in items if i["id"] == u.important)
    assert set(ids(inbox(client, city.key, since=middle["received_at"]))) == {u.important,
                                                                              u.urgent}
    later = (now() + timedelta(hours=1)).isoformat()
    assert inbox(client, city.key, since=later) == []
    for bad in ("2024-01-01T00:00:00", "0001-01-01T00:00:00+14:00", "yesterday"):
        assert_problem(client.get("/v1/inbox", params={"since": bad},
                                  headers=bearer(city.key)), 422)


# ----------------------------------------------------------------------------- cursors


GARBAGE_CURSORS = {
    "not base64": "!!!not a cursor!!!",
    "base64 of nonsense": cursor_of("nonsense"),
    "no time zone": cursor_of(f"2030-01-01T00:00:00|{uuid.uuid4()}"),
    "not an id": cursor_of("2030-01-01T00:00:00+00:00|not-a-uuid"),
    "too many parts": cursor_of(f"2030-01-01T00:00:00+00:00|{uuid.uuid4()}|x"),
    "out of range instant": cursor_of(f"0001-01-01T00:00:00+14:00|{uuid.uuid4()}"),
}


@pytest.mark.parametrize("cursor", GARBAGE_CURSORS.values(), ids=GARBAGE_CURSORS.keys())
def test_a_garbage_cursor_is_a_4xx_problem(client, city, cursor):
    response = client.get("/v1/inbox", params={"cursor": cursor}, headers=bearer(city.key))
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"].startswith(PROBLEM)


def test_a_tampered_cursor_never_reaches_another_organisations_items(
        client, db_session, publisher, city, topics):
    mine = deliver(client, db_session, publisher.key, title="Mine", topics=[topics.root])
    stranger, stranger_key = org_with_key(db_session, "subscribe")
    create_subscription(db_session, stranger, filter={})
    theirs = deliver(client, db_session, publisher.key, title="Theirs only",
                     topics=[topics.root], audience={"organisations": [str(stranger.id)]})
    assert ids(inbox(client, stranger_key)) == [theirs]
    # A well-formed cursor that names their item, just after it: still only my items.
    received = inbox(client, stranger_key)[0]["received_at"]
    at = datetime.fromisoformat(received) + timedelta(seconds=1)
    forged = cursor_of(f"{at.isoformat()}|{theirs}")
    response = client.get("/v1/inbox", params={"cursor": forged}, headers=bearer(city.key))
    assert response.status_code == 200
    assert ids(response.json()["items"]) == [mine]
    assert "Theirs only" not in response.text


# ---------------------------------------------------------------------------------- expiry


def test_expired_items_leave_the_default_view_but_stay_in_the_archive(
        client, db_session, publisher, city, topics):
    current = deliver(client, db_session, publisher.key, title="Current",
                      topics=[topics.root], expires_at=(now() + timedelta(days=1)).isoformat())
    expired = deliver(client, db_session, publisher.key, title="Expired", topics=[topics.root],
                      publish_at=(now() - timedelta(hours=2)).isoformat(),
                      expires_at=(now() - timedelta(hours=1)).isoformat())
    assert ids(inbox(client, city.key)) == [current]
    assert set(ids(inbox(client, city.key, include_expired="true"))) == {current, expired}
    archived = client.get(f"/v1/inbox/{expired}", headers=bearer(city.key))
    assert archived.status_code == 200
    assert archived.json()["update"]["title"] == "Expired"


# ------------------------------------------------------------------------------ restricted


def test_restricted_items_are_notices_in_the_list_and_audited_when_opened(
        client, db_session, publisher, city, topics):
    update_id = deliver(client, db_session, publisher.key, title="Vertrouwelijk",
                        summary="Geheime samenvatting", body="Geheime inhoud",
                        topics=[topics.root], classification="restricted",
                        audience={"organisations": [str(city.org.id)]})
    audits = lambda: db_session.scalars(sa.select(AuditEntry).where(  # noqa: E731
        AuditEntry.action == "update.restricted_read", AuditEntry.object_id == update_id)).all()

    listed = client.get("/v1/inbox", headers=bearer(city.key))
    [item] = listed.json()["items"]
    assert item["id"] == update_id and item["update"]["notice"] is True
    assert item["update"]["body"] is None and item["update"]["summary"] is None
    assert "Geheime" not in listed.text and "Vertrouwelijk" not in listed.text
    assert audits() == []

    opened = client.get(f"/v1/inbox/{update_id}", headers=bearer(city.key))
    assert opened.status_code == 200
    assert opened.json()["update"]["body"] == "Geheime inhoud"
    assert opened.json()["update"]["title"] == "Vertrouwelijk"
    assert opened.json()["update"]["notice"] is False
    [entry] = audits()
    assert entry.actor_organisation_id == city.org.id
    assert entry.actor_key_id == key_id_of(db_session, city.key)

    client.get(f"/v1/inbox/{update_id}", headers=bearer(city.key))
    assert len(audits()) == 2  # every read


# ----------------------------------------------------------------------------- isolation


def test_another_organisations_objects_are_404_never_403_never_data(
        client, db_session, publisher, topics):
    # B: subscribes, receives, publishes. A: publishes and subscribes, but shares nothing.
    b, b_key = org_with_key(db_session, "subscribe", "publish")
    a, a_key = org_with_key(db_session, "subscribe", "publish")
    b_sub = create_subscription(db_session, b, filter={"topics": [topics.root]})
    received = deliver(client, db_session, publisher.key, title="Voor B",
                       topics=[topics.root], audience={"organisations": [str(b.id)]})
    b_update = deliver(client, db_session, b_key, title="Van B", topics=[topics.other])
    missing = str(uuid.uuid4())

    attempts = [
        ("GET", f"/v1/subscriptions/{b_sub.id}", None),
        ("PATCH", f"/v1/subscriptions/{b_sub.id}", {"name": "mine now"}),
        ("DELETE", f"/v1/subscriptions/{b_sub.id}", None),
        ("GET", f"/v1/inbox/{received}", None),
        ("POST", f"/v1/inbox/{received}/read", None),
        ("POST", f"/v1/inbox/{received}/ack", None),
        ("GET", f"/v1/updates/{b_update}/reach", None),
        ("POST", f"/v1/updates/{b_update}/withdraw", None),
        ("GET", f"/v1/updates/{b_update}", None),
        ("GET", f"/v1/updates/{received}", None),
    ]
    for method, path, body in attempts:
        kwargs = {"json": body} if body is not None else {}
        response = client.request(method, path, headers=bearer(a_key), **kwargs)
        problem = assert_problem(response, 404, "not-found")
        assert "Voor B" not in response.text and "Van B" not in response.text
        # Indistinguishable from an id that does not exist at all.
        absent = client.request(method, path.replace(path.split("/")[3], missing),
                                headers=bearer(a_key), **kwargs)
        assert absent.status_code == 404 and absent.json()["type"] == problem["type"]

    # Nothing of B's changed.
    mine = client.get(f"/v1/subscriptions/{b_sub.id}", headers=bearer(b_key))
    assert mine.status_code == 200 and mine.json()["name"] is None
    [item] = inbox(client, b_key)
    assert item["read_at"] is None and item["acked_at"] is None
    assert client.get(f"/v1/updates/{b_update}", headers=bearer(b_key)).json()["status"] == \
        "published"


# ----------------------------------------------------------------------------- subscriptions


def test_subscription_crud(client, db_session, topics):
    org, key = org_with_key(db_session, "subscribe")
    created = client.post("/v1/subscriptions", headers=bearer(key), json={
        "name": "Radicalisering", "filter": {"topics": [topics.root], "min_priority": "important"},
        "cadence": "weekly", "send_at": "07:30", "weekday": 1})
    assert created.status_code == 201, created.text
    sub = created.json()
    assert created.headers["Location"] == f"/v1/subscriptions/{sub['id']}"
    assert sub["filter"]["topics"] == [topics.root]
    assert sub["filter"]["min_priority"] == "important"
    assert (sub["cadence"], sub["send_at"], sub["weekday"]) == ("weekly", "07:30", 1)
    assert sub["channel"] == {"type": "inbox"} and sub["feed_url"] is None
    assert sub["include_directed"] is True and sub["active"] is True

    assert client.get(f"/v1/subscriptions/{sub['id']}", headers=bearer(key)).json() == sub
    listed = client.get("/v1/subscriptions", headers=bearer(key)).json()
    assert ids(listed["items"]) == [sub["id"]] and listed["next_cursor"] is None

    patched = client.patch(f"/v1/subscriptions/{sub['id']}", headers=bearer(key), json={
        "filter": {"topics": [topics.other]}, "cadence": "daily", "send_at": "18:00",
        "active": False})
    assert patched.status_code == 200, patched.text
    assert patched.json()["filter"]["topics"] == [topics.other]
    assert (patched.json()["cadence"], patched.json()["send_at"],
            patched.json()["weekday"]) == ("daily", "18:00", None)
    assert patched.json()["active"] is False
    assert client.get(f"/v1/subscriptions/{sub['id']}",
                      headers=bearer(key)).json()["cadence"] == "daily"

    assert client.delete(f"/v1/subscriptions/{sub['id']}", headers=bearer(key)).status_code \
        == 204
    assert_problem(client.get(f"/v1/subscriptions/{sub['id']}", headers=bearer(key)), 404)
    assert client.get("/v1/subscriptions", headers=bearer(key)).json()["items"] == []


INVALID_SUBSCRIPTIONS = {
    "unknown filter field": {"filter": {"colour": "red"}},
    "unknown top-level field": {"organisation_id": str(uuid.uuid4())},
    "unknown topic": {"filter": {"topics": ["no-such-topic-anywhere"]}},
    "send_at 25:00": {"cadence": "daily", "send_at": "25:00"},
    "send_at without minutes": {"cadence": "daily", "send_at": "8"},
    "weekday 9": {"cadence": "weekly", "send_at": "08:00", "weekday": 9},
    "weekday 0": {"cadence": "weekly", "weekday": 0},
    "unknown cadence": {"cadence": "hourly"},
    "webhook channel (not yet available)": {"channel": {"type": "webhook",
                                                        "endpoint_id": str(uuid.uuid4())}},
    "e-mail channel without an address": {"channel": {"type": "email"}},
}


@pytest.mark.parametrize("body", INVALID_SUBSCRIPTIONS.values(),
                         ids=INVALID_SUBSCRIPTIONS.keys())
def test_invalid_subscription_is_refused_with_422(client, db_session, body):
    org, key = org_with_key(db_session, "subscribe")
    assert_problem(client.post("/v1/subscriptions", json=body, headers=bearer(key)), 422)
    assert count(db_session, Subscription, Subscription.organisation_id == org.id) == 0


def test_invalid_patch_is_refused_and_changes_nothing(client, db_session, city):
    path = f"/v1/subscriptions/{city.sub.id}"
    before = client.get(path, headers=bearer(city.key)).json()
    for body in ({"filter": {"colour": "red"}}, {"cadence": "weekly", "weekday": 9},
                 {"cadence": "daily", "send_at": "25:00"}, {"organisation_id": "x"}):
        assert_problem(client.patch(path, json=body, headers=bearer(city.key)), 422)
    assert client.get(path, headers=bearer(city.key)).json() == before


def test_a_feed_subscription_answers_its_feed_url(client, db_session):
    _, key = org_with_key(db_session, "subscribe")
    created = client.post("/v1/subscriptions", headers=bearer(key),
                          json={"channel": {"type": "feed"}})
    assert created.status_code == 201, created.text
    feed_url = created.json()["feed_url"]
    assert feed_url and "/v1/feeds/" in feed_url
    token = feed_url.rsplit("/", 1)[1]
    assert len(token) >= 32
    rotated = client.post(f"/v1/subscriptions/{created.json()['id']}/rotate-feed-token",
                          headers=bearer(key))
    assert rotated.status_code == 200 and rotated.json()["feed_url"] != feed_url


def test_subscriptions_need_the_subscribe_scope(client, db_session, publisher):
    assert_problem(client.get("/v1/subscriptions", headers=bearer(publisher.key)), 403,
                   "forbidden")
    assert_problem(client.get("/v1/inbox", headers=bearer(publisher.key)), 403, "forbidden")

