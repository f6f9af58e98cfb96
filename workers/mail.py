"""E-mail sending: MIME assembly and SMTP (`smtplib`), around the use cases in domain/mail.py.

Both settings are read from the environment (or `.env`, see `domain/settings.py`):

`DOORSTROOM_SMTP_URL`: `smtp://[user:password@]host[:port][?starttls=true]` (port 25, or
587 with STARTTLS) or `smtps://…` (implicit TLS, port 465). Optional query parameters:
`from=` (the sender address) and `timeout=` (seconds, default 30). Without an SMTP URL
nothing is sent: e-mail deliveries stay pending (and the confirmation task stays unfinished
in the outbox) until one is configured; platform notices are dropped (they are in the inbox
too).

`DOORSTROOM_MAIL_FROM` (optional): the From of every mail, e.g.
`Doorstroom <noreply@doorstroom.example>`. Unset: the URL's `from=`, else
`Doorstroom <noreply@<public URL host>>`.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from domain import mail, outbox
from domain.db import session_scope
from domain.models import Organisation
from domain.settings import get_settings
from workers.celery_app import celery_app

log = logging.getLogger("doorstroom.mail")

RETRYABLE = (OperationalError, ConnectionError, TimeoutError)


class MailNotConfigured(RuntimeError):
    """No `DOORSTROOM_SMTP_URL`."""


class MailSendError(Exception):
    """One message was not accepted. `permanent` is a 5xx to the recipient or the message."""

    def __init__(self, code: int | None, reply: str, stage: str) -> None:
        super().__init__(f"{code or ''} {reply}".strip())
        self.code = code
        self.reply = reply
        self.stage = stage

    @property
    def permanent(self) -> bool:
        return code_is_permanent(self.code, self.stage)


def code_is_permanent(code: int | None, stage: str) -> bool:
    return code is not None and 500 <= code < 600 and stage in ("rcpt", "data")


# ------------------------------------------------------------------------------ SMTP URL


@dataclass(frozen=True)
class SmtpConfig:
    host: str
    port: int
    implicit_tls: bool
    starttls: bool
    username: str | None
    password: str | None
    sender: str
    timeout: float

    @classmethod
    def parse(cls, url: str) -> SmtpConfig:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps"):
            raise ValueError("the SMTP URL must start with smtp:// or smtps://")
        if not parts.hostname:
            raise ValueError("the SMTP URL has no host")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        implicit_tls = parts.scheme == "smtps"
        starttls = not implicit_tls and query.get("starttls", "").lower() in ("1", "true", "yes")
        port = parts.port or (465 if implicit_tls else 587 if starttls else 25)
        return cls(host=parts.hostname, port=port, implicit_tls=implicit_tls, starttls=starttls,
                   username=unquote(parts.username) if parts.username else None,
                   password=unquote(parts.password) if parts.password else None,
                   sender=checked_sender(get_settings().mail_from or query.get("from")
                                         or default_sender()),
                   timeout=float(query.get("timeout", 30)))


def default_sender() -> str:
    return str(Address("Doorstroom", "noreply", mail.mail_domain()))


def checked_sender(sender: str) -> str:
    """A configured From must be one address (with an optional display name): a
    misconfiguration fails loudly here rather than in the middle of a batch."""
    _name, address = parseaddr(sender)
    if (not address or "@" not in address or mail.header_text(sender, 998) != sender.strip()
            or "," in address):
        raise ValueError(f"not a sender address: {sender!r} (DOORSTROOM_MAIL_FROM or from=)")
    return sender.strip()


def smtp_config(smtp_url: str | None = None) -> SmtpConfig:
    url = smtp_url or get_settings().smtp_url
    if not url:
        raise MailNotConfigured("DOORSTROOM_SMTP_URL is not set")
    return SmtpConfig.parse(url)


# --------------------------------------------------------------------------------- MIME


def header_value(value: str, limit: int) -> str:
    """`mail.header_text`, and no RFC 2047 encoded word: the email package decodes an
    encoded word in a value it is given (`=?utf-8?q?a=0D=0ABcc=3A_x?=` becomes "a", CR LF,
    "Bcc: x") and, before Python 3.11.10 / 3.12.5 (gh-121650), writes the decoded CR LF out
    as is: a header injection. A space after "=" keeps such text literal."""
    return mail.header_text(value, limit).replace("=?", "= ?")


def build_message(outgoing: mail.OutgoingMail, sender: str) -> EmailMessage:
    """multipart/alternative (text, then HTML) or text alone. Every header value here is
    either fixed, an address validated at subscription time, or passed through
    `header_value`; the stdlib also refuses CR/LF in header values. An address that the
    email package cannot write (it decodes encoded words in it too) is a permanent refusal
    of that recipient (553), not an error that stops the batch."""
    message = EmailMessage()
    message["From"] = sender
    try:
        message["To"] = outgoing.to
    except ValueError as exc:
        raise MailSendError(553, f"the address cannot be written in a header: {exc}",
                            "rcpt") from exc
    message["Subject"] = header_value(outgoing.subject, 250)
    message["Date"] = format_datetime(get_settings().now())
    message["Message-ID"] = outgoing.message_id or make_msgid(domain=mail.mail_domain())
    message.set_content(outgoing.text, subtype="plain", charset="utf-8")
    if outgoing.html is not None:
        message.add_alternative(outgoing.html, subtype="html", charset="utf-8")
    # After the body: setting content replaces Content-* headers (Content-Language).
    for name, value in outgoing.headers:
        message[name] = header_value(value, 900)
    return message


# ------------------------------------------------------------------------------- sending


class SmtpSender:
    """One SMTP connection, opened on first use and reopened after a disconnect."""

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config
        self._smtp: smtplib.SMTP | None = None

    def _connect(self) -> smtplib.SMTP:
        c = self.config
        context = ssl.create_default_context()
        smtp: smtplib.SMTP
        if c.implicit_tls:
            smtp = smtplib.SMTP_SSL(c.host, c.port, timeout=c.timeout, context=context)
        else:
            smtp = smtplib.SMTP(c.host, c.port, timeout=c.timeout)
        try:
            smtp.ehlo()
            if c.starttls:
                smtp.starttls(context=context)
                smtp.ehlo()
            if c.username:
                smtp.login(c.username, c.password or "")
        except BaseException:
            smtp.close()
            raise
        return smtp

    def send(self, message: EmailMessage, recipient: str) -> tuple[int, str]:
        """Send one message to one recipient: (code, reply) when accepted, else raises
        `MailSendError` (SMTP replies) or OSError (the connection)."""
        for attempt in (1, 2):
            if self._smtp is None:
                self._smtp = self._connect()
            try:
                return self._send_once(self._smtp, message, recipient)
            except smtplib.SMTPServerDisconnected:
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _send_once(self, smtp: smtplib.SMTP, message: EmailMessage,
                   recipient: str) -> tuple[int, str]:
        sender = parseaddr(str(message["From"]))[1]
        try:
            smtp.send_message(message, from_addr=sender, to_addrs=[recipient])
        except smtplib.SMTPRecipientsRefused as exc:
            code, reply = next(iter(exc.recipients.values()))
            raise MailSendError(code, _text(reply), "rcpt") from exc
        except smtplib.SMTPSenderRefused as exc:
            raise MailSendError(exc.smtp_code, _text(exc.smtp_error), "mail") from exc
        except smtplib.SMTPDataError as exc:
            raise MailSendError(exc.smtp_code, _text(exc.smtp_error), "data") from exc
        except smtplib.SMTPAuthenticationError as exc:
            raise MailSendError(exc.smtp_code, _text(exc.smtp_error), "auth") from exc
        except smtplib.SMTPServerDisconnected:
            raise
        except smtplib.SMTPResponseException as exc:
            raise MailSendError(exc.smtp_code, _text(exc.smtp_error), "other") from exc
        # One recipient, no exception: the server accepted the message with a 2xx.
        return 250, "accepted"

    def close(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.quit()
            except (smtplib.SMTPException, OSError):
                self._smtp.close()
            self._smtp = None

    def __enter__(self) -> SmtpSender:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _text(reply: Any) -> str:
    value = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    return mail.header_text(value, 400)


@contextmanager
def _session(session: Session | None) -> Iterator[Session]:
    if session is not None:
        yield session
    else:
        with session_scope() as own:
            yield own


def send_due_emails(session: Session | None = None, *, smtp_url: str | None = None,
                    limit: int = 100, max_batches: int = 20,
                    outbox_id: int | None = None) -> int:
    """Send every due e-mail delivery, in batches of `limit`; answers how many were tried.

    `session` and `smtp_url` can be passed in (tests); otherwise a session of its own and
    the configured SMTP URL are used."""
    try:
        config = smtp_config(smtp_url)
    except MailNotConfigured:
        log.info("no SMTP URL configured: e-mail deliveries stay pending")
        with _session(session) as s:
            outbox.mark_completed(s, outbox_id)
            s.commit()
        return 0
    tried = 0
    with _session(session) as s, SmtpSender(config) as sender:
        # The kick has done its work once deliveries are claimed: they are durable rows now.
        outbox.mark_completed(s, outbox_id)
        for _ in range(max_batches):
            sends = mail.claim_due_emails(s, limit)
            if not sends:
                break
            outcomes: list[mail.MailOutcome] = []
            for send in sends:
                outcomes.append(_attempt(sender, config, send))
                if outcomes[-1].stage == "connect":
                    break  # the server is unreachable: the rest wait for the next run
            mail.record_email_outcomes(s, sends, outcomes)
            untried = [send.delivery_id for send in sends[len(outcomes):]]
            mail.release_lease(s, untried)
            tried += len(outcomes)
            if untried or len(sends) < limit:
                break
        s.commit()
    return tried


def _attempt(sender: SmtpSender, config: SmtpConfig, send: mail.EmailSend) -> mail.MailOutcome:
    now = get_settings().now()
    started = time.perf_counter()

    def outcome(code: int | None, error: str | None, stage: str) -> mail.MailOutcome:
        return mail.MailOutcome(send.delivery_id, now,
                                int((time.perf_counter() - started) * 1000), code, error, stage)

    try:
        message = build_message(send.mail, config.sender)
        code, reply = sender.send(message, send.mail.to)
        return outcome(code, None, "done")
    except MailSendError as exc:
        return outcome(exc.code, exc.reply, exc.stage)
    except (smtplib.SMTPException, OSError) as exc:
        return outcome(None, f"{type(exc).__name__}: {exc}"[:1000], "connect")


def send_mail(outgoing: mail.OutgoingMail, *, smtp_url: str | None = None) -> None:
    """Send one message on a connection of its own; raises `MailSendError`, OSError or
    `MailNotConfigured`."""
    config = smtp_config(smtp_url)
    with SmtpSender(config) as sender:
        sender.send(build_message(outgoing, config.sender), outgoing.to)


def send_notice_email(address: str, subject: str, text: str, *,
                      smtp_url: str | None = None) -> None:
    """A plain-text notice from the platform (e.g. "your webhook endpoint was disabled").
    The subject is made header-safe. Raises like `send_mail`."""
    send_mail(mail.OutgoingMail(
        to=address.strip(), subject=mail.header_text(subject, 250), text=text, html=None,
        language=mail.DEFAULT_LANGUAGE,
        headers=(("Auto-Submitted", "auto-generated"), ("X-Auto-Response-Suppress", "All"))),
        smtp_url=smtp_url)


def send_confirmation(subscription_id: uuid.UUID, session: Session | None = None, *,
                      smtp_url: str | None = None, outbox_id: int | None = None) -> bool:
    """Send the confirmation mail a subscription is owed (if it still is); answers whether a
    mail went out. A temporary failure raises (the task retries, the outbox row stays
    unfinished); a refused address suspends the subscription."""
    with _session(session) as s:
        outgoing = mail.confirmation_mail(s, subscription_id)
        if outgoing is None:
            outbox.mark_completed(s, outbox_id)
            s.commit()
            return False
        try:
            send_mail(outgoing, smtp_url=smtp_url)
        except MailSendError as exc:
            if not exc.permanent:
                raise
            log.warning("confirmation mail for subscription %s refused: %s", subscription_id,
                        exc)
            if exc.stage == "rcpt":
                mail.address_rejected(s, subscription_id, outgoing.to, exc.code, exc.reply)
            outbox.mark_completed(s, outbox_id)
            s.commit()
            return False
        outbox.mark_completed(s, outbox_id)
        s.commit()
        return True


def notice_address(session: Session, organisation_id: uuid.UUID) -> str | None:
    """Where platform notices for an organisation go: its escalation address, else its
    general one; None when it has neither (or no longer exists)."""
    organisation = session.get(Organisation, organisation_id)
    if organisation is None:
        return None
    address = (organisation.escalation_email or "").strip() or (organisation.email or "").strip()
    return address or None


def send_notice(organisation_id: uuid.UUID | str, subject: str, text: str,
                session: Session | None = None, *, smtp_url: str | None = None,
                outbox_id: int | None = None) -> bool:
    """Mail a platform notice (e.g. "webhook endpoint disabled") to the organisation;
    answers whether a mail went out. No address, no SMTP URL configured, or a permanent
    refusal: logged, and the work is done (the notice is in the organisation's inbox too).
    A temporary failure (4xx, connection) raises, so the task retries and the outbox row
    stays unfinished."""
    organisation_id = uuid.UUID(str(organisation_id))
    with _session(session) as s:
        address = notice_address(s, organisation_id)
        sent = False
        if address is None:
            log.info("organisation %s has no e-mail address: notice %r not mailed",
                     organisation_id, subject)
        else:
            try:
                send_notice_email(address, subject, text, smtp_url=smtp_url)
                sent = True
            except MailNotConfigured:
                log.info("no SMTP URL configured: notice %r to organisation %s not mailed",
                         subject, organisation_id)
            except MailSendError as exc:
                if not exc.permanent:
                    raise
                log.warning("notice %r to organisation %s refused by %s: %s", subject,
                            organisation_id, address, exc)
        outbox.mark_completed(s, outbox_id)
        s.commit()
        return sent


# -------------------------------------------------------------------------------- tasks


@celery_app.task(name="email.send_due", autoretry_for=RETRYABLE, retry_backoff=2,
                 retry_backoff_max=60, max_retries=5)
def send_due_task(outbox_id: int | None = None) -> int:
    """Send due e-mail deliveries (periodic, and kicked by routing through the outbox)."""
    return send_due_emails(outbox_id=outbox_id)


@celery_app.task(name="email.send_confirmation",
                 autoretry_for=(*RETRYABLE, OSError, smtplib.SMTPException, MailSendError,
                                MailNotConfigured),
                 retry_backoff=10, retry_backoff_max=3600, max_retries=8)
def send_confirmation_task(subscription_id: str, outbox_id: int | None = None) -> bool:
    """Send one subscription's confirmation mail. Unfinished work stays in the outbox, so
    the sweeper hands it out again after the task's own retries."""
    return send_confirmation(uuid.UUID(subscription_id), outbox_id=outbox_id)



@celery_app.task(name=mail.SEND_NOTICE_TASK,
                 autoretry_for=(*RETRYABLE, OSError, MailSendError),
                 retry_backoff=10, retry_backoff_max=3600, max_retries=8)
def send_notice_task(organisation_id: str, subject: str, text: str,
                     outbox_id: int | None = None) -> bool:
    """Mail one platform notice to an organisation (outbox task `email.send_notice`).
    Temporary failures are retried with backoff; after the task's own retries the row is
    still unfinished and the sweeper hands it out again."""
    return send_notice(organisation_id, subject, text, outbox_id=outbox_id)
