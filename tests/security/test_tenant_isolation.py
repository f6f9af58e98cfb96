"""Tenant isolation, generated from the OpenAPI document.

For every operation whose path takes an id (or a slug or token), `TABLE` says which real
object of organisation B to name and what another organisation A may see of it:
- `tenant`: B's own object. B's key reads it with 2xx; A's key (publish and subscribe, the
  scopes that would serve A's own object) gets 404, never 2xx or 403, never B's data, and
  changes nothing.
- `admin`: an admin-only operation. A's non-admin key gets 403 before any lookup, for B's id
  and for an id that does not exist alike (the answer says nothing about existence).
- `shared`: the directory (organisations, groups, topics), readable by any valid key by
  design (see the contract: "reads: any"). A sees what B sees.
- `capability`: no key at all; the unguessable token in the path is the credential (feeds,
  e-mail links). Tested below: a token only ever shows its own organisation's items.

A path with an id that is not in `TABLE` fails the test, so the table stays complete.
Then: tampered pagination cursors, feed tokens, and restricted updates on every channel.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from api.app import app
from domain import bundles, publishing, routing
from domain.models import (
    Bundle,
    BundleEntry,
    Classification,
    Delivery,
    InboxItem,
    Subscription,
    Update,
    WebhookEndpoint,
)
from domain.pagination import encode_cursor
from tests.factories import (
    actor_for,
    bearer,
    create_email_subscription,
    create_feed_subscription,
    create_rule,
    create_subscription,
    create_webhook_subscription,
    insert_webhook_endpoint,
    publish_update,
)
from tests.security.world import TUESDAY, Tenant, World, module_world_fixtures

Value = Callable[[World, Tenant], str]


@dataclass(frozen=True)
class Entry:
    kind: str  # tenant | admin | shared | capability
    value: Value
    #: which of B's keys reads it (tenant objects)
    owner: str = "both"
    #: the GET that shows B's object with 2xx (for operations that are not themselves reads)
    read: str | None = None
    #: a valid body per method, so that validation (422) cannot hide the lookup
    bodies: dict[str, Any] = field(default_factory=dict)


def _str(attr: str) -> Value:
    return lambda world, tenant: str(getattr(tenant, attr))


REPLAY = {"since": "2000-01-01T00:00:00Z", "until": "2100-01-01T00:00:00Z"}

#: path template -> how to name B's object and who may see it.
TABLE: dict[str, Entry] = {
    "/v1/organisations/{organisation_id}": Entry(
        "shared", lambda w, t: t.id, bodies={"PATCH": {"name": "Hijacked"}}),
    "/v1/organisations/{organisation_id}/keys": Entry(
        "admin", lambda w, t: t.id, bodies={"POST": {"scopes": ["admin"]}}),
    "/v1/keys/{key_id}": Entry("admin", _str("spare_key_id")),
    "/v1/groups/{group_id}": Entry("shared", lambda w, t: str(w.group_id)),
    "/v1/groups/{group_id}/members": Entry(
        "admin", lambda w, t: str(w.group_id), bodies={"PUT": {"members": []}}),
    "/v1/topics/{slug}": Entry("shared", lambda w, t: w.topic,
                               bodies={"PATCH": {"name_nl": "Hijacked"}}),
    "/v1/routing-rules/{rule_id}": Entry("admin", lambda w, t: str(w.rule_id)),
    "/v1/updates/{update_id}": Entry("tenant", _str("own_update_id"), owner="publish"),
    "/v1/updates/{update_id}/withdraw": Entry(
        "tenant", _str("own_update_id"), owner="publish", read="/v1/updates/{update_id}",
        bodies={"POST": {"reason": "hijack"}}),
    "/v1/updates/{update_id}/reach": Entry("tenant", _str("own_update_id"), owner="publish"),
    "/v1/inbox/{update_id}": Entry("tenant", _str("received_update_id"), owner="subscribe"),
    "/v1/inbox/{update_id}/read": Entry("tenant", _str("received_update_id"),
                                        owner="subscribe", read="/v1/inbox/{update_id}"),
    "/v1/inbox/{update_id}/ack": Entry("tenant", _str("received_update_id"),
                                       owner="subscribe", read="/v1/inbox/{update_id}"),
    "/v1/subscriptions/{subscription_id}": Entry(
        "tenant", _str("feed_subscription_id"), owner="subscribe",
        bodies={"PATCH": {"name": "hijacked", "active": False}}),
    "/v1/subscriptions/{subscription_id}/rotate-feed-token": Entry(
        "tenant", _str("feed_subscription_id"), owner="subscribe",
        read="/v1/subscriptions/{subscription_id}"),
    "/v1/webhook-endpoints/{endpoint_id}": Entry(
        "tenant", _str("endpoint_id"), owner="subscribe",
        bodies={"PATCH": {"url": "http://127.0.0.1:9/stolen", "enabled": False}}),
    "/v1/webhook-endpoints/{endpoint_id}/rotate-secret": Entry(
        "tenant", _str("endpoint_id"), owner="subscribe",
        read="/v1/webhook-endpoints/{endpoint_id}"),
    "/v1/webhook-endpoints/{endpoint_id}/ping": Entry(
        "tenant", _str("endpoint_id"), owner="subscribe",
        read="/v1/webhook-endpoints/{endpoint_id}"),
    "/v1/webhook-endpoints/{endpoint_id}/replay": Entry(
        "tenant", _str("endpoint_id"), owner="subscribe",
        read="/v1/webhook-endpoints/{endpoint_id}", bodies={"POST": REPLAY}),
    "/v1/deliveries/{delivery_id}": Entry(
        "tenant", lambda w, t: str(t.delivery_ids[0]), owner="subscribe"),
    "/v1/deliveries/{delivery_id}/retry": Entry(
        "tenant", lambda w, t: str(t.delivery_ids[0]), owner="subscribe",
        read="/v1/deliveries/{delivery_id}"),
    "/v1/bundles/{bundle_id}": Entry("tenant", _str("bundle_id"), owner="subscribe"),
    "/v1/feeds/{token}": Entry("capability", _str("feed_token")),
    "/v1/email/confirm/{token}": Entry("capability", _str("email_confirm_token")),
    "/v1/email/unsubscribe/{token}": Entry("capability", _str("unsubscribe_token")),
}


def id_taking_operations() -> list[tuple[str, str]]:
    document = app.openapi()
    found = []
    for path, operations in document["paths"].items():
        if "{" not in path:
            continue
        for method in operations:
            if method in ("get", "post", "put", "patch", "delete"):
                found.append((method.upper(), path))
    return found


OPERATIONS = id_taking_operations()


def test_every_id_taking_path_has_an_entry_in_the_table():
    missing = sorted({path for _, path in OPERATIONS} - set(TABLE))
    assert not missing, f"add these paths to TABLE in {__name__}: {missing}"
    stale = sorted(set(TABLE) - {path for _, path in OPERATIONS})
    assert not stale, f"TABLE names paths the API no longer has: {stale}"
    assert len(OPERATIONS) >= 30


# ------------------------------------------------------------------------------- helpers


#: The world is built once for the module; each test runs in a savepoint of it.
world_connection, module_world, db_session, world = module_world_fixtures()


@pytest.fixture(autouse=True)
def no_rate_limit(monkeypatch):
    """The module's keys live for the whole module: keep the per-minute limit out of it."""
    from api import ratelimit
    from domain.settings import get_settings

    unlimited = get_settings().model_copy(update={"rate_limit_per_minute": 0})
    monkeypatch.setattr(ratelimit, "get_settings", lambda: unlimited)


def fill(template: str, value: str) -> str:
    return re.sub(r"\{[^}]+\}", value, template, count=1)


def request(client, method: str, path: str, key: str | None, body: Any = None):
    headers = bearer(key) if key else {}
    if body is None:
        return client.request(method, path, headers=headers)
    return client.request(method, path, headers=headers, json=body)


def b_markers(world: World) -> list[str]:
    """Strings that only B's data contains: its ids, its objects' ids, its secrets."""
    b = world.b
    return [b.id, str(b.received_update_id), str(b.restricted_update_id),
            str(b.subscription_id), str(b.feed_subscription_id), str(b.endpoint_id),
            str(b.bundle_id), *[str(d) for d in b.delivery_ids], *b.secrets,
            f"Gemeente {b.name.upper()}", "Restricted for b", "For b ", "secret body for b"]


def assert_no_b_data(response, world: World, allowed: str = "") -> None:
    text = response.text.replace(allowed, "") if allowed else response.text
    leaked = [m for m in b_markers(world) if m and m in text]
    assert not leaked, (response.request.method, response.request.url, leaked, text[:500])


def snapshot(session, world: World) -> dict[str, Any]:
    """B's state that A must not be able to change."""
    session.expire_all()
    b = world.b
    sub = session.get(Subscription, b.feed_subscription_id)
    endpoint = session.get(WebhookEndpoint, b.endpoint_id)
    own = session.get(Update, b.own_update_id)
    item = session.get(InboxItem, (session.get(Update, b.received_update_id).chain_id,
                                   b.org.id))
    delivery = session.get(Delivery, b.delivery_ids[0])
    return {
        "subscription": (sub.name, sub.active, sub.feed_token, sub.filter),
        "endpoint": (endpoint.url, endpoint.enabled, endpoint.secret_ciphertext,
                     endpoint.description),
        "update": (own.status, own.withdrawn_at),
        "inbox": (item.read_at, item.acked_at),
        "delivery": (delivery.status, delivery.attempt_count, delivery.next_attempt_at),
        "subscriptions": session.scalar(sa.select(sa.func.count()).select_from(Subscription)
                                        .where(Subscription.organisation_id == b.org.id)),
    }


# ------------------------------------------------------------- the generated isolation test


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_another_organisations_object_is_not_found(client, db_session, world, method, path):
    entry = TABLE.get(path)
    assert entry is not None, f"{path} is not in TABLE"
    a, b = world.a, world.b
    value = entry.value(world, b)
    url = fill(path, value)
    body = entry.bodies.get(method)

    if entry.kind == "capability":
        # The token is the credential (tests below); a key adds nothing, a guess finds nothing.
        guess = fill(path, "x" * 43)
        for key in (None, a.keys["both"], world.admin_key):
            response = request(client, method, guess, key)
            assert response.status_code == 404, response.text
            assert_no_b_data(response, world)
        return

    if entry.kind == "shared":
        if method == "GET":
            seen_by_b = request(client, "GET", url, b.keys["both"])
            seen_by_a = request(client, "GET", url, a.keys["both"])
            assert seen_by_b.status_code == 200, seen_by_b.text
            assert seen_by_a.status_code == 200 and seen_by_a.json() == seen_by_b.json()
        else:
            before = request(client, "GET", url, world.admin_key).json()
            for key in (a.keys["both"], b.keys["both"]):
                response = request(client, method, url, key, body)
                assert response.status_code == 403, response.text
            assert request(client, "GET", url, world.admin_key).json() == before
        return

    if entry.kind == "admin":
        assert request(client, "GET", "/v1/organisations", world.admin_key).status_code == 200
        nowhere = fill(path, str(uuid.uuid4()) if "slug" not in path else "no-such-topic")
        for key in (a.keys["both"], a.keys["publish"], a.keys["subscribe"], b.keys["both"]):
            for target in (url, nowhere):
                response = request(client, method, target, key, body)
                assert response.status_code == 403, (target, response.text)
                assert response.json()["type"].endswith("forbidden")
                assert_no_b_data(response, world)
        return

    assert entry.kind == "tenant"
    read_url = fill(entry.read or path, value)
    owner_key = b.keys[entry.owner]
    shown = request(client, "GET", read_url, owner_key)
    assert 200 <= shown.status_code < 300, (read_url, shown.text)
    before = snapshot(db_session, world)

    for key_name in ("both", "publish", "subscribe", entry.owner):
        response = request(client, method, url, a.keys[key_name], body)
        if response.status_code == 403:
            # Only a key without the operation's scope may get 403 (checked before lookup).
            own = request(client, method, fill(path, _own_value(world, path)),
                          a.keys[key_name], body)
            assert own.status_code == 403, (key_name, method, path)
            continue
        assert response.status_code == 404, (key_name, method, url, response.status_code,
                                             response.text)
        assert response.json()["type"].endswith("not-found")
        assert_no_b_data(response, world)
    assert snapshot(db_session, world) == before
    again = request(client, "GET", read_url, owner_key)
    assert 200 <= again.status_code < 300


def _own_value(world: World, path: str) -> str:
    """A's own object for the same path (to tell a scope 403 from a lookup 403)."""
    entry = TABLE[path]
    return entry.value(world, world.a)


def test_the_owner_reads_each_of_its_objects_and_the_other_gets_404_on_reads(client, world):
    """The table's values really are B's objects: B's own key reads each with 2xx."""
    b = world.b
    for path, entry in TABLE.items():
        if entry.kind != "tenant" or entry.read:
            continue
        url = fill(path, entry.value(world, b))
        assert request(client, "GET", url, b.keys[entry.owner]).status_code == 200, url
        assert request(client, "GET", url, world.a.keys["both"]).status_code == 404, url


# ------------------------------------------------------------------- pagination cursors


LISTS = [
    ("/v1/inbox", "subscribe"),
    ("/v1/subscriptions", "subscribe"),
    ("/v1/webhook-endpoints", "subscribe"),
    ("/v1/deliveries", "subscribe"),
    ("/v1/bundles", "subscribe"),
    ("/v1/updates", "publish"),
]


def _ids_in(payload: dict[str, Any]) -> str:
    return json.dumps(payload["items"])


def test_another_organisations_cursor_never_shows_its_items(client, db_session, world):
    a, b = world.a, world.b
    # Enough of B's objects for a second page everywhere.
    create_webhook_subscription(db_session, b.org, insert_webhook_endpoint(
        db_session, b.org, "http://127.0.0.1:9/second")[0])
    publish_update(db_session, b.org, title="B's second", topics=[world.topic],
                   audience={"organisations": [b.id]})
    for path, scope in LISTS:
        first = client.get(path, params={"limit": 1}, headers=bearer(b.keys[scope]))
        assert first.status_code == 200, (path, first.text)
        cursor = first.json()["next_cursor"]
        cursors = [cursor] if cursor else []
        # And cursors forged from B's own objects' keys.
        cursors += [encode_cursor(value) for value in (
            b.subscription_id, b.endpoint_id, b.delivery_ids[0], b.bundle_id, b.own_update_id,
            uuid.UUID(int=0), uuid.UUID(int=2**128 - 1))]
        assert cursors, path
        mine = client.get(path, params={"limit": 200}, headers=bearer(a.keys[scope])).json()
        for cursor in cursors:
            response = client.get(path, params={"cursor": cursor, "limit": 200},
                                  headers=bearer(a.keys[scope]))
            if response.status_code == 422:  # a cursor of another list's shape
                assert response.json()["type"].endswith("validation-error")
                continue
            assert response.status_code == 200, (path, response.text)
            assert_no_b_data(response, world)
            mine_ids = {item["id"] for item in mine["items"]}
            assert {item["id"] for item in response.json()["items"]} <= mine_ids, path


def test_a_forged_inbox_cursor_stays_within_ones_own_inbox(client, world):
    """The inbox cursor is (received_at, chain): any forged value moves within A's inbox."""
    import base64

    a = world.a
    for raw in (json.dumps({"at": "1970-01-01T00:00:00+00:00",
                            "c": str(world.b.received_update_id)}),
                '{"at":"2999-01-01T00:00:00+00:00","c":"ffffffff-ffff-ffff-ffff-ffffffffffff"}',
                "garbage", '{"k": "x"}'):
        cursor = base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")
        response = client.get("/v1/inbox", params={"cursor": cursor},
                              headers=bearer(a.keys["subscribe"]))
        assert response.status_code in (200, 422), response.text
        assert_no_b_data(response, world)


# ------------------------------------------------------------------------- feed tokens


def _chains_of(session, org_id) -> set[str]:
    return {str(c) for c in session.scalars(sa.select(InboxItem.chain_id)
                                            .where(InboxItem.organisation_id == org_id))}


def test_a_feed_token_only_ever_shows_its_own_organisations_items(client, db_session, world):
    a, b = world.a, world.b
    feeds_of = {}
    for tenant in (a, b):
        response = client.get(f"/v1/feeds/{tenant.feed_token}")
        assert response.status_code == 200, response.text
        feeds_of[tenant.name] = response.content
    a_chains, b_chains = _chains_of(db_session, a.org.id), _chains_of(db_session, b.org.id)
    assert a_chains and b_chains and not (a_chains & b_chains)
    a_feed, b_feed = feeds_of["a"].decode(), feeds_of["b"].decode()
    assert any(chain in b_feed for chain in b_chains)
    assert not [chain for chain in a_chains if chain in b_feed]
    assert not [chain for chain in b_chains if chain in a_feed]
    assert "Restricted for b" not in a_feed and "secret body" not in b_feed

    # B's feed with cursors of A's (or forged ones) still shows B's items alone.
    from domain.feeds import feed_page

    a_sub = db_session.get(Subscription, a.feed_subscription_id)
    page = feed_page(db_session, a_sub, None, 1)
    for cursor in filter(None, [page.next_cursor, encode_cursor(a.received_update_id)]):
        response = client.get(f"/v1/feeds/{b.feed_token}", params={"cursor": cursor})
        assert response.status_code in (200, 422), response.text
        assert not [chain for chain in a_chains if chain in response.text]

    # A rotated-away token shows nothing, and a token is not an id.
    old = b.feed_token
    rotated = client.post(f"/v1/subscriptions/{b.feed_subscription_id}/rotate-feed-token",
                          headers=bearer(b.keys["subscribe"]))
    assert rotated.status_code == 200
    assert client.get(f"/v1/feeds/{old}").status_code == 404
    assert client.get(f"/v1/feeds/{b.feed_subscription_id}").status_code == 404


def test_e_mail_link_tokens_act_on_their_own_subscription_only(client, db_session, world):
    a, b = world.a, world.b
    response = client.post(f"/v1/email/unsubscribe/{a.unsubscribe_token}")
    assert response.status_code == 200
    db_session.expire_all()
    assert db_session.get(Subscription, a.email_subscription_id).suspended_at is not None
    assert db_session.get(Subscription, b.email_subscription_id).suspended_at is None
    assert_no_b_data(response, world)
    # A's organisation cannot resume B's subscription through the API either.
    resumed = client.patch(f"/v1/subscriptions/{b.email_subscription_id}",
                           json={"active": True}, headers=bearer(a.keys["subscribe"]))
    assert resumed.status_code == 404


# -------------------------------------------------------- restricted updates, every channel


def test_a_restricted_update_reaches_only_its_named_audience_on_every_channel(
        client, db_session, world):
    """Subscriptions that take everything, a rule that routes the topic to A, feed, webhook,
    e-mail and daily subscriptions of A: none of it adds A to a restricted update for B."""
    a, b = world.a, world.b
    create_rule(db_session, filter={"topics": [world.topic]},
                targets={"organisations": [a.id], "groups": [str(world.group_id)]})
    create_email_subscription(db_session, a.org, confirmed=True, filter={})
    create_subscription(db_session, a.org, filter={"publishers": [str(world.publisher.id)]},
                        include_directed=True)
    create_feed_subscription(db_session, a.org, filter={"topics": [world.topic]})
    secret = f"restricted-{uuid.uuid4().hex}"
    update = publish_update(db_session, world.publisher, title=secret, body=secret,
                            summary=secret, topics=[world.topic],
                            classification=Classification.restricted,
                            audience={"organisations": [b.id]})
    correction = publishing.publish(
        db_session, actor_for(world.publisher, "publish"),
        publishing.Draft(title=secret + " v2", body=secret, topics=[world.topic],
                         classification=Classification.restricted,
                         audience={"organisations": [b.id]}, supersedes=update.id))
    routing.route_update(db_session, correction.id)
    chain = update.chain_id

    # Inbox: B alone.
    holders = set(db_session.scalars(sa.select(InboxItem.organisation_id)
                                     .where(InboxItem.chain_id == chain)))
    assert holders == {b.org.id}
    # Deliveries (webhook, e-mail): B's subscriptions alone.
    receivers = set(db_session.scalars(sa.select(Delivery.organisation_id).where(
        Delivery.update_id.in_([update.id, correction.id]))))
    assert receivers <= {b.org.id} and receivers
    # Feeds: not in any of A's.
    for sub in db_session.scalars(sa.select(Subscription).where(
            Subscription.organisation_id == a.org.id, Subscription.feed_token.is_not(None))):
        feed = client.get(f"/v1/feeds/{sub.feed_token}")
        assert feed.status_code == 200 and str(chain) not in feed.text
        assert secret not in feed.text
    # B's feed has it as a notice only.
    b_feed = client.get(f"/v1/feeds/{b.feed_token}").text
    assert str(chain) in b_feed and secret not in b_feed
    # Bundles: a window containing it puts it in B's bundle alone.
    db_session.execute(sa.update(InboxItem).where(InboxItem.chain_id == chain)
                       .values(received_at=TUESDAY + timedelta(hours=2)))
    for sub in db_session.scalars(sa.select(Subscription).where(
            Subscription.organisation_id.in_([a.org.id, b.org.id]),
            Subscription.cadence != "immediate")):
        sub.bundled_until = TUESDAY
    db_session.commit()
    bundles.run_due_bundles(db_session, TUESDAY + timedelta(days=1, seconds=1))
    owners = set(db_session.scalars(
        sa.select(Bundle.organisation_id).join(BundleEntry, BundleEntry.bundle_id == Bundle.id)
        .where(BundleEntry.chain_id == chain)))
    assert owners == {b.org.id}
    # The API: A cannot read it, B reads it in full (audited).
    for url in (f"/v1/updates/{update.id}", f"/v1/inbox/{update.id}",
                f"/v1/updates/{correction.id}"):
        response = client.get(url, headers=bearer(a.keys["both"]))
        assert response.status_code == 404 and secret not in response.text
    full = client.get(f"/v1/inbox/{correction.id}", headers=bearer(b.keys["subscribe"]))
    assert full.status_code == 200 and secret in full.text
    listed = client.get("/v1/inbox", headers=bearer(b.keys["subscribe"])).text
    assert str(chain) in listed and secret not in listed
    # Bundles as B sees them carry a notice, not the content.
    b_bundles = client.get("/v1/bundles", headers=bearer(b.keys["subscribe"])).text
    assert secret not in b_bundles
