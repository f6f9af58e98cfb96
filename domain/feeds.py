"""Atom 1.0 feeds (RFC 4287) of one feed subscription, paged per RFC 5005, with withdrawn
updates as RFC 6721 tombstones.

The feed URL carries an unguessable token (like a private calendar URL): it is the only
credential, so an unknown token, a rotated-away one and a subscription that is not a feed all
look the same (not found). Every query is bound to the token's subscription and organisation,
so a tampered cursor can move within that feed only.

A feed shows the updates that reached the subscription's organisation through this
subscription (its id among the inbox item's reasons) or, when it has `include_directed`,
through a routing rule or the audience. One entry per version chain, showing the latest
version; newest first by when it (last) reached the organisation. Expired updates leave the
feed; withdrawn ones become tombstones. Restricted updates are notices: who, priority, link.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import urlencode
from xml.etree import ElementTree as ET
from zoneinfo import ZoneInfo

import nh3
import sqlalchemy as sa
from markdown_it import MarkdownIt
from sqlalchemy.orm import Session

from domain.errors import NotFound
from domain.events import update_link
from domain.models import (
    ChannelType,
    Classification,
    InboxItem,
    Organisation,
    Subscription,
    Topic,
    Update,
    UpdateStatus,
    lists_id,
    reached_directly,
)
from domain.pagination import clamp_limit, decode_time_cursor, encode_time_cursor
from domain.settings import get_settings

ATOM_NS = "http://www.w3.org/2005/Atom"
TOMBSTONE_NS = "http://purl.org/atompub/tombstones/1.0"
XML_NS = "http://www.w3.org/XML/1998/namespace"
MEDIA_TYPE = "application/atom+xml; charset=utf-8"
TOPIC_SCHEME = "urn:doorstroom:topic"
PRIORITY_SCHEME = "urn:doorstroom:priority"
CLASSIFICATION_SCHEME = "urn:doorstroom:classification"
GENERATOR_VERSION = "1.0.0"

# The Atom namespace is the document's default namespace (see `_a`); "at" is the
# conventional prefix of RFC 6721. ElementTree keeps prefixes in a process-wide registry.
ET.register_namespace("at", TOMBSTONE_NS)

#: Tokens are `secrets.token_urlsafe(32)` (43 characters); anything else is not one of ours.
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
#: Characters XML 1.0 does not allow, even escaped: C0 controls except tab, LF and CR, lone
#: surrogates, U+FFFE and U+FFFF.
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

_markdown = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])


# ------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class FeedEntry:
    item: InboxItem
    update: Update
    publisher_name: str
    #: When the chain's first version was published (Atom `published`).
    first_published_at: datetime


@dataclass(frozen=True)
class FeedPage:
    subscription: Subscription
    organisation: Organisation
    entries: list[FeedEntry]
    topics: dict[str, Topic]
    #: When the feed last changed: the newest `received_at` in the whole feed.
    updated: datetime
    cursor: str | None
    limit: int | None
    next_cursor: str | None


def subscription_for_token(session: Session, token: str) -> Subscription:
    """The feed subscription this token opens; NotFound for anything else."""
    if not _TOKEN.match(token or ""):
        raise NotFound("feed not found")
    sub = session.scalars(sa.select(Subscription).where(
        Subscription.feed_token == token,
        Subscription.channel_type == ChannelType.feed)).one_or_none()
    # A subscription switched to another channel keeps its token column; it is no feed.
    if sub is None:
        raise NotFound("feed not found")
    return sub


def reached_through(session: Session, sub: Subscription) -> sa.ColumnElement[bool]:
    """The inbox items this subscription's feed shows, by their reasons."""
    dialect = session.get_bind().dialect.name
    mine = lists_id(dialect, InboxItem.subscription_ids, sa.literal(sub.id, sa.Uuid))
    if sub.include_directed:
        return sa.or_(mine, reached_directly(dialect, InboxItem))
    return mine


def _visible(session: Session, sub: Subscription, now: datetime) -> list[sa.ColumnElement[bool]]:
    return [
        InboxItem.organisation_id == sub.organisation_id,
        reached_through(session, sub),
        Update.status.in_([UpdateStatus.published, UpdateStatus.withdrawn]),
        sa.or_(Update.expires_at.is_(None), Update.expires_at > now),
    ]


def feed_page(session: Session, sub: Subscription, cursor: str | None,
              limit: int | None) -> FeedPage:
    """One page of the subscription's feed (see `subscription_for_token`), newest first."""
    size = clamp_limit(limit)
    after = decode_time_cursor(cursor) if cursor else None
    organisation = session.get(Organisation, sub.organisation_id)
    assert organisation is not None
    now = get_settings().now()
    conditions = _visible(session, sub, now)
    base = (sa.select(InboxItem, Update, Organisation.name)
            .join(Update, Update.id == InboxItem.update_id)
            .join(Organisation, Organisation.id == Update.publisher_id)
            .where(*conditions))
    if after is not None:
        at, chain = after
        base = base.where(sa.or_(InboxItem.received_at < at,
                                 sa.and_(InboxItem.received_at == at,
                                         InboxItem.chain_id < chain)))
    # (Daily and weekly subscriptions have one entry per bundle: see `bundle_feed`.)
    rows = session.execute(base.order_by(InboxItem.received_at.desc(),
                                         InboxItem.chain_id.desc()).limit(size + 1)).all()
    next_cursor = (encode_time_cursor(rows[size - 1][0].received_at, rows[size - 1][0].chain_id)
                   if len(rows) > size else None)
    rows = rows[:size]

    first_published = dict(session.execute(
        sa.select(Update.id, Update.publish_at)
        .where(Update.id.in_({row[0].chain_id for row in rows}))).all()) if rows else {}
    entries = [FeedEntry(item, update, name, first_published.get(item.chain_id,
                                                                 update.publish_at))
               for item, update, name in rows]
    slugs = {slug for e in entries if e.update.classification is not Classification.restricted
             for slug in e.update.topics or []}
    topics = {t.slug: t for t in session.scalars(sa.select(Topic).where(Topic.slug.in_(slugs)))
              } if slugs else {}

    if after is None and entries:
        updated = entries[0].item.received_at
    else:
        newest = session.scalar(
            sa.select(InboxItem.received_at).join(Update, Update.id == InboxItem.update_id)
            .where(*conditions).order_by(InboxItem.received_at.desc()).limit(1))
        updated = newest or sub.created_at
    return FeedPage(subscription=sub, organisation=organisation, entries=entries,
                    topics=topics, updated=updated, cursor=cursor, limit=limit,
                    next_cursor=next_cursor)


# ----------------------------------------------------------------------------- rendering


def clean_text(value: Any) -> str:
    """Text that XML 1.0 can carry (the serializer escapes the rest)."""
    return _XML_ILLEGAL.sub("", "" if value is None else str(value))


def render_markdown(markdown: str) -> str:
    """Markdown to HTML without raw HTML (escaped by the parser), then sanitised."""
    return nh3.clean(_markdown.render(clean_text(markdown)))


def atom_date(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def feed_url(token: str, cursor: str | None = None, limit: int | None = None) -> str:
    url = f"{get_settings().public_url.rstrip('/')}/v1/feeds/{token}"
    query = {k: v for k, v in (("limit", limit), ("cursor", cursor)) if v is not None}
    return f"{url}?{urlencode(query)}" if query else url


def _a(tag: str) -> str:
    """An Atom element name. Atom is the document's default namespace, declared on the root
    (ElementTree cannot write a default namespace next to unqualified attribute names)."""
    return tag


def _el(parent: ET.Element, tag: str, text: Any = None, **attributes: Any) -> ET.Element:
    element = ET.SubElement(parent, tag, {k: clean_text(v) for k, v in attributes.items()
                                          if v is not None})
    if text is not None:
        element.text = clean_text(text)
    return element


def _person(parent: ET.Element, tag: str, name: str) -> None:
    _el(_el(parent, tag), _a("name"), name or "Doorstroom")


def _entry(feed: ET.Element, page: FeedPage, entry: FeedEntry) -> None:
    update = entry.update
    restricted = update.classification is Classification.restricted
    element = _el(feed, _a("entry"))
    if not restricted:
        element.set(f"{{{XML_NS}}}lang", update.language)
    _el(element, _a("id"), f"urn:uuid:{update.chain_id}")
    if restricted:
        _el(element, _a("title"), f"Restricted update from {entry.publisher_name}",
            type="text")
    else:
        _el(element, _a("title"), update.title, type="text")
    _el(element, _a("updated"), atom_date(update.publish_at))
    _el(element, _a("published"), atom_date(entry.first_published_at))
    _person(element, _a("author"), entry.publisher_name)
    _el(element, _a("link"), rel="alternate", href=update_link(update.id))
    if not restricted:
        for link in update.links or []:
            href = link.get("url") if isinstance(link, dict) else None
            if isinstance(href, str) and href.startswith(("https://", "http://")):
                _el(element, _a("link"), rel="related", href=href, title=link.get("title"))
        for slug in update.topics or []:
            topic = page.topics.get(slug)
            _el(element, _a("category"), term=slug, scheme=TOPIC_SCHEME,
                label=topic.name_nl if topic else slug)
    _el(element, _a("category"), term=update.priority.value, scheme=PRIORITY_SCHEME,
        label=f"priority: {update.priority.value}")
    _el(element, _a("category"), term=update.classification.value,
        scheme=CLASSIFICATION_SCHEME, label=f"classification: {update.classification.value}")
    if not restricted:
        if update.summary:
            _el(element, _a("summary"), update.summary, type="text")
        _el(element, _a("content"), render_markdown(update.body or ""), type="html")


def _tombstone(feed: ET.Element, entry: FeedEntry) -> None:
    """RFC 6721: the entry with this id was withdrawn; readers should drop it."""
    update = entry.update
    when = update.withdrawn_at or entry.item.received_at
    element = _el(feed, f"{{{TOMBSTONE_NS}}}deleted-entry", ref=f"urn:uuid:{update.chain_id}",
                  when=atom_date(when))
    by = _el(element, f"{{{TOMBSTONE_NS}}}by")
    _el(by, _a("name"), entry.publisher_name or "Doorstroom")
    _el(element, f"{{{TOMBSTONE_NS}}}comment", "Withdrawn by the publisher.")
    _el(element, _a("link"), rel="alternate", href=update_link(update.id))


def render(page: FeedPage) -> bytes:
    """The page as an Atom document (UTF-8 bytes)."""
    sub = page.subscription
    token = sub.feed_token or ""
    feed = ET.Element(_a("feed"), {"xmlns": ATOM_NS})
    _el(feed, _a("id"), f"urn:uuid:{sub.id}")
    _el(feed, _a("title"), f"Doorstroom – {page.organisation.name}", type="text")
    if sub.name:
        _el(feed, _a("subtitle"), sub.name, type="text")
    _el(feed, _a("updated"), atom_date(page.updated))
    _person(feed, _a("author"), "Doorstroom")
    _el(feed, _a("generator"), "Doorstroom", version=GENERATOR_VERSION)
    # RFC 5005 paged feed: self, first and (when there is more) next. The feed URL holds a
    # credential, so the links repeat it, which is what a feed reader needs to follow them.
    _el(feed, _a("link"), rel="self", type="application/atom+xml",
        href=feed_url(token, page.cursor, page.limit))
    _el(feed, _a("link"), rel="first", type="application/atom+xml",
        href=feed_url(token, None, page.limit))
    if page.next_cursor:
        _el(feed, _a("link"), rel="next", type="application/atom+xml",
            href=feed_url(token, page.next_cursor, page.limit))
    for entry in page.entries:
        if entry.update.status is UpdateStatus.withdrawn:
            _tombstone(feed, entry)
        else:
            _entry(feed, page, entry)
    return ET.tostring(feed, encoding="utf-8", xml_declaration=True)


# ------------------------------------------------------------------- daily and weekly feeds


def bundle_feed(session: Session, sub: Subscription, cursor: str | None,
                limit: int | None) -> bytes:
    """A daily or weekly subscription's feed: one entry per bundle, newest first."""
    from domain.bundles import bundle_contents
    from domain.models import Bundle

    size = clamp_limit(limit)
    organisation = session.get(Organisation, sub.organisation_id)
    assert organisation is not None
    stmt = sa.select(Bundle).where(Bundle.subscription_id == sub.id)
    if cursor:
        at, bundle_id = decode_time_cursor(cursor)
        stmt = stmt.where(sa.or_(Bundle.window_end < at,
                                 sa.and_(Bundle.window_end == at, Bundle.id < bundle_id)))
    found = list(session.scalars(stmt.order_by(Bundle.window_end.desc(), Bundle.id.desc())
                                 .limit(size + 1)))
    next_cursor = (encode_time_cursor(found[size - 1].window_end, found[size - 1].id)
                   if len(found) > size else None)
    found = found[:size]
    contents = bundle_contents(session, found)
    token = sub.feed_token or ""
    feed = ET.Element(_a("feed"), {"xmlns": ATOM_NS})
    _el(feed, _a("id"), f"urn:uuid:{sub.id}")
    _el(feed, _a("title"), f"Doorstroom – {organisation.name}", type="text")
    if sub.name:
        _el(feed, _a("subtitle"), sub.name, type="text")
    newest = found[0].built_at if found and found[0].built_at else sub.created_at
    _el(feed, _a("updated"), atom_date(newest))
    _person(feed, _a("author"), "Doorstroom")
    _el(feed, _a("generator"), "Doorstroom", version=GENERATOR_VERSION)
    _el(feed, _a("link"), rel="self", type="application/atom+xml",
        href=feed_url(token, cursor, limit))
    _el(feed, _a("link"), rel="first", type="application/atom+xml",
        href=feed_url(token, None, limit))
    if next_cursor:
        _el(feed, _a("link"), rel="next", type="application/atom+xml",
            href=feed_url(token, next_cursor, limit))
    for bundle in found:
        content = contents[bundle.id]
        local_end = bundle.window_end.astimezone(ZoneInfo(get_settings().timezone))
        element = _el(feed, _a("entry"))
        _el(element, _a("id"), f"urn:uuid:{bundle.id}")
        _el(element, _a("title"), f"Doorstroom {bundle.cadence.value} bundle "
            f"{local_end:%Y-%m-%d}: {content['count']} update(s)", type="text")
        _el(element, _a("updated"), atom_date(bundle.built_at or bundle.window_end))
        _person(element, _a("author"), "Doorstroom")
        _el(element, _a("link"), rel="alternate",
            href=f"{get_settings().public_url.rstrip('/')}/v1/bundles/{bundle.id}")
        _el(element, _a("category"), term=bundle.cadence.value, scheme=CADENCE_SCHEME)
        _el(element, _a("content"), _bundle_html(content), type="html")
    return ET.tostring(feed, encoding="utf-8", xml_declaration=True)


CADENCE_SCHEME = "urn:doorstroom:cadence"
_STATE_LABEL = {"new": "", "corrected": " (corrected since the last bundle)",
                "withdrawn": " (withdrawn)", "already_sent": " (already sent)"}


def _bundle_html(content: dict[str, Any]) -> str:
    """Sections as HTML; every piece of text escaped, then sanitised like all content."""
    parts: list[str] = []
    for section in content["sections"]:
        heading = section["topic_name"] or section["topic"] or "Other"
        parts.append(f"<h2>{escape(heading)} – {escape(section['publisher'])} "
                     f"({section['count']})</h2><ul>")
        for item in section["items"]:
            parts.append(f'<li><a href="{escape(item["url"])}">{escape(item["title"])}</a>'
                         f"{escape(_STATE_LABEL[item['state']])}</li>")
        parts.append("</ul>")
    return nh3.clean(clean_text("".join(parts)))
