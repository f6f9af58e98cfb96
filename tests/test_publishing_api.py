"""Publishing through the HTTP API: validation, idempotency, scheduling, corrections,
withdrawal, reach, routing rules and rate limits.

Routing runs in a worker in production; here each test routes in-process with
`routing.route_update` right after publishing through the API.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from api.routes.updates import draft_from
from api.schemas import UpdateCreate
from domain import routing
from domain.models import (
    IdempotencyKey,
    InboxItem,
    Kind,
    Level,
    OutboxMessage,
    Update,
    UpdateStatus,
)
from domain.publishing import IN_FLIGHT_TIMEOUT
from tests.factories import (
    bearer,
    create_key,
    create_subscription,
    create_topic,
    org_with_key,
)

PROBLEM = "application/problem+json"


# ------------------------------------------------------------------------------- helpers


def now() -> datetime:
    return datetime.now(UTC)


def iso(value: datetime) -> str:
    return value.isoformat()


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


def publish(client, key: str, idempotency_key: str | None = None, **fields):
    headers = bearer(key)
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return client.post("/v1/updates", json=fields, headers=headers)


def route(session, update_id: str) -> routing.RoutingResult:
    return routing.route_update(session, uuid.UUID(update_id))


def inbox_items(client, key: str, **params) -> list[dict]:
    response = client.get("/v1/inbox", params=params, headers=bearer(key))
    assert response.status_code == 200, response.text
    return response.json()["items"]


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
def other_publisher(db_session):
    org, key = org_with_key(db_session, "publish", level=Level.federal, kind=Kind.federal_body)
    return SimpleNamespace(org=org, key=key)


@pytest.fixture
def recipient(db_session, topics):
    """A municipality subscribed to the `root` tree, with a subscribe key."""
    org, key = org_with_key(db_session, "subscribe")
    sub = create_subscription(db_session, org, filter={"topics": [topics.root]})
    return SimpleNamespace(org=org, key=key, sub=sub)


# ------------------------------------------------------------------------------- publish


def test_publish_answers_202_with_id_and_location(client, db_session, publisher, topics):
    before = count(db_session, Update)
    response = publish(client, publisher.key, title="Nieuwe richtlijn", topics=[topics.child])
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["Location"] == f"/v1/updates/{body['id']}"
    assert body["status"] == "published" and body["version"] == 1
    assert count(db_session, Update) == before + 1
    shown = client.get(response.headers["Location"], headers=bearer(publisher.key))
    assert shown.status_code == 200
    assert shown.json()["title"] == "Nieuwe richtlijn"
    assert shown.json()["publisher_id"] == str(publisher.org.id)


def test_a_publish_writes_the_update_its_topics_its_outbox_row_and_its_audit_entry(
        db_session, publisher, topics):
    """The four rows of a publish (one statement on PostgreSQL), and the update answered as
    a persistent object of the caller's session."""
    from domain import publishing
    from domain.audit import Actor
    from domain.models import AuditEntry, UpdateTopic

    actor = Actor(publisher.org.id, None, frozenset({"publish"}))
    update = publishing.publish(db_session, actor, publishing.Draft(
        title="Vier rijen", topics=[topics.root, topics.child], body="b" * 2000))
    assert sa.inspect(update).persistent and db_session.get(Update, update.id) is update
    assert update.routed_at is None and update.recipient_count is None
    stored = db_session.execute(sa.select(Update).where(Update.id == update.id)
                                .execution_options(populate_existing=True)).scalar_one()
    assert (stored.title, stored.topics, stored.chain_id, stored.version, stored.status) == (
        "Vier rijen", sorted([topics.root, topics.child]), update.id, 1,
        UpdateStatus.published)
    assert len(db_session.scalars(sa.select(UpdateTopic.topic_id)
                                  .where(UpdateTopic.update_id == update.id)).all()) == 2
    message = db_session.scalars(sa.select(OutboxMessage).where(
        OutboxMessage.args["update_id"].as_string() == str(update.id))).one()
    assert (message.task, message.dispatched_at, message.dispatch_count) == (
        publishing.ROUTE_TASK, None, 0)
    entry = db_session.scalars(sa.select(AuditEntry).where(
        AuditEntry.object_id == str(update.id))).one()
    assert (entry.action, entry.actor_organisation_id, entry.detail) == (
        "update.published", publisher.org.id,
        {"chain_id": str(update.id), "version": 1, "classification": "public"})


def test_a_title_of_exactly_200_characters_is_accepted(client, publisher, topics):
    response = publish(client, publisher.key, title="t" * 200, topics=[topics.root])
    assert response.status_code == 202, response.text


INVALID = {
    "title over 200 characters": {"title": "t" * 201},
    "unknown topic slug": {"topics": ["no-such-topic-anywhere"]},
    "unknown audience organisation": {"audience": {"organisations": [str(uuid.uuid4())]}},
    "expires_at equal to publish_at": {"publish_at": "2031-01-01T10:00:00+00:00",
                                       "expires_at": "2031-01-01T10:00:00+00:00"},
    "expires_at before publish_at": {"publish_at": "2031-01-01T10:00:00+00:00",
                                     "expires_at": "2031-01-01T09:00:00+00:00"},
    "a role outside the closed set": {"target_roles": ["mayor", "janitor"]},
    "mass assignment of id": {"id": str(uuid.uuid4())},
    "mass assignment of publisher_id": {"publisher_id": str(uuid.uuid4())},
    "mass assignment of status": {"status": "published"},
    "restricted without audience": {"classification": "restricted"},
    "restricted with an empty audience": {"classification": "restricted",
                                          "audience": {"organisations": []}},
    "body over 100 kB": {"body": "x" * (100 * 1024 + 1)},
    "publish_at without a time zone": {"publish_at": "2031-01-01T10:00:00"},
    "publish_at outside the UTC range": {"publish_at": "0001-01-01T00:00:00+01:00"},
    "expires_at outside the UTC range": {"expires_at": "9999-12-31T23:59:59-01:00"},
}


@pytest.mark.parametrize("change", INVALID.values(), ids=INVALID.keys())
def test_invalid_update_is_refused_with_422_and_changes_nothing(client, db_session, publisher,
                                                                topics, change):
    before = (count(db_session, Update), count(db_session, OutboxMessage))
    fields = {"title": "Valid title", "topics": [topics.root], **change}
    response = publish(client, publisher.key, **fields)
    assert_problem(response, 422, "validation-error")
    assert (count(db_session, Update), count(db_session, OutboxMessage)) == before


def test_supersedes_naming_another_publishers_update_is_refused(
        client, db_session, publisher, other_publisher, topics):
    theirs = publish(client, other_publisher.key, title="Theirs", topics=[topics.root])
    assert theirs.status_code == 202
    before = count(db_session, Update)
    response = publish(client, publisher.key, title="Hijack", topics=[topics.root],
                       supersedes=theirs.json()["id"])
    assert_problem(response, 422, "validation-error")
    assert count(db_session, Update) == before
    chain = client.get(f"/v1/updates/{theirs.json()['id']}",
                       headers=bearer(other_publisher.key)).json()["versions"]
    assert [v["id"] for v in chain] == [theirs.json()["id"]]


def test_a_body_over_the_request_limit_is_refused_with_413_before_parsing(
        client, db_session, publisher):
    before = count(db_session, Update)
    # Not even JSON: were it parsed, the answer would be 400 or 422.
    oversized = b"{" + b"x" * (200 * 1024)
    response = client.post("/v1/updates", content=oversized,
                           headers={**bearer(publisher.key), "Content-Type": "application/json"})
    assert_problem(response, 413, "payload-too-large")
    assert count(db_session, Update) == before


def test_a_chunked_body_over_the_limit_is_refused_with_413(client, db_session, publisher):
    before = count(db_session, Update)

    def chunks():
        for _ in range(20):
            yield b"x" * (16 * 1024)

    response = client.post("/v1/updates", content=chunks(),
                           headers={**bearer(publisher.key), "Content-Type": "application/json"})
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert_problem(response, 413, "payload-too-large")
    assert count(db_session, Update) == before


def test_a_subscribe_only_key_cannot_publish(client, db_session, recipient, topics):
    response = publish(client, recipient.key, title="Nope", topics=[topics.root])
    assert_problem(response, 403, "forbidden")


# --------------------------------------------------------------------------- idempotency


def test_same_idempotency_key_and_body_answers_the_same_update_once(client, db_session,
                                                                    publisher, topics):
    fields = {"title": "Once only", "topics": [topics.root]}
    first = publish(client, publisher.key, idempotency_key="req-1", **fields)
    again = publish(client, publisher.key, idempotency_key="req-1", **fields)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Location"] == first.headers["Location"]
    assert count(db_session, Update, Update.publisher_id == publisher.org.id) == 1


def test_same_idempotency_key_with_another_body_is_422(client, db_session, publisher, topics):
    first = publish(client, publisher.key, idempotency_key="req-2", title="First",
                    topics=[topics.root])
    assert first.status_code == 202
    other = publish(client, publisher.key, idempotency_key="req-2", title="Second",
                    topics=[topics.root])
    assert_problem(other, 422, "idempotency-key-reused")
    assert count(db_session, Update, Update.publisher_id == publisher.org.id) == 1


def _fingerprint(fields: dict) -> str:
    return draft_from(UpdateCreate.model_validate(fields)).fingerprint()


def test_a_retry_while_the_first_request_is_in_flight_is_409(client, db_session, publisher,
                                                             topics):
    fields = {"title": "Slow one", "topics": [topics.root]}
    db_session.add(IdempotencyKey(organisation_id=publisher.org.id, key="req-3",
                                  request_hash=_fingerprint(fields),
                                  created_at=now() - timedelta(seconds=5)))
    db_session.commit()
    db_session.expunge_all()  # as if another process had written it
    response = publish(client, publisher.key, idempotency_key="req-3", **fields)
    assert_problem(response, 409, "request-in-flight")
    assert count(db_session, Update, Update.publisher_id == publisher.org.id) == 0
    # The first request's claim is untouched: it may still finish.
    row = db_session.get(IdempotencyKey, (publisher.org.id, "req-3"))
    assert row is not None and row.completed_at is None and row.update_id is None


def test_a_stale_in_flight_key_is_taken_over(client, db_session, publisher, topics):
    fields = {"title": "Died half-way", "topics": [topics.root]}
    db_session.add(IdempotencyKey(
        organisation_id=publisher.org.id, key="req-4", request_hash=_fingerprint(fields),
        created_at=now() - IN_FLIGHT_TIMEOUT - timedelta(seconds=5)))
    db_session.commit()
    db_session.expunge_all()  # as if another process had written it
    response = publish(client, publisher.key, idempotency_key="req-4", **fields)
    assert response.status_code == 202, response.text
    row = db_session.get(IdempotencyKey, (publisher.org.id, "req-4"), populate_existing=True)
    assert str(row.update_id) == response.json()["id"] and row.completed_at is not None
    # And it now behaves as a finished key.
    again = publish(client, publisher.key, idempotency_key="req-4", **fields)
    assert again.status_code == 202 and again.json()["id"] == response.json()["id"]
    assert count(db_session, Update, Update.publisher_id == publisher.org.id) == 1


def test_a_refused_request_releases_its_idempotency_key(client, db_session, publisher, topics):
    refused = publish(client, publisher.key, idempotency_key="req-5", title="Typo",
                      topics=["no-such-topic-anywhere"])
    assert_problem(refused, 422, "validation-error")
    fixed = publish(client, publisher.key, idempotency_key="req-5", title="Typo",
                    topics=[topics.root])
    assert fixed.status_code == 202, fixed.text


def test_a_malformed_idempotency_key_is_refused(client, db_session, publisher, topics):
    response = publish(client, publisher.key, idempotency_key="has spaces in it",
                       title="x", topics=[topics.root])
    assert_problem(response, 422, "validation-error")
    assert count(db_session, Update, Update.publisher_id == publisher.org.id) == 0


def test_idempotency_keys_are_per_organisation(client, db_session, publisher, other_publisher,
                                               topics):
    fields = {"title": "Same words", "topics": [topics.root]}
    mine = publish(client, publisher.key, idempotency_key="shared", **fields)
    theirs = publish(client, other_publisher.key, idempotency_key="shared", **fields)
    assert mine.status_code == theirs.status_code == 202
    assert mine.json()["id"] != theirs.json()["id"]
    stored = db_session.get(Update, uuid.UUID(theirs.json()["id"]))
    assert stored.publisher_id == other_publisher.org.id


# ---------------------------------------------------------------------------- scheduling


def test_a_future_publish_at_is_scheduled_and_routes_nothing_before_it_is_due(
        client, db_session, publisher, recipient, topics, monkeypatch):
    publish_at = (now() + timedelta(hours=1)).replace(microsecond=0)
    response = publish(client, publisher.key, title="Later", topics=[topics.child],
                       publish_at=iso(publish_at))
    assert response.status_code == 202
    assert response.json()["status"] == "scheduled"
    update_id = uuid.UUID(response.json()["id"])
    outbox_row = db_session.scalars(sa.select(OutboxMessage).where(
        OutboxMessage.args["update_id"].as_string() == str(update_id))).one()
    assert outbox_row.available_at == publish_at

    result = routing.route_update(db_session, update_id)
    assert result.recipients == 0
    assert count(db_session, InboxItem, InboxItem.chain_id == update_id) == 0
    assert inbox_items(client, recipient.key) == []
    assert db_session.get(Update, update_id, populate_existing=True).status is \
        UpdateStatus.scheduled

    # Once due, the same routing delivers it (the clock is a setting).
    from domain.settings import Settings

    later = Settings(clock=publish_at + timedelta(seconds=1))
    monkeypatch.setattr(routing, "get_settings", lambda: later)
    assert routing.route_update(db_session, update_id).recipients == 1
    assert [i["update"]["id"] for i in inbox_items(client, recipient.key)] == [str(update_id)]


# ---------------------------------------------------------------------------- corrections


def test_a_correction_replaces_the_inbox_item_and_reaches_new_matches(
        client, db_session, publisher, recipient, topics):
    original = publish(client, publisher.key, title="Versie 1", topics=[topics.child])
    v1 = original.json()["id"]
    route(db_session, v1)
    assert client.post(f"/v1/inbox/{v1}/read", headers=bearer(recipient.key)).status_code == 200
    acked = client.post(f"/v1/inbox/{v1}/ack", headers=bearer(recipient.key))
    assert acked.json()["acked_at"] is not None and acked.json()["read_at"] is not None

    # The correction moves to a topic the recipient's subscription does not cover; a new
    # organisation subscribed to that topic receives it too.
    newcomer, newcomer_key = org_with_key(db_session, "subscribe")
    create_subscription(db_session, newcomer, filter={"topics": [topics.other]})
    corrected = publish(client, publisher.key, title="Versie 2", topics=[topics.other],
                        supersedes=v1)
    assert corrected.status_code == 202
    v2 = corrected.json()["id"]
    assert corrected.json()["chain_id"] == v1 and corrected.json()["version"] == 2
    route(db_session, v2)

    items = inbox_items(client, recipient.key)
    assert len(items) == 1
    item = items[0]
    assert item["id"] == v1  # the chain
    assert item["update"]["id"] == v2 and item["update"]["title"] == "Versie 2"
    assert item["read_at"] is None and item["acked_at"] is None

    shown = client.get(f"/v1/updates/{v2}", headers=bearer(publisher.key)).json()
    assert shown["recipient_count"] == 2  # the earlier recipient and the newcomer

    new_items = inbox_items(client, newcomer_key)
    assert [(i["update"]["id"], i["update"]["title"]) for i in new_items] == [(v2, "Versie 2")]

    # Any version id of the chain names the item.
    for version_id in (v1, v2):
        response = client.post(f"/v1/inbox/{version_id}/read", headers=bearer(recipient.key))
        assert response.status_code == 200
        assert response.json()["update"]["id"] == v2 and response.json()["read_at"]
    assert client.post(f"/v1/inbox/{v2}/ack", headers=bearer(recipient.key)).json()["acked_at"]

    # The chain, for the publisher and for a recipient.
    for key in (publisher.key, recipient.key, newcomer_key):
        shown = client.get(f"/v1/updates/{v2}", headers=bearer(key))
        assert shown.status_code == 200, shown.text
        assert [(v["id"], v["version"]) for v in shown.json()["versions"]] == [(v1, 1), (v2, 2)]
        assert shown.json()["supersedes"] == v1


def test_an_earlier_recipient_keeps_getting_corrections_after_unsubscribing(
        client, db_session, publisher, recipient, topics):
    v1 = publish(client, publisher.key, title="Eerste", topics=[topics.root]).json()["id"]
    route(db_session, v1)
    deleted = client.delete(f"/v1/subscriptions/{recipient.sub.id}",
                            headers=bearer(recipient.key))
    assert deleted.status_code == 204
    v2 = publish(client, publisher.key, title="Tweede", topics=[topics.root],
                 supersedes=v1).json()["id"]
    route(db_session, v2)
    items = inbox_items(client, recipient.key)
    assert [(i["id"], i["update"]["title"]) for i in items] == [(v1, "Tweede")]


# ----------------------------------------------------------------------------- withdrawal


def test_withdrawal_by_the_publisher_shows_in_the_recipients_inbox(
        client, db_session, publisher, other_publisher, recipient, topics):
    update_id = publish(client, publisher.key, title="Soon gone",
                        topics=[topics.root]).json()["id"]
    route(db_session, update_id)

    stranger = client.post(f"/v1/updates/{update_id}/withdraw",
                           headers=bearer(other_publisher.key))
    assert_problem(stranger, 404, "not-found")
    assert inbox_items(client, recipient.key)[0]["update"]["status"] == "published"

    response = client.post(f"/v1/updates/{update_id}/withdraw", json={"reason": "mistake"},
                           headers=bearer(publisher.key))
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "withdrawn" and response.json()["withdrawn_at"]
    items = inbox_items(client, recipient.key)
    assert [(i["id"], i["update"]["status"]) for i in items] == [(update_id, "withdrawn")]
    one = client.get(f"/v1/inbox/{update_id}", headers=bearer(recipient.key))
    assert one.json()["update"]["status"] == "withdrawn"

    before = count(db_session, Update)
    correction = publish(client, publisher.key, title="Revive", topics=[topics.root],
                         supersedes=update_id)
    assert_problem(correction, 422, "validation-error")
    assert count(db_session, Update) == before


# ---------------------------------------------------------------------------------- reach


def test_reach_lists_every_recipient_with_times_and_totals(client, db_session, publisher,
                                                           other_publisher, topics):
    recipients = []
    for _ in range(3):
        org, key = org_with_key(db_session, "subscribe")
        create_subscription(db_session, org, filter={"topics": [topics.root]})
        recipients.append((org, key))
    bystander, bystander_key = org_with_key(db_session, "subscribe")
    create_subscription(db_session, bystander, filter={"topics": [topics.other]})
    update_id = publish(client, publisher.key, title="Dringend", priority="urgent",
                        topics=[topics.child]).json()["id"]
    route(db_session, update_id)
    (reader, reader_key), (acker, acker_key), (silent, _) = recipients
    client.post(f"/v1/inbox/{update_id}/read", headers=bearer(reader_key))
    client.post(f"/v1/inbox/{update_id}/ack", headers=bearer(acker_key))

    response = client.get(f"/v1/updates/{update_id}/reach", headers=bearer(publisher.key))
    assert response.status_code == 200, response.text
    body = response.json()
    rows = {r["organisation_id"]: r for r in body["items"]}
    assert set(rows) == {str(o.id) for o, _ in recipients}
    assert all(r["delivered_at"] for r in rows.values())
    assert rows[str(reader.id)]["read_at"] and not rows[str(reader.id)]["acked_at"]
    assert rows[str(acker.id)]["read_at"] and rows[str(acker.id)]["acked_at"]
    assert not rows[str(silent.id)]["read_at"] and not rows[str(silent.id)]["acked_at"]
    assert all(r["needs_ack"] for r in rows.values())
    assert body["totals"] == {"recipients": 3, "delivered": 3, "read": 2, "acknowledged": 1,
                              "needs_ack": 3}
    shown = client.get(f"/v1/updates/{update_id}", headers=bearer(publisher.key)).json()
    assert shown["recipient_count"] == 3

    # Paged: every recipient exactly once across pages, with a Link to the next page.
    first = client.get(f"/v1/updates/{update_id}/reach", params={"limit": 2},
                       headers=bearer(publisher.key))
    assert 'rel="next"' in first.headers["Link"] and len(first.json()["items"]) == 2
    second = client.get(f"/v1/updates/{update_id}/reach",
                        params={"limit": 2, "cursor": first.json()["next_cursor"]},
                        headers=bearer(publisher.key))
    paged = [r["organisation_id"] for r in first.json()["items"] + second.json()["items"]]
    assert sorted(paged) == sorted(rows) and second.json()["next_cursor"] is None

    # Only the publisher sees it: a recipient (subscribe key) is refused by scope, another
    # publisher gets 404.
    assert_problem(client.get(f"/v1/updates/{update_id}/reach", headers=bearer(reader_key)),
                   403, "forbidden")
    assert_problem(client.get(f"/v1/updates/{update_id}/reach",
                              headers=bearer(other_publisher.key)), 404, "not-found")


# --------------------------------------------------------------------------- routing rules


def test_routing_rules_are_for_admins_only(client, db_session, recipient):
    key = recipient.key
    for method, path, body in (("post", "/v1/routing-rules", {"name": "x", "targets": {}}),
                               ("get", "/v1/routing-rules", None),
                               ("post", "/v1/routing-rules/preview",
                                {"title": "x", "topics": ["a"]}),
                               ("delete", f"/v1/routing-rules/{uuid.uuid4()}", None)):
        kwargs = {"json": body} if body is not None else {}
        response = client.request(method.upper(), path, headers=bearer(key), **kwargs)
        assert_problem(response, 403, "forbidden")


def test_route_and_suppress_rules_via_the_api_and_a_preview_that_writes_nothing(
        client, db_session, admin_key, publisher, topics):
    directed, _ = org_with_key(db_session, "subscribe")
    subscribed, _ = org_with_key(db_session, "subscribe")
    silenced, _ = org_with_key(db_session, "subscribe")
    sub = create_subscription(db_session, subscribed, filter={"topics": [topics.root]})
    create_subscription(db_session, silenced, filter={"topics": [topics.root]})
    admin = bearer(admin_key)

    route_rule = client.post("/v1/routing-rules", headers=admin, json={
        "name": "Directed to one city", "action": "route",
        "filter": {"topics": [topics.root]},
        "targets": {"organisations": [str(directed.id)]}})
    assert route_rule.status_code == 201, route_rule.text
    suppress_rule = client.post("/v1/routing-rules", headers=admin, json={
        "name": "Silence one city", "action": "suppress",
        "targets": {"organisations": [str(silenced.id)]}})
    assert suppress_rule.status_code == 201, suppress_rule.text
    listed = client.get("/v1/routing-rules", headers=admin).json()["items"]
    assert {route_rule.json()["id"], suppress_rule.json()["id"]} <= {r["id"] for r in listed}
    assert_problem(client.post("/v1/routing-rules", headers=admin, json={
        "name": "bad", "targets": {}, "colour": "red"}), 422)

    counts = lambda: (count(db_session, Update), count(db_session, InboxItem),  # noqa: E731
                      count(db_session, OutboxMessage))
    before = counts()
    preview = client.post("/v1/routing-rules/preview", headers=admin, json={
        "title": "Would it reach?", "topics": [topics.child],
        "publisher_id": str(publisher.org.id)})
    assert preview.status_code == 200, preview.text
    reasons = {i["organisation_id"]: i["reasons"] for i in preview.json()["items"]}
    assert reasons == {
        str(directed.id): [{"kind": "rule", "id": route_rule.json()["id"]}],
        str(subscribed.id): [{"kind": "subscription", "id": str(sub.id)}],
    }
    assert preview.json()["total"] == 2
    assert counts() == before
    assert_problem(client.post("/v1/routing-rules/preview", headers=admin, json={
        "title": "Naive time", "topics": [topics.child],
        "expires_at": "2031-01-01T00:00:00"}), 422, "validation-error")

    # Deleting the route rule takes it out of the next preview.
    deleted = client.delete(f"/v1/routing-rules/{route_rule.json()['id']}", headers=admin)
    assert deleted.status_code == 204
    again = client.post("/v1/routing-rules/preview", headers=admin, json={
        "title": "Would it reach?", "topics": [topics.child],
        "publisher_id": str(publisher.org.id)})
    assert {i["organisation_id"] for i in again.json()["items"]} == {str(subscribed.id)}


# ----------------------------------------------------------------------------- rate limit


@pytest.fixture
def rate_limit(monkeypatch):
    """Set the rate limit (and Redis) for this test; the cached client is reset around it."""
    from api import ratelimit
    from domain.settings import Settings

    def configure(per_minute: int, redis_url: str) -> None:
        settings = Settings(rate_limit_per_minute=per_minute, redis_url=redis_url)
        monkeypatch.setattr(ratelimit, "get_settings", lambda: settings)
        ratelimit._client.cache_clear()

    yield configure
    ratelimit._client.cache_clear()


def test_the_fourth_request_in_a_minute_gets_429_with_retry_after(client, db_session,
                                                                   rate_limit, monkeypatch):
    from api import ratelimit
    from tests.conftest import REDIS_URL

    rate_limit(3, REDIS_URL)
    # Ten seconds into a window, so that the window cannot roll over mid-test.
    window_start = (int(ratelimit.time.time()) // 60 + 1) * 60
    monkeypatch.setattr(ratelimit, "time", SimpleNamespace(time=lambda: window_start + 10.0))
    org, key = org_with_key(db_session, "subscribe")
    other_key = create_key(db_session, org, "subscribe")

    answers = [client.get("/v1/subscriptions", headers=bearer(key)).status_code
               for _ in range(3)]
    assert answers == [200, 200, 200]
    limited = client.get("/v1/subscriptions", headers=bearer(key))
    assert_problem(limited, 429, "rate-limited")
    assert limited.headers["Retry-After"] == "51"
    assert client.get("/v1/subscriptions", headers=bearer(other_key)).status_code == 200


def test_the_rate_limiter_fails_open_when_redis_is_unreachable(client, db_session, rate_limit):
    rate_limit(1, "redis://127.0.0.1:1/0")
    _, key = org_with_key(db_session, "subscribe")
    answers = [client.get("/v1/subscriptions", headers=bearer(key)).status_code
               for _ in range(3)]
    assert answers == [200, 200, 200]
