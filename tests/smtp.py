"""A real SMTP server for tests (aiosmtpd on 127.0.0.1) and helpers to read what it got.

Test modules import the fixtures by name (`from tests.smtp import smtp, smtp_server`)."""

from __future__ import annotations

import email
import socket
import threading
from email import policy
from email.message import EmailMessage
from html.parser import HTMLParser

import pytest
from aiosmtpd.controller import Controller


class Mailbox:
    """aiosmtpd handler: keeps what it accepts; refuses chosen recipients at RCPT or DATA."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[tuple[str, list[str], bytes]] = []
        self.rcpt_replies: dict[str, str] = {}
        self.data_replies: dict[str, str] = {}
        self.refused_data: list[bytes] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        reply = self.rcpt_replies.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        content = envelope.original_content or envelope.content
        for rcpt in envelope.rcpt_tos:
            if rcpt.lower() in self.data_replies:
                with self.lock:
                    self.refused_data.append(content)
                return self.data_replies[rcpt.lower()]
        with self.lock:
            self.received.append((envelope.mail_from, list(envelope.rcpt_tos), content))
        return "250 2.0.0 Message accepted for delivery"

    def reset(self) -> None:
        with self.lock:
            self.received.clear()
            self.refused_data.clear()
        self.rcpt_replies.clear()
        self.data_replies.clear()

    def to(self, address: str) -> list[EmailMessage]:
        with self.lock:
            found = [content for _, rcpts, content in self.received if address in rcpts]
        return [email.message_from_bytes(c, policy=policy.default) for c in found]

    def envelopes_to(self, address: str) -> list[tuple[str, list[str], bytes]]:
        with self.lock:
            return [e for e in self.received if address in e[1]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SmtpServer:
    def __init__(self, mailbox: Mailbox, port: int) -> None:
        self.mailbox = mailbox
        self.url = f"smtp://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def smtp_server():
    mailbox = Mailbox()
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield SmtpServer(mailbox, port)
    finally:
        controller.stop()


@pytest.fixture
def smtp(smtp_server):
    smtp_server.mailbox.reset()
    return smtp_server


# ----------------------------------------------------------------------- reading mail


def body_parts(message: EmailMessage) -> tuple[str, str]:
    """(text, html) of a multipart/alternative message, checking its shape."""
    assert message.get_content_type() == "multipart/alternative"
    types = [part.get_content_type() for part in message.iter_parts()]
    assert types == ["text/plain", "text/html"]
    return (message.get_body(("plain",)).get_content(),
            message.get_body(("html",)).get_content())


def subject(message: EmailMessage) -> str:
    # A subject that fits a continuation line whole is folded there ("Subject:\r\n [...]");
    # unfolding leaves the folding space in front.
    return str(message["Subject"]).strip()


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def tags_of(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = Tags()
    parser.feed(html)
    return parser.tags
