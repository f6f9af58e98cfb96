"""Daily and weekly bundles by e-mail, against a real SMTP server (aiosmtpd on 127.0.0.1):
one multipart mail per bundle, with sections, item states, the subscription headers, the
subscription's language, and restricted items as notices only."""

from __future__ import annotations

import email
from datetime import UTC, datetime, timedelta
from email import policy

import pytest
import sqlalchemy as sa

from domain import bundles, events, publishing
from domain.models import (
    Bundle,
    Classification,
    Delivery,
    DeliveryStatus,
    InboxItem,
    Kind,
    Level,
    Priority,
)
from domain.settings import get_settings
from tests import smtp as smtp_fixtures
from tests.factories import (
    actor_for,
    create_email_subscription,
    create_org,
    create_topic,
    publish_update,
)
from tests.smtp import body_parts, subject, tags_of
from workers import mail as mail_worker

# The real SMTP server (module-wide) and its mailbox, emptied for each test.
smtp_server = smtp_fixtures.smtp_server
smtp = smtp_fixtures.smtp

# Windows of a daily 08:00 (Brussels, CET in winter = 07:00 UTC) subscription.
MON = datetime(2026, 11, 23, 7, tzinfo=UTC)
TUE, WED = MON + timedelta(days=1), MON + timedelta(days=2)


@pytest.fixture
def world(db_session):
    suffix = create_org(db_session).id.hex[:6]
    topics = {name: create_topic(db_session, f"{name}-{suffix}").slug
              for name in ("onderwijs", "radicalisering")}
    agency = create_org(db_session, name=f"Agentschap {suffix}", level=Level.flemish,
                        kind=Kind.agency)
    ocad = create_org(db_session, name=f"OCAD {suffix}", level=Level.federal,
                      kind=Kind.federal_body)
    city = create_org(db_session)
    return {"topics": topics, "agency": agency, "ocad": ocad, "city": city}


def daily_subscription(db_session, world, *, language=None, confirmed=True):
    """A daily 08:00 e-mail subscription that has existed since last week; its last bundle
    went out on Monday."""
    sub = create_email_subscription(db_session, world["city"], language=language,
                                    confirmed=confirmed, cadence="daily", send_at="08:00",
                                    filter={"topics": list(world["topics"].values())})
    sub.created_at = MON - timedelta(days=7)
    sub.bundled_until = MON
    db_session.commit()
    return sub


def arrive(db_session, update, at):
    """Place the update's inbox items at a moment inside a window."""
    db_session.execute(sa.update(InboxItem).where(InboxItem.chain_id == update.chain_id)
                       .values(received_at=at))
    db_session.commit()


def send(db_session, smtp) -> int:
    return mail_worker.send_due_emails(db_session, smtp_url=smtp.url)


def bundle_mails(smtp, sub):
    return [m for m in smtp.mailbox.to(sub.channel["address"])
            if subject(m).startswith("Doorstroom")]


def bundle_delivery(db_session, sub, window_end) -> Delivery:
    return db_session.scalars(
        sa.select(Delivery).join(Bundle, Bundle.id == Delivery.bundle_id)
        .where(Bundle.subscription_id == sub.id, Bundle.window_end == window_end)).one()


def test_one_multipart_mail_per_bundle_with_sections_and_states(db_session, smtp, world):
    t, agency, ocad = world["topics"], world["agency"], world["ocad"]
    publisher = actor_for(ocad, "publish")
    sub = daily_subscription(db_session, world)
    address = sub.channel["address"]

    # Monday's window: one update from each publisher.
    guideline = publish_update(db_session, agency, topics=[t["onderwijs"]],
                               title="Schoolrichtlijn", summary="Wat scholen moeten doen")
    alert = publish_update(db_session, ocad, topics=[t["radicalisering"]], title="Dreigingsbeeld")
    for update in (guideline, alert):
        arrive(db_session, update, MON + timedelta(hours=3))
    bundles.run_due_bundles(db_session, TUE + timedelta(seconds=1))
    send(db_session, smtp)
    [monday] = bundle_mails(smtp, sub)
    assert subject(monday) == "Doorstroom: dagelijkse bundel van 24 november – 2 berichten"
    assert bundle_delivery(db_session, sub, TUE).status is DeliveryStatus.succeeded

    # Tuesday's window: a correction, a withdrawal, something new and something urgent.
    corrected = publish_update(db_session, agency, topics=[t["onderwijs"]],
                               title="Schoolrichtlijn (aangepast)", supersedes=guideline.id)
    withdrawn = publishing.withdraw(db_session, publisher, alert.id)
    fresh = publish_update(db_session, agency, topics=[t["onderwijs"]], title="Nieuwe oproep")
    urgent = publish_update(db_session, ocad, topics=[t["radicalisering"]], title="Fase oranje",
                            priority=Priority.urgent)
    for update in (corrected, withdrawn, fresh, urgent):
        arrive(db_session, update, TUE + timedelta(hours=2))
    smtp.mailbox.reset()
    bundles.run_due_bundles(db_session, WED + timedelta(seconds=1))
    send(db_session, smtp)
    # The urgent update went out on its own at once as well; the bundle is one mail.
    assert "[Dringend] Fase oranje" in [subject(m) for m in smtp.mailbox.to(address)]
    [message] = bundle_mails(smtp, sub)
    assert subject(message) == "Doorstroom: dagelijkse bundel van 25 november – 4 berichten"
    text, html = body_parts(message)

    # Two sections, headed by topic, publisher and count.
    assert f"{t['onderwijs']} · {agency.name} (2)" in text
    assert f"{t['radicalisering']} · {ocad.name} (2)" in text
    # The section with something urgent in it comes first.
    assert text.index(t["radicalisering"]) < text.index(t["onderwijs"])
    assert html.count("<h2") == 2
    for heading in (t["onderwijs"], agency.name, t["radicalisering"], ocad.name):
        assert heading in html
    assert "23 november" not in text and "24 november 08:00 en 25 november 08:00" in text

    # Items link to the inbox and carry their state.
    lines = text.splitlines()

    def line_of(title: str) -> str:
        [line] = [line for line in lines if line.startswith("- ") and title in line]
        return line

    assert line_of("Schoolrichtlijn (aangepast)").endswith(
        "(gecorrigeerd sinds de vorige bundel)")
    assert line_of("Dreigingsbeeld").endswith("(ingetrokken)")
    assert line_of("Fase oranje") == "- [Dringend] Fase oranje (al verzonden)"
    assert line_of("Nieuwe oproep") == "- Nieuwe oproep"
    links = {attrs.get("href") for name, attrs in tags_of(html) if name == "a"}
    for update in (corrected, withdrawn, fresh, urgent):
        assert events.update_link(update.id) in links
        assert events.update_link(update.id) in text
    for phrase in ("gecorrigeerd sinds de vorige bundel", "ingetrokken", "al verzonden"):
        assert phrase in html

    # The same headers as an update mail.
    public = get_settings().public_url.rstrip("/")
    assert message["List-Unsubscribe"] == (
        f"<{public}/v1/email/unsubscribe/{sub.unsubscribe_token}>")
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["Content-Language"] == "nl"
    assert '<html lang="nl">' in html
    delivery = bundle_delivery(db_session, sub, WED)
    assert delivery.update_id is None and delivery.event_type == events.BUNDLE
    assert message["Message-ID"].startswith(f"<{delivery.message_id}@")
    assert delivery.status is DeliveryStatus.succeeded and delivery.attempt_count == 1
    assert sub.unsubscribe_token in text

    # Sent once: running the sender again sends nothing more.
    send(db_session, smtp)
    assert len(bundle_mails(smtp, sub)) == 1


def test_an_empty_window_sends_nothing(db_session, smtp, world):
    sub = daily_subscription(db_session, world)
    report = bundles.run_due_bundles(db_session, TUE + timedelta(seconds=1))
    assert (report.windows, report.bundles, report.deliveries) == (1, 0, 0)
    send(db_session, smtp)
    assert smtp.mailbox.to(sub.channel["address"]) == []
    assert db_session.scalars(sa.select(Delivery)
                             .where(Delivery.subscription_id == sub.id)).all() == []


def test_a_restricted_item_is_a_notice_only(db_session, smtp, world):
    t, city = world["topics"], world["city"]
    sub = daily_subscription(db_session, world, language="en")
    secret = publish_update(
        db_session, world["ocad"], topics=[t["radicalisering"]], title="Secret title XYZ",
        summary="Secret summary QRS", body="Confidential body ABC",
        priority=Priority.important, classification=Classification.restricted,
        audience={"organisations": [str(city.id)]})
    plain = publish_update(db_session, world["agency"], topics=[t["onderwijs"]],
                           title="Open call", summary="Everyone may read this")
    for update in (secret, plain):
        arrive(db_session, update, MON + timedelta(hours=4))
    bundles.run_due_bundles(db_session, TUE + timedelta(seconds=1))
    send(db_session, smtp)
    [(_, _, raw)] = smtp.mailbox.envelopes_to(sub.channel["address"])
    message = email.message_from_bytes(raw, policy=policy.default)
    assert subject(message) == "Doorstroom: daily bundle of 24 November – 2 updates"
    text, html = body_parts(message)
    for hidden in ("Secret title XYZ", "Secret summary QRS", "Confidential body ABC",
                   t["radicalisering"]):
        assert hidden not in text and hidden not in html
        assert hidden.encode() not in raw
    # The notice: its publisher, priority and a link to the inbox, nothing more.
    assert "[Important] Restricted update" in text
    assert "not in this e-mail" in text and "not in this e-mail" in html
    assert world["ocad"].name in text
    assert events.update_link(secret.id) in text and events.update_link(secret.id) in html
    # The open item shows its summary.
    assert "Open call" in text and "Everyone may read this" in text


@pytest.mark.parametrize(("language", "expected", "already_sent", "unsubscribe"), [
    ("fr", "Doorstroom : récapitulatif quotidien du 24 novembre – 2 messages", "déjà envoyé",
     "Se désabonner"),
    ("en", "Doorstroom: daily bundle of 24 November – 2 updates", "already sent",
     "Unsubscribe"),
])
def test_the_bundle_speaks_the_subscriptions_language(db_session, smtp, world, language,
                                                      expected, already_sent, unsubscribe):
    t = world["topics"]
    sub = daily_subscription(db_session, world, language=language)
    made = [publish_update(db_session, world["agency"], topics=[t["onderwijs"]], title="Een"),
            publish_update(db_session, world["ocad"], topics=[t["onderwijs"]], title="Twee",
                           priority=Priority.urgent)]
    for update in made:
        arrive(db_session, update, MON + timedelta(hours=1))
    bundles.run_due_bundles(db_session, TUE + timedelta(seconds=1))
    send(db_session, smtp)
    [message] = bundle_mails(smtp, sub)
    assert subject(message) == expected
    assert message["Content-Language"] == language
    text, html = body_parts(message)
    assert f"Twee ({already_sent})" in text and already_sent in html
    assert unsubscribe in text and f'<html lang="{language}">' in html


def test_a_bundle_for_an_unconfirmed_address_is_held(db_session, smtp, world):
    sub = daily_subscription(db_session, world, confirmed=False)
    update = publish_update(db_session, world["agency"], topics=[world["topics"]["onderwijs"]])
    arrive(db_session, update, MON + timedelta(hours=1))
    bundles.run_due_bundles(db_session, TUE + timedelta(seconds=1))
    delivery = bundle_delivery(db_session, sub, TUE)
    delivery.created_at = get_settings().now()  # built just now: within the retry horizon
    db_session.commit()
    send(db_session, smtp)
    assert bundle_mails(smtp, sub) == []
    db_session.refresh(delivery)
    assert delivery.status is DeliveryStatus.pending and delivery.attempt_count == 0
    assert "not confirmed" in (delivery.last_error or "")

    # Past the retry horizon it is given up, like any other delivery.
    delivery.created_at = get_settings().now() - timedelta(hours=73)
    delivery.next_attempt_at = get_settings().now()
    db_session.commit()
    send(db_session, smtp)
    db_session.refresh(delivery)
    assert delivery.status is DeliveryStatus.skipped
    assert delivery.last_error == "the e-mail address was never confirmed"
