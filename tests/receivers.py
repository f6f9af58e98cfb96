"""A real local webhook receiver for tests, and connections that only reach loopback.

`Receiver` is an HTTP/1.1 server (`http.server.ThreadingHTTPServer`) on 127.0.0.1 and a free
port, in a thread. Each path has a behaviour (`Behaviour`: status, headers, delay,
connection reset). Every request is recorded with its headers and body; its Standard
Webhooks signature is VERIFIED against the receiver's secrets (which secrets verify is
recorded) and its body PARSED as a structured CloudEvent with the CloudEvents SDK.

    with Receiver(secrets=[secret]) as rx:
        rx.route("/flaky", Behaviour(status=500))
        url = rx.url("/flaky")

`LoopbackOnly` makes connectors that refuse (before any connection) every request whose URL
host is not an IP literal in 127.0.0.0/8, recording what they saw: pass it to the sender
(`connector=`) to prove that no packet goes anywhere else.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import aiohttp
from cloudevents.core.bindings.http import HTTPMessage, from_structured
from cloudevents.core.formats.json import JSONFormat
from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass(frozen=True)
class Behaviour:
    """What the receiver does for a path."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    #: Seconds to wait before answering (cut short when the receiver stops).
    delay: float = 0.0
    #: Close the connection without an answer (a TCP reset).
    reset: bool = False


OK = Behaviour()


def status(code: int, **headers: str) -> Behaviour:
    return Behaviour(status=code, headers=dict(headers))


def slow(seconds: float, code: int = 200) -> Behaviour:
    return Behaviour(status=code, delay=seconds)


RESET = Behaviour(reset=True)


@dataclass
class Received:
    """One request as the receiver saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    started: float  # time.monotonic() when the request had been read
    finished: float | None = None  # when the answer was written (or the socket reset)
    #: Indexes (into the receiver's secrets) of every secret the signature verifies with.
    verified_with: list[int] = field(default_factory=list)
    verify_error: str | None = None
    event: Any = None  # a cloudevents.core CloudEvent
    event_error: str | None = None

    @property
    def verified(self) -> bool:
        return bool(self.verified_with)

    @property
    def data(self) -> Any:
        return None if self.event is None else self.event.get_data()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real receivers do
    timeout = 10  # an idle keep-alive connection is closed after this
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def do_POST(self) -> None:  # noqa: N802
        self._serve()

    def do_GET(self) -> None:  # noqa: N802
        self._serve()

    def _serve(self) -> None:
        receiver = self.server.receiver
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path.split("?", 1)[0]
        record = receiver._record(self.command, self.path, dict(self.headers.items()), body)
        behaviour = receiver.behaviour(path)
        receiver._enter(path)
        try:
            if behaviour.delay and receiver._stopping.wait(behaviour.delay):
                self.close_connection = True
                return
            if behaviour.reset:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()
                return
            self.send_response(behaviour.status)
            for name, value in behaviour.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(behaviour.body)))
            self.end_headers()
            if behaviour.body:
                self.wfile.write(behaviour.body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True  # the client gave up (a timeout): nothing to answer
        finally:
            record.finished = time.monotonic()
            receiver._leave(path)

    def finish(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().finish()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 drops bursts of connections (1 s SYN retries)
    receiver: Receiver

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # resets and client timeouts are part of the tests


class Receiver:
    """A webhook receiver on 127.0.0.1 (see the module docstring)."""

    def __init__(self, secrets: list[str] | None = None,
                 routes: dict[str, Behaviour] | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self.secrets: list[str] = list(secrets or [])
        self._routes: dict[str, Behaviour] = {"/ok": OK, **(routes or {})}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.requests: list[Received] = []
        self._in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.receiver = self
        self.scheme = "http"
        if tls is not None:  # the handshake happens on accept, in the serving thread
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True,
                                        name=f"receiver-{self.port}")

    # -- life cycle
    def start(self) -> Receiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- configuration
    def url(self, path: str = "/ok", host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def route(self, path: str, behaviour: Behaviour) -> None:
        with self._lock:
            self._routes[path] = behaviour

    def behaviour(self, path: str) -> Behaviour:
        with self._lock:
            return self._routes.get(path, Behaviour(status=404))

    # -- what was received
    def received(self, path: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.requests
                    if path is None or r.path.split("?", 1)[0] == path]

    def _enter(self, path: str) -> None:
        with self._lock:
            self._in_flight[path] = self._in_flight.get(path, 0) + 1
            self.max_in_flight[path] = max(self.max_in_flight.get(path, 0),
                                           self._in_flight[path])

    def _leave(self, path: str) -> None:
        with self._lock:
            self._in_flight[path] -= 1

    def _record(self, method: str, path: str, headers: dict[str, str],
                body: bytes) -> Received:
        lowered = {k.lower(): v for k, v in headers.items()}
        record = Received(method, path, lowered, body, time.monotonic())
        for index, secret in enumerate(self.secrets):
            try:
                Webhook(secret).verify(body, lowered)
                record.verified_with.append(index)
            except WebhookVerificationError as exc:
                record.verify_error = str(exc)
        try:
            if lowered.get("content-type") != "application/cloudevents+json":
                raise ValueError(f"not a structured CloudEvent: {lowered.get('content-type')}")
            record.event = from_structured(HTTPMessage(lowered, body), JSONFormat())
        except Exception as exc:  # noqa: BLE001 - recorded for the test to assert on
            record.event_error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.requests.append(record)
        return record


# ----------------------------------------------------------------------------- TLS


def make_tls(*names: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A throwaway CA and a server certificate for `names`: answers (server context, client
    context that trusts only that CA)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def build(subject: str, issuer: x509.Name | None, issuer_key: Any, key: Any,
              ca: bool) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (x509.CertificateBuilder().subject_name(name)
                   .issuer_name(issuer or name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(hours=1))
                   .not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = build("Doorstroom test CA", None, ca_key, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build(names[0], ca_cert.subject, ca_key, key, ca=False)
    pem = serialization.Encoding.PEM
    with tempfile.TemporaryDirectory() as folder:
        cert_file, key_file = f"{folder}/cert.pem", f"{folder}/key.pem"
        with open(cert_file, "wb") as out:
            out.write(cert.public_bytes(pem))
        with open(key_file, "wb") as out:
            out.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cadata=ca_cert.public_bytes(pem).decode())
    return server, client


# ----------------------------------------------------------------------------- connections


class Refused(aiohttp.ClientConnectionError):
    """The loopback-only connector would not connect there."""


class LoopbackOnly:
    """A connector factory for the webhook sender (`connector=`) whose connectors open
    connections only to URL hosts that are IP literals in 127.0.0.0/8 and refuse everything
    else before any socket is opened. Records every request it saw (aiohttp's
    `ClientRequest`: `.url`, `.headers`). For tests only: production never uses it."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context
        self.seen: list[aiohttp.ClientRequest] = []
        self.refused: list[aiohttp.ClientRequest] = []

    def __call__(self, limit: int) -> aiohttp.BaseConnector:
        return _LoopbackOnlyConnector(self, limit=limit,
                                      ssl=self.ssl_context if self.ssl_context else True)


class _LoopbackOnlyConnector(aiohttp.TCPConnector):
    def __init__(self, guard: LoopbackOnly, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._guard = guard

    async def connect(self, req: aiohttp.ClientRequest, traces: Any,
                      timeout: aiohttp.ClientTimeout) -> Any:
        self._guard.seen.append(req)
        host = req.url.host or ""
        try:
            loopback = ipaddress.ip_address(host) in ipaddress.ip_network("127.0.0.0/8")
        except ValueError:
            loopback = False
        if not loopback:
            self._guard.refused.append(req)
            raise Refused(f"LoopbackOnly refused {host}")
        return await super().connect(req, traces, timeout)
