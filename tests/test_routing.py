"""Routing: filter matching (Python and SQL agree), rules, classification, idempotency."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from domain import matching, routing
from domain.models import (
    Classification,
    InboxItem,
    Kind,
    Level,
    PreventionLevel,
    Priority,
    Role,
    UpdateTopic,
)
from tests.factories import (
    create_group_with,
    create_org,
    create_rule,
    create_subscription,
    create_topic,
    publish_update,
)


def inbox_of(session, update):
    items = session.scalars(sa.select(InboxItem).where(InboxItem.chain_id == update.chain_id))
    return {item.organisation_id: item.reasons() for item in items}


@pytest.fixture
def tree(db_session):
    """radicalisation > violent-radicalisation > terrorism; education (a sibling tree)."""
    suffix = create_org(db_session).id.hex[:6]
    root = create_topic(db_session, f"radicalisation-{suffix}")
    child = create_topic(db_session, f"violent-{suffix}", parent=root.slug)
    leaf = create_topic(db_session, f"terrorism-{suffix}", parent=child.slug)
    other = create_topic(db_session, f"education-{suffix}")
    return {"root": root.slug, "child": child.slug, "leaf": leaf.slug, "other": other.slug}


# Each case: (subscription filter, update fields, should it match?). Topic names refer to
# the `tree` fixture; "publisher" refers to the publishing organisation.
CASES = [
    ("no filter takes everything", {}, {}, True),
    ("topic itself", {"topics": ["child"]}, {"topics": ["child"]}, True),
    ("descendant of the filter topic", {"topics": ["root"]}, {"topics": ["leaf"]}, True),
    ("ancestor of the filter topic is no match", {"topics": ["leaf"]}, {"topics": ["root"]},
     False),
    ("sibling tree", {"topics": ["root"]}, {"topics": ["other"]}, False),
    ("one of several topics", {"topics": ["other"]}, {"topics": ["leaf", "other"]}, True),
    ("publisher listed", {"publishers": ["publisher"]}, {}, True),
    ("another publisher listed", {"publishers": ["stranger"]}, {}, False),
    ("publisher level matches", {"publisher_levels": ["federal"]}, {}, True),
    ("publisher level differs", {"publisher_levels": ["flemish", "local"]}, {}, False),
    ("prevention level matches", {"prevention_levels": ["secondary", "tertiary"]},
     {"prevention_level": PreventionLevel.tertiary}, True),
    ("prevention level differs", {"prevention_levels": ["primary"]},
     {"prevention_level": PreventionLevel.tertiary}, False),
    ("prevention none is not primary", {"prevention_levels": ["primary"]},
     {"prevention_level": PreventionLevel.none}, False),
    ("min priority met", {"min_priority": "important"}, {"priority": Priority.urgent}, True),
    ("min priority equal", {"min_priority": "important"}, {"priority": Priority.important},
     True),
    ("below min priority", {"min_priority": "urgent"}, {"priority": Priority.important}, False),
    ("roles intersect", {"target_roles": ["mayor", "livc_coordinator"]},
     {"target_roles": [Role.livc_coordinator, Role.police_contact]}, True),
    ("roles disjoint", {"target_roles": ["mayor"]},
     {"target_roles": [Role.education_contact]}, False),
    ("update for all roles", {"target_roles": ["mayor"]}, {"target_roles": [Role.all]}, True),
    ("subscription for all roles", {"target_roles": ["all"]},
     {"target_roles": [Role.welfare_contact]}, True),
    ("every criterion met", {"topics": ["root"], "publisher_levels": ["federal"],
                             "prevention_levels": ["secondary"], "min_priority": "important",
                             "target_roles": ["livc_coordinator"]},
     {"topics": ["leaf"], "prevention_level": PreventionLevel.secondary,
      "priority": Priority.urgent, "target_roles": [Role.livc_coordinator]}, True),
    ("all but one criterion met", {"topics": ["root"], "publisher_levels": ["federal"],
                                   "min_priority": "urgent"},
     {"topics": ["leaf"], "priority": Priority.important}, False),
]


@pytest.mark.parametrize("name,sub_filter,update_fields,expected", CASES,
                         ids=[c[0] for c in CASES])
def test_filter_matching(db_session, tree, name, sub_filter, update_fields, expected):
    publisher = create_org(db_session, level=Level.federal, kind=Kind.federal_body)
    stranger = create_org(db_session, level=Level.federal, kind=Kind.federal_body)
    subscriber = create_org(db_session)
    names = {"publisher": str(publisher.id), "stranger": str(stranger.id)}
    f = dict(sub_filter)
    if "topics" in f:
        f["topics"] = [tree[t] for t in f["topics"]]
    if "publishers" in f:
        f["publishers"] = [names[p] for p in f["publishers"]]
    sub = create_subscription(db_session, subscriber, filter=f)
    fields = {"topics": ["other"], **update_fields}
    fields["topics"] = [tree[t] for t in fields["topics"]]
    update = publish_update(db_session, publisher, **fields)

    routed = subscriber.id in inbox_of(db_session, update)
    assert routed is expected
    # The pure rule says the same as the SQL statement.
    from domain.filters import compile_stored_filter

    plan = routing.make_plan(
        db_session, publisher_id=update.publisher_id,
        topic_ids=frozenset(db_session.scalars(sa.select(UpdateTopic.topic_id)
                                               .where(UpdateTopic.update_id == update.id))),
        prevention_level=update.prevention_level, priority=update.priority,
        roles_mask=update.roles_mask, classification=update.classification,
        audience=update.audience, update_id=update.id)
    assert matching.filter_matches(compile_stored_filter(db_session, sub.filter),
                                   plan.facts) is expected
    if expected:
        assert inbox_of(db_session, update)[subscriber.id] == [
            {"kind": "subscription", "id": str(sub.id)}]


def test_one_inbox_item_with_every_reason_when_several_subscriptions_and_rules_match(
        db_session, tree):
    publisher = create_org(db_session, level=Level.federal, kind=Kind.federal_body)
    city = create_org(db_session)
    s1 = create_subscription(db_session, city, filter={"topics": [tree["root"]]})
    s2 = create_subscription(db_session, city, filter={})
    group = create_group_with(db_session, [city])
    r1 = create_rule(db_session, filter={"topics": [tree["child"]]},
                     targets={"groups": [str(group.id)]})
    r2 = create_rule(db_session, filter={}, targets={"organisations": [str(city.id)]})
    update = publish_update(db_session, publisher, topics=[tree["leaf"]])
    reasons = inbox_of(db_session, update)[city.id]
    assert reasons == sorted([{"kind": "subscription", "id": str(s1.id)},
                              {"kind": "subscription", "id": str(s2.id)},
                              {"kind": "rule", "id": str(r1.id)},
                              {"kind": "rule", "id": str(r2.id)}],
                             key=lambda r: (r["kind"], r["id"]))
    count = db_session.scalar(sa.select(sa.func.count()).select_from(InboxItem)
                              .where(InboxItem.chain_id == update.chain_id))
    assert count == 1


def test_route_rule_reaches_province_municipalities_and_suppress_rule_removes(db_session, tree):
    publisher = create_org(db_session, level=Level.federal, kind=Kind.federal_body)
    a = create_org(db_session, province_nis="71000")
    b = create_org(db_session, province_nis="71000")
    elsewhere = create_org(db_session, province_nis="72000")
    create_rule(db_session, filter={"topics": [tree["root"]]},
                targets={"provinces": ["71000"]})
    create_rule(db_session, action="suppress", filter={},
                targets={"organisations": [str(b.id)]})
    update = publish_update(db_session, publisher, topics=[tree["child"]])
    recipients = inbox_of(db_session, update)
    assert a.id in recipients and b.id not in recipients and elsewhere.id not in recipients
    # A rule whose filter does not match adds nobody.
    other = publish_update(db_session, publisher, topics=[tree["other"]])
    assert inbox_of(db_session, other) == {}


def test_restricted_update_reaches_exactly_its_audience(db_session, tree):
    publisher = create_org(db_session, level=Level.federal, kind=Kind.federal_body)
    named = create_org(db_session)
    also_named = create_org(db_session)
    subscribed_but_unnamed = create_org(db_session)
    create_subscription(db_session, subscribed_but_unnamed, filter={})
    create_subscription(db_session, named, filter={"topics": [tree["other"]]})
    create_rule(db_session, filter={}, targets={"organisations": [str(subscribed_but_unnamed.id)]})
    create_rule(db_session, action="suppress", filter={},
                targets={"organisations": [str(named.id)]})
    update = publish_update(db_session, publisher, topics=[tree["leaf"]],
                            classification=Classification.restricted,
                            audience={"organisations": [str(named.id), str(also_named.id)]})
    assert set(inbox_of(db_session, update)) == {named.id, also_named.id}
    assert inbox_of(db_session, update)[named.id] == [{"kind": "audience", "id": str(update.id)}]


def test_audience_narrows_public_updates(db_session, tree):
    publisher = create_org(db_session, level=Level.federal, kind=Kind.federal_body)
    inside, outside = create_org(db_session), create_org(db_session)
    for org in (inside, outside):
        create_subscription(db_session, org, filter={})
    update = publish_update(db_session, publisher, topics=[tree["root"]],
                            audience={"organisations": [str(inside.id)]})
    assert set(inbox_of(db_session, update)) == {inside.id}


def test_routing_twice_gives_the_same_rows(db_session, tree):
    publisher = create_org(db_session, level=Level.federal, kind=Kind.federal_body)
    orgs = [create_org(db_session) for _ in range(5)]
    for org in orgs:
        create_subscription(db_session, org, filter={"topics": [tree["root"]]})
    update = publish_update(db_session, publisher, topics=[tree["child"]])
    before = db_session.execute(sa.select(InboxItem.__table__)
                                .where(InboxItem.chain_id == update.chain_id)
                                .order_by(InboxItem.organisation_id)).all()
    again = routing.route_update(db_session, update.id)
    assert again.already_routed
    # Even with the guard cleared (a worker killed after the insert, before its commit is
    # impossible, but a forced re-run must still be harmless):
    update.routed_at = None
    db_session.commit()
    routing.route_update(db_session, update.id)
    after = db_session.execute(sa.select(InboxItem.__table__)
                               .where(InboxItem.chain_id == update.chain_id)
                               .order_by(InboxItem.organisation_id)).all()
    assert len(before) == 5 and before == after


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_only_a_duplicate_inbox_row_counts_as_a_conflict(database, request):
    """`route_update` routes again with the upsert on a duplicate (chain, organisation) in
    the inbox, and on nothing else: told apart on PostgreSQL and on SQLite (the embedded
    default of `make run`, whose driver reports constraints only in its message)."""
    if database == "sqlite":
        engine = sa.create_engine("sqlite://")
        InboxItem.__table__.create(engine)
    else:
        engine = request.getfixturevalue("engine")
    item = {"chain_id": uuid.uuid4(), "organisation_id": uuid.uuid4(),
            "update_id": uuid.uuid4(), "subscription_ids": [], "rule_ids": [],
            "via_audience": False, "needs_ack": False,
            "received_at": datetime.now(UTC)}
    insert = sa.insert(InboxItem.__table__)
    with engine.connect() as connection:  # never committed
        connection.execute(insert, item)
        with pytest.raises(sa.exc.IntegrityError) as duplicate:
            connection.execute(insert, item)
        assert routing._inbox_conflict(duplicate.value)
        connection.rollback()
        with pytest.raises(sa.exc.IntegrityError) as missing:
            connection.execute(insert, {**item, "needs_ack": None})
        assert not routing._inbox_conflict(missing.value)


def test_a_version_routed_after_its_correction_leaves_the_correction_in_the_inboxes(
        db_session, tree):
    """A correction published before its first version was routed, and routed first (two
    workers): the first version, routed late, overwrites nothing and reaches no one."""
    publisher = create_org(db_session, level=Level.federal, kind=Kind.federal_body)
    orgs = [create_org(db_session) for _ in range(3)]
    for org in orgs:
        create_subscription(db_session, org, filter={"topics": [tree["root"]]})
    first = publish_update(db_session, publisher, route=False, topics=[tree["child"]])
    correction = publish_update(db_session, publisher, route=False, topics=[tree["child"]],
                                title="Corrected", supersedes=first.id)
    assert routing.route_update(db_session, correction.id).recipients == 3
    late = routing.route_update(db_session, first.id)
    assert late.recipients == 0 and not late.already_routed
    shown = db_session.execute(sa.select(InboxItem.organisation_id, InboxItem.update_id)
                               .where(InboxItem.chain_id == first.chain_id)).all()
    assert sorted(shown) == sorted((org.id, correction.id) for org in orgs)
    db_session.refresh(first)
    assert first.routed_at is not None and first.recipient_count == 0
    assert routing.route_update(db_session, first.id).already_routed
