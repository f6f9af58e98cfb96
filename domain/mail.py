"""E-mail channel: address confirmation, one-click unsubscribe, and what each mail says.

This module renders subjects, text and HTML parts (Jinja2 templates in `domain/templates/`)
and holds the use cases; building the MIME message and talking SMTP live in
`workers/mail.py`, so that `domain/` imports no mail library.

Rules kept here:
- Nothing is sent to an address before it is confirmed through its link. Deliveries for an
  unconfirmed address are *held*: they stay pending and their `next_attempt_at` moves
  `HOLD_UNCONFIRMED` later each time the sender meets them (no attempt is counted).
  Confirming the address makes them due at once. A delivery still held when the retry
  horizon (`deliveries.RETRY_HORIZON`, 72 h after creation) has passed is marked skipped
  with the reason in `last_error`.
- Deliveries of a subscription that is meanwhile deleted, suspended, inactive or no longer
  on the e-mail channel are marked skipped, with the reason in `last_error`.
- Restricted updates are a notice alone: publisher, priority and a link to the
  authenticated inbox; never their title or body. In a bundle too.
- A daily or weekly bundle is one mail (`render_bundle_mail`): its sections (topic,
  publisher, count) and items, each marked when corrected since the previous bundle,
  withdrawn or already sent. Bundle deliveries are held, skipped and retried like the others.
- Untrusted text never reaches a header with CR, LF or another control character in it.
- A permanent refusal of the recipient (a 5xx reply to RCPT TO) fails the delivery and
  suspends the subscription ("address rejected: <code> <reply>"), audited. A 5xx to the
  message itself (DATA) fails that delivery only. Everything else (4xx, a 5xx to MAIL FROM,
  which is our own configuration, connection errors) is retried on the webhook schedule.
"""

from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import jinja2
import nh3
import sqlalchemy as sa
from markdown_it import MarkdownIt
from markupsafe import Markup
from sqlalchemy.orm import Session

from domain import audit, events, outbox
from domain.bundles import bundle_contents
from domain.db import rowcount
from domain.deliveries import LEASE, RETRY_HORIZON, SEND_EMAIL_TASK, next_retry_at
from domain.errors import NotFound
from domain.models import (
    Bundle,
    ChannelType,
    Classification,
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    Organisation,
    Subscription,
    Update,
)
from domain.settings import get_settings

SEND_CONFIRMATION_TASK = "email.send_confirmation"
#: A plain notice from the platform to an organisation's escalation (or general) address;
#: args {"organisation_id", "subject", "text"} (`workers/mail.py`).
SEND_NOTICE_TASK = "email.send_notice"
LANGUAGES = ("nl", "fr", "en")
DEFAULT_LANGUAGE = "nl"
#: How much later a delivery for an unconfirmed address is looked at again. Confirming the
#: address releases held deliveries at once, so this only bounds the re-scan rate.
HOLD_UNCONFIRMED = timedelta(minutes=30)
UNSUBSCRIBED_REASON = "unsubscribed by the recipient"
REJECTED_PREFIX = "address rejected: "
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


# ---------------------------------------------------------------------------- wording

_STRINGS: dict[str, dict[str, str]] = {
    "nl": {
        "routine": "Routine", "important": "Belangrijk", "urgent": "Dringend",
        "subject.published": "[{priority}] {title}",
        "subject.corrected": "[{priority}] Correctie: {title}",
        "subject.withdrawn": "[{priority}] Ingetrokken: {title}",
        "subject.restricted.published":
            "[{priority}] Nieuwe update met beperkte toegang van {publisher}",
        "subject.restricted.corrected":
            "[{priority}] Gecorrigeerde update met beperkte toegang van {publisher}",
        "subject.restricted.withdrawn":
            "[{priority}] Update met beperkte toegang ingetrokken door {publisher}",
        "intro.published": "{publisher} publiceerde een nieuwe update.",
        "intro.corrected": "{publisher} heeft een update gecorrigeerd. Dit is de nieuwe "
                           "versie; ze vervangt de vorige.",
        "intro.withdrawn": "{publisher} heeft deze update ingetrokken: ze is niet langer van "
                           "toepassing.",
        "restricted": "Deze update heeft beperkte toegang. De inhoud staat niet in deze "
                      "e-mail: lees ze in de inbox van uw organisatie (aangemeld).",
        "label.publisher": "Afzender", "label.priority": "Prioriteit",
        "label.links": "Links", "read": "Bekijken in de inbox",
        "footer": "U ontvangt deze e-mail omdat uw organisatie op Doorstroom een "
                  "e-mailabonnement heeft voor {address}.",
        "unsubscribe": "Uitschrijven van dit abonnement",
        "confirm.subject": "Bevestig uw e-mailadres voor Doorstroom",
        "confirm.intro": "{organisation} wil updates van Doorstroom ontvangen op {address}.",
        "confirm.action": "Bevestig dit adres via deze link:",
        "confirm.button": "E-mailadres bevestigen",
        "confirm.ignore": "Vroeg u dit niet aan? Negeer dan deze e-mail: zolang het adres "
                          "niet bevestigd is, wordt er niets naartoe gestuurd.",
        "page.confirmed.title": "E-mailadres bevestigd",
        "page.confirmed.text": "{address} ontvangt voortaan updates van Doorstroom voor "
                               "{organisation}.",
        "page.unsubscribe.title": "Uitschrijven",
        "page.unsubscribe.text": "Wilt u via dit abonnement geen updates van Doorstroom meer "
                                 "ontvangen op {address}? Andere abonnementen van "
                                 "{organisation} blijven werken.",
        "page.unsubscribe.button": "Uitschrijven",
        "page.unsubscribed.title": "Uitgeschreven",
        "page.unsubscribed.text": "{address} ontvangt via dit abonnement geen updates meer. "
                                  "{organisation} kan het abonnement opnieuw activeren.",
        "bundle.daily": "dagelijkse bundel", "bundle.weekly": "wekelijkse bundel",
        "bundle.subject": "Doorstroom: {bundle} van {date} – {count}",
        "bundle.count.one": "1 bericht", "bundle.count.many": "{count} berichten",
        "bundle.intro": "Uw {bundle} van Doorstroom: {count}, ontvangen tussen {start} en "
                        "{end}.",
        "bundle.state.corrected": "gecorrigeerd sinds de vorige bundel",
        "bundle.state.withdrawn": "ingetrokken",
        "bundle.state.already_sent": "al verzonden",
        "bundle.no_topic": "Zonder thema",
        "bundle.restricted.title": "Update met beperkte toegang",
        "bundle.restricted": "De inhoud staat niet in deze e-mail: lees ze in de inbox van uw "
                             "organisatie (aangemeld).",
    },
    "fr": {
        "routine": "Routine", "important": "Important", "urgent": "Urgent",
        "subject.published": "[{priority}] {title}",
        "subject.corrected": "[{priority}] Correction : {title}",
        "subject.withdrawn": "[{priority}] Retirée : {title}",
        "subject.restricted.published":
            "[{priority}] Nouvelle mise à jour à accès restreint de {publisher}",
        "subject.restricted.corrected":
            "[{priority}] Mise à jour à accès restreint corrigée par {publisher}",
        "subject.restricted.withdrawn":
            "[{priority}] Mise à jour à accès restreint retirée par {publisher}",
        "intro.published": "{publisher} a publié une nouvelle mise à jour.",
        "intro.corrected": "{publisher} a corrigé une mise à jour. Voici la nouvelle version, "
                           "qui remplace la précédente.",
        "intro.withdrawn": "{publisher} a retiré cette mise à jour : elle n'est plus "
                           "d'application.",
        "restricted": "Cette mise à jour est à accès restreint. Son contenu ne figure pas dans "
                      "ce courriel : consultez-le dans la boîte de réception de votre "
                      "organisation (après authentification).",
        "label.publisher": "Émetteur", "label.priority": "Priorité",
        "label.links": "Liens", "read": "Voir dans la boîte de réception",
        "footer": "Vous recevez ce courriel parce que votre organisation a un abonnement par "
                  "courriel sur Doorstroom pour {address}.",
        "unsubscribe": "Se désabonner de cet abonnement",
        "confirm.subject": "Confirmez votre adresse électronique pour Doorstroom",
        "confirm.intro": "{organisation} souhaite recevoir les mises à jour de Doorstroom à "
                         "l'adresse {address}.",
        "confirm.action": "Confirmez cette adresse par ce lien :",
        "confirm.button": "Confirmer l'adresse",
        "confirm.ignore": "Vous n'avez rien demandé ? Ignorez ce courriel : rien ne sera "
                          "envoyé à cette adresse tant qu'elle n'est pas confirmée.",
        "page.confirmed.title": "Adresse confirmée",
        "page.confirmed.text": "{address} recevra désormais les mises à jour de Doorstroom "
                               "pour {organisation}.",
        "page.unsubscribe.title": "Se désabonner",
        "page.unsubscribe.text": "Vous ne souhaitez plus recevoir de mises à jour de "
                                 "Doorstroom à l'adresse {address} via cet abonnement ? Les "
                                 "autres abonnements de {organisation} restent actifs.",
        "page.unsubscribe.button": "Se désabonner",
        "page.unsubscribed.title": "Désabonné",
        "page.unsubscribed.text": "{address} ne recevra plus de mises à jour via cet "
                                  "abonnement. {organisation} peut le réactiver.",
        "bundle.daily": "récapitulatif quotidien", "bundle.weekly": "récapitulatif hebdomadaire",
        "bundle.subject": "Doorstroom : {bundle} du {date} – {count}",
        "bundle.count.one": "1 message", "bundle.count.many": "{count} messages",
        "bundle.intro": "Votre {bundle} de Doorstroom : {count}, reçus entre le {start} et le "
                        "{end}.",
        "bundle.state.corrected": "corrigé depuis le récapitulatif précédent",
        "bundle.state.withdrawn": "retiré",
        "bundle.state.already_sent": "déjà envoyé",
        "bundle.no_topic": "Sans thème",
        "bundle.restricted.title": "Mise à jour à accès restreint",
        "bundle.restricted": "Son contenu ne figure pas dans ce courriel : consultez-le dans la "
                             "boîte de réception de votre organisation (après "
                             "authentification).",
    },
    "en": {
        "routine": "Routine", "important": "Important", "urgent": "Urgent",
        "subject.published": "[{priority}] {title}",
        "subject.corrected": "[{priority}] Correction: {title}",
        "subject.withdrawn": "[{priority}] Withdrawn: {title}",
        "subject.restricted.published": "[{priority}] New restricted update from {publisher}",
        "subject.restricted.corrected":
            "[{priority}] Restricted update corrected by {publisher}",
        "subject.restricted.withdrawn":
            "[{priority}] Restricted update withdrawn by {publisher}",
        "intro.published": "{publisher} published a new update.",
        "intro.corrected": "{publisher} corrected an update. This is the new version; it "
                           "replaces the previous one.",
        "intro.withdrawn": "{publisher} withdrew this update: it no longer applies.",
        "restricted": "This update is restricted. Its content is not in this e-mail: read it "
                      "in your organisation's inbox (signed in).",
        "label.publisher": "Publisher", "label.priority": "Priority",
        "label.links": "Links", "read": "View in the inbox",
        "footer": "You receive this e-mail because your organisation has an e-mail "
                  "subscription on Doorstroom for {address}.",
        "unsubscribe": "Unsubscribe from this subscription",
        "confirm.subject": "Confirm your e-mail address for Doorstroom",
        "confirm.intro": "{organisation} wants to receive Doorstroom updates at {address}.",
        "confirm.action": "Confirm this address with this link:",
        "confirm.button": "Confirm the address",
        "confirm.ignore": "Did you not ask for this? Then ignore this e-mail: nothing is sent "
                          "to the address until it is confirmed.",
        "page.confirmed.title": "E-mail address confirmed",
        "page.confirmed.text": "{address} now receives Doorstroom updates for {organisation}.",
        "page.unsubscribe.title": "Unsubscribe",
        "page.unsubscribe.text": "Stop receiving Doorstroom updates at {address} through this "
                                 "subscription? Other subscriptions of {organisation} keep "
                                 "working.",
        "page.unsubscribe.button": "Unsubscribe",
        "page.unsubscribed.title": "Unsubscribed",
        "page.unsubscribed.text": "{address} no longer receives updates through this "
                                  "subscription. {organisation} can reactivate it.",
        "bundle.daily": "daily bundle", "bundle.weekly": "weekly bundle",
        "bundle.subject": "Doorstroom: {bundle} of {date} – {count}",
        "bundle.count.one": "1 update", "bundle.count.many": "{count} updates",
        "bundle.intro": "Your Doorstroom {bundle}: {count}, received between {start} and "
                        "{end}.",
        "bundle.state.corrected": "corrected since the previous bundle",
        "bundle.state.withdrawn": "withdrawn",
        "bundle.state.already_sent": "already sent",
        "bundle.no_topic": "No topic",
        "bundle.restricted.title": "Restricted update",
        "bundle.restricted": "Its content is not in this e-mail: read it in your "
                             "organisation's inbox (signed in).",
    },
}

_MONTHS: dict[str, tuple[str, ...]] = {
    "nl": ("januari", "februari", "maart", "april", "mei", "juni", "juli", "augustus",
           "september", "oktober", "november", "december"),
    "fr": ("janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août",
           "septembre", "octobre", "novembre", "décembre"),
    "en": ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"),
}


def language_of(subscription: Subscription | None) -> str:
    language = (subscription.channel or {}).get("language") if subscription else None
    return language if language in LANGUAGES else DEFAULT_LANGUAGE


def strings(language: str) -> dict[str, str]:
    return _STRINGS.get(language, _STRINGS[DEFAULT_LANGUAGE])


# ----------------------------------------------------------------------- safe rendering

#: C0/C1 controls (CR and LF among them), line/paragraph separators and bidi overrides.
_UNSAFE_IN_HEADER = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def header_text(value: str, limit: int = 200) -> str:
    """Untrusted text made safe for a header: control characters (CR and LF included)
    become spaces, runs of whitespace one space, and the result is capped."""
    cleaned = " ".join(_UNSAFE_IN_HEADER.sub(" ", value or "").split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1].rstrip() + "…"


_MARKDOWN = (MarkdownIt("commonmark", {"html": False, "breaks": True})
             .enable(["table", "strikethrough"]))
_ALLOWED_TAGS = {"a", "p", "br", "hr", "strong", "em", "b", "i", "s", "del", "code", "pre",
                 "blockquote", "ul", "ol", "li", "h1", "h2", "h3", "h4", "h5", "h6",
                 "table", "thead", "tbody", "tr", "th", "td"}
_ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}}


def markdown_to_html(text: str) -> str:
    """Publisher Markdown as safe HTML: raw HTML in the source is not interpreted (it shows
    as text), and the result passes an allow-list sanitiser (no scripts, no event handler
    attributes, no `javascript:` links; http, https and mailto links kept)."""
    rendered = _MARKDOWN.render(text or "")
    return nh3.clean(rendered, tags=_ALLOWED_TAGS, attributes=_ALLOWED_ATTRIBUTES,
                     url_schemes={"http", "https", "mailto"}, link_rel="noopener noreferrer",
                     strip_comments=True)


@lru_cache
def _templates() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).resolve().parent / "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",),
                                            default_for_string=False),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True)


def render_template(name: str, **context: Any) -> str:
    return _templates().get_template(name).render(**context)


def _public(path: str) -> str:
    return get_settings().public_url.rstrip("/") + path


def confirm_url(token: str) -> str:
    return _public(f"/v1/email/confirm/{token}")


def unsubscribe_url(token: str) -> str:
    return _public(f"/v1/email/unsubscribe/{token}")


def mail_domain() -> str:
    """The domain part of generated Message-IDs (the public URL's host)."""
    host = urlsplit(get_settings().public_url).hostname or "localhost"
    return host if re.search(r"[a-z]", host) and "." in host else "doorstroom.localhost"


# ------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class OutgoingMail:
    """One rendered message; `workers/mail.py` turns it into MIME and sends it."""

    to: str
    subject: str
    text: str
    html: str | None
    language: str
    #: `<…@…>`; stable across retries for deliveries.
    message_id: str | None = None
    #: Extra headers (List-Unsubscribe, …): fixed names, values built from safe parts only.
    headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def _kind(event_type: str) -> str:
    if event_type == events.WITHDRAWN:
        return "withdrawn"
    if event_type == events.CORRECTED:
        return "corrected"
    return "published"


def render_update_mail(update: Update, publisher: Organisation, event_type: str,
                       address: str, language: str, unsubscribe_token: str | None,
                       message_id: str | None = None) -> OutgoingMail:
    """The mail for one update event to one subscription."""
    t = strings(language)
    kind = _kind(event_type)
    restricted = update.classification is Classification.restricted
    priority = t[update.priority.value]
    publisher_name = header_text(publisher.name, 150)
    if restricted:
        subject = t[f"subject.restricted.{kind}"].format(priority=priority,
                                                         publisher=publisher_name)
    else:
        subject = t[f"subject.{kind}"].format(priority=priority,
                                              title=header_text(update.title, 180))
    context: dict[str, Any] = {
        "t": t, "language": language, "kind": kind, "restricted": restricted,
        "priority": priority,
        "urgent": update.priority.value == "urgent",
        "publisher": publisher.name, "intro": t[f"intro.{kind}"].format(publisher=publisher.name),
        "link": events.update_link(update.id), "address": address,
        "footer": t["footer"].format(address=address),
        "unsubscribe_url": unsubscribe_url(unsubscribe_token) if unsubscribe_token else None,
        "title": None, "summary": "", "body": "", "body_html": Markup(""), "links": [],
    }
    if not restricted:
        context.update(
            title=update.title, summary=update.summary or "",
            body="" if kind == "withdrawn" else (update.body or ""),
            body_html=Markup("" if kind == "withdrawn" else markdown_to_html(update.body)),
            links=[] if kind == "withdrawn" else [
                {"url": link.get("url", ""), "title": link.get("title") or link.get("url", "")}
                for link in (update.links or []) if _safe_link(link.get("url"))],
        )
    return OutgoingMail(
        to=address, subject=header_text(subject, 250),
        text=render_template("email/update.txt", **context),
        html=render_template("email/update.html", **context), language=language,
        message_id=_message_id(message_id), headers=_subscription_headers(language,
                                                                          unsubscribe_token))


def _subscription_headers(language: str,
                          unsubscribe_token: str | None) -> tuple[tuple[str, str], ...]:
    """The headers of every mail a subscription sends (updates and bundles): automated,
    its language, and the one-click unsubscribe link (RFC 2369, RFC 8058)."""
    headers: list[tuple[str, str]] = [("Auto-Submitted", "auto-generated"),
                                      ("X-Auto-Response-Suppress", "All"),
                                      ("Content-Language", language)]
    if unsubscribe_token:
        headers += [("List-Unsubscribe", f"<{unsubscribe_url(unsubscribe_token)}>"),
                    ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")]
    return tuple(headers)


def _message_id(message_id: str | None) -> str | None:
    return f"<{message_id}@{mail_domain()}>" if message_id else None


def _safe_link(url: Any) -> bool:
    return isinstance(url, str) and url.lower().startswith(("https://", "http://"))


def _local(value: str | datetime) -> datetime:
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.astimezone(ZoneInfo(get_settings().timezone))


def format_date(moment: datetime, language: str) -> str:
    """"24 november", "1er décembre", "24 November" (the platform's time zone)."""
    day = "1er" if language == "fr" and moment.day == 1 else str(moment.day)
    months = _MONTHS.get(language, _MONTHS[DEFAULT_LANGUAGE])
    return f"{day} {months[moment.month - 1]}"


def _format_moment(moment: datetime, language: str) -> str:
    return f"{format_date(moment, language)} {moment:%H:%M}"


def render_bundle_mail(content: dict[str, Any], address: str, language: str,
                       unsubscribe_token: str | None,
                       message_id: str | None = None) -> OutgoingMail:
    """One digest mail for one bundle (`domain.bundles.bundle_contents`): its sections (topic,
    publisher, count) and items, each linked to the inbox and marked when it was corrected
    since the previous bundle, withdrawn or already sent. Restricted items are a notice
    alone: never their title or summary."""
    t = strings(language)
    count = int(content.get("count") or 0)
    counted = (t["bundle.count.one"] if count == 1
               else t["bundle.count.many"].format(count=count))
    cadence = content.get("cadence") if content.get("cadence") in ("daily", "weekly") else "daily"
    bundle_name = t[f"bundle.{cadence}"]
    start = _local(content["window"]["start"])
    end = _local(content["window"]["end"])
    subject = t["bundle.subject"].format(bundle=bundle_name, date=format_date(end, language),
                                         count=counted)
    sections = []
    for section in content.get("sections") or []:
        items = []
        for item in section.get("items") or []:
            notice = bool(item.get("notice")) or item.get("classification") == "restricted"
            state = item.get("state")
            url = item.get("url") if _safe_link(item.get("url")) else None
            items.append({
                "notice": notice,
                "title": (t["bundle.restricted.title"] if notice
                          else header_text(item.get("title") or "", 500)),
                "summary": None if notice else (item.get("summary") or None),
                "url": url,
                "state": t.get(f"bundle.state.{state}") if state else None,
                "priority": (t[item["priority"]]
                             if item.get("priority") in ("important", "urgent") else None),
                "urgent": item.get("priority") == "urgent",
            })
        heading = section.get("topic_name") or section.get("topic") or t["bundle.no_topic"]
        sections.append({"heading": header_text(heading, 300),
                         "publisher": header_text(section.get("publisher") or "", 300),
                         "count": section.get("count", len(items)), "items": items})
    context: dict[str, Any] = {
        "t": t, "language": language, "subject": subject, "sections": sections,
        "intro": t["bundle.intro"].format(bundle=bundle_name, count=counted,
                                          start=_format_moment(start, language),
                                          end=_format_moment(end, language)),
        "footer": t["footer"].format(address=address),
        "unsubscribe_url": unsubscribe_url(unsubscribe_token) if unsubscribe_token else None,
    }
    return OutgoingMail(
        to=address, subject=header_text(subject, 250),
        text=render_template("email/bundle.txt", **context),
        html=render_template("email/bundle.html", **context), language=language,
        message_id=_message_id(message_id),
        headers=_subscription_headers(language, unsubscribe_token))


def render_confirmation_mail(subscription: Subscription,
                             organisation: Organisation) -> OutgoingMail:
    language = language_of(subscription)
    t = strings(language)
    address = subscription.channel["address"]
    assert subscription.email_confirm_token
    context = {"t": t, "language": language, "address": address,
               "url": confirm_url(subscription.email_confirm_token),
               "intro": t["confirm.intro"].format(organisation=organisation.name,
                                                  address=address)}
    return OutgoingMail(
        to=address, subject=t["confirm.subject"],
        text=render_template("email/confirmation.txt", **context),
        html=render_template("email/confirmation.html", **context), language=language,
        headers=(("Auto-Submitted", "auto-generated"), ("X-Auto-Response-Suppress", "All"),
                 ("Content-Language", language)))


def render_page(page: str, subscription: Subscription, organisation: Organisation | None,
                **extra: Any) -> str:
    """A small HTML page for the confirm and unsubscribe links
    (`page` is confirmed, unsubscribe or unsubscribed)."""
    language = language_of(subscription)
    t = strings(language)
    values = {"address": subscription.channel.get("address", ""),
              "organisation": organisation.name if organisation else "Doorstroom"}
    return render_template("email/page.html", language=language, page=page,
                           title=t[f"page.{page}.title"],
                           text=t[f"page.{page}.text"].format(**values),
                           button=t.get(f"page.{page}.button"), **extra)


# ------------------------------------------------------------ verification (use cases)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def start_email_verification(session: Session, subscription: Subscription) -> str | None:
    """A new or changed address: fresh tokens, unconfirmed, and a confirmation mail queued
    (in the caller's transaction; the subscription must have an id). A suspension caused by
    the previous address (rejected, or unsubscribed from it) no longer applies: answers its
    reason when one was lifted, for the caller's audit entry."""
    assert subscription.id is not None
    subscription.email_confirm_token = new_token()
    subscription.unsubscribe_token = new_token()
    subscription.email_verified_at = None
    lifted = None
    if subscription.suspended_reason and (
            subscription.suspended_reason == UNSUBSCRIBED_REASON
            or subscription.suspended_reason.startswith(REJECTED_PREFIX)):
        lifted = subscription.suspended_reason
        subscription.suspended_at = None
        subscription.suspended_reason = None
    outbox.enqueue(session, SEND_CONFIRMATION_TASK, {"subscription_id": str(subscription.id)})
    return lifted


def clear_email_state(subscription: Subscription) -> None:
    """The subscription left the e-mail channel."""
    subscription.email_confirm_token = None
    subscription.unsubscribe_token = None
    subscription.email_verified_at = None


def _by_token(session: Session, column: Any, token: str) -> Subscription:
    if not _TOKEN.match(token or ""):
        raise NotFound("unknown or expired link")
    sub = session.scalars(sa.select(Subscription).where(
        column == token, Subscription.channel_type == ChannelType.email)).first()
    if sub is None:
        raise NotFound("unknown or expired link")
    return sub


def _recipient(sub: Subscription) -> audit.Actor:
    """Whoever follows a link sent to the subscription's address acts for its organisation,
    without a key."""
    return audit.Actor(sub.organisation_id, None, frozenset())


def confirm_address(session: Session, token: str) -> Subscription:
    """The confirmation link: the address is verified (idempotent) and deliveries held for
    it become due now."""
    sub = _by_token(session, Subscription.email_confirm_token, token)
    if sub.email_verified_at is None:
        now = get_settings().now()
        sub.email_verified_at = now
        audit.record(session, _recipient(sub), "subscription.email_confirmed", "subscription",
                     sub.id, address=sub.channel.get("address"))
        result: Any = session.execute(
            sa.update(Delivery)
            .where(Delivery.subscription_id == sub.id, Delivery.channel == ChannelType.email,
                   Delivery.status == DeliveryStatus.pending)
            .values(next_attempt_at=now, last_error=None))
        released = rowcount(result)
        if released:
            outbox.enqueue(session, SEND_EMAIL_TASK, {})
        session.commit()
    return sub


def subscription_for_unsubscribe(session: Session, token: str) -> Subscription:
    return _by_token(session, Subscription.unsubscribe_token, token)


def unsubscribe(session: Session, token: str) -> Subscription:
    """One-click unsubscribe (RFC 8058): suspends this subscription only (idempotent)."""
    sub = _by_token(session, Subscription.unsubscribe_token, token)
    if sub.suspended_at is None:
        sub.suspended_at = get_settings().now()
        sub.suspended_reason = UNSUBSCRIBED_REASON
        audit.record(session, _recipient(sub), "subscription.unsubscribed", "subscription",
                     sub.id, address=sub.channel.get("address"), via="one-click link")
        session.commit()
    return sub


def organisation_of(session: Session, sub: Subscription) -> Organisation | None:
    return session.get(Organisation, sub.organisation_id)


# ----------------------------------------------------------------- confirmation mail


def confirmation_mail(session: Session, subscription_id: uuid.UUID) -> OutgoingMail | None:
    """The confirmation mail still owed to this subscription, or None (deleted, no longer
    e-mail, already confirmed, suspended)."""
    sub = session.get(Subscription, subscription_id)
    if (sub is None or sub.channel_type is not ChannelType.email
            or sub.email_verified_at is not None or not sub.email_confirm_token
            or sub.suspended_at is not None):
        return None
    organisation = session.get(Organisation, sub.organisation_id)
    assert organisation is not None
    return render_confirmation_mail(sub, organisation)


def address_rejected(session: Session, subscription_id: uuid.UUID, address: str,
                     code: int | None, reply: str) -> None:
    """The receiving server refused the address for good: suspend the subscription (in the
    caller's transaction), audited. Only if the address is still the one refused."""
    sub = session.get(Subscription, subscription_id)
    if (sub is None or sub.channel_type is not ChannelType.email
            or (sub.channel or {}).get("address") != address or sub.suspended_at is not None):
        return
    reason = header_text(f"{REJECTED_PREFIX}{code or ''} {reply}", 500)
    sub.suspended_at = get_settings().now()
    sub.suspended_reason = reason
    audit.record(session, audit.SYSTEM, "subscription.suspended", "subscription", sub.id,
                 reason=reason, address=address)


# ---------------------------------------------------------------------- delivery sending


@dataclass(frozen=True)
class EmailSend:
    delivery_id: uuid.UUID
    subscription_id: uuid.UUID
    mail: OutgoingMail


@dataclass(frozen=True)
class MailOutcome:
    """The result of one SMTP attempt.

    `stage` is where the server answered: `connect`, `mail` (MAIL FROM), `rcpt`, `data`,
    or `done` for an accepted message."""

    delivery_id: uuid.UUID
    at: datetime
    latency_ms: int | None
    status_code: int | None
    error: str | None = None
    stage: str = "done"

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def permanent(self) -> bool:
        """A 5xx to the recipient or to the message; a 5xx to MAIL FROM is our own
        configuration and is retried."""
        return (self.status_code is not None and 500 <= self.status_code < 600
                and self.stage in ("rcpt", "data"))

    @property
    def address_rejected(self) -> bool:
        return self.permanent and self.stage == "rcpt"


def claim_due_emails(session: Session, limit: int = 100) -> list[EmailSend]:
    """Lease up to `limit` due e-mail deliveries and render their messages; commits.

    `FOR UPDATE SKIP LOCKED` (PostgreSQL) lets several senders work side by side; a sender
    that dies leaves leases that run out. Deliveries that must not be sent are skipped, and
    deliveries for unconfirmed addresses are held (see the module docstring)."""
    now = get_settings().now()
    stmt = (sa.select(Delivery, Subscription)
            .outerjoin(Subscription, Subscription.id == Delivery.subscription_id)
            .where(Delivery.status == DeliveryStatus.pending,
                   Delivery.channel == ChannelType.email,
                   Delivery.next_attempt_at <= now,
                   sa.or_(Delivery.leased_until.is_(None), Delivery.leased_until < now))
            .order_by(Delivery.next_attempt_at).limit(limit))
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(of=Delivery, skip_locked=True)
    claimed: list[EmailSend] = []
    bundled: list[tuple[Delivery, Subscription]] = []
    for delivery, sub in session.execute(stmt).all():
        reason = _not_sendable(sub)
        if reason is not None:
            delivery.status = DeliveryStatus.skipped
            delivery.next_attempt_at = None
            delivery.last_error = reason
            continue
        assert sub is not None
        if sub.email_verified_at is None:
            give_up = delivery.created_at + RETRY_HORIZON
            if now >= give_up:
                delivery.status = DeliveryStatus.skipped
                delivery.next_attempt_at = None
                delivery.last_error = "the e-mail address was never confirmed"
            else:
                delivery.next_attempt_at = min(now + HOLD_UNCONFIRMED, give_up)
                delivery.last_error = "held: the e-mail address is not confirmed yet"
            continue
        if delivery.bundle_id is not None:
            bundled.append((delivery, sub))  # rendered below, all bundles in one go
            continue
        update = session.get(Update, delivery.update_id) if delivery.update_id else None
        publisher = session.get(Organisation, update.publisher_id) if update else None
        if update is None or publisher is None:
            delivery.status = DeliveryStatus.skipped
            delivery.next_attempt_at = None
            delivery.last_error = "the update no longer exists"
            continue
        mail = render_update_mail(update, publisher, delivery.event_type,
                                  sub.channel["address"], language_of(sub),
                                  sub.unsubscribe_token, delivery.message_id)
        delivery.leased_until = now + LEASE
        claimed.append(EmailSend(delivery.id, sub.id, mail))
    claimed += _claim_bundles(session, bundled, now)
    session.commit()
    return claimed


def _claim_bundles(session: Session, bundled: list[tuple[Delivery, Subscription]],
                   now: datetime) -> list[EmailSend]:
    """One digest mail per bundle delivery (their contents read in one go)."""
    if not bundled:
        return []
    found = {bundle.id: bundle for bundle in session.scalars(
        sa.select(Bundle).where(Bundle.id.in_([d.bundle_id for d, _ in bundled])))}
    contents = bundle_contents(session, list(found.values()))
    claimed: list[EmailSend] = []
    for delivery, sub in bundled:
        content = contents.get(delivery.bundle_id) if delivery.bundle_id else None
        if content is None or not content["count"]:
            delivery.status = DeliveryStatus.skipped
            delivery.next_attempt_at = None
            delivery.last_error = ("the bundle no longer exists" if content is None
                                   else "the bundle is empty")
            continue
        mail = render_bundle_mail(content, sub.channel["address"], language_of(sub),
                                  sub.unsubscribe_token, delivery.message_id)
        delivery.leased_until = now + LEASE
        claimed.append(EmailSend(delivery.id, sub.id, mail))
    return claimed


def _not_sendable(sub: Subscription | None) -> str | None:
    if sub is None:
        return "the subscription was deleted"
    if sub.channel_type is not ChannelType.email or not (sub.channel or {}).get("address"):
        return "the subscription no longer uses e-mail"
    if sub.suspended_at is not None:
        return f"the subscription is suspended: {sub.suspended_reason or ''}".strip()
    if not sub.active:
        return "the subscription is inactive"
    return None


def record_email_outcomes(session: Session, sends: list[EmailSend],
                          outcomes: list[MailOutcome]) -> None:
    """Store every attempt and move each delivery on: succeeded, retried later, or failed
    (and the subscription suspended when the address was refused). Commits once."""
    if not outcomes:
        return
    now = get_settings().now()
    by_delivery = {s.delivery_id: s for s in sends}
    session.add_all(DeliveryAttempt(delivery_id=o.delivery_id, at=o.at,
                                    latency_ms=o.latency_ms, status_code=o.status_code,
                                    error=(o.error or "")[:1000] or None) for o in outcomes)
    deliveries = {d.id: d for d in session.scalars(
        sa.select(Delivery).where(Delivery.id.in_([o.delivery_id for o in outcomes])))}
    for outcome in outcomes:
        delivery = deliveries[outcome.delivery_id]
        delivery.attempt_count += 1
        delivery.last_attempt_at = outcome.at
        delivery.last_status_code = outcome.status_code
        delivery.last_error = (outcome.error or "")[:1000] or None
        delivery.leased_until = None
        if outcome.succeeded:
            delivery.status = DeliveryStatus.succeeded
            delivery.succeeded_at = outcome.at
            delivery.next_attempt_at = None
        elif outcome.permanent:
            delivery.status = DeliveryStatus.failed
            delivery.next_attempt_at = None
            send = by_delivery.get(outcome.delivery_id)
            if outcome.address_rejected and send is not None:
                address_rejected(session, send.subscription_id, send.mail.to,
                                 outcome.status_code, outcome.error or "")
        else:
            delivery.next_attempt_at = next_retry_at(delivery.attempt_count,
                                                     delivery.created_at, now)
            if delivery.next_attempt_at is None:
                delivery.status = DeliveryStatus.failed
    session.commit()


def release_lease(session: Session, delivery_ids: list[uuid.UUID]) -> None:
    """Give claimed deliveries back without an attempt (the sender could not run)."""
    if delivery_ids:
        session.execute(sa.update(Delivery).where(Delivery.id.in_(delivery_ids))
                        .values(leased_until=None))
        session.commit()


def pending_due_count(session: Session) -> int:
    now = get_settings().now()
    return session.scalar(sa.select(sa.func.count()).select_from(Delivery).where(
        Delivery.status == DeliveryStatus.pending, Delivery.channel == ChannelType.email,
        Delivery.next_attempt_at <= now)) or 0
