"""E-mail channel against a real SMTP server (aiosmtpd on 127.0.0.1): confirmation before the
first send, rendering (languages, sanitised Markdown, safe headers, restricted notices),
one-click unsubscribe (RFC 8058), and what 2xx, 4xx and 5xx replies do."""

from __future__ import annotations

import email
import re
from datetime import timedelta
from email import policy

import pytest
import sqlalchemy as sa

from domain import deliveries, events, mail, publishing
from domain.models import (
    AuditEntry,
    Classification,
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    Kind,
    Level,
    OutboxMessage,
    Priority,
)
from domain.settings import get_settings
from tests import smtp as smtp_fixtures
from tests.factories import (
    actor_for,
    bearer,
    create_email_subscription,
    create_key,
    create_org,
    create_topic,
    publish_update,
)
from tests.smtp import body_parts, free_port, subject, tags_of
from workers import mail as mail_worker

# The real SMTP server (module-wide) and its mailbox, emptied for each test.
smtp_server = smtp_fixtures.smtp_server
smtp = smtp_fixtures.smtp

# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def world(db_session):
    """A publisher, a municipality and a topic of their own."""
    publisher = create_org(db_session, level=Level.flemish, kind=Kind.agency,
                           name=f"Agentschap Test {create_topic(db_session).slug}")
    town = create_org(db_session)
    topic = create_topic(db_session).slug
    return publisher, town, topic


def send(session, smtp) -> int:
    return mail_worker.send_due_emails(session, smtp_url=smtp.url)


def deliveries_of(session, sub):
    return list(session.scalars(sa.select(Delivery).where(Delivery.subscription_id == sub.id)
                                .order_by(Delivery.created_at)))


def audit_actions(session, sub) -> list[str]:
    return list(session.scalars(sa.select(AuditEntry.action)
                                .where(AuditEntry.object_id == str(sub.id))
                                .order_by(AuditEntry.id)))


# ------------------------------------------------------------------- confirmation


def test_confirmation_first_then_the_update(db_session, client, smtp, world):
    publisher, town, topic = world
    sub = create_email_subscription(db_session, town, filter={"topics": [topic]})
    address = sub.channel["address"]
    assert sub.email_verified_at is None and sub.email_confirm_token and sub.unsubscribe_token
    queued = db_session.scalars(sa.select(OutboxMessage).where(
        OutboxMessage.task == mail.SEND_CONFIRMATION_TASK)).all()
    assert {"subscription_id": str(sub.id)} in [m.args for m in queued]

    # The outbox task's core: one confirmation mail with the link.
    assert mail_worker.send_confirmation(sub.id, db_session, smtp_url=smtp.url) is True
    [confirmation] = smtp.mailbox.to(address)
    assert subject(confirmation) == "Bevestig uw e-mailadres voor Doorstroom"
    text, html = body_parts(confirmation)
    link = re.search(r"https?://\S+/v1/email/confirm/([A-Za-z0-9_-]+)", text)
    assert link is not None and link.group(1) == sub.email_confirm_token
    assert link.group(0) in html

    # Before confirmation nothing else goes out: the delivery is held.
    update = publish_update(db_session, publisher, title="Nieuwe richtlijn", topics=[topic])
    [delivery] = deliveries_of(db_session, sub)
    assert delivery.status is DeliveryStatus.pending
    send(db_session, smtp)
    assert len(smtp.mailbox.to(address)) == 1
    db_session.refresh(delivery)
    assert delivery.status is DeliveryStatus.pending and delivery.attempt_count == 0
    assert delivery.next_attempt_at > get_settings().now() + timedelta(minutes=5)
    assert "not confirmed" in (delivery.last_error or "")

    # The link confirms the address (no key needed) and releases what was held.
    response = client.get(f"/v1/email/confirm/{link.group(1)}")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert "bevestigd" in response.text
    assert response.headers["referrer-policy"] == "no-referrer"
    db_session.refresh(sub)
    db_session.refresh(delivery)
    assert sub.email_verified_at is not None
    assert "subscription.email_confirmed" in audit_actions(db_session, sub)
    assert delivery.next_attempt_at <= get_settings().now()

    assert send(db_session, smtp) >= 1
    messages = smtp.mailbox.to(address)
    assert len(messages) == 2
    message = messages[1]
    assert subject(message) == "[Routine] Nieuwe richtlijn"
    text, html = body_parts(message)
    assert "Nieuwe richtlijn" in text and "Nieuwe richtlijn" in html
    assert publisher.name in text
    assert events.update_link(update.id) in text
    public = get_settings().public_url.rstrip("/")
    assert message["List-Unsubscribe"] == (
        f"<{public}/v1/email/unsubscribe/{sub.unsubscribe_token}>")
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message["Auto-Submitted"] == "auto-generated"
    db_session.refresh(delivery)
    assert message["Message-ID"].startswith(f"<{delivery.message_id}@")
    assert delivery.status is DeliveryStatus.succeeded and delivery.attempt_count == 1
    [attempt] = db_session.scalars(sa.select(DeliveryAttempt)
                                   .where(DeliveryAttempt.delivery_id == delivery.id)).all()
    assert attempt.status_code == 250

    # A second confirmation click is harmless; JSON is available too.
    again = client.get(f"/v1/email/confirm/{sub.email_confirm_token}",
                       headers={"Accept": "application/json"})
    assert again.status_code == 200
    assert again.json() == {"status": "confirmed", "subscription_id": str(sub.id)}
    assert audit_actions(db_session, sub).count("subscription.email_confirmed") == 1


def test_unknown_links_are_404_problems(client):
    for method, path in [("get", "/v1/email/confirm/" + "x" * 43),
                         ("get", "/v1/email/unsubscribe/" + "y" * 43),
                         ("post", "/v1/email/unsubscribe/" + "z" * 43),
                         ("get", "/v1/email/confirm/short")]:
        response = getattr(client, method)(path)
        assert response.status_code == 404, path
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["type"].endswith("not-found")


def test_changing_the_address_asks_for_confirmation_again(db_session, client):
    org = create_org(db_session)
    key = create_key(db_session, org, "subscribe")
    sub = create_email_subscription(db_session, org, confirmed=True)
    old_tokens = (sub.email_confirm_token, sub.unsubscribe_token)
    assert sub.email_verified_at is not None

    # Another language for the same address keeps the confirmation.
    response = client.patch(f"/v1/subscriptions/{sub.id}", headers=bearer(key), json={
        "channel": {"type": "email", "address": sub.channel["address"], "language": "fr"}})
    assert response.status_code == 200, response.text
    db_session.refresh(sub)
    assert sub.email_verified_at is not None and sub.channel["language"] == "fr"

    response = client.patch(f"/v1/subscriptions/{sub.id}", headers=bearer(key), json={
        "channel": {"type": "email", "address": "nieuw@gemeente.example"}})
    assert response.status_code == 200, response.text
    db_session.refresh(sub)
    assert sub.email_verified_at is None
    assert sub.email_confirm_token not in old_tokens and sub.unsubscribe_token not in old_tokens
    queued = db_session.scalars(sa.select(OutboxMessage.args).where(
        OutboxMessage.task == mail.SEND_CONFIRMATION_TASK)).all()
    assert sum(1 for args in queued if args == {"subscription_id": str(sub.id)}) == 2
    assert "subscription.email_verification_started" in audit_actions(db_session, sub)
    # The old confirmation link no longer works.
    assert client.get(f"/v1/email/confirm/{old_tokens[0]}").status_code == 404


def test_unconfirmed_deliveries_are_skipped_after_the_retry_horizon(db_session, smtp, world):
    publisher, town, topic = world
    sub = create_email_subscription(db_session, town, filter={"topics": [topic]})
    publish_update(db_session, publisher, topics=[topic])
    [delivery] = deliveries_of(db_session, sub)
    delivery.created_at -= deliveries.RETRY_HORIZON + timedelta(minutes=1)
    db_session.commit()
    send(db_session, smtp)
    db_session.refresh(delivery)
    assert delivery.status is DeliveryStatus.skipped
    assert delivery.last_error == "the e-mail address was never confirmed"
    assert smtp.mailbox.to(sub.channel["address"]) == []


# ------------------------------------------------------------------------- rendering


@pytest.mark.parametrize(("language", "priority_label", "phrase", "unsubscribe"), [
    (None, "Dringend", "publiceerde een nieuwe update", "Uitschrijven"),
    ("fr", "Urgent", "a publié une nouvelle mise à jour", "Se désabonner"),
    ("en", "Urgent", "published a new update", "Unsubscribe"),
])
def test_language_of_the_subscription(db_session, smtp, world, language, priority_label,
                                      phrase, unsubscribe):
    publisher, town, topic = world
    sub = create_email_subscription(db_session, town, language=language, confirmed=True,
                                    filter={"topics": [topic]})
    publish_update(db_session, publisher, title="Hittegolf: fase oranje", topics=[topic],
                   priority=Priority.urgent)
    send(db_session, smtp)
    [message] = smtp.mailbox.to(sub.channel["address"])
    assert subject(message) == f"[{priority_label}] Hittegolf: fase oranje"
    assert message["Content-Language"] == (language or "nl")
    text, html = body_parts(message)
    assert phrase in text and phrase in html
    assert unsubscribe in text
    assert f'<html lang="{language or "nl"}">' in html


def test_markdown_body_is_sanitised_and_links_kept(db_session, smtp, world):
    publisher, town, topic = world
    sub = create_email_subscription(db_session, town, confirmed=True,
                                    filter={"topics": [topic]})
    body = ("# Richtlijn\n\nLees **dit** eerst.\n\n<script>alert('xss')</script>\n\n"
            '<a href="https://evil.example" onclick="steal()">klik</a>\n\n'
            '<img src=x onerror="alert(1)">\n\n'
            "[De brochure](https://www.vlaanderen.be/brochure) en "
            "[niet dit](javascript:alert(1)).\n")
    publish_update(db_session, publisher, title="Opmaak", body=body, topics=[topic],
                   links=[{"url": "https://example.org/meer", "title": "Meer info"}])
    send(db_session, smtp)
    [message] = smtp.mailbox.to(sub.channel["address"])
    text, html = body_parts(message)
    tags = tags_of(html)
    names = [name for name, _ in tags]
    assert "script" not in names and "img" not in names
    assert "<script" not in html.lower()
    assert not [a for _, attrs in tags for a in attrs if a.startswith("on")]
    hrefs = [attrs.get("href") or "" for name, attrs in tags if name == "a"]
    assert "https://www.vlaanderen.be/brochure" in hrefs
    assert "https://example.org/meer" in hrefs
    assert not [h for h in hrefs if h.lower().startswith("javascript")]
    assert "strong" in names and "h1" in names
    # The plain part carries the Markdown source as text.
    assert "**dit**" in text and "https://example.org/meer" in text


def test_a_title_with_line_breaks_injects_no_header(db_session, smtp, world):
    publisher, town, topic = world
    sub = create_email_subscription(db_session, town, confirmed=True,
                                    filter={"topics": [topic]})
    title = "Alarm\r\nBcc: attacker@evil.example\r\nX-Injected: yes\nTo: other@evil.example"
    publish_update(db_session, publisher, title=title, topics=[topic])
    send(db_session, smtp)
    [(_, rcpts, raw)] = smtp.mailbox.envelopes_to(sub.channel["address"])
    assert rcpts == [sub.channel["address"]]
    message = email.message_from_bytes(raw, policy=policy.default)
    assert message["Bcc"] is None and message["X-Injected"] is None
    assert message.get_all("To") == [sub.channel["address"]]
    assert subject(message) == ("[Routine] Alarm Bcc: attacker@evil.example X-Injected: yes "
                                  "To: other@evil.example")
    header_block = raw.split(b"\r\n\r\n", 1)[0].replace(b"\r\n ", b" ")
    assert not re.search(rb"(?m)^(Bcc|X-Injected):", header_block)


def test_header_text_strips_control_characters():
    assert mail.header_text("a\r\nb\x00c\u2028d\te\u202ef") == "a b c d e f"
    assert len(mail.header_text("x" * 500, 100)) == 100


def test_a_restricted_update_is_a_notice_only(db_session, smtp, world):
    publisher, town, topic = world
    sub = create_email_subscription(db_session, town, confirmed=True, language="en")
    update = publish_update(
        db_session, publisher, title="Secret title XYZ", summary="Secret summary",
        body="Confidential body ABC", topics=[topic], priority=Priority.important,
        classification=Classification.restricted,
        audience={"organisations": [str(town.id)]})
    send(db_session, smtp)
    [(_, _, raw)] = smtp.mailbox.envelopes_to(sub.channel["address"])
    message = email.message_from_bytes(raw, policy=policy.default)
    text, html = body_parts(message)
    for secret in ("Secret title XYZ", "Secret summary", "Confidential body ABC"):
        assert secret not in text and secret not in html
        assert secret.encode() not in raw
        assert secret not in subject(message)
    assert subject(message) == f"[Important] New restricted update from {publisher.name}"
    assert publisher.name in text and "Important" in text
    assert events.update_link(update.id) in text and events.update_link(update.id) in html


def test_corrections_and_withdrawals_have_their_own_wording(db_session, smtp, world):
    publisher, town, topic = world
    sub = create_email_subscription(db_session, town, confirmed=True,
                                    filter={"topics": [topic]})
    first = publish_update(db_session, publisher, title="Subsidieoproep", topics=[topic])
    send(db_session, smtp)
    publish_update(db_session, publisher, title="Subsidieoproep (nieuwe datum)",
                   topics=[topic], supersedes=first.id, body="Nieuwe deadline: 1 juni.")
    send(db_session, smtp)
    latest = publishing.withdraw(db_session, actor_for(publisher, "publish"), first.id)
    assert deliveries.create_withdrawal_deliveries(db_session, latest) == 1
    db_session.commit()
    send(db_session, smtp)
    subjects = [subject(m) for m in smtp.mailbox.to(sub.channel["address"])]
    assert subjects == ["[Routine] Subsidieoproep",
                        "[Routine] Correctie: Subsidieoproep (nieuwe datum)",
                        "[Routine] Ingetrokken: Subsidieoproep (nieuwe datum)"]
    corrected, withdrawn = smtp.mailbox.to(sub.channel["address"])[1:]
    assert "gecorrigeerd" in body_parts(corrected)[0]
    assert "Nieuwe deadline" in body_parts(corrected)[0]
    withdrawn_text = body_parts(withdrawn)[0]
    assert "ingetrokken" in withdrawn_text and "Nieuwe deadline" not in withdrawn_text


# ------------------------------------------------------------------------- unsubscribe


def test_one_click_unsubscribe_suspends_that_subscription_only(db_session, client, smtp,
                                                               world):
    publisher, town, topic = world
    key = create_key(db_session, town, "subscribe")
    leaving = create_email_subscription(db_session, town, confirmed=True,
                                        filter={"topics": [topic]})
    staying = create_email_subscription(db_session, town, confirmed=True,
                                        filter={"topics": [topic]})
    path = f"/v1/email/unsubscribe/{leaving.unsubscribe_token}"
    # Already queued for both before the unsubscribe.
    publish_update(db_session, publisher, title="Eerste", topics=[topic])

    # GET (a link scanner, or the person who clicks) only shows the form.
    page = client.get(path)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert 'method="post"' in page.text and f'action="{path}"' in page.text
    assert 'name="List-Unsubscribe" value="One-Click"' in page.text
    db_session.refresh(leaving)
    assert leaving.suspended_at is None

    # The RFC 8058 one-click POST, as a mail client sends it: no login.
    response = client.post(path, content=b"List-Unsubscribe=One-Click",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200, response.text
    db_session.refresh(leaving)
    db_session.refresh(staying)
    assert leaving.suspended_at is not None
    assert leaving.suspended_reason == "unsubscribed by the recipient"
    assert staying.suspended_at is None
    assert "subscription.unsubscribed" in audit_actions(db_session, leaving)
    # Idempotent.
    assert client.post(path).status_code == 200
    assert audit_actions(db_session, leaving).count("subscription.unsubscribed") == 1

    publish_update(db_session, publisher, title="Tweede", topics=[topic])
    send(db_session, smtp)
    assert [subject(m) for m in smtp.mailbox.to(staying.channel["address"])] == [
        "[Routine] Eerste", "[Routine] Tweede"]
    assert smtp.mailbox.to(leaving.channel["address"]) == []
    [queued_before] = deliveries_of(db_session, leaving)
    assert queued_before.status is DeliveryStatus.skipped
    assert "suspended" in (queued_before.last_error or "")

    # The organisation undoes it.
    response = client.patch(f"/v1/subscriptions/{leaving.id}", headers=bearer(key),
                            json={"active": True})
    assert response.status_code == 200, response.text
    db_session.refresh(leaving)
    assert leaving.suspended_at is None and leaving.suspended_reason is None
    assert "subscription.resumed" in audit_actions(db_session, leaving)
    publish_update(db_session, publisher, title="Derde", topics=[topic])
    send(db_session, smtp)
    assert [subject(m) for m in smtp.mailbox.to(leaving.channel["address"])] == [
        "[Routine] Derde"]


def test_another_organisation_cannot_resume_a_subscription(db_session, client):
    town = create_org(db_session)
    other = create_org(db_session)
    sub = create_email_subscription(db_session, town, confirmed=True)
    client.post(f"/v1/email/unsubscribe/{sub.unsubscribe_token}")
    response = client.patch(f"/v1/subscriptions/{sub.id}",
                            headers=bearer(create_key(db_session, other, "subscribe")),
                            json={"active": True})
    assert response.status_code == 404
    db_session.refresh(sub)
    assert sub.suspended_at is not None


# ----------------------------------------------------------------------- SMTP outcomes


def test_a_permanent_refusal_fails_and_suspends(db_session, smtp, world):
    publisher, town, topic = world
    sub = create_email_subscription(db_session, town, confirmed=True,
                                    filter={"topics": [topic]})
    other = create_email_subscription(db_session, town, confirmed=True,
                                      filter={"topics": [topic]})
    smtp.mailbox.rcpt_replies[sub.channel["address"]] = "550 5.1.1 user unknown"
    publish_update(db_session, publisher, topics=[topic])
    send(db_session, smtp)
    [delivery] = deliveries_of(db_session, sub)
    assert delivery.status is DeliveryStatus.failed
    assert delivery.last_status_code == 550 and delivery.next_attempt_at is None
    [attempt] = db_session.scalars(sa.select(DeliveryAttempt)
                                   .where(DeliveryAttempt.delivery_id == delivery.id)).all()
    assert attempt.status_code == 550 and "user unknown" in attempt.error
    db_session.refresh(sub)
    assert sub.suspended_at is not None
    assert sub.suspended_reason == "address rejected: 550 5.1.1 user unknown"
    assert "subscription.suspended" in audit_actions(db_session, sub)
    # The other address of the organisation is unaffected.
    db_session.refresh(other)
    assert other.suspended_at is None
    assert len(smtp.mailbox.to(other.channel["address"])) == 1


def test_a_temporary_refusal_is_retried_later_with_the_same_message_id(db_session, smtp,
                                                                       world):
    publisher, town, topic = world
    sub = create_email_subscription(db_session, town, confirmed=True,
                                    filter={"topics": [topic]})
    address = sub.channel["address"]
    smtp.mailbox.data_replies[address] = "451 4.3.0 try later"
    publish_update(db_session, publisher, topics=[topic])
    now = get_settings().now()
    send(db_session, smtp)
    [delivery] = deliveries_of(db_session, sub)
    assert delivery.status is DeliveryStatus.pending and delivery.attempt_count == 1
    assert delivery.next_attempt_at > now and delivery.leased_until is None
    assert delivery.last_status_code == 451
    [attempt] = db_session.scalars(sa.select(DeliveryAttempt)
                                   .where(DeliveryAttempt.delivery_id == delivery.id)).all()
    assert attempt.status_code == 451
    db_session.refresh(sub)
    assert sub.suspended_at is None
    # Not due yet: nothing happens.
    send(db_session, smtp)
    db_session.refresh(delivery)
    assert delivery.attempt_count == 1

    # Time passes, the server takes mail again.
    first_try = email.message_from_bytes(smtp.mailbox.refused_data[0], policy=policy.default)
    smtp.mailbox.data_replies.clear()
    delivery.next_attempt_at = get_settings().now() - timedelta(seconds=1)
    db_session.commit()
    send(db_session, smtp)
    db_session.refresh(delivery)
    assert delivery.status is DeliveryStatus.succeeded and delivery.attempt_count == 2
    [message] = smtp.mailbox.to(address)
    assert message["Message-ID"] == first_try["Message-ID"]


def test_a_temporary_rcpt_refusal_keeps_the_delivery_pending(db_session, smtp, world):
    publisher, town, topic = world
    sub = create_email_subscription(db_session, town, confirmed=True,
                                    filter={"topics": [topic]})
    smtp.mailbox.rcpt_replies[sub.channel["address"]] = "451 4.3.0 try later"
    publish_update(db_session, publisher, topics=[topic])
    send(db_session, smtp)
    [delivery] = deliveries_of(db_session, sub)
    assert delivery.status is DeliveryStatus.pending and delivery.last_status_code == 451
    assert delivery.next_attempt_at > get_settings().now()


def test_an_unreachable_server_is_a_temporary_failure(db_session, world):
    publisher, town, topic = world
    sub = create_email_subscription(db_session, town, confirmed=True,
                                    filter={"topics": [topic]})
    publish_update(db_session, publisher, topics=[topic])
    mail_worker.send_due_emails(db_session, smtp_url=f"smtp://127.0.0.1:{free_port()}")
    [delivery] = deliveries_of(db_session, sub)
    assert delivery.status is DeliveryStatus.pending and delivery.attempt_count == 1
    assert delivery.last_status_code is None and delivery.last_error
    assert delivery.next_attempt_at > get_settings().now()


def test_a_refused_confirmation_suspends_and_a_deferred_one_is_retried(db_session, smtp):
    town = create_org(db_session)
    refused = create_email_subscription(db_session, town)
    deferred = create_email_subscription(db_session, town)
    smtp.mailbox.rcpt_replies[refused.channel["address"]] = "550 5.1.1 user unknown"
    smtp.mailbox.rcpt_replies[deferred.channel["address"]] = "451 4.3.0 try later"
    assert mail_worker.send_confirmation(refused.id, db_session, smtp_url=smtp.url) is False
    db_session.refresh(refused)
    assert refused.suspended_reason == "address rejected: 550 5.1.1 user unknown"
    with pytest.raises(mail_worker.MailSendError) as raised:
        mail_worker.send_confirmation(deferred.id, db_session, smtp_url=smtp.url)
    assert raised.value.code == 451 and not raised.value.permanent
    db_session.refresh(deferred)
    assert deferred.suspended_at is None
    # Once confirmed, no confirmation mail is owed any more.
    mail.confirm_address(db_session, deferred.email_confirm_token)
    smtp.mailbox.rcpt_replies.clear()
    assert mail_worker.send_confirmation(deferred.id, db_session, smtp_url=smtp.url) is False


def test_send_notice_email(smtp):
    mail_worker.send_notice_email("beheer@gemeente.example",
                                  "Webhook disabled\r\nBcc: x@evil.example",
                                  "Your endpoint https://hooks.example was disabled.",
                                  smtp_url=smtp.url)
    [message] = smtp.mailbox.to("beheer@gemeente.example")
    assert subject(message) == "Webhook disabled Bcc: x@evil.example"
    assert message["Bcc"] is None
    assert message.get_content_type() == "text/plain"
    assert "was disabled" in message.get_content()


def test_smtp_urls():
    config = mail_worker.SmtpConfig.parse("smtps://user%40x:p%3Ass@mail.example")
    assert (config.host, config.port, config.implicit_tls, config.starttls) == (
        "mail.example", 465, True, False)
    assert (config.username, config.password) == ("user@x", "p:ss")
    config = mail_worker.SmtpConfig.parse(
        "smtp://relay.example?starttls=true&from=Doorstroom%20%3Cnoreply%40d.example%3E")
    assert (config.port, config.starttls, config.username) == (587, True, None)
    assert config.sender == "Doorstroom <noreply@d.example>"
    assert mail_worker.SmtpConfig.parse("smtp://localhost:2525").port == 2525
    with pytest.raises(ValueError):
        mail_worker.SmtpConfig.parse("http://mail.example")


@pytest.mark.parametrize("address", ["a,b@gemeente.example", "Naam <a@gemeente.example>",
                                     "a@gemeente.example\r\nBcc: x@evil.example", "a@b"])
def test_an_address_must_be_one_plain_address(client, db_session, address):
    org = create_org(db_session)
    response = client.post("/v1/subscriptions",
                           headers=bearer(create_key(db_session, org, "subscribe")),
                           json={"filter": {}, "channel": {"type": "email", "address": address}})
    assert response.status_code == 422, response.text


def test_the_tasks_complete_their_outbox_rows(db_session, smtp):
    from domain import outbox

    sub = create_email_subscription(db_session, create_org(db_session))
    kick = outbox.enqueue(db_session, deliveries.SEND_EMAIL_TASK, {})
    db_session.commit()
    confirmation = db_session.scalars(sa.select(OutboxMessage).where(
        OutboxMessage.task == mail.SEND_CONFIRMATION_TASK,
        OutboxMessage.args["subscription_id"].as_string() == str(sub.id))).one()
    mail_worker.send_due_emails(db_session, smtp_url=smtp.url, outbox_id=kick.id)
    mail_worker.send_confirmation(sub.id, db_session, smtp_url=smtp.url,
                                  outbox_id=confirmation.id)
    db_session.refresh(kick)
    db_session.refresh(confirmation)
    assert kick.completed_at is not None and confirmation.completed_at is not None
    assert len(smtp.mailbox.to(sub.channel["address"])) == 1


# ------------------------------------------------------------------------- withdrawals


def test_only_subscriptions_that_were_sent_the_chain_are_told_of_its_withdrawal(db_session,
                                                                              world):
    publisher, town, topic = world
    subs = {status: create_email_subscription(db_session, town, confirmed=True,
                                              filter={"topics": [topic]})
            for status in ("succeeded", "pending", "failed", "skipped", "corrected")}
    first = publish_update(db_session, publisher, title="Eerste versie", topics=[topic])
    second = publish_update(db_session, publisher, title="Tweede versie", topics=[topic],
                            supersedes=first.id)
    for name, sub in subs.items():
        v1, v2 = deliveries_of(db_session, sub)
        assert (v1.update_id, v2.update_id) == (first.id, second.id)
        if name == "corrected":  # the first version failed, the correction arrived
            v1.status, v2.status = DeliveryStatus.failed, DeliveryStatus.succeeded
        else:
            v1.status = v2.status = DeliveryStatus(name)
    db_session.commit()

    latest = publishing.withdraw(db_session, actor_for(publisher, "publish"), first.id)
    assert deliveries.create_withdrawal_deliveries(db_session, latest) == 3
    db_session.commit()
    told = {name for name, sub in subs.items()
            if any(d.event_type == events.WITHDRAWN for d in deliveries_of(db_session, sub))}
    assert told == {"succeeded", "pending", "corrected"}
    # Idempotent.
    assert deliveries.create_withdrawal_deliveries(db_session, latest) == 0


# ------------------------------------------------------------------- platform notices


def _disabled_endpoint_notice(db_session, town):
    """A webhook endpoint of `town` answers 410: the outbox row of the notice mail."""
    from domain.models import WebhookEndpoint
    from tests.factories import create_webhook_subscription, insert_webhook_endpoint

    publisher = create_org(db_session, level=Level.flemish, kind=Kind.agency)
    topic = create_topic(db_session).slug
    endpoint, _ = insert_webhook_endpoint(db_session, town, "http://127.0.0.1:9/gone")
    create_webhook_subscription(db_session, town, endpoint, filter={"topics": [topic]})
    update = publish_update(db_session, publisher, topics=[topic])
    delivery = db_session.scalars(sa.select(Delivery).where(
        Delivery.update_id == update.id, Delivery.endpoint_id == endpoint.id)).one()
    deliveries.record_outcomes(db_session, [deliveries.Outcome(
        delivery.id, get_settings().now(), 12, status_code=410)])
    endpoint = db_session.get(WebhookEndpoint, endpoint.id)
    assert endpoint is not None and endpoint.enabled is False
    [row] = db_session.scalars(sa.select(OutboxMessage).where(
        OutboxMessage.task == mail.SEND_NOTICE_TASK,
        OutboxMessage.args["organisation_id"].as_string() == str(town.id))).all()
    return endpoint, row


def test_a_disabled_endpoint_is_mailed_to_the_escalation_address(db_session, smtp):
    town = create_org(db_session, email="info@gemeente.example")
    town.escalation_email = "crisis@gemeente.example"
    db_session.commit()
    endpoint, row = _disabled_endpoint_notice(db_session, town)
    assert row.task == "email.send_notice"
    assert set(row.args) == {"organisation_id", "subject", "text"}
    assert row.args["subject"] == "Doorstroom: webhook endpoint disabled"
    assert endpoint.url in row.args["text"] and "410" in row.args["text"]

    # The outbox task's core, against the real SMTP server.
    assert mail_worker.send_notice(**row.args, session=db_session, smtp_url=smtp.url,
                                   outbox_id=row.id) is True
    [message] = smtp.mailbox.to("crisis@gemeente.example")
    assert smtp.mailbox.to("info@gemeente.example") == []
    assert subject(message) == "Doorstroom: webhook endpoint disabled"
    assert message.get_content_type() == "text/plain"
    assert message["Auto-Submitted"] == "auto-generated"
    assert endpoint.url in message.get_content() and str(endpoint.id) in message.get_content()
    db_session.refresh(row)
    assert row.completed_at is not None


def test_a_notice_goes_to_the_general_address_or_nowhere(db_session, smtp):
    town = create_org(db_session, email="info@stad.example")
    _, row = _disabled_endpoint_notice(db_session, town)
    assert mail_worker.send_notice(**row.args, session=db_session, smtp_url=smtp.url,
                                   outbox_id=row.id) is True
    assert len(smtp.mailbox.to("info@stad.example")) == 1

    silent = create_org(db_session)
    _, row = _disabled_endpoint_notice(db_session, silent)
    assert mail_worker.send_notice(**row.args, session=db_session, smtp_url=smtp.url,
                                   outbox_id=row.id) is False
    db_session.refresh(row)
    assert row.completed_at is not None


def test_a_notice_is_retried_when_refused_for_now_and_dropped_when_refused_for_good(
        db_session, smtp):
    town = create_org(db_session, email="info@dorp.example")
    _, row = _disabled_endpoint_notice(db_session, town)
    smtp.mailbox.rcpt_replies["info@dorp.example"] = "451 4.3.0 try later"
    with pytest.raises(mail_worker.MailSendError):
        mail_worker.send_notice(**row.args, session=db_session, smtp_url=smtp.url,
                                outbox_id=row.id)
    db_session.refresh(row)
    assert row.completed_at is None  # left for the task's retries and the sweeper
    smtp.mailbox.rcpt_replies["info@dorp.example"] = "550 5.1.1 user unknown"
    assert mail_worker.send_notice(**row.args, session=db_session, smtp_url=smtp.url,
                                   outbox_id=row.id) is False
    db_session.refresh(row)
    assert row.completed_at is not None
    # An unreachable server is temporary too.
    with pytest.raises(OSError):
        mail_worker.send_notice(**row.args, session=db_session,
                                smtp_url=f"smtp://127.0.0.1:{free_port()}")


def test_the_notice_task_is_registered_and_retries_temporary_failures():
    from workers.celery_app import celery_app

    task = celery_app.tasks[mail.SEND_NOTICE_TASK]
    assert task.name == "email.send_notice" and task.run.__module__ == "workers.mail"
    assert OSError in task.autoretry_for and mail_worker.MailSendError in task.autoretry_for
    assert task.retry_backoff


def test_the_sender_address_setting(monkeypatch):
    settings = get_settings().model_copy(update={"mail_from": "Meldingen <meld@d.example>"})
    monkeypatch.setattr(mail_worker, "get_settings", lambda: settings)
    assert mail_worker.SmtpConfig.parse("smtp://relay.example").sender == (
        "Meldingen <meld@d.example>")
    assert mail_worker.SmtpConfig.parse("smtp://relay.example?from=x%40y.example").sender == (
        "Meldingen <meld@d.example>")
    unset = get_settings().model_copy(update={"mail_from": None})
    monkeypatch.setattr(mail_worker, "get_settings", lambda: unset)
    assert mail_worker.SmtpConfig.parse("smtp://relay.example").sender.startswith(
        "Doorstroom <noreply@")
    bad = get_settings().model_copy(update={"mail_from": "a@b.example\r\nBcc: x@evil.example"})
    monkeypatch.setattr(mail_worker, "get_settings", lambda: bad)
    with pytest.raises(ValueError):
        mail_worker.SmtpConfig.parse("smtp://relay.example")


def test_the_api_shows_a_pending_confirmation_and_an_unsubscribe(db_session, client):
    town = create_org(db_session)
    key = create_key(db_session, town, "subscribe")
    sub = create_email_subscription(db_session, town)
    path = f"/v1/subscriptions/{sub.id}"
    shown = client.get(path, headers=bearer(key)).json()
    assert (shown["email_verified_at"], shown["suspended_at"], shown["suspended_reason"]) == (
        None, None, None)
    assert shown["active"] is True and "bundled_until" in shown

    client.get(f"/v1/email/confirm/{sub.email_confirm_token}")
    assert client.get(path, headers=bearer(key)).json()["email_verified_at"] is not None
    client.post(f"/v1/email/unsubscribe/{sub.unsubscribe_token}")
    shown = client.get(path, headers=bearer(key)).json()
    assert shown["suspended_at"] is not None
    assert shown["suspended_reason"] == "unsubscribed by the recipient"
    listed = client.get("/v1/subscriptions", headers=bearer(key)).json()["items"]
    assert [s["suspended_reason"] for s in listed if s["id"] == str(sub.id)] == [
        "unsubscribed by the recipient"]
