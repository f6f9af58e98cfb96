"""The immediate cadence on every channel, through a real API and a real worker: one
publish reaches a signed webhook, a mailbox on a real SMTP server and the Atom feed."""

from __future__ import annotations

import re
import time
from pathlib import Path

import feedparser
import httpx
import pytest
import redis
import sqlalchemy as sa
from aiosmtpd.controller import Controller

from domain.db import get_sessionmaker
from domain.models import (
    Delivery,
    InboxItem,
    Kind,
    Level,
    Organisation,
    Subscription,
    Topic,
    Update,
    WebhookEndpoint,
)
from tests.factories import create_key, create_org, create_topic
from tests.processes import Api, Worker, free_port, process_env, running, wait_until
from tests.receivers import Receiver
from tests.smtp import Mailbox

pytestmark = [pytest.mark.worker, pytest.mark.timeout(120)]

BROKER = "redis://127.0.0.1:6379/10"


def test_one_publish_reaches_webhook_mail_and_feed_within_seconds(migrated_database,
                                                                 tmp_path: Path):
    redis.Redis.from_url(BROKER).flushdb()
    mailbox = Mailbox()
    smtp_port = free_port()
    smtp = Controller(mailbox, hostname="127.0.0.1", port=smtp_port)
    smtp.start()
    session = get_sessionmaker()()
    orgs: list[Organisation] = []
    topic = create_topic(session)
    try:
        publisher = create_org(session, level=Level.federal, kind=Kind.federal_body)
        city = create_org(session)
        orgs += [publisher, city]
        publish_key = create_key(session, publisher, "publish")
        city_key = create_key(session, city, "subscribe")
        env = process_env({"DOORSTROOM_BROKER_URL": BROKER,
                           "DOORSTROOM_SMTP_URL": f"smtp://127.0.0.1:{smtp_port}",
                           "DOORSTROOM_WEBHOOK_ALLOW_LOOPBACK": "true",
                           "DOORSTROOM_ENVIRONMENT": "test",
                           "DOORSTROOM_OUTBOX_POLL_SECONDS": "0.5",
                           "DOORSTROOM_DELIVERY_POLL_SECONDS": "1",
                           "DOORSTROOM_BEAT_SCHEDULE_FILE": tmp_path / "beat"})
        api = Api(env, tmp_path)
        worker = Worker(env, tmp_path, beat=True, concurrency=2)
        with Receiver() as receiver, running(api, worker):
            client = api.client(city_key)
            endpoint = client.post("/v1/webhook-endpoints",
                                   json={"url": receiver.url("/hook")}).json()
            receiver.secrets.append(endpoint["secret"])
            filt = {"topics": [topic.slug]}
            for channel in ({"type": "webhook", "endpoint_id": endpoint["id"]},
                            {"type": "email", "address": "livc@city.example"},
                            {"type": "feed"}):
                response = client.post("/v1/subscriptions",
                                       json={"filter": filt, "channel": channel})
                assert response.status_code == 201, response.text
                if channel["type"] == "feed":
                    feed_url = response.json()["feed_url"]
            # The address is confirmed through the link in the mail the worker sends.
            confirmation = wait_until(lambda: mailbox.to("livc@city.example"), timeout=20)
            link = re.search(r"https?://\S+/v1/email/confirm/[\w-]+",
                             confirmation[0].get_body(("plain",)).get_content()).group(0)
            path = link.split("/v1/", 1)[1]
            assert client.get(f"/v1/{path}").status_code == 200

            sent = time.monotonic()
            published = api.client(publish_key).post(
                "/v1/updates", json={"title": "Dreigingsniveau", "topics": [topic.slug],
                                     "body": "Verhoogde waakzaamheid."})
            assert published.status_code == 202
            update_id = published.json()["id"]

            hook = wait_until(lambda: receiver.received("/hook"), timeout=15)
            webhook_seconds = time.monotonic() - sent
            assert hook[0].verified and hook[0].event.get_type() == \
                "be.doorstroom.update.published"
            assert hook[0].data["update"]["id"] == update_id

            def update_mails():
                return [m for m in mailbox.to("livc@city.example")
                        if "Dreigingsniveau" in str(m["Subject"])]

            mails = wait_until(update_mails, timeout=15)
            mail_seconds = time.monotonic() - sent
            assert mails[0]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"

            feed_path = "/v1/" + feed_url.split("/v1/", 1)[1]

            def feed_entries():
                parsed = feedparser.parse(httpx.get(f"{api.base_url}{feed_path}").content)
                return [e for e in parsed.entries if e.title == "Dreigingsniveau"]

            entries = wait_until(feed_entries, timeout=15)
            feed_seconds = time.monotonic() - sent
            assert entries[0].id == f"urn:uuid:{update_id}"
            # "Within seconds" on this 2-core machine, with the worker also polling.
            assert max(webhook_seconds, mail_seconds, feed_seconds) < 10
    finally:
        smtp.stop()
        session.rollback()
        org_ids = [o.id for o in orgs]
        session.execute(sa.delete(Delivery).where(Delivery.organisation_id.in_(org_ids)))
        session.execute(sa.delete(Subscription).where(Subscription.organisation_id.in_(org_ids)))
        session.execute(sa.delete(WebhookEndpoint)
                        .where(WebhookEndpoint.organisation_id.in_(org_ids)))
        session.execute(sa.delete(InboxItem).where(InboxItem.organisation_id.in_(org_ids)))
        session.execute(sa.delete(Update).where(Update.publisher_id.in_(org_ids)))
        session.execute(sa.delete(Organisation).where(Organisation.id.in_(org_ids)))
        session.execute(sa.delete(Topic).where(Topic.id == topic.id))
        session.commit()
        session.close()
