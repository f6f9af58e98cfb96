"""Daily and weekly bundles: content, dedupe, corrections, withdrawals, exactly once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from domain import bundles, publishing, subscriptions
from domain.models import (
    Bundle,
    BundleEntry,
    Classification,
    Delivery,
    InboxItem,
    Kind,
    Level,
    Priority,
    Subscription,
)
from tests.factories import (
    actor_for,
    create_org,
    create_rule,
    create_subscription,
    create_topic,
    publish_update,
)

# Windows of a daily 08:00 (Brussels, CET in winter = 07:00 UTC) subscription.
MON = datetime(2026, 11, 23, 7, tzinfo=UTC)
TUE, WED, THU = MON + timedelta(days=1), MON + timedelta(days=2), MON + timedelta(days=3)


@pytest.fixture
def world(db_session):
    suffix = create_org(db_session).id.hex[:6]
    topics = {name: create_topic(db_session, f"{name}-{suffix}").slug
              for name in ("radicalisation", "education")}
    agency = create_org(db_session, name=f"Agentschap {suffix}", level=Level.flemish,
                        kind=Kind.agency)
    ocad = create_org(db_session, name=f"OCAD {suffix}", level=Level.federal,
                      kind=Kind.federal_body)
    city = create_org(db_session)
    sub = create_subscription(db_session, city, cadence="daily", send_at="08:00")
    # The subscription has existed since last week; its last bundle went out on Monday.
    sub.created_at = MON - timedelta(days=7)
    sub.bundled_until = MON
    db_session.commit()
    return {"topics": topics, "agency": agency, "ocad": ocad, "city": city, "sub": sub}


def arrive(db_session, update, at):
    """Place the update's inbox items at a moment inside a window."""
    db_session.execute(sa.update(InboxItem).where(InboxItem.chain_id == update.chain_id)
                       .values(received_at=at))
    db_session.commit()


def entries(db_session, bundle):
    rows = db_session.execute(sa.select(BundleEntry.chain_id, BundleEntry.state)
                              .where(BundleEntry.bundle_id == bundle.id)).all()
    return {chain: state for chain, state in rows}


def bundles_of(db_session, sub):
    return list(db_session.scalars(sa.select(Bundle).where(Bundle.subscription_id == sub.id)
                                   .order_by(Bundle.window_end)))


def test_one_bundle_per_window_with_every_publisher_and_nothing_twice(db_session, world):
    t = world["topics"]
    a = publish_update(db_session, world["agency"], topics=[t["education"]], title="A")
    b = publish_update(db_session, world["ocad"], topics=[t["radicalisation"]], title="B")
    for update in (a, b):
        arrive(db_session, update, MON + timedelta(hours=3))
    report = bundles.run_due_bundles(db_session, TUE + timedelta(seconds=1))
    assert report.bundles == 1
    [bundle] = bundles_of(db_session, world["sub"])
    assert (bundle.window_start, bundle.window_end) == (MON, TUE)
    assert entries(db_session, bundle) == {a.chain_id: "new", b.chain_id: "new"}
    assert bundle.item_count == 2
    # Running again, at the same time or later in the same window, builds nothing more.
    again = bundles.run_due_bundles(db_session, TUE + timedelta(hours=5))
    assert again.windows == 0 and len(bundles_of(db_session, world["sub"])) == 1
    db_session.refresh(world["sub"])
    assert world["sub"].bundled_until == TUE


def test_an_update_reached_several_ways_appears_once(db_session, world):
    t = world["topics"]
    create_subscription(db_session, world["city"], filter={"topics": [t["education"]]})
    create_rule(db_session, filter={"topics": [t["education"]]},
                targets={"organisations": [str(world["city"].id)]})
    update = publish_update(db_session, world["agency"], topics=[t["education"]])
    arrive(db_session, update, MON + timedelta(hours=1))
    bundles.run_due_bundles(db_session, TUE)
    [bundle] = bundles_of(db_session, world["sub"])
    assert list(entries(db_session, bundle)) == [update.chain_id]
    content = bundles.bundle_contents(db_session, [bundle])[bundle.id]
    kinds = {r["kind"] for r in content["sections"][0]["items"][0]["reasons"]}
    assert kinds == {"subscription", "rule"}


def test_a_correction_within_a_window_replaces_its_earlier_version(db_session, world):
    t = world["topics"]
    first = publish_update(db_session, world["agency"], topics=[t["education"]], title="v1")
    second = publish_update(db_session, world["agency"], topics=[t["education"]], title="v2",
                            supersedes=first.id)
    arrive(db_session, second, MON + timedelta(hours=2))
    bundles.run_due_bundles(db_session, TUE)
    [bundle] = bundles_of(db_session, world["sub"])
    content = bundles.bundle_contents(db_session, [bundle])[bundle.id]
    [item] = [i for s in content["sections"] for i in s["items"]]
    assert (item["title"], item["version"], item["state"]) == ("v2", 2, "new")


def test_a_correction_after_its_bundle_is_marked_corrected_in_the_next(db_session, world):
    t = world["topics"]
    first = publish_update(db_session, world["agency"], topics=[t["education"]], title="v1")
    arrive(db_session, first, MON + timedelta(hours=2))
    bundles.run_due_bundles(db_session, TUE)
    second = publish_update(db_session, world["agency"], topics=[t["education"]], title="v2",
                            supersedes=first.id)
    arrive(db_session, second, TUE + timedelta(hours=2))
    bundles.run_due_bundles(db_session, WED)
    monday, tuesday = bundles_of(db_session, world["sub"])
    assert entries(db_session, monday) == {first.chain_id: "new"}
    assert entries(db_session, tuesday) == {first.chain_id: "corrected"}


def test_withdrawn_before_sending_is_left_out_and_after_sending_is_listed(db_session, world):
    t = world["topics"]
    publisher = actor_for(world["agency"], "publish")
    early = publish_update(db_session, world["agency"], topics=[t["education"]], title="x")
    keep = publish_update(db_session, world["agency"], topics=[t["education"]], title="k")
    publishing.withdraw(db_session, publisher, early.id)
    for update in (early, keep):
        arrive(db_session, update, MON + timedelta(hours=2))
    bundles.run_due_bundles(db_session, TUE)
    [monday] = bundles_of(db_session, world["sub"])
    assert entries(db_session, monday) == {keep.chain_id: "new"}

    publishing.withdraw(db_session, publisher, keep.id)
    arrive(db_session, keep, TUE + timedelta(hours=1))
    bundles.run_due_bundles(db_session, WED)
    _, tuesday = bundles_of(db_session, world["sub"])
    assert entries(db_session, tuesday) == {keep.chain_id: "withdrawn"}


def test_an_empty_window_sends_nothing_but_is_not_built_again(db_session, world):
    report = bundles.run_due_bundles(db_session, TUE)
    assert (report.windows, report.bundles, report.empty) == (1, 0, 1)
    assert bundles_of(db_session, world["sub"]) == []
    db_session.refresh(world["sub"])
    assert world["sub"].bundled_until == TUE


def test_missed_windows_are_each_built_once(db_session, world):
    t = world["topics"]
    updates = [publish_update(db_session, world["agency"], topics=[t["education"]],
                              title=f"u{day}") for day in range(3)]
    for day, update in enumerate(updates):
        arrive(db_session, update, MON + timedelta(days=day, hours=4))
    # The scheduler was down from Monday until Thursday noon: three windows are due at once.
    report = bundles.run_due_bundles(db_session, THU + timedelta(hours=5))
    assert report.windows == 3 and report.bundles == 3
    built = bundles_of(db_session, world["sub"])
    assert [(b.window_start, b.window_end) for b in built] == [(MON, TUE), (TUE, WED),
                                                               (WED, THU)]
    assert [list(entries(db_session, b)) for b in built] == [[u.chain_id] for u in updates]


def test_deleting_a_subscription_deletes_its_bundles_and_their_entries(db_session, world):
    """Entries have no foreign key to their bundle (see BundleEntry.bundle_id): a trigger
    deletes them with it, also when the bundle goes by its subscription's cascade."""
    t = world["topics"]
    update = publish_update(db_session, world["agency"], topics=[t["education"]])
    arrive(db_session, update, MON + timedelta(hours=1))
    bundles.run_due_bundles(db_session, TUE)
    [bundle] = bundles_of(db_session, world["sub"])
    assert entries(db_session, bundle) == {update.chain_id: "new"}
    subscriptions.delete_subscription(db_session, actor_for(world["city"]), world["sub"].id)
    left = db_session.scalar(sa.select(sa.func.count()).select_from(Bundle)
                             .where(Bundle.id == bundle.id))
    assert left == 0 and entries(db_session, bundle) == {}


def test_urgent_updates_go_out_at_once_and_are_listed_as_already_sent(db_session, world):
    t = world["topics"]
    from domain.models import WebhookEndpoint
    from domain.secrets import encrypt, new_webhook_secret
    from domain.settings import get_settings

    now = get_settings().now()
    endpoint = WebhookEndpoint(organisation_id=world["city"].id, url="http://127.0.0.1:9/h",
                               event_types=[], enabled=True,
                               secret_ciphertext=encrypt(new_webhook_secret()),
                               created_at=now, updated_at=now)
    db_session.add(endpoint)
    db_session.commit()
    hooked = create_subscription(db_session, world["city"], cadence="daily", send_at="08:00",
                                 channel={"type": "webhook", "endpoint_id": str(endpoint.id)})
    hooked.bundled_until = MON
    db_session.commit()
    routine = publish_update(db_session, world["ocad"], topics=[t["radicalisation"]])
    urgent = publish_update(db_session, world["ocad"], topics=[t["radicalisation"]],
                            priority=Priority.urgent, title="Urgent")
    immediate = db_session.scalars(sa.select(Delivery.update_id)
                                   .where(Delivery.subscription_id == hooked.id)).all()
    assert immediate == [urgent.id]  # the routine one waits for the bundle
    for update in (routine, urgent):
        arrive(db_session, update, MON + timedelta(hours=5))
    bundles.run_due_bundles(db_session, TUE)
    [bundle] = bundles_of(db_session, hooked)
    assert entries(db_session, bundle) == {routine.chain_id: "new",
                                           urgent.chain_id: "already_sent"}
    delivery = db_session.scalars(sa.select(Delivery).where(Delivery.bundle_id == bundle.id)).one()
    assert delivery.event_type == "be.doorstroom.bundle"
    import json

    body = json.loads(delivery.payload)
    assert body["type"] == "be.doorstroom.bundle" and body["data"]["id"] == str(bundle.id)
    items = [i for s in body["data"]["sections"] for i in s["items"]]
    assert items[0]["title"] == "Urgent"  # urgent first


def test_sections_group_by_topic_then_publisher_with_counts(db_session, world):
    t = world["topics"]
    made = [publish_update(db_session, world["agency"], topics=[t["education"]]),
            publish_update(db_session, world["agency"], topics=[t["education"]]),
            publish_update(db_session, world["ocad"], topics=[t["education"]]),
            publish_update(db_session, world["ocad"], topics=[t["radicalisation"]],
                           classification=Classification.restricted,
                           audience={"organisations": [str(world["city"].id)]},
                           body="secret case")]
    for update in made:
        arrive(db_session, update, MON + timedelta(hours=6))
    bundles.run_due_bundles(db_session, TUE)
    [bundle] = bundles_of(db_session, world["sub"])
    content = bundles.bundle_contents(db_session, [bundle])[bundle.id]
    shape = [(s["topic"], s["publisher"], s["count"]) for s in content["sections"]]
    assert (t["education"], world["agency"].name, 2) in shape
    assert (t["education"], world["ocad"].name, 1) in shape
    assert content["count"] == 4
    notice = [i for s in content["sections"] for i in s["items"] if i["notice"]]
    assert notice and "secret" not in str(notice)


def test_bundles_api_lists_own_bundles_only(client, db_session, world):
    from tests.factories import bearer, create_key

    t = world["topics"]
    update = publish_update(db_session, world["agency"], topics=[t["education"]])
    arrive(db_session, update, MON + timedelta(hours=1))
    bundles.run_due_bundles(db_session, TUE)
    [bundle] = bundles_of(db_session, world["sub"])
    key = create_key(db_session, world["city"], "subscribe")
    listed = client.get("/v1/bundles", headers=bearer(key)).json()
    assert [b["id"] for b in listed["items"]] == [str(bundle.id)]
    one = client.get(f"/v1/bundles/{bundle.id}", headers=bearer(key)).json()
    assert one["count"] == 1 and one["window"]["end"].startswith("2026-11-24T07:00")
    stranger = create_key(db_session, create_org(db_session), "subscribe")
    assert client.get(f"/v1/bundles/{bundle.id}", headers=bearer(stranger)).status_code == 404
    assert client.get("/v1/bundles", headers=bearer(stranger)).json()["items"] == []
    assert Subscription is not None


def test_a_daily_feed_has_one_entry_per_bundle(client, db_session, world):
    import feedparser

    t = world["topics"]
    city = world["city"]
    feed_sub = create_subscription(db_session, city, cadence="daily", send_at="08:00",
                                   channel={"type": "feed"})
    feed_sub.bundled_until = MON
    db_session.commit()
    for day in range(2):
        update = publish_update(db_session, world["agency"], topics=[t["education"]],
                                title=f"Day {day}")
        arrive(db_session, update, MON + timedelta(days=day, hours=3))
    bundles.run_due_bundles(db_session, WED)
    response = client.get(f"/v1/feeds/{feed_sub.feed_token}")
    assert response.status_code == 200
    parsed = feedparser.parse(response.content)
    assert not parsed.bozo
    assert len(parsed.entries) == 2
    assert all(e.id.startswith("urn:uuid:") and e.updated and e.title for e in parsed.entries)
    assert "Day 1" in parsed.entries[0].content[0].value  # newest bundle first
