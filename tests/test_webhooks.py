"""Webhook sending against a real local receiver: signatures, CloudEvents, retries, limits,
SSRF (no packet ever leaves loopback), secret rotation, ping and the Celery task."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import aiohttp
import pytest
import sqlalchemy as sa

from domain import deliveries, events, outbox, ssrf
from domain.deliveries import Outcome, WebhookSend
from domain.errors import NotFound
from domain.models import (
    Classification,
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    InboxItem,
    Kind,
    Level,
    Organisation,
    Update,
)
from domain.secrets import new_webhook_secret
from domain.settings import get_settings
from domain.ssrf import Target
from tests.factories import (
    create_org,
    create_topic,
    create_webhook_subscription,
    insert_webhook_endpoint,
    publish_update,
)
from tests.receivers import (
    OK,
    RESET,
    Behaviour,
    LoopbackOnly,
    Receiver,
    make_tls,
    slow,
    status,
)
from workers import webhooks


def no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"no real DNS in tests (asked for {host})")


class FakeDNS:
    """A resolver answering from a table; a list of answers is served one call at a time."""

    def __init__(self, table: dict[str, list[str] | list[list[str]]]) -> None:
        self.table = table
        self.calls: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        answer = self.table[host]
        if answer and isinstance(answer[0], list):  # successive answers (rebinding)
            return answer[min(len(self.calls_for(host)), len(answer)) - 1]  # type: ignore
        return answer  # type: ignore[return-value]

    def calls_for(self, host: str) -> list[str]:
        return [h for h in self.calls if h == host]


@pytest.fixture
def secret() -> str:
    return new_webhook_secret()


@pytest.fixture
def receiver(secret: str) -> Iterator[Receiver]:
    with Receiver(secrets=[secret]) as rx:
        yield rx


@pytest.fixture
def loopback() -> LoopbackOnly:
    return LoopbackOnly()


@pytest.fixture
def world(db_session, receiver, secret, loopback, monkeypatch):
    """A publisher, a subscriber with a topic, and helpers to wire endpoints and send."""
    publisher = create_org(db_session, level=Level.federal, kind=Kind.federal_body)
    subscriber = create_org(db_session)
    topic = create_topic(db_session)

    @contextlib.contextmanager
    def the_test_session():
        yield db_session  # send_due's sessions are the test's rolled-back one

    def endpoint(path: str, *, behaviour=None, **kwargs):
        if behaviour is not None:
            receiver.route(path, behaviour)
        kwargs.setdefault("secret", secret)
        url = kwargs.pop("url", None) or receiver.url(path)
        ep, _ = insert_webhook_endpoint(db_session, subscriber, url, **kwargs)
        create_webhook_subscription(db_session, subscriber, ep, filter={"topics": [topic.slug]})
        return ep

    def publish(**kwargs):
        kwargs.setdefault("topics", [topic.slug])
        kwargs.setdefault("title", f"Update {uuid.uuid4().hex[:8]}")
        return publish_update(db_session, publisher, **kwargs)

    def delivery_for(update, ep) -> Delivery:
        return db_session.scalars(sa.select(Delivery).where(
            Delivery.update_id == update.id, Delivery.endpoint_id == ep.id)).one()

    def attempts(delivery) -> list[DeliveryAttempt]:
        return list(db_session.scalars(sa.select(DeliveryAttempt).where(
            DeliveryAttempt.delivery_id == delivery.id).order_by(DeliveryAttempt.id)))

    def send(**kwargs) -> int:
        kwargs.setdefault("resolver", no_dns)
        return webhooks.send_due(session_factory=the_test_session, connector=loopback,
                                 **kwargs)

    def make_due(delivery) -> None:
        delivery.next_attempt_at = get_settings().now()
        db_session.flush()

    def configure(**updates) -> None:
        """Settings for send_due only (timeout, per-endpoint concurrency...)."""
        patched = get_settings().model_copy(update=updates)
        monkeypatch.setattr(webhooks, "get_settings", lambda: patched)

    return SimpleNamespace(publisher=publisher, subscriber=subscriber, topic=topic,
                           endpoint=endpoint, publish=publish, delivery_for=delivery_for,
                           attempts=attempts, send=send, make_due=make_due,
                           configure=configure, session=the_test_session)


def item(url: str, secrets: tuple[str, ...], *, endpoint_id: uuid.UUID | None = None,
         payload: str | None = None) -> WebhookSend:
    message_id = f"msg_{uuid.uuid4().hex}"
    payload = payload or events.ping_event("test", f"evt_{uuid.uuid4().hex}", datetime.now(UTC))
    return WebhookSend(uuid.uuid4(), message_id, endpoint_id or uuid.uuid4(), url, secrets,
                       payload, events.PING)


def send(items: list[WebhookSend], *, connector: LoopbackOnly,
         resolver=no_dns, allow_loopback: bool = True, timeout: float = 5.0,
         per_endpoint: int = 4, require_https: bool = False) -> list[Outcome]:
    return asyncio.run(webhooks.send_batch(
        items, resolver=resolver, allow_loopback=allow_loopback, require_https=require_https,
        timeout=timeout, per_endpoint=per_endpoint, connector=connector))


# ----------------------------------------------------------------------------- success


def test_a_routed_update_is_delivered_signed_as_a_cloudevent(world, receiver, loopback,
                                                             db_session):
    ep = world.endpoint("/ok")
    update = world.publish(title="Nieuwe richtlijn radicalisering", body="De **inhoud**.")
    delivery = world.delivery_for(update, ep)
    assert delivery.status is DeliveryStatus.pending

    assert world.send() >= 1

    assert delivery.status is DeliveryStatus.succeeded
    assert delivery.succeeded_at is not None and delivery.next_attempt_at is None
    (attempt,) = world.attempts(delivery)
    assert attempt.status_code == 200 and attempt.error is None
    assert attempt.latency_ms is not None and 0 <= attempt.latency_ms < 5000
    (got,) = receiver.received("/ok")
    assert got.verified and got.verify_error is None, got.verify_error
    assert got.event_error is None
    assert got.event.get_type() == events.PUBLISHED
    assert got.event.get_id() == f"{update.id}.published"
    assert got.data["update"]["title"] == "Nieuwe richtlijn radicalisering"
    assert got.data["update"]["body"] == "De **inhoud**."
    assert got.headers["webhook-id"] == delivery.message_id
    assert got.headers["content-type"] == "application/cloudevents+json"
    assert got.headers["user-agent"] == "Doorstroom-Webhooks/1"
    assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 60
    assert got.body == delivery.payload.encode()
    assert got.headers["host"] == f"127.0.0.1:{receiver.port}"
    assert [r.url.host for r in loopback.seen] == ["127.0.0.1"]
    endpoint = db_session.get(type(ep), ep.id, populate_existing=True)  # as stored
    assert endpoint.last_success_at is not None and endpoint.failing_since is None


def test_routing_wakes_only_the_sender_that_has_work(world, db_session):
    from domain import routing

    def route(update) -> tuple[str, ...]:
        update.routed_at = None  # route it again, to see what it would wake
        return routing.route_update(db_session, update.id).wake

    assert route(world.publish()) == ()  # nobody pushes yet: no sender is woken
    world.endpoint("/ok")
    # A webhook subscription only: the webhook sender, not the e-mail one.
    assert route(world.publish(route=False)) == (deliveries.SEND_TASK,)


def test_a_restricted_update_is_pushed_as_a_notice_only(world, receiver):
    ep = world.endpoint("/ok")
    update = world.publish(title="Geheime titel XYZZY", body="Geheime inhoud PLUGH",
                           summary="Geheime samenvatting", topics=[world.topic.slug],
                           classification=Classification.restricted,
                           audience={"organisations": [str(world.subscriber.id)]})
    delivery = world.delivery_for(update, ep)
    world.send()
    assert delivery.status is DeliveryStatus.succeeded
    (got,) = receiver.received("/ok")
    assert got.verified
    assert got.data["notice"] is True
    assert got.data["update"]["id"] == str(update.id)
    assert not {"title", "body", "summary"} & set(got.data["update"])
    for secret_text in (b"XYZZY", b"PLUGH", b"Geheime"):
        assert secret_text not in got.body


# ----------------------------------------------------------------------------- retries


def test_a_500_is_retried_later_under_the_same_message_id(world, receiver):
    ep = world.endpoint("/flaky", behaviour=status(500))
    update = world.publish()
    delivery = world.delivery_for(update, ep)

    before = get_settings().now()
    world.send()
    assert delivery.status is DeliveryStatus.pending
    assert delivery.attempt_count == 1 and delivery.last_status_code == 500
    assert delivery.next_attempt_at > before + timedelta(seconds=5)
    assert delivery.leased_until is None
    (first,) = world.attempts(delivery)
    assert first.status_code == 500 and "500" in first.error

    world.send()  # not due yet: nothing is sent
    assert len(receiver.received("/flaky")) == 1

    world.make_due(delivery)
    receiver.route("/flaky", OK)
    world.send()
    assert delivery.status is DeliveryStatus.succeeded
    assert [a.status_code for a in world.attempts(delivery)] == [500, 200]
    one, two = receiver.received("/flaky")
    assert one.verified and two.verified
    assert one.headers["webhook-id"] == two.headers["webhook-id"] == delivery.message_id
    assert one.body == two.body


def test_a_429_retry_after_postpones_the_next_attempt(world, receiver):
    ep = world.endpoint("/busy", behaviour=status(429, **{"Retry-After": "120"}))
    delivery = world.delivery_for(world.publish(), ep)
    before = get_settings().now()
    world.send()
    assert delivery.status is DeliveryStatus.pending
    assert delivery.last_status_code == 429
    assert delivery.next_attempt_at >= before + timedelta(seconds=120)


def test_a_receiver_that_hangs_past_the_timeout_is_retried(world, receiver):
    world.configure(webhook_timeout_seconds=0.5)
    ep = world.endpoint("/hang", behaviour=slow(5))
    delivery = world.delivery_for(world.publish(), ep)
    started = time.monotonic()
    world.send()
    assert time.monotonic() - started < 3
    assert delivery.status is DeliveryStatus.pending and delivery.next_attempt_at is not None
    (attempt,) = world.attempts(delivery)
    assert attempt.status_code is None and attempt.error.startswith("timeout")
    assert 400 <= attempt.latency_ms < 2000


def test_a_connection_reset_is_retried(world, receiver):
    ep = world.endpoint("/reset", behaviour=RESET)
    delivery = world.delivery_for(world.publish(), ep)
    world.send()
    assert len(receiver.received("/reset")) == 1
    assert delivery.status is DeliveryStatus.pending and delivery.next_attempt_at is not None
    (attempt,) = world.attempts(delivery)
    assert attempt.status_code is None
    assert attempt.error.startswith(("ConnectionClosed: ", "ClientOSError: ")), attempt.error


def test_a_400_fails_for_good(world, receiver):
    ep = world.endpoint("/bad", behaviour=Behaviour(status=400, body=b"bad envelope"))
    delivery = world.delivery_for(world.publish(), ep)
    world.send()
    assert delivery.status is DeliveryStatus.failed
    assert delivery.next_attempt_at is None and delivery.last_status_code == 400
    assert "bad envelope" in delivery.last_error
    world.send()
    assert len(receiver.received("/bad")) == 1


def test_a_410_disables_the_endpoint_and_tells_the_organisation(world, receiver, db_session):
    ep = world.endpoint("/gone", behaviour=status(410))
    delivery = world.delivery_for(world.publish(), ep)
    world.send()
    assert delivery.status is DeliveryStatus.failed and delivery.next_attempt_at is None
    assert ep.enabled is False and ep.disabled_at is not None
    assert "410" in ep.disabled_reason
    notices = db_session.execute(
        sa.select(Update.title, Organisation.kind)
        .join(InboxItem, InboxItem.update_id == Update.id)
        .join(Organisation, Organisation.id == Update.publisher_id)
        .where(InboxItem.organisation_id == world.subscriber.id)).all()
    assert ("Webhook endpoint disabled", Kind.platform) in notices

    later = world.publish()  # a disabled endpoint is not sent to
    world.send()
    assert world.delivery_for(later, ep).status is DeliveryStatus.pending
    assert len(receiver.received("/gone")) == 1


def test_a_redirect_is_not_followed(world, receiver):
    ep = world.endpoint("/moved", behaviour=status(302, Location="/elsewhere"))
    receiver.route("/elsewhere", OK)
    delivery = world.delivery_for(world.publish(), ep)
    world.send()
    assert receiver.received("/elsewhere") == []
    assert delivery.status is DeliveryStatus.failed and delivery.last_status_code == 302
    assert "not followed" in delivery.last_error


def test_retry_after_is_read_as_seconds_or_http_date():
    now = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
    assert webhooks.parse_retry_after("120", now) == 120
    assert webhooks.parse_retry_after("Mon, 02 Mar 2026 12:05:00 GMT", now) == 300
    assert webhooks.parse_retry_after("Mon, 02 Mar 2026 11:00:00 GMT", now) == 0
    assert webhooks.parse_retry_after("soon", now) is None
    assert webhooks.parse_retry_after(None, now) is None


# ----------------------------------------------------------------------------- concurrency


def test_a_slow_endpoint_does_not_hold_up_the_others(receiver, secret, loopback):
    receiver.route("/slow", slow(2))
    slow_endpoint, healthy_endpoint = uuid.uuid4(), uuid.uuid4()
    batch = ([item(receiver.url("/slow"), (secret,), endpoint_id=slow_endpoint)
              for _ in range(8)]
             + [item(receiver.url("/ok"), (secret,), endpoint_id=healthy_endpoint)
                for _ in range(8)])
    started = time.monotonic()
    outcomes = send(batch, connector=loopback, per_endpoint=4, timeout=5)
    total = time.monotonic() - started

    assert len(outcomes) == 16 and all(o.succeeded for o in outcomes)
    healthy = receiver.received("/ok")
    slowed = receiver.received("/slow")
    assert len(healthy) == 8 and len(slowed) == 8
    # The healthy endpoint was done long before the slow one's first answer...
    assert max(r.finished for r in healthy) - started < 1.0
    assert max(r.finished for r in healthy) < min(r.finished for r in slowed)
    # ...while the slow one got at most 4 requests at a time (two waves of 2 s).
    assert receiver.max_in_flight["/slow"] == 4
    assert total >= 4.0
    by_id = {o.delivery_id: o for o in outcomes}
    assert all(by_id[i.delivery_id].latency_ms < 1000 for i in batch[8:])


def test_items_that_cannot_start_within_the_budget_are_given_back(receiver, secret,
                                                                  loopback):
    receiver.route("/slow", slow(0.6))
    endpoint = uuid.uuid4()
    batch = [item(receiver.url("/slow"), (secret,), endpoint_id=endpoint) for _ in range(3)]
    outcomes = asyncio.run(webhooks.send_batch(
        batch, resolver=no_dns, allow_loopback=True, require_https=False, timeout=2,
        per_endpoint=1, connector=loopback, budget=0.3))
    assert [o.delivery_id for o in outcomes] == [batch[0].delivery_id]


def test_send_due_claims_no_more_for_an_endpoint_than_it_can_start(world, receiver):
    # One request at a time to an endpoint that takes 0.3 s: the sender claims one delivery,
    # then the next as the first ends, never a backlog that waits on the endpoint.
    world.configure(webhook_per_endpoint_concurrency=1, webhook_timeout_seconds=2)
    ep = world.endpoint("/slowish", behaviour=slow(0.3))
    sent = [world.delivery_for(world.publish(), ep) for _ in range(3)]
    assert world.send() == 3
    assert {d.status for d in sent} == {DeliveryStatus.succeeded}
    assert receiver.max_in_flight["/slowish"] == 1
    assert all(len(world.attempts(d)) == 1 for d in sent)


def test_send_due_stops_claiming_when_its_time_is_up(world, receiver):
    # One request at a time, 0.6 s each, and 1 s to run: two deliveries go out, the third is
    # never claimed (no lease, no attempt) and is left for the next sender.
    world.configure(webhook_per_endpoint_concurrency=1, webhook_timeout_seconds=2)
    ep = world.endpoint("/slowish", behaviour=slow(0.6))
    sent = [world.delivery_for(world.publish(), ep) for _ in range(3)]
    assert world.send(max_seconds=1.0) == 2
    assert sorted(d.status.value for d in sent) == ["pending", "succeeded", "succeeded"]
    (left,) = [d for d in sent if d.status is DeliveryStatus.pending]
    assert left.leased_until is None and left.attempt_count == 0
    assert world.attempts(left) == []
    assert len(receiver.received("/slowish")) == 2


def test_a_slow_endpoint_does_not_hold_up_newer_work_or_its_recording(
        world, receiver, db_session, monkeypatch):
    # The slow endpoint's request runs for its whole 2 s timeout. Meanwhile a healthy
    # delivery that becomes due later is claimed, sent and recorded: the sender streams, it
    # does not wait for its slowest request.
    world.configure(webhook_timeout_seconds=2)
    slow_ep = world.endpoint("/slow", behaviour=slow(5))
    ok_ep = world.endpoint("/ok")
    update = world.publish()
    slow_delivery, first = world.delivery_for(update, slow_ep), world.delivery_for(update, ok_ep)
    second = world.publish()
    later = world.delivery_for(second, ok_ep)
    later.next_attempt_at = get_settings().now() + timedelta(seconds=0.5)
    world.delivery_for(second, slow_ep).next_attempt_at = get_settings().now() + timedelta(
        hours=1)  # not this sender's business
    slow_delivery.next_attempt_at = first.next_attempt_at = get_settings().now()
    db_session.flush()
    recorded: dict[uuid.UUID, float] = {}
    record = webhooks._record

    def timed_record(session_factory, outcomes, unsent):
        record(session_factory, outcomes, unsent)
        recorded.update({o.delivery_id: time.monotonic() for o in outcomes})

    monkeypatch.setattr(webhooks, "_record", timed_record)
    started = time.monotonic()
    assert world.send() == 3
    assert recorded[first.id] - started < 1.0
    assert 0.5 <= recorded[later.id] - started < 1.5
    assert recorded[slow_delivery.id] - started >= 2.0
    assert first.status is later.status is DeliveryStatus.succeeded
    assert slow_delivery.status is DeliveryStatus.pending
    assert world.attempts(slow_delivery)[0].error.startswith("timeout")


def test_claims_take_at_most_the_limit_per_endpoint_and_leave_out_busy_ones(world,
                                                                            db_session):
    busy, backlog, other = (world.endpoint(f"/{n}") for n in ("busy", "backlog", "other"))
    for _ in range(5):
        world.publish()
    with world.session() as session:
        claimed = deliveries.claim_due_webhooks(session, 100, per_endpoint=2, exclude=[busy.id])
    by_endpoint: dict[uuid.UUID, int] = {}
    for send_item in claimed:
        by_endpoint[send_item.endpoint_id] = by_endpoint.get(send_item.endpoint_id, 0) + 1
    assert by_endpoint == {backlog.id: 2, other.id: 2}


# ----------------------------------------------------------------------------- SSRF

REFUSED_URLS = [
    ("{rx}/ok", {}),  # 127.0.0.1 itself, loopback not allowed
    ("http://127.1:{port}/ok", {}),
    ("http://2130706433:{port}/ok", {}),
    ("http://0x7f000001:{port}/ok", {}),
    ("http://017700000001:{port}/ok", {}),
    ("http://[::ffff:127.0.0.1]:{port}/ok", {}),
    ("http://[::1]:{port}/ok", {}),
    ("http://10.0.0.1/hook", {}),
    ("http://169.254.169.254/latest/meta-data/", {}),
    ("http://[fd00:ec2::254]/latest", {}),
    ("http://192.168.1.10:8080/hook", {}),
    ("http://internal.example/hook", {"internal.example": ["10.0.0.5"]}),
    ("http://sneaky.example:{port}/ok", {"sneaky.example": ["127.0.0.1"]}),
    ("http://mixed.example/hook", {"mixed.example": ["93.184.216.34", "10.1.2.3"]}),
]


@pytest.mark.parametrize(("template", "dns"), REFUSED_URLS)
def test_internal_targets_are_refused_at_send_time_without_a_packet(
        template, dns, receiver, secret, loopback):
    url = template.format(rx=receiver.url("").rstrip("/"), port=receiver.port)
    resolver = FakeDNS(dns)
    (outcome,) = send([item(url, (secret,))], connector=loopback, resolver=resolver,
                      allow_loopback=False)
    assert outcome.error.startswith("refused: "), outcome.error
    assert outcome.status_code is None and outcome.permanent and not outcome.retryable
    assert loopback.seen == [] and receiver.requests == []
    assert resolver.calls == list(dns)  # names were resolved through the injected resolver


@pytest.mark.parametrize(("url", "literal"), [
    ("http://127.0.0.1:8080/x", True), ("http://2130706433/x", True),
    ("http://0x7f000001/x", True), ("http://127.1/x", True), ("https://[::1]/x", True),
    ("http://[::ffff:127.0.0.1]/x", True), ("https://hooks.example/x", False),
    ("https://127.0.0.1.nip.io/x", False), ("not a url", False),
])
def test_only_urls_naming_an_address_skip_the_dns_thread(url, literal):
    assert ssrf.names_an_address(url) is literal


@pytest.mark.parametrize("url", ["http://10.0.0.1/hook", "http://169.254.169.254/",
                                 "http://internal.example/hook"])
def test_internal_targets_stay_refused_when_loopback_is_allowed(url, secret, loopback):
    (outcome,) = send([item(url, (secret,))], connector=loopback,
                      resolver=FakeDNS({"internal.example": ["10.0.0.5"]}), allow_loopback=True)
    assert outcome.error.startswith("refused: ") and not outcome.retryable
    assert loopback.seen == []


def test_http_is_refused_where_https_is_required(receiver, secret, loopback):
    (outcome,) = send([item(receiver.url("/ok"), (secret,))], connector=loopback,
                      require_https=True)
    assert outcome.error.startswith("refused: ") and "https" in outcome.error
    assert not outcome.retryable and loopback.seen == []


def test_a_name_that_does_not_resolve_is_retried(secret, loopback):
    def failing(host: str, port: int) -> list[str]:
        raise OSError("temporary failure in name resolution")

    (outcome,) = send([item("http://flaky-dns.example/hook", (secret,))], connector=loopback,
                      resolver=failing)
    assert outcome.error.startswith("dns: ") and outcome.retryable
    assert loopback.seen == []


def test_the_sender_connects_to_the_address_it_checked(receiver, secret, loopback):
    """DNS rebinding: the first answer is public, a second lookup would say 127.0.0.1. The
    sender connects to the checked (public) IP literal, which the loopback-only connector
    refuses, so the request never reaches the local receiver; the next send resolves again
    and is refused by the check itself."""
    dns = FakeDNS({"rebind.example": [["93.184.216.34"], ["127.0.0.1"]]})
    url = f"http://rebind.example:{receiver.port}/ok"
    one = item(url, (secret,))

    (first,) = send([one], connector=loopback, resolver=dns, allow_loopback=False)
    assert "LoopbackOnly refused 93.184.216.34" in first.error
    (request,) = loopback.seen
    assert request.url.host == "93.184.216.34" and request.url.port == receiver.port
    assert request.headers["host"] == f"rebind.example:{receiver.port}"
    assert loopback.refused == [request]
    assert receiver.requests == []

    (second,) = send([one], connector=loopback, resolver=dns, allow_loopback=False)
    assert second.error.startswith("refused: 127.0.0.1 is a loopback address")
    assert not second.retryable
    assert len(loopback.seen) == 1 and receiver.requests == []
    assert dns.calls == ["rebind.example", "rebind.example"]


def test_a_public_address_is_never_connected_to_in_tests(secret, loopback):
    (outcome,) = send([item("http://93.184.216.34/hook", (secret,))], connector=loopback,
                      allow_loopback=False)
    assert outcome.error == "Refused: LoopbackOnly refused 93.184.216.34"
    assert outcome.retryable and [r.url.host for r in loopback.refused] == ["93.184.216.34"]


def test_a_host_name_is_pinned_to_its_checked_address(receiver, secret, loopback):
    dns = FakeDNS({"hooks.example": ["127.0.0.1"]})
    url = f"http://hooks.example:{receiver.port}/ok"
    (outcome,) = send([item(url, (secret,))], connector=loopback, resolver=dns)
    assert outcome.succeeded
    (got,) = receiver.received("/ok")
    assert got.headers["host"] == f"hooks.example:{receiver.port}" and got.verified
    assert [r.url.host for r in loopback.seen] == ["127.0.0.1"]


def test_tls_verifies_the_host_name_not_the_address(secret):
    server_tls, client_tls = make_tls("hooks.example")
    dns = FakeDNS({"hooks.example": ["127.0.0.1"], "other.example": ["127.0.0.1"]})
    with Receiver(secrets=[secret], tls=server_tls) as rx:
        loopback = LoopbackOnly(client_tls)
        good, bad = (item(f"https://{name}:{rx.port}/ok", (secret,))
                     for name in ("hooks.example", "other.example"))
        outcomes = {o.delivery_id: o for o in send([good, bad], connector=loopback,
                                                   resolver=dns, require_https=True)}
        assert outcomes[good.delivery_id].succeeded
        assert not outcomes[bad.delivery_id].succeeded
        assert "certificate" in outcomes[bad.delivery_id].error.lower()
        (got,) = rx.received("/ok")
        assert got.headers["host"] == f"hooks.example:{rx.port}" and got.verified


def test_requests_carry_the_ip_literal_and_the_real_host():
    payload = WebhookSend(uuid.uuid4(), "msg_1", uuid.uuid4(), "https://hooks.example/x", (),
                          "{}", events.PING)
    v4 = webhooks.build_request(payload, Target("https", "hooks.example", 443, "203.0.113.7",
                                                "/x?a=1"), "v1,x", 1)
    assert v4.url == "https://203.0.113.7:443/x?a=1"
    assert v4.headers["host"] == "hooks.example"
    assert v4.server_name == "hooks.example"
    v6 = webhooks.build_request(payload, Target("https", "hooks.example", 8443, "2001:db8::7",
                                                "/"), "v1,x", 1)
    assert v6.url == "https://[2001:db8::7]:8443/"
    assert v6.headers["host"] == "hooks.example:8443"
    literal = webhooks.build_request(payload, Target("https", "2001:db8::7", 443,
                                                     "2001:db8::7", "/"), "v1,x", 1)
    assert literal.headers["host"] == "[2001:db8::7]"
    assert literal.server_name is None
    plain = webhooks.build_request(payload, Target("http", "hooks.example", 80, "203.0.113.7",
                                                   "/"), "v1,x", 1)
    assert plain.server_name is None and plain.headers["host"] == "hooks.example"


def test_each_endpoint_and_server_name_gets_a_session_of_its_own():
    made: list[int] = []

    def connector(limit: int) -> aiohttp.BaseConnector:
        made.append(limit)
        return aiohttp.TCPConnector(limit=limit)

    async def scenario() -> None:
        sessions = webhooks.EndpointSessions(3, connector)
        one, two = uuid.uuid4(), uuid.uuid4()
        a = sessions.get(one, "a.example")
        assert sessions.get(one, "a.example") is a  # same endpoint and name: same pool
        assert sessions.get(two, "a.example") is not a  # another endpoint: its own
        assert sessions.get(one, "b.example") is not a  # another name: its own
        assert sessions.get(one, None) is not a
        await sessions.aclose()
        assert a.closed

    asyncio.run(scenario())
    assert made == [3, 3, 3, 3]  # each pool as large as one endpoint's concurrency


def test_a_refused_endpoint_fails_its_delivery_for_good(world, receiver, loopback):
    ep = world.endpoint("/x", url="http://10.0.0.1/hook")
    delivery = world.delivery_for(world.publish(), ep)
    world.send()
    assert delivery.status is DeliveryStatus.failed and delivery.next_attempt_at is None
    assert delivery.last_error.startswith("refused: 10.0.0.1")
    assert loopback.seen == []


# ----------------------------------------------------------------------------- rotation


def test_two_secrets_sign_twice_and_either_verifies(secret, loopback):
    old = new_webhook_secret()
    with Receiver(secrets=[secret, old]) as rx:
        (outcome,) = send([item(rx.url("/ok"), (secret, old))], connector=loopback)
        assert outcome.succeeded
        (got,) = rx.received("/ok")
    entries = got.headers["webhook-signature"].split(" ")
    assert len(entries) == 2 and all(e.startswith("v1,") for e in entries)
    assert got.verified_with == [0, 1]  # verifies with the new secret and with the old


def test_a_rotation_grace_period_signs_with_both_secrets(world, receiver, secret):
    old = new_webhook_secret()
    receiver.secrets.append(old)
    ep = world.endpoint("/ok", previous_secret=old)
    expired = world.endpoint("/ok", previous_secret=new_webhook_secret(),
                             previous_expires_at=get_settings().now() - timedelta(seconds=1))
    update = world.publish()
    world.send()
    assert world.delivery_for(update, ep).status is DeliveryStatus.succeeded
    assert world.delivery_for(update, expired).status is DeliveryStatus.succeeded
    signatures = sorted(len(r.headers["webhook-signature"].split(" "))
                        for r in receiver.received("/ok"))
    assert signatures == [1, 2]
    assert all(0 in r.verified_with for r in receiver.received("/ok"))


# ----------------------------------------------------------------------------- ping, task


def test_ping_sends_a_signed_ping_event_and_stores_nothing(world, receiver, loopback,
                                                           db_session):
    ep = world.endpoint("/ok")
    outcome = webhooks.send_ping(ep.id, session=db_session, resolver=no_dns,
                                 connector=loopback)
    assert outcome.succeeded and outcome.latency_ms is not None
    (got,) = receiver.received("/ok")
    assert got.verified and got.event.get_type() == events.PING
    assert got.data == {"endpoint_id": str(ep.id), "message": "ping"}
    assert db_session.scalar(sa.select(sa.func.count()).select_from(Delivery)
                             .where(Delivery.endpoint_id == ep.id)) == 0

    with pytest.raises(NotFound):
        webhooks.send_ping(uuid.uuid4(), session=db_session)


def test_the_task_is_registered_and_completes_its_outbox_row(world, db_session, monkeypatch):
    from workers.celery_app import celery_app

    task = celery_app.tasks[deliveries.SEND_TASK]
    assert webhooks.send_due_task.name == task.name == "deliveries.send_due"
    assert task.run.__module__ == "workers.webhooks"
    assert task.autoretry_for == (sa.exc.OperationalError,)
    message = outbox.enqueue(db_session, deliveries.SEND_TASK, {})
    db_session.flush()
    calls = []
    monkeypatch.setattr(webhooks, "send_due", lambda: calls.append(1) or 0)
    monkeypatch.setattr(webhooks, "session_scope", world.session)
    assert task.run(outbox_id=message.id) == 0
    assert calls == [1]
    db_session.refresh(message)
    assert message.completed_at is not None


def test_outcome_retryability():
    at = datetime.now(UTC)
    did = uuid.uuid4()
    assert Outcome(did, at, 1, status_code=503).retryable
    assert Outcome(did, at, 1, status_code=429).retryable
    assert Outcome(did, at, None, error="ConnectError: x").retryable
    assert not Outcome(did, at, 1, status_code=404).retryable
    assert not Outcome(did, at, 1, status_code=302).retryable
    assert not Outcome(did, at, None, error="refused: x", permanent=True).retryable


def test_payloads_are_json_with_the_update_link(world, receiver):
    ep = world.endpoint("/ok")
    update = world.publish()
    world.send()
    body = json.loads(receiver.received("/ok")[0].body)
    assert body["specversion"] == "1.0" and body["subject"] == f"updates/{update.id}"
    assert body["data"]["update"]["url"].endswith(f"/v1/inbox/{update.id}")
    assert world.delivery_for(update, ep).status is DeliveryStatus.succeeded
