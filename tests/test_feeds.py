"""Atom feeds (`GET /v1/feeds/{token}`): RFC 4287 documents that feedparser reads cleanly,
RFC 6721 tombstones for withdrawn updates, RFC 5005 paging, notices for restricted updates,
include_directed, token rotation, isolation between organisations, expiry.

Updates are published through the use case and routed in-process (`publish_update`).
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from urllib.parse import urlsplit
from xml.etree import ElementTree as ET

import feedparser
import pytest

from domain import feeds, publishing
from domain.models import Classification, Kind, Level, Priority
from domain.pagination import encode_time_cursor
from tests.factories import (
    actor_for,
    bearer,
    create_feed_subscription,
    create_org,
    create_rule,
    create_topic,
    feed_path,
    org_with_key,
    publish_update,
)

ATOM = "{http://www.w3.org/2005/Atom}"
AT = "{http://purl.org/atompub/tombstones/1.0}"
PROBLEM = "application/problem+json"


# ------------------------------------------------------------------------------- helpers


def fetch(client, path: str):
    response = client.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/atom+xml; charset=utf-8"
    return response


def parse(client, path: str):
    """The feed through feedparser, which must find nothing wrong with it."""
    response = fetch(client, path)
    parsed = feedparser.parse(response.content)
    assert not parsed.bozo, parsed.get("bozo_exception")
    for entry in parsed.entries:
        assert entry.get("id") and entry.get("updated") and entry.get("title"), entry
    return parsed


def xml_of(client, path: str) -> ET.Element:
    return ET.fromstring(fetch(client, path).content)


def entry_ids(parsed) -> list[str]:
    return [e.id for e in parsed.entries]


def urn(update) -> str:
    return f"urn:uuid:{update.chain_id}"


def link(parsed, rel: str) -> str | None:
    return next((lnk["href"] for lnk in parsed.feed.get("links", []) if lnk["rel"] == rel),
                None)


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def assert_problem(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status
    return body


@pytest.fixture
def world(db_session):
    """A federal publisher, a city with a subscribe key and a feed subscription, a topic."""
    suffix = uuid.uuid4().hex[:6]
    topic = create_topic(db_session, f"feeds-{suffix}")
    other_topic = create_topic(db_session, f"feeds-other-{suffix}")
    publisher = create_org(db_session, name=f"Federal body {suffix}", level=Level.federal,
                           kind=Kind.federal_body)
    city, key = org_with_key(db_session, "subscribe", name=f"Stad {suffix}")
    sub = create_feed_subscription(db_session, city, filter={"topics": [topic.slug]},
                                   name="Radicalisering")
    return SimpleNamespace(topic=topic, other_topic=other_topic, publisher=publisher,
                           city=city, key=key, sub=sub)


def publish(db_session, world, **kwargs):
    kwargs.setdefault("topics", [world.topic.slug])
    return publish_update(db_session, world.publisher, **kwargs)


# --------------------------------------------------------------------------------- tests


def test_the_feed_is_valid_atom_with_complete_entries(client, db_session, world):
    first = publish(db_session, world, title="Eerste update", summary="Kort",
                    body="# Kop\n\nMet **nadruk** en <script>alert(1)</script> "
                         "[link](javascript:alert(2))",
                    links=[{"url": "https://example.org/report", "title": "Rapport"}])
    second = publish(db_session, world, title="Tweede update", priority=Priority.important)

    parsed = parse(client, feed_path(world.sub))
    assert parsed.version == "atom10"
    assert parsed.feed.id == f"urn:uuid:{world.sub.id}"
    assert parsed.feed.title == f"Doorstroom – {world.city.name}"
    assert parsed.feed.get("updated") and parsed.feed.get("author")
    assert parsed.feed.generator == "Doorstroom"
    assert link(parsed, "self") and link(parsed, "first") and link(parsed, "next") is None
    assert entry_ids(parsed) == [urn(second), urn(first)]  # newest first

    entry = parsed.entries[1]
    assert entry.title == "Eerste update"
    assert entry.summary == "Kort"
    assert entry.author == world.publisher.name
    assert link(SimpleNamespace(feed=entry), "alternate").endswith(f"/v1/inbox/{first.id}")
    assert link(SimpleNamespace(feed=entry), "related") == "https://example.org/report"
    html = next(c.value for c in entry.content if c.type == "text/html")
    assert "<strong>nadruk</strong>" in html and "<h1>" in html
    # Raw HTML in the Markdown is text, not markup; unsafe links are not links.
    served = xml_of(client, feed_path(world.sub)).findall(f"{ATOM}entry")[1]
    served_html = served.findtext(f"{ATOM}content")
    assert "<script" not in served_html and "&lt;script&gt;" in served_html
    assert 'href="javascript' not in served_html and 'href="javascript' not in html
    tags = {(t.scheme, t.term): t.label for t in entry.tags}
    assert tags[(feeds.TOPIC_SCHEME, world.topic.slug)] == world.topic.name_nl
    assert (feeds.PRIORITY_SCHEME, "routine") in tags
    assert (feeds.CLASSIFICATION_SCHEME, "public") in tags
    assert (feeds.PRIORITY_SCHEME, "important") in {(t.scheme, t.term)
                                                    for t in parsed.entries[0].tags}


def test_a_correction_is_one_entry_showing_the_latest_version(client, db_session, world):
    original = publish(db_session, world, title="Versie 1")
    corrected = publish(db_session, world, title="Versie 2", supersedes=original.id)
    parsed = parse(client, feed_path(world.sub))
    assert entry_ids(parsed) == [urn(original)]
    assert urn(corrected) == urn(original)
    assert parsed.entries[0].title == "Versie 2"


def test_a_withdrawn_update_is_a_tombstone_not_an_entry(client, db_session, world):
    kept = publish(db_session, world, title="Blijft")
    gone = publish(db_session, world, title="Ingetrokken")
    publishing.withdraw(db_session, actor_for(world.publisher, "publish"), gone.id)

    parsed = parse(client, feed_path(world.sub))
    assert entry_ids(parsed) == [urn(kept)]
    root = xml_of(client, feed_path(world.sub))
    tombstones = root.findall(f"{AT}deleted-entry")
    assert [t.get("ref") for t in tombstones] == [urn(gone)]
    assert datetime.fromisoformat(tombstones[0].get("when").replace("Z", "+00:00"))
    assert tombstones[0].findtext(f"{AT}comment")
    assert "Ingetrokken" not in fetch(client, feed_path(world.sub)).text


def test_a_restricted_update_is_a_notice(client, db_session, world):
    publish(db_session, world, title="Geheime titel", summary="Geheime samenvatting",
            body="Geheime inhoud", classification=Classification.restricted,
            audience={"organisations": [str(world.city.id)]})
    raw = fetch(client, feed_path(world.sub)).text
    assert "Geheime" not in raw
    parsed = parse(client, feed_path(world.sub))
    [entry] = parsed.entries
    assert entry.title == f"Restricted update from {world.publisher.name}"
    assert not entry.get("summary") and not entry.get("content")
    assert link(SimpleNamespace(feed=entry), "alternate")
    assert {t.scheme for t in entry.tags} == {feeds.PRIORITY_SCHEME,
                                              feeds.CLASSIFICATION_SCHEME}


def test_rule_directed_updates_appear_only_with_include_directed(client, db_session, world):
    directed_off = create_feed_subscription(db_session, world.city, include_directed=False,
                                            filter={"topics": [world.topic.slug]})
    create_rule(db_session, filter={"topics": [world.other_topic.slug]},
                targets={"organisations": [str(world.city.id)]})
    via_rule = publish(db_session, world, title="Via regel", topics=[world.other_topic.slug])
    via_sub = publish(db_session, world, title="Via abonnement")

    assert entry_ids(parse(client, feed_path(world.sub))) == [urn(via_sub), urn(via_rule)]
    assert entry_ids(parse(client, feed_path(directed_off))) == [urn(via_sub)]


def test_another_subscription_of_the_same_org_does_not_leak_in(client, db_session, world):
    other = create_feed_subscription(db_session, world.city, include_directed=False,
                                     filter={"topics": [world.other_topic.slug]})
    mine = publish(db_session, world, title="Mijn onderwerp")
    theirs = publish(db_session, world, title="Ander onderwerp",
                     topics=[world.other_topic.slug])
    assert entry_ids(parse(client, feed_path(other))) == [urn(theirs)]
    assert urn(mine) in entry_ids(parse(client, feed_path(world.sub)))
    assert urn(theirs) not in entry_ids(parse(client, feed_path(world.sub)))


def test_paging_follows_next_links_through_every_entry_once(client, db_session, world):
    published = [publish(db_session, world, title=f"Update {n}") for n in range(5)]
    path, seen, pages = f"{feed_path(world.sub)}?limit=2", [], 0
    while path:
        parsed = parse(client, path)
        pages += 1
        assert path_of(link(parsed, "self")) == path
        assert path_of(link(parsed, "first")) == f"{feed_path(world.sub)}?limit=2"
        assert len(parsed.entries) <= 2
        seen += entry_ids(parsed)
        nxt = link(parsed, "next")
        path = path_of(nxt) if nxt else None
    assert pages == 3
    assert seen == [urn(u) for u in reversed(published)]
    assert len(set(seen)) == 5


def test_page_size_limits(client, db_session, world):
    assert client.get(f"{feed_path(world.sub)}?limit=0").status_code == 422
    assert client.get(f"{feed_path(world.sub)}?limit=201").status_code == 422
    assert client.get(f"{feed_path(world.sub)}?limit=200").status_code == 200


def test_a_tampered_cursor_is_refused_and_never_shows_another_org(client, db_session, world):
    for cursor in ("garbage!", "bm90LWEtY3Vyc29y", base64.urlsafe_b64encode(b"x|y").decode(),
                   base64.urlsafe_b64encode(b"2026-01-01T00:00:00|not-a-uuid").decode()):
        assert_problem(client.get(f"{feed_path(world.sub)}?cursor={cursor}"), 422)
    # A well-formed cursor pointing into another organisation's feed moves within one's own.
    stranger = create_org(db_session)
    stranger_sub = create_feed_subscription(db_session, stranger)
    theirs = publish(db_session, world, title="Alleen voor de vreemde",
                     audience={"organisations": [str(stranger.id)]})
    future = datetime.now(UTC) + timedelta(days=1)
    crafted = encode_time_cursor(future, theirs.chain_id)
    parsed = parse(client, f"{feed_path(world.sub)}?cursor={crafted}")
    assert urn(theirs) not in entry_ids(parsed)
    assert urn(theirs) in entry_ids(parse(client, feed_path(stranger_sub)))


def test_rotating_the_token_retires_the_old_url(client, db_session, world):
    update = publish(db_session, world)
    old = feed_path(world.sub)
    assert entry_ids(parse(client, old)) == [urn(update)]
    rotated = client.post(f"/v1/subscriptions/{world.sub.id}/rotate-feed-token",
                          headers=bearer(world.key))
    assert rotated.status_code == 200, rotated.text
    new = path_of(rotated.json()["feed_url"])
    assert new != old
    assert_problem(client.get(old), 404)
    assert entry_ids(parse(client, new)) == [urn(update)]


def test_each_token_shows_only_its_own_organisations_feed(client, db_session, world):
    other_city = create_org(db_session, name="Andere gemeente")
    other_sub = create_feed_subscription(db_session, other_city)
    for_city = publish(db_session, world, title="Voor stad",
                       audience={"organisations": [str(world.city.id)]})
    for_other = publish(db_session, world, title="Voor andere",
                        audience={"organisations": [str(other_city.id)]})
    for_both = publish(db_session, world, title="Voor beide")

    mine = parse(client, feed_path(world.sub))
    theirs = parse(client, feed_path(other_sub))
    assert entry_ids(mine) == [urn(for_both), urn(for_city)]
    assert entry_ids(theirs) == [urn(for_both), urn(for_other)]
    assert theirs.feed.title == "Doorstroom – Andere gemeente"
    assert theirs.feed.id == f"urn:uuid:{other_sub.id}"
    assert "Voor stad" not in fetch(client, feed_path(other_sub)).text


def test_unknown_tokens_are_404_problems(client, db_session, world):
    for token in ("garbage", "x" * 43, "a" * 300, "%00", "..", world.sub.feed_token + "x"):
        assert_problem(client.get(f"/v1/feeds/{token}"), 404)


def test_a_subscription_moved_to_another_channel_is_no_feed(client, db_session, world):
    path = feed_path(world.sub)
    fetch(client, path)
    patched = client.patch(f"/v1/subscriptions/{world.sub.id}", headers=bearer(world.key),
                           json={"channel": {"type": "inbox"}})
    assert patched.status_code == 200, patched.text
    assert_problem(client.get(path), 404)


def test_expired_updates_leave_the_feed(client, db_session, world):
    now = datetime.now(UTC)
    current = publish(db_session, world, title="Nog geldig", expires_at=now + timedelta(days=1))
    expired = publish(db_session, world, title="Verlopen", expires_at=now + timedelta(days=1))
    expired.expires_at = now - timedelta(minutes=1)  # time passes
    db_session.flush()
    assert entry_ids(parse(client, feed_path(world.sub))) == [urn(current)]


def test_a_feed_without_entries_is_valid(client, db_session, world):
    parsed = parse(client, feed_path(world.sub))
    assert parsed.entries == [] and parsed.feed.get("updated")


def test_xml_illegal_characters_are_stripped(client, db_session, world):
    publish(db_session, world, title="Bel\x07 & <tag>", summary="nul\x01teken",
            body="verticale\x0btab \ufffe")
    parsed = parse(client, feed_path(world.sub))
    assert parsed.entries[0].title == "Bel & <tag>"
    assert parsed.entries[0].summary == "nulteken"


def test_etag_answers_304_when_nothing_changed(client, db_session, world):
    publish(db_session, world)
    first = fetch(client, feed_path(world.sub))
    etag = first.headers["etag"]
    again = client.get(feed_path(world.sub), headers={"If-None-Match": etag})
    assert again.status_code == 304 and not again.content
    publish(db_session, world, title="Nieuw")
    changed = client.get(feed_path(world.sub), headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag


def test_the_feed_works_on_sqlite_too(tmp_path):
    """The embedded default: the reasons filter has its own SQL there."""
    from sqlalchemy.orm import Session

    from domain import migrate
    from domain.db import make_engine

    url = f"sqlite:///{tmp_path / 'feeds.sqlite3'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        with Session(engine, expire_on_commit=False) as session:
            topic = create_topic(session, "sqlite-topic")
            other = create_topic(session, "sqlite-other")
            publisher = create_org(session, level=Level.federal, kind=Kind.federal_body)
            city = create_org(session)
            sub = create_feed_subscription(session, city, filter={"topics": [topic.slug]})
            closed = create_feed_subscription(session, city, include_directed=False,
                                              filter={"topics": [topic.slug]})
            create_rule(session, filter={"topics": [other.slug]},
                        targets={"organisations": [str(city.id)]})
            direct = publish_update(session, publisher, title="Direct", topics=[topic.slug])
            ruled = publish_update(session, publisher, title="Regel", topics=[other.slug])

            page = feeds.feed_page(session, feeds.subscription_for_token(
                session, sub.feed_token), None, None)
            assert [e.update.id for e in page.entries] == [ruled.id, direct.id]
            page = feeds.feed_page(session, closed, None, None)
            assert [e.update.id for e in page.entries] == [direct.id]
            parsed = feedparser.parse(feeds.render(page))
            assert not parsed.bozo and entry_ids(parsed) == [urn(direct)]
    finally:
        engine.dispose()
