"""Hostile input: oversized bodies, mass assignment, broken encodings, control and bidi
characters, header injection in mail, and active content in Markdown.

Requests go through the in-process API (`client`, rolled back with `db_session`); mail and
feed rendering are checked on what `domain.mail`, `workers.mail` and `domain.feeds` produce.
"""

from __future__ import annotations

import email
import html
import json
import re
import uuid
from email import policy
from html.parser import HTMLParser
from types import SimpleNamespace
from xml.etree import ElementTree as ET

import pytest
import sqlalchemy as sa

from domain import events, feeds, mail
from domain.models import (
    Classification,
    InboxItem,
    Organisation,
    Subscription,
    Update,
    WebhookEndpoint,
)
from domain.settings import get_settings
from tests import smtp as smtp_fixtures
from tests.factories import (
    bearer,
    create_feed_subscription,
    create_org,
    create_subscription,
    create_topic,
    insert_webhook_endpoint,
    org_with_key,
)
from workers import mail as mail_worker

PROBLEM = "application/problem+json"
JSON = {"Content-Type": "application/json"}


def assert_problem(response, status: int | tuple[int, ...], kind: str | None = None) -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, (response.status_code, response.text)
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == response.status_code
    if kind is not None:
        assert body["type"].endswith(kind), body["type"]
    return body


def count(session, model, *where) -> int:
    return session.scalar(sa.select(sa.func.count()).select_from(model).where(*where))


@pytest.fixture
def actors(db_session, admin_key):
    """An admin, a publisher with a topic, and a municipality with an inbox subscription and
    a webhook endpoint."""
    topic = create_topic(db_session).slug
    publisher, publish_key = org_with_key(db_session, "publish")
    town, subscribe_key = org_with_key(db_session, "subscribe")
    sub = create_subscription(db_session, town, filter={}, name="everything")
    endpoint, _ = insert_webhook_endpoint(db_session, town, "http://127.0.0.1:9/hook")
    return SimpleNamespace(admin=admin_key, publisher=publisher, publish=publish_key,
                           town=town, subscribe=subscribe_key, sub=sub, endpoint=endpoint,
                           topic=topic)


@pytest.fixture
def server_client(db_session):
    """Like `client`, but a server error comes back as the 500 a caller would see."""
    from fastapi.testclient import TestClient

    from api.app import app
    from api.deps import get_session

    app.dependency_overrides[get_session] = lambda: db_session
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client
    app.dependency_overrides.clear()


def publish(client, key: str, **fields):
    return client.post("/v1/updates", json=fields, headers=bearer(key))


# --------------------------------------------------------------------------- body size


def _writes(actors) -> list[tuple[str, str, str]]:
    """(method, path, key) of body-taking operations across the API."""
    return [
        ("POST", "/v1/updates", actors.publish),
        ("POST", "/v1/organisations", actors.admin),
        ("PATCH", f"/v1/organisations/{actors.town.id}", actors.admin),
        ("POST", "/v1/subscriptions", actors.subscribe),
        ("PATCH", f"/v1/subscriptions/{actors.sub.id}", actors.subscribe),
        ("POST", "/v1/webhook-endpoints", actors.subscribe),
        ("POST", "/v1/routing-rules/preview", actors.admin),
        ("POST", "/v1/groups", actors.admin),
    ]


def test_a_declared_oversized_body_is_413_before_auth_and_parsing(client, db_session, actors):
    limit = get_settings().max_request_bytes
    # Not JSON: parsed, it would be 400; validated, 422; unauthenticated, 401.
    oversized = b"\xff{" + b"x" * limit
    for method, path, key in _writes(actors):
        for headers in ({**JSON, **bearer(key)}, JSON):
            response = client.request(method, path, content=oversized, headers=headers)
            assert_problem(response, 413, "payload-too-large")
    assert count(db_session, Update, Update.publisher_id == actors.publisher.id) == 0


def test_a_chunked_oversized_body_is_413_on_every_write(client, db_session, actors):
    limit = get_settings().max_request_bytes

    def chunks():
        sent = 0
        while sent <= limit:
            yield b"y" * 8192
            sent += 8192

    for method, path, key in _writes(actors):
        response = client.request(method, path, content=chunks(),
                                  headers={**JSON, **bearer(key)})
        assert "content-length" not in {k.lower() for k in response.request.headers}
        assert_problem(response, 413, "payload-too-large")
    assert count(db_session, Update, Update.publisher_id == actors.publisher.id) == 0


def test_a_content_length_that_is_not_a_number_is_refused(client, actors):
    response = client.post("/v1/updates", content=b"{}",
                           headers={**JSON, **bearer(actors.publish), "Content-Length": "1e9"})
    assert_problem(response, (400, 413))


def test_a_body_just_under_the_limit_is_parsed(client, actors):
    limit = get_settings().max_request_bytes
    padding = limit - 200
    body = json.dumps({"title": "Near the limit", "topics": [actors.topic],
                       "summary": "s" * padding}).encode()
    assert len(body) <= limit
    response = client.post("/v1/updates", content=body,
                           headers={**JSON, **bearer(actors.publish)})
    # Parsed and validated: the summary is over its own 2000-character cap.
    assert_problem(response, 422, "validation-error")


# ---------------------------------------------------------------------- mass assignment

FOREIGN = str(uuid.uuid4())
SMUGGLED = {"id": FOREIGN, "organisation_id": FOREIGN, "publisher_id": FOREIGN,
            "status": "withdrawn", "routed_at": "2020-01-01T00:00:00Z",
            "created_at": "2020-01-01T00:00:00Z", "recipient_count": 9999}


@pytest.mark.parametrize("field", sorted(SMUGGLED))
def test_an_update_with_a_server_field_is_refused_and_nothing_is_published(
        client, db_session, actors, field):
    response = publish(client, actors.publish, title="Smuggle", topics=[actors.topic],
                       **{field: SMUGGLED[field]})
    body = assert_problem(response, 422, "validation-error")
    assert any(e["location"][-1] == field for e in body["errors"]), body
    assert count(db_session, Update, Update.publisher_id == actors.publisher.id) == 0
    assert count(db_session, Update, Update.id == uuid.UUID(FOREIGN)) == 0


@pytest.mark.parametrize("field", ["id", "organisation_id", "status", "created_at",
                                   "feed_token", "email_verified_at", "suspended_at",
                                   "webhook_endpoint_id"])
def test_subscriptions_take_no_server_fields_on_create_or_patch(client, db_session, actors,
                                                               field):
    value = SMUGGLED.get(field, FOREIGN)
    before = count(db_session, Subscription, Subscription.organisation_id == actors.town.id)
    created = client.post("/v1/subscriptions", json={"filter": {}, field: value},
                          headers=bearer(actors.subscribe))
    assert_problem(created, 422, "validation-error")
    assert count(db_session, Subscription,
                 Subscription.organisation_id == actors.town.id) == before

    snapshot = client.get(f"/v1/subscriptions/{actors.sub.id}",
                          headers=bearer(actors.subscribe)).json()
    patched = client.patch(f"/v1/subscriptions/{actors.sub.id}",
                           json={"name": "renamed", field: value},
                           headers=bearer(actors.subscribe))
    assert_problem(patched, 422, "validation-error")
    after = client.get(f"/v1/subscriptions/{actors.sub.id}", headers=bearer(actors.subscribe))
    assert after.json() == snapshot
    db_session.expire_all()
    assert db_session.get(Subscription, actors.sub.id).organisation_id == actors.town.id


@pytest.mark.parametrize("field", ["id", "organisation_id", "secret", "secret_ciphertext",
                                   "created_at", "disabled_at"])
def test_webhook_endpoints_take_no_server_fields(client, db_session, actors, field):
    value = SMUGGLED.get(field, FOREIGN)
    before = count(db_session, WebhookEndpoint)
    created = client.post("/v1/webhook-endpoints",
                          json={"url": "http://127.0.0.1:9/x", field: value},
                          headers=bearer(actors.subscribe))
    assert_problem(created, 422, "validation-error")
    assert count(db_session, WebhookEndpoint) == before
    ciphertext = actors.endpoint.secret_ciphertext
    patched = client.patch(f"/v1/webhook-endpoints/{actors.endpoint.id}",
                           json={"description": "x", field: value},
                           headers=bearer(actors.subscribe))
    assert_problem(patched, 422, "validation-error")
    db_session.expire_all()
    endpoint = db_session.get(WebhookEndpoint, actors.endpoint.id)
    assert endpoint.organisation_id == actors.town.id
    assert endpoint.secret_ciphertext == ciphertext
    assert endpoint.description is None


@pytest.mark.parametrize("field", ["id", "code", "created_at", "updated_at", "organisation_id"])
def test_organisations_take_no_server_fields(client, db_session, actors, field):
    value = SMUGGLED.get(field, FOREIGN)
    before = count(db_session, Organisation)
    created = client.post("/v1/organisations",
                          json={"name": "Smuggler", "level": "local", "kind": "municipality",
                                field: value},
                          headers=bearer(actors.admin))
    assert_problem(created, 422, "validation-error")
    assert count(db_session, Organisation) == before
    snapshot = client.get(f"/v1/organisations/{actors.town.id}",
                          headers=bearer(actors.admin)).json()
    patched = client.patch(f"/v1/organisations/{actors.town.id}",
                           json={"name": "Renamed", field: value},
                           headers=bearer(actors.admin))
    assert_problem(patched, 422, "validation-error")
    assert client.get(f"/v1/organisations/{actors.town.id}",
                      headers=bearer(actors.admin)).json() == snapshot


def test_nested_objects_refuse_unknown_fields_too(client, db_session, actors):
    cases = [
        ("/v1/updates", actors.publish,
         {"title": "t", "topics": [actors.topic], "audience": {"organisations": [],
                                                               "everyone": True}}),
        ("/v1/updates", actors.publish,
         {"title": "t", "topics": [actors.topic],
          "links": [{"url": "https://example.org", "rel": "stylesheet"}]}),
        ("/v1/subscriptions", actors.subscribe,
         {"filter": {"topics": [], "organisation_id": FOREIGN}}),
        ("/v1/subscriptions", actors.subscribe,
         {"channel": {"type": "webhook", "endpoint_id": str(actors.endpoint.id),
                      "organisation_id": FOREIGN}}),
    ]
    for path, key, payload in cases:
        assert_problem(client.post(path, json=payload, headers=bearer(key)), 422)
    assert count(db_session, Update, Update.publisher_id == actors.publisher.id) == 0


# ------------------------------------------------------------------------ broken encodings

INVALID_UTF8 = [
    b'{"title": "\xff\xfe", "topics": ["x"]}',
    b'{"title": "caf\xc3", "topics": ["x"]}',             # truncated sequence
    b'{"title": "\xed\xa0\x80", "topics": ["x"]}',        # an encoded surrogate
    b'{"title": "\xc0\xaf", "topics": ["x"]}',            # overlong "/"
    b'\xef\xbb\xbf{"title": "bom", "topics": ["x"]}',     # a byte order mark
    b'\x00{"title": 1}',
]


@pytest.mark.parametrize("raw", INVALID_UTF8, ids=range(len(INVALID_UTF8)))
def test_invalid_utf8_in_a_json_body_is_a_client_error(client, db_session, actors, raw):
    targets = [("POST", "/v1/updates", actors.publish),
               ("POST", "/v1/subscriptions", actors.subscribe),
               ("PATCH", f"/v1/subscriptions/{actors.sub.id}", actors.subscribe),
               ("POST", "/v1/organisations", actors.admin)]
    for method, path, key in targets:
        response = client.request(method, path, content=raw,
                                  headers={**JSON, **bearer(key)})
        assert_problem(response, (400, 422))
    assert count(db_session, Update, Update.publisher_id == actors.publisher.id) == 0


def test_a_body_in_another_encoding_or_type_is_a_client_error(client, actors):
    utf16 = '{"title": "t", "topics": ["x"]}'.encode("utf-16")
    for content, content_type in ((utf16, "application/json"),
                                  (b"title=t", "application/x-www-form-urlencoded"),
                                  (b"<update/>", "application/xml"),
                                  (b'{"title": "t"}', "text/plain")):
        response = client.post("/v1/updates", content=content,
                               headers={"Content-Type": content_type, **bearer(actors.publish)})
        assert 400 <= response.status_code < 500, (content_type, response.text)


LONE_SURROGATE = '"\\ud800"'
LOW_SURROGATE = '"\\udfff"'
NUL = '"a\\u0000b"'


@pytest.mark.parametrize("bad", [LONE_SURROGATE, LOW_SURROGATE, NUL],
                         ids=["high-surrogate", "low-surrogate", "nul"])
@pytest.mark.parametrize("field", ["title", "summary", "body", "topics", "links",
                                   "idempotency"])
def test_surrogates_and_nul_in_update_text_are_422(client, db_session, actors, bad, field):
    fields = {"title": '"t"', "summary": '""', "body": '""',
              "topics": f'["{actors.topic}"]', "links": "[]"}
    headers = {**JSON, **bearer(actors.publish)}
    if field == "topics":
        fields["topics"] = f"[{bad}]"
    elif field == "links":
        fields["links"] = '[{"url": "https://example.org/", "title": BAD}]'.replace("BAD", bad)
    elif field == "idempotency":
        headers["Idempotency-Key"] = "key\x00"  # refused by the client or the server
    else:
        fields[field] = bad
    raw = "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"
    try:
        response = client.post("/v1/updates", content=raw.encode(), headers=headers)
    except Exception:  # noqa: BLE001 - httpx refuses NUL in a header itself: fine
        assert field == "idempotency"
        return
    if field == "idempotency":
        assert_problem(response, (400, 422))
    else:
        assert_problem(response, 422, "validation-error")
    assert count(db_session, Update, Update.publisher_id == actors.publisher.id) == 0


@pytest.mark.parametrize("bad", [LONE_SURROGATE, NUL], ids=["surrogate", "nul"])
def test_surrogates_and_nul_elsewhere_are_422(client, db_session, actors, bad):
    cases = [
        ("POST", "/v1/subscriptions", actors.subscribe, '{"name": BAD}'),
        ("POST", "/v1/subscriptions", actors.subscribe, '{"filter": {"topics": [BAD]}}'),
        ("PATCH", f"/v1/subscriptions/{actors.sub.id}", actors.subscribe, '{"name": BAD}'),
        ("POST", "/v1/subscriptions", actors.subscribe,
         '{"channel": {"type": "email", "address": BAD}}'),
        ("POST", "/v1/organisations", actors.admin,
         '{"name": BAD, "level": "local", "kind": "municipality"}'),
        ("PATCH", f"/v1/organisations/{actors.town.id}", actors.admin, '{"name": BAD}'),
        ("POST", "/v1/webhook-endpoints", actors.subscribe,
         '{"url": "http://127.0.0.1:9/x", "description": BAD}'),
        ("POST", "/v1/topics", actors.admin,
         '{"slug": "ok-slug", "name_nl": "n", "name_en": "n", "definition_nl": BAD}'),
        ("POST", "/v1/groups", actors.admin, '{"name": BAD}'),
        ("POST", f"/v1/organisations/{actors.town.id}/keys", actors.admin,
         '{"scopes": ["subscribe"], "name": BAD}'),
    ]
    for method, path, key, template in cases:
        raw = template.replace("BAD", bad)
        response = client.request(method, path, content=raw.encode(),
                                  headers={**JSON, **bearer(key)})
        assert_problem(response, 422, "validation-error")
    db_session.expire_all()
    assert db_session.get(Subscription, actors.sub.id).name == "everything"


@pytest.mark.parametrize("value", ["\x00", "a\x00b", "\ud800", "%00", "\u202e", "\r\nX: y"],
                         ids=["nul", "nul-inside", "surrogate", "percent-nul", "bidi", "crlf"])
def test_hostile_query_and_path_values_are_never_a_server_error(server_client, actors, value):
    """NUL cannot be stored or compared in PostgreSQL text: anywhere it reaches a query it
    must be refused (or simply match nothing), never a 500."""
    from urllib.parse import quote

    encoded = quote(value.encode("utf-8", "surrogatepass"), safe="")
    requests = [
        ("GET", f"/v1/inbox?topic={encoded}", actors.subscribe),
        ("GET", f"/v1/inbox?cursor={encoded}", actors.subscribe),
        ("GET", f"/v1/topics?parent={encoded}", actors.admin),
        ("GET", f"/v1/topics/{encoded}", actors.admin),
        ("PATCH", f"/v1/topics/{encoded}", actors.admin),
        ("GET", f"/v1/organisations?cursor={encoded}", actors.admin),
        ("GET", f"/v1/subscriptions/{encoded}", actors.subscribe),
        ("GET", f"/v1/feeds/{encoded}", None),
        ("GET", f"/v1/email/confirm/{encoded}", None),
        ("POST", f"/v1/email/unsubscribe/{encoded}", None),
        ("GET", f"/v1/deliveries?endpoint_id={encoded}", actors.subscribe),
        ("GET", f"/v1/bundles?subscription_id={encoded}", actors.subscribe),
    ]
    failures = []
    for method, path, key in requests:
        kwargs = {"json": {"name_nl": "x"}} if method == "PATCH" else {}
        response = server_client.request(method, path, headers=bearer(key) if key else {},
                                         **kwargs)
        if response.status_code >= 500:
            failures.append((method, path, response.status_code))
        elif response.status_code >= 400:
            assert response.headers["content-type"].startswith(PROBLEM), path
    assert not failures


# ---------------------------------------------------------------- bidi text and headers

BIDI = "Factuur \u202egnp.exe\u202c en \u2066isolate\u2069"


def test_bidi_overrides_in_a_title_are_stored_as_given(client, db_session, actors):
    response = publish(client, actors.publish, title=BIDI, topics=[actors.topic],
                       summary="\u202eevil")
    assert response.status_code == 202, response.text
    update_id = response.json()["id"]
    shown = client.get(f"/v1/updates/{update_id}", headers=bearer(actors.publish)).json()
    assert shown["title"] == BIDI
    assert shown["summary"] == "\u202eevil"


def _parsed(outgoing: mail.OutgoingMail) -> email.message.EmailMessage:
    raw = mail_worker.build_message(outgoing, "Doorstroom <noreply@doorstroom.example>").as_bytes()
    return raw, email.message_from_bytes(raw, policy=policy.default)


UNSAFE_IN_HEADERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _header_block(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0] if b"\r\n\r\n" in raw else raw.split(b"\n\n", 1)[0]


def _assert_clean_headers(raw: bytes, message, *, expected_to: str) -> None:
    names = [name.lower() for name in message]
    assert names.count("to") == 1 and message["To"] == expected_to
    assert not {"bcc", "cc", "x-injected", "reply-to", "content-disposition"} & set(names), names
    assert names.count("subject") == 1
    for name, value in message.items():
        # Decoded (RFC 2047) values carry no control, line-separator or bidi character.
        assert not UNSAFE_IN_HEADERS.search(str(value)), (name, value)
    unfolded = re.sub(rb"\r?\n[ \t]", b" ", _header_block(raw))
    assert not re.search(rb"(?mi)^(bcc|cc|x-injected|reply-to):", unfolded)


HOSTILE_TITLES = [
    "Alarm\r\nBcc: attacker@evil.example",
    "Alarm\nX-Injected: yes",
    "Alarm\rCc: a@evil.example",
    "Alarm\u2028Reply-To: a@evil.example",
    "Alarm\x85Bcc: nel@evil.example",
    "=?utf-8?q?Alarm=0D=0ABcc=3A_encoded=40evil.example?=",
    BIDI,
    "\u202e" * 300,
]


def _update(publisher: Organisation, *, title: str, classification=Classification.public,
            body: str = "Body") -> Update:
    """An unsaved update, as the renderers see it."""
    from datetime import UTC, datetime

    from domain.models import PreventionLevel, Priority, UpdateStatus

    now = datetime.now(UTC)
    return Update(id=uuid.uuid4(), chain_id=uuid.uuid4(), version=1, publisher_id=publisher.id,
                  title=title, summary="summary", body=body, topics=["t"],
                  prevention_level=PreventionLevel.none, target_roles=["all"],
                  priority=Priority.urgent, classification=classification, audience=None,
                  links=[], language="nl", publish_at=now, status=UpdateStatus.published,
                  created_at=now)


@pytest.mark.parametrize("title", HOSTILE_TITLES, ids=range(len(HOSTILE_TITLES)))
@pytest.mark.parametrize("classification", [Classification.public, Classification.restricted])
def test_a_hostile_title_or_publisher_name_injects_no_mail_header(title, classification):
    publisher = Organisation(id=uuid.uuid4(), name="Agentschap " + title.replace("Alarm", "Org"))
    update = _update(publisher, title=title, classification=classification)
    address = "ops@gemeente.example"
    for event in (events.PUBLISHED, events.CORRECTED, events.WITHDRAWN):
        outgoing = mail.render_update_mail(update, publisher, event, address, "nl",
                                           "tok" + "x" * 40, message_id="msg_1")
        assert not UNSAFE_IN_HEADERS.search(outgoing.subject)
        for name, value in outgoing.headers:
            assert not UNSAFE_IN_HEADERS.search(name + value)
        raw, message = _parsed(outgoing)
        _assert_clean_headers(raw, message, expected_to=address)
        if classification is Classification.restricted and "Alarm" in title:
            # A restricted update's notice never carries its title, in any part.
            assert "Alarm" not in outgoing.subject + outgoing.text + (outgoing.html or "")


def test_a_hostile_bundle_section_and_item_inject_no_header():
    from datetime import UTC, datetime, timedelta

    end = datetime(2026, 11, 24, 7, tzinfo=UTC)
    hostile = "Nieuws\r\nBcc: bundle@evil.example\u202e"
    content = {
        "id": str(uuid.uuid4()), "cadence": "daily", "count": 1,
        "window": {"start": end - timedelta(days=1), "end": end},
        "sections": [{"topic": hostile, "topic_name": hostile, "publisher": hostile,
                      "count": 1, "items": [{
                          "update_id": str(uuid.uuid4()), "title": hostile,
                          "summary": hostile, "priority": "urgent",
                          "classification": "public", "notice": False, "state": "new",
                          "url": "javascript:alert(1)", "reasons": []}]}],
    }
    outgoing = mail.render_bundle_mail(content, "ops@gemeente.example", "nl", "t" * 43)
    raw, message = _parsed(outgoing)
    _assert_clean_headers(raw, message, expected_to="ops@gemeente.example")
    assert "javascript:" not in (outgoing.html or "")


# ------------------------------------------------------------------- Markdown, HTML, Atom

HOSTILE_MARKDOWN = [
    "<script>alert(1)</script>",
    "<SCRIPT SRC=//evil.example/x.js></SCRIPT>",
    "[click](javascript:alert(1))",
    "[click](JaVaScRiPt:alert(1))",
    "[click]( javascript:alert(1) )",
    "[click](java\tscript:alert(1))",
    "[click](&#106;avascript:alert(1))",
    "[click](javascript&#58;alert(1))",
    "[click](vbscript:msgbox(1))",
    "[click](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "<javascript:alert(1)>",
    "[ref]\n\n[ref]: javascript:alert(1)",
    '<a href="javascript:alert(1)">x</a>',
    '<img src=x onerror="alert(1)">',
    '![x](https://example.org/x.png" onerror="alert(1))',
    '![x](javascript:alert(1))',
    '<svg onload="alert(1)"></svg>',
    '<iframe src="https://evil.example"></iframe>',
    '<div style="background:url(javascript:alert(1))">x</div>',
    '<a href="https://example.org" onclick="alert(1)">ok</a>',
    "```html\n<script>alert(1)</script>\n```",
    "<!-- <script>alert(1)</script> -->",
    '<form action="https://evil.example"><input name=x></form>',
    '<meta http-equiv="refresh" content="0;url=javascript:alert(1)">',
    '<base href="javascript:alert(1)//">',
    "[x](https://example.org/\"onmouseover=\"alert(1))",
]

_DANGEROUS_TAGS = {"script", "iframe", "object", "embed", "svg", "math", "style", "form",
                   "input", "meta", "base", "link", "frame", "frameset", "img"}
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*):")


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, attrs))

    handle_startendtag = handle_starttag


def assert_inert_html(rendered: str, *, allow_images: bool = False,
                      template: bool = False) -> None:
    """No element that runs script, no event handler, no link or source outside http(s)
    and mailto (checked after the browser's own decoding: entities, case, control chars).
    `template`: a whole mail, whose own layout has a charset `meta` and inline styles."""
    parser = _Elements()
    parser.feed(rendered)
    parser.close()
    dangerous = _DANGEROUS_TAGS - ({"img"} if allow_images else set())
    for tag, attrs in parser.elements:
        names = {name for name, _ in attrs}
        if not (template and tag == "meta" and "http-equiv" not in names):
            assert tag not in dangerous, (tag, attrs, rendered)
        for name, value in attrs:
            assert not name.startswith("on"), (name, rendered)
            assert name not in ("srcdoc", "formaction"), (name, rendered)
            if name == "style":
                assert template, (name, rendered)
                lowered = html.unescape(value or "").lower()
                assert not any(bad in lowered for bad in ("url(", "expression", "script")), \
                    value
            if name in ("href", "src", "action", "xlink:href", "background", "poster"):
                target = re.sub(r"[\x00-\x20]", "", html.unescape(value or "")).lower()
                scheme = _SCHEME.match(target)
                assert scheme is None or scheme.group(1) in ("http", "https", "mailto"), \
                    (name, value, rendered)


@pytest.mark.parametrize("markdown", HOSTILE_MARKDOWN, ids=range(len(HOSTILE_MARKDOWN)))
def test_markdown_is_rendered_inert_in_mail_html(markdown):
    assert_inert_html(mail.markdown_to_html(markdown))


@pytest.mark.parametrize("markdown", HOSTILE_MARKDOWN, ids=range(len(HOSTILE_MARKDOWN)))
def test_markdown_is_rendered_inert_in_the_atom_feed(markdown):
    # Feeds may keep plain images (a reader's choice to load them); nothing that runs.
    assert_inert_html(feeds.render_markdown(markdown), allow_images=True)


def test_the_whole_update_mail_is_inert(db_session):
    publisher = Organisation(id=uuid.uuid4(), name="<script>alert('org')</script>")
    update = _update(publisher, title='<img src=x onerror="alert(1)">',
                     body="\n\n".join(HOSTILE_MARKDOWN))
    update.summary = '<a href="javascript:alert(1)">summary</a>'
    update.links = [{"url": "javascript:alert(1)", "title": "bad"},
                    {"url": "https://example.org/ok", "title": "<b onclick=x>ok</b>"}]
    outgoing = mail.render_update_mail(update, publisher, events.PUBLISHED,
                                       "ops@gemeente.example", "nl", "t" * 43)
    assert outgoing.html is not None
    assert_inert_html(outgoing.html, template=True)
    assert "<script>alert('org')</script>" not in outgoing.html


def test_the_atom_feed_served_over_http_carries_only_inert_html(client, db_session):
    publisher, _ = org_with_key(db_session, "publish")
    town = create_org(db_session)
    topic = create_topic(db_session).slug
    sub = create_feed_subscription(db_session, town, filter={})
    from tests.factories import publish_update

    publish_update(db_session, publisher, title="<script>alert('title')</script>\u202e",
                   summary='<img src=x onerror="alert(1)">', topics=[topic],
                   body="\n\n".join(HOSTILE_MARKDOWN),
                   links=[{"url": "https://example.org/\"><script>x</script>",
                           "title": "<svg onload=alert(1)>"}],
                   audience={"organisations": [str(town.id)]})
    response = client.get(f"/v1/feeds/{sub.feed_token}")
    assert response.status_code == 200, response.text
    root = ET.fromstring(response.content)  # well-formed XML whatever the input
    ns = {"a": feeds.ATOM_NS}
    [entry] = root.findall("a:entry", ns)
    content = entry.find("a:content", ns)
    assert content.get("type") == "html"
    assert_inert_html(content.text or "", allow_images=True)
    # Text constructs are type="text": a reader shows them as text, never as markup.
    for tag in ("title", "summary"):
        element = entry.find(f"a:{tag}", ns)
        assert element is not None and element.get("type", "text") == "text"
    assert b"<script" not in response.content


def test_a_restricted_update_in_the_feed_and_mail_is_a_notice_only(client, db_session):
    publisher = create_org(db_session)
    town = create_org(db_session)
    topic = create_topic(db_session).slug
    sub = create_feed_subscription(db_session, town, filter={})
    from tests.factories import publish_update

    secret = f"secret-{uuid.uuid4().hex}"
    update = publish_update(db_session, publisher, title=secret, body=secret, summary=secret,
                            topics=[topic], classification=Classification.restricted,
                            audience={"organisations": [str(town.id)]})
    assert count(db_session, InboxItem, InboxItem.chain_id == update.chain_id) == 1
    feed = client.get(f"/v1/feeds/{sub.feed_token}")
    assert feed.status_code == 200 and secret.encode() not in feed.content
    outgoing = mail.render_update_mail(update, publisher, events.PUBLISHED,
                                       "ops@gemeente.example", "nl", "t" * 43)
    assert secret not in outgoing.subject + outgoing.text + (outgoing.html or "")


# ------------------------------------------------------ an address the mail library decodes

smtp_server = smtp_fixtures.smtp_server
smtp = smtp_fixtures.smtp

ENCODED_WORD_ADDRESS = "=?utf-8?q?x=0D=0ABcc=3A_a=40evil.example?=@gemeente.example"


def test_an_encoded_word_in_an_address_is_refused_for_that_recipient_only(db_session, smtp):
    """Python's email package decodes an RFC 2047 word even in an address and then refuses
    the CR LF it finds (ValueError). That must refuse this one recipient (553, permanent: the
    subscription is suspended), not stop the batch for every other organisation."""
    from domain.models import Delivery, DeliveryStatus
    from tests.factories import create_email_subscription, publish_update

    publisher = create_org(db_session)
    topic = create_topic(db_session).slug
    hostile_town, town = create_org(db_session), create_org(db_session)
    hostile = create_email_subscription(db_session, hostile_town, confirmed=True,
                                        address=ENCODED_WORD_ADDRESS, filter={})
    normal = create_email_subscription(db_session, town, confirmed=True, filter={})
    publish_update(db_session, publisher, title="Voor iedereen", topics=[topic])

    mail_worker.send_due_emails(db_session, smtp_url=smtp.url)

    assert len(smtp.mailbox.to(normal.channel["address"])) == 1
    assert not [e for e in smtp.mailbox.received if "evil" in str(e[1])]
    for raw in (e[2] for e in smtp.mailbox.received):
        assert not re.search(rb"(?mi)^bcc:", _header_block(raw))
    [delivery] = db_session.scalars(sa.select(Delivery)
                                    .where(Delivery.subscription_id == hostile.id)).all()
    db_session.refresh(hostile)
    assert delivery.status is DeliveryStatus.failed, delivery.last_error
    assert hostile.suspended_at is not None
