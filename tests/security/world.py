"""Real organisations with one of every kind of resource, for the security tests.

`make_world` builds, through the use cases (rolled back with the test's `db_session`):
- a platform organisation with an admin key;
- a publisher agency (publish key) that sends updates to the tenants;
- tenants (municipalities) A and B, each with keys (publish, subscribe, and both), an update
  of its own, an update it received (public) and a restricted update addressed to it alone,
  an inbox, a feed, an e-mail and a webhook subscription (with its endpoint and the
  deliveries routing created), a daily subscription with a built bundle, and a spare key;
- shared directory objects: a topic, a group and a routing rule.

Webhook endpoints point at 127.0.0.1 port 9 (discard: nothing listens), so nothing that
tries them leaves the machine.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from domain import bundles, keys
from domain.models import (
    ApiKey,
    Classification,
    Delivery,
    InboxItem,
    Kind,
    Level,
    Organisation,
)
from tests.factories import (
    create_email_subscription,
    create_feed_subscription,
    create_group_with,
    create_key,
    create_org,
    create_rule,
    create_subscription,
    create_topic,
    create_webhook_subscription,
    insert_webhook_endpoint,
    publish_update,
)

#: A bundle window of a daily 08:00 (Brussels) subscription: (MONDAY, TUESDAY].
MONDAY = datetime(2026, 11, 23, 7, tzinfo=UTC)
TUESDAY = MONDAY + timedelta(days=1)
CLOSED_LOOPBACK_URL = "http://127.0.0.1:9/hook"


@dataclass
class Tenant:
    name: str
    org: Organisation
    #: scope name ("publish", "subscribe", "both") -> plaintext key
    keys: dict[str, str]
    spare_key_id: uuid.UUID
    own_update_id: uuid.UUID
    received_update_id: uuid.UUID
    restricted_update_id: uuid.UUID
    subscription_id: uuid.UUID
    feed_subscription_id: uuid.UUID
    feed_token: str
    email_subscription_id: uuid.UUID
    email_confirm_token: str
    unsubscribe_token: str
    endpoint_id: uuid.UUID
    webhook_subscription_id: uuid.UUID
    daily_subscription_id: uuid.UUID
    bundle_id: uuid.UUID
    delivery_ids: list[uuid.UUID] = field(default_factory=list)
    #: secrets this tenant holds: its keys, its webhook secret, its tokens
    secrets: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return str(self.org.id)


@dataclass
class World:
    admin_org: Organisation
    admin_key: str
    publisher: Organisation
    publisher_key: str
    topic: str
    group_id: uuid.UUID
    rule_id: uuid.UUID
    tenants: dict[str, Tenant]

    @property
    def a(self) -> Tenant:
        return self.tenants["a"]

    @property
    def b(self) -> Tenant:
        return self.tenants["b"]


def _key_id(session: Session, plaintext: str) -> uuid.UUID:
    return session.scalars(sa.select(ApiKey.id)
                           .where(ApiKey.key_hash == keys.hash_key(plaintext))).one()


def make_tenant(session: Session, name: str, publisher: Organisation, topic: str) -> Tenant:
    suffix = uuid.uuid4().hex[:6]
    org = create_org(session, name=f"Gemeente {name.upper()} {suffix}",
                     email=f"info-{name}-{suffix}@gemeente.example")
    tenant_keys = {"publish": create_key(session, org, "publish"),
                   "subscribe": create_key(session, org, "subscribe"),
                   "both": create_key(session, org, "publish", "subscribe")}
    spare = create_key(session, org, "subscribe")

    inbox_sub = create_subscription(session, org, filter={}, name=f"{name} inbox")
    feed_sub = create_feed_subscription(session, org, filter={})
    email_sub = create_email_subscription(session, org)
    endpoint, whsec = insert_webhook_endpoint(session, org, CLOSED_LOOPBACK_URL)
    webhook_sub = create_webhook_subscription(session, org, endpoint, filter={})
    daily = create_subscription(session, org, filter={}, cadence="daily", send_at="08:00")
    # The daily subscription has existed since last week; its last bundle went out on Monday.
    daily.created_at = MONDAY - timedelta(days=7)
    daily.bundled_until = MONDAY
    session.commit()

    # Every update names its audience, so that no tenant receives another's by accident.
    own = publish_update(session, org, title=f"{name}'s own update {suffix}", topics=[topic],
                         audience={"organisations": [str(org.id)]})
    received = publish_update(session, publisher, title=f"For {name} {suffix}", topics=[topic],
                              audience={"organisations": [str(org.id)]})
    restricted = publish_update(session, publisher, title=f"Restricted for {name} {suffix}",
                                body=f"secret body for {name} {suffix}", topics=[topic],
                                classification=Classification.restricted,
                                audience={"organisations": [str(org.id)]})
    # Place the received update inside the daily window and build the bundle.
    session.execute(sa.update(InboxItem)
                    .where(InboxItem.chain_id == received.chain_id,
                           InboxItem.organisation_id == org.id)
                    .values(received_at=MONDAY + timedelta(hours=3)))
    session.commit()
    bundles.run_due_bundles(session, TUESDAY + timedelta(seconds=1))
    from domain.models import Bundle

    bundle_id = session.scalars(sa.select(Bundle.id)
                                .where(Bundle.subscription_id == daily.id)).one()
    delivery_ids = list(session.scalars(sa.select(Delivery.id)
                                        .where(Delivery.organisation_id == org.id)))
    assert delivery_ids, "routing created no delivery for the tenant"
    session.refresh(feed_sub)
    session.refresh(email_sub)
    return Tenant(
        name=name, org=org, keys=tenant_keys, spare_key_id=_key_id(session, spare),
        own_update_id=own.id, received_update_id=received.id,
        restricted_update_id=restricted.id, subscription_id=inbox_sub.id,
        feed_subscription_id=feed_sub.id, feed_token=feed_sub.feed_token,
        email_subscription_id=email_sub.id, email_confirm_token=email_sub.email_confirm_token,
        unsubscribe_token=email_sub.unsubscribe_token, endpoint_id=endpoint.id,
        webhook_subscription_id=webhook_sub.id, daily_subscription_id=daily.id,
        bundle_id=bundle_id, delivery_ids=delivery_ids,
        secrets=[*tenant_keys.values(), spare, whsec, feed_sub.feed_token,
                 email_sub.email_confirm_token, email_sub.unsubscribe_token],
    )


def make_world(session: Session, tenants: tuple[str, ...] = ("a", "b")) -> World:
    admin_org = create_org(session, level=Level.flemish, kind=Kind.platform)
    admin_key = create_key(session, admin_org, "admin")
    publisher = create_org(session, level=Level.flemish, kind=Kind.agency)
    publisher_key = create_key(session, publisher, "publish")
    topic = create_topic(session).slug
    built = {name: make_tenant(session, name, publisher, topic) for name in tenants}
    group = create_group_with(session, [t.org for t in built.values()])
    # A rule on a topic no update carries: it exists, and routes nothing here.
    rule = create_rule(session, filter={"topics": [create_topic(session).slug]},
                       targets={"organisations": [str(built[tenants[0]].org.id)]})
    return World(admin_org=admin_org, admin_key=admin_key, publisher=publisher,
                 publisher_key=publisher_key, topic=topic, group_id=group.id, rule_id=rule.id,
                 tenants=built)




# ------------------------------------------------------------- one world for a whole module


def module_world_fixtures(tenants: tuple[str, ...] = ("a", "b")):
    """Fixtures that build the world once per test module and roll each test back to it.

    `world_connection` holds one transaction for the module (rolled back at its end); the
    world is built in it once. The `db_session` returned here overrides conftest's: each test
    runs in a savepoint of that transaction, rolled back afterwards, so that tests stay
    independent (and `client`, `admin_key` share it as usual). Use in a test module as
    `world_connection, module_world, db_session, world = module_world_fixtures()`."""
    import pytest
    from sqlalchemy.orm import Session

    @pytest.fixture(scope="module")
    def world_connection(engine):
        connection = engine.connect()
        transaction = connection.begin()
        try:
            yield connection
        finally:
            transaction.rollback()
            connection.close()

    @pytest.fixture(scope="module")
    def module_world(world_connection):
        session = Session(bind=world_connection, join_transaction_mode="create_savepoint",
                          expire_on_commit=False)
        try:
            built = make_world(session, tenants)
            session.commit()
        finally:
            session.close()
        return built

    @pytest.fixture
    def db_session(world_connection, module_world):
        savepoint = world_connection.begin_nested()
        session = Session(bind=world_connection, join_transaction_mode="create_savepoint",
                          expire_on_commit=False)
        try:
            yield session
        finally:
            session.close()
            if savepoint.is_active:
                savepoint.rollback()

    @pytest.fixture
    def world(module_world, db_session):
        return module_world

    return world_connection, module_world, db_session, world
