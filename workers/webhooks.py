"""Webhook sending: signed CloudEvents over HTTP, to the address that passed the SSRF check.

`send_due` is the core: a streaming sender. One event loop keeps up to `MAX_IN_FLIGHT`
requests in flight (at most `webhook_per_endpoint_concurrency` per endpoint), claims more due
deliveries (leased in the database) as slots free up, and records outcomes in small
transactions as they come in; a slow endpoint only ever holds its own slots, never the others'
work. The Celery task `deliveries.send_due` is a thin shell around it, run by the scheduler
every `delivery_poll_seconds` and after routing, on a queue of its own (`deliveries`, see
workers/celery_app.py) so that sending never holds up routing.

Every send checks its URL again (`domain.ssrf.resolve_target`) and then connects to the very
address it checked: the request URL carries the IP literal, the `Host` header and the TLS
server name (SNI, verified against the certificate) carry the real host name. So a DNS answer
that changes between the check and the connection (rebinding) cannot redirect a webhook into
our network. Redirects are never followed.

Headers follow Standard Webhooks: `webhook-id` (the delivery's message id, the same on every
retry), `webhook-timestamp` and `webhook-signature` (one `v1,…` entry per secret: during a
rotation's grace period both the new and the previous secret sign).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import functools
import ipaddress
import logging
import ssl
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp
import certifi
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import Webhook

from domain import deliveries, events, outbox
from domain.db import session_scope
from domain.deliveries import Outcome, WebhookSend
from domain.errors import InvalidInput, NotFound
from domain.models import WebhookEndpoint
from domain.settings import Settings, get_settings
from domain.ssrf import (
    Resolver,
    Target,
    UnsafeTarget,
    names_an_address,
    resolve_target,
    system_resolver,
)
from workers.celery_app import celery_app

log = logging.getLogger("doorstroom.webhooks")

USER_AGENT = "Doorstroom-Webhooks/1"
#: Errors of URLs refused before any packet left start with this (they are not retried).
REFUSED = "refused: "
#: How much of a response body is read (for the attempt's error text and to keep the
#: connection reusable); a longer body is cut off and its connection closed.
MAX_RESPONSE_BYTES = 64 * 1024
ERROR_BODY_CHARS = 200
#: Requests in flight at once over the whole batch (each endpoint also has its own limit).
MAX_IN_FLIGHT = 256
#: One `send_due` stops claiming after this long and finishes what is in flight. Short, so
#: that a worker's warm shutdown does not wait long (the pool cannot tell its tasks to stop);
#: while work keeps coming, the next queued `deliveries.send_due` carries on at once.
MAX_RUN_SECONDS = 5.0
#: While requests are in flight, `send_due` looks for newly due work this often...
POLL_SECONDS = 0.1
#: ...and right after requests finish, but not more often than this.
MIN_CLAIM_INTERVAL = 0.01
#: Finished outcomes are recorded (one transaction) once this many are waiting or the oldest
#: has waited this long.
FLUSH_OUTCOMES = 50
FLUSH_SECONDS = 0.05
#: A batch stops starting requests this long before its lease would run out, plus one
#: request timeout, so that no other sender can claim a delivery that is still in flight.
LEASE_MARGIN_SECONDS = 10.0

T = TypeVar("T")


# ----------------------------------------------------------------------------- the client


#: Makes the connection pool of one (endpoint, server name), given its connection limit.
#: Tests pass one that refuses every address outside 127.0.0.0/8 (tests/receivers.py).
Connector = Callable[[int], aiohttp.BaseConnector]


@functools.cache
def ssl_context() -> ssl.SSLContext:
    """One verifying TLS context per process: making one loads the CA bundle (~50 ms), far
    too slow to do per batch."""
    return ssl.create_default_context(cafile=certifi.where())


def default_connector(limit: int) -> aiohttp.BaseConnector:
    # The URLs carry IP literals, so the connector never resolves a name itself.
    return aiohttp.TCPConnector(limit=limit, limit_per_host=0, ssl=ssl_context(),
                                use_dns_cache=False, keepalive_timeout=30.0)


class EndpointSessions:
    """One HTTP client session, with its own small connection pool, per (endpoint, TLS
    server name).

    Per endpoint, because an endpoint never has more than `webhook_per_endpoint_concurrency`
    requests in flight: its pool needs no more connections than that, and one endpoint's
    connections never queue behind another's. Per server name, because our URLs carry IP
    literals: two host names on one IP (a shared host, a CDN) must not share a TLS
    connection whose certificate was only verified for the first name."""

    def __init__(self, per_endpoint: int, connector: Connector | None = None) -> None:
        self._per_endpoint = max(1, per_endpoint)
        self._connector = connector or default_connector
        self._sessions: dict[tuple[uuid.UUID, str | None], aiohttp.ClientSession] = {}

    def get(self, endpoint_id: uuid.UUID, server_name: str | None) -> aiohttp.ClientSession:
        key = (endpoint_id, server_name)
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = aiohttp.ClientSession(
                connector=self._connector(self._per_endpoint),
                # Each attempt is bounded as a whole by `asyncio.timeout` in `_attempt`.
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=False, trust_env=False, cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent",))
        return session

    async def aclose(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()


# ----------------------------------------------------------------------------- one request


class _Signers:
    """`Webhook` objects per secret, made once per batch."""

    def __init__(self) -> None:
        self._by_secret: dict[str, Webhook] = {}

    def signature(self, secrets: tuple[str, ...], msg_id: str, at: datetime,
                  payload: str) -> str:
        entries = []
        for secret in dict.fromkeys(secrets):  # unique, in order: current secret first
            signer = self._by_secret.get(secret)
            if signer is None:
                signer = self._by_secret[secret] = Webhook(secret)
            entries.append(signer.sign(msg_id, at, payload))
        return " ".join(entries)


def sign(secrets: tuple[str, ...], msg_id: str, at: datetime, payload: str) -> str:
    """The `webhook-signature` header value: `v1,<base64>` per secret, space separated."""
    return _Signers().signature(secrets, msg_id, at, payload)


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class OutgoingRequest:
    url: str  # with the checked IP literal as its host
    headers: dict[str, str]
    body: bytes
    server_name: str | None  # the TLS server name (SNI, and the certificate's name)


def build_request(item: WebhookSend, target: Target, signature: str,
                  timestamp: int) -> OutgoingRequest:
    """A POST to the checked IP, speaking to the original host (Host header, TLS name)."""
    ip = f"[{target.ip}]" if ":" in target.ip else target.ip
    default_port = 443 if target.scheme == "https" else 80
    host = f"[{target.host}]" if ":" in target.host else target.host
    headers = {
        "host": host if target.port == default_port else f"{host}:{target.port}",
        "content-type": events.CONTENT_TYPE,
        "user-agent": USER_AGENT,
        "accept-encoding": "identity",
        "webhook-id": item.message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }
    server_name = (target.host if target.scheme == "https" and not _is_ip_literal(target.host)
                   else None)
    return OutgoingRequest(f"{target.scheme}://{ip}:{target.port}{target.path}", headers,
                           item.payload.encode("utf-8"), server_name)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


async def _read_some(response: aiohttp.ClientResponse) -> bytes:
    """Up to MAX_RESPONSE_BYTES of the body. A body left unread closes its connection when
    the response is released (aiohttp only pools connections whose answer was read)."""
    chunks: list[bytes] = []
    size = 0
    while size < MAX_RESPONSE_BYTES:
        chunk = await response.content.read(MAX_RESPONSE_BYTES - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _describe(status: int, reason: str | None, location: str | None,
              body: bytes) -> str | None:
    if 200 <= status < 300:
        return None
    text = f"HTTP {status} {reason or ''}".rstrip()
    if 300 <= status < 400:
        text += f": redirect to {location or '?'} not followed"
    excerpt = " ".join(body.decode("utf-8", "replace").split())[:ERROR_BODY_CHARS]
    return f"{text}: {excerpt}" if excerpt else text


def network_error(exc: BaseException) -> str:
    """An attempt's error text for a failure below HTTP: a stable kind, then the detail.
    Kinds: `ConnectError` (no connection: refused, unreachable, TLS handshake or
    certificate), `ConnectionClosed` (the receiver hung up before answering), `ReadError`
    (the answer broke off); anything else by its exception's name."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        kind = "ConnectError"
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        kind = "ConnectionClosed"
    elif isinstance(exc, aiohttp.ClientPayloadError):
        kind = "ReadError"
    else:
        kind = type(exc).__name__
    detail = str(exc) or "the connection ended without an answer"
    return f"{kind}: {detail}"


async def _attempt(sessions: EndpointSessions, item: WebhookSend, signers: _Signers,
                   lookups: concurrent.futures.Executor, *, resolver: Resolver,
                   allow_loopback: bool, require_https: bool, timeout: float) -> Outcome:
    at = get_settings().now()
    resolver_called = False

    def tracking_resolver(host: str, port: int) -> list[str]:
        nonlocal resolver_called
        resolver_called = True
        return resolver(host, port)

    started: float | None = None

    def latency() -> int | None:
        return None if started is None else int((time.perf_counter() - started) * 1000)

    try:
        async with asyncio.timeout(timeout):
            try:
                check = functools.partial(resolve_target, item.url,
                                          allow_loopback=allow_loopback,
                                          require_https=require_https,
                                          resolver=tracking_resolver)
                if names_an_address(item.url):
                    target = check()  # no DNS lookup: no need for a thread
                else:
                    target = await asyncio.get_running_loop().run_in_executor(lookups, check)
            except UnsafeTarget as exc:
                return Outcome(item.delivery_id, at, None, error=REFUSED + exc.detail,
                               permanent=True)
            except InvalidInput as exc:
                if resolver_called:  # the name did not resolve: DNS may answer later
                    return Outcome(item.delivery_id, at, None, error=f"dns: {exc.detail}")
                return Outcome(item.delivery_id, at, None, error=REFUSED + exc.detail,
                               permanent=True)
            signed_at = datetime.now(UTC).replace(microsecond=0)  # receivers' clocks: real time
            signature = signers.signature(item.secrets, item.message_id, signed_at,
                                          item.payload)
            request = build_request(item, target, signature, int(signed_at.timestamp()))
            session = sessions.get(item.endpoint_id, request.server_name)
            started = time.perf_counter()
            async with session.post(request.url, data=request.body, headers=request.headers,
                                    allow_redirects=False,
                                    server_hostname=request.server_name) as response:
                body = await _read_some(response)
    except TimeoutError:
        return Outcome(item.delivery_id, at, latency(),
                       error=f"timeout: no complete answer within {timeout:g} s")
    except (aiohttp.ClientError, OSError) as exc:
        return Outcome(item.delivery_id, at, latency(), error=network_error(exc))
    except Exception as exc:  # noqa: BLE001 - one broken item must not sink the batch
        log.exception("webhook delivery %s: unexpected error", item.delivery_id)
        return Outcome(item.delivery_id, at, latency(),
                       error=f"internal: {type(exc).__name__}: {exc}")
    status = response.status
    retry_after = (parse_retry_after(response.headers.get("retry-after"))
                   if status in (429, 503) else None)
    return Outcome(item.delivery_id, at, latency(), status_code=status,
                   error=_describe(status, response.reason, response.headers.get("location"),
                                   body), retry_after=retry_after)


# ----------------------------------------------------------------------------- a batch


async def send_batch(batch: list[WebhookSend], *, resolver: Resolver = system_resolver,
                     allow_loopback: bool, require_https: bool, timeout: float,
                     per_endpoint: int, connector: Connector | None = None,
                     max_in_flight: int = MAX_IN_FLIGHT,
                     budget: float | None = None) -> list[Outcome]:
    """Send every item concurrently and answer one Outcome per item sent.

    Each endpoint gets at most `per_endpoint` requests at once, so a slow endpoint only slows
    itself; each attempt (address check included) is bounded by `timeout` seconds in total.
    With a `budget` (seconds), items that could not start within it are not sent and get no
    Outcome (the caller gives their leases back)."""
    if not batch:
        return []
    sessions = EndpointSessions(per_endpoint, connector)
    gates: defaultdict[uuid.UUID, asyncio.Semaphore] = defaultdict(
        lambda: asyncio.Semaphore(max(1, per_endpoint)))
    overall = asyncio.Semaphore(max(1, max_in_flight))
    signers = _Signers()
    # DNS lookups block: they run in threads of their own, which are not waited for at the
    # end (a lookup that hangs past its timeout must not hold up the batch).
    lookups = concurrent.futures.ThreadPoolExecutor(
        max_workers=min(32, len(batch)), thread_name_prefix="webhook-dns")
    deadline = None if budget is None else time.monotonic() + budget

    async def one(item: WebhookSend) -> Outcome | None:
        async with gates[item.endpoint_id], overall:
            if deadline is not None and time.monotonic() > deadline:
                return None
            return await _attempt(sessions, item, signers, lookups, resolver=resolver,
                                  allow_loopback=allow_loopback, require_https=require_https,
                                  timeout=timeout)

    try:
        results = await asyncio.gather(*(one(item) for item in batch))
    finally:
        lookups.shutdown(wait=False, cancel_futures=True)
        await sessions.aclose()
    return [r for r in results if r is not None]


def require_https_for(settings: Settings) -> bool:
    return settings.environment not in ("development", "test")


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (it roughly halves the event loop's share of each
    request), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _run_in_new_loop(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=_new_event_loop) as runner:
        return runner.run(coro)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to its end on a new event loop, also from a thread whose event loop
    is already running (there, in a thread of its own)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run_in_new_loop(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(_run_in_new_loop, coro).result()


SessionFactory = Callable[[], AbstractContextManager[Session]]


def _claim(session_factory: SessionFactory, limit: int, per_endpoint: int,
           exclude: list[uuid.UUID]) -> list[WebhookSend]:
    with session_factory() as session:
        return deliveries.claim_due_webhooks(session, limit, per_endpoint=per_endpoint,
                                             exclude=exclude)


def _record(session_factory: SessionFactory, outcomes: list[Outcome],
            unsent: list[uuid.UUID]) -> None:
    with session_factory() as session:
        deliveries.record_outcomes(session, outcomes)
        if unsent:
            deliveries.release_leases(session, unsent)


async def stream_due(limit: int = 500, *, session_factory: SessionFactory = session_scope,
                     resolver: Resolver = system_resolver,
                     connector: Connector | None = None,
                     max_in_flight: int = MAX_IN_FLIGHT,
                     max_seconds: float | None = None) -> int:
    """The streaming sender (see the module's description); answers the attempts made.

    It claims only for endpoints below their limit (and at most that limit per endpoint per
    claim), so what it claims starts at once or as soon as that endpoint's own request ends;
    an item that could not start before its lease would run out (less one timeout and
    `LEASE_MARGIN_SECONDS`) is given back unsent. It ends when nothing is due and nothing is
    in flight, or `max_seconds` after it began (then it finishes what is in flight). The
    synchronous database work runs in a thread, one call at a time."""
    settings = get_settings()
    timeout = settings.webhook_timeout_seconds
    per_endpoint = max(1, settings.webhook_per_endpoint_concurrency)
    capacity = max(1, max_in_flight)
    start_budget = max(1.0, deliveries.LEASE.total_seconds() - timeout - LEASE_MARGIN_SECONDS)
    run_until = time.monotonic() + (MAX_RUN_SECONDS if max_seconds is None else max_seconds)
    sessions = EndpointSessions(per_endpoint, connector)
    signers = _Signers()
    lookups = concurrent.futures.ThreadPoolExecutor(max_workers=32,
                                                    thread_name_prefix="webhook-dns")
    gates: defaultdict[uuid.UUID, asyncio.Semaphore] = defaultdict(
        lambda: asyncio.Semaphore(per_endpoint))
    attempt = functools.partial(_attempt, resolver=resolver,
                                allow_loopback=settings.webhook_allow_loopback,
                                require_https=require_https_for(settings), timeout=timeout)
    tasks: dict[asyncio.Task[Outcome | None], WebhookSend] = {}
    outstanding: Counter[uuid.UUID] = Counter()  # claimed and not finished, per endpoint
    finished: list[Outcome] = []
    unsent: list[uuid.UUID] = []
    oldest_unrecorded: float | None = None
    sent = succeeded = given_back = 0

    async def one(item: WebhookSend, start_by: float) -> Outcome | None:
        async with gates[item.endpoint_id]:
            if time.monotonic() > start_by:
                return None
            return await attempt(sessions, item, signers, lookups)

    async def flush() -> None:
        nonlocal finished, unsent, oldest_unrecorded, sent, succeeded, given_back
        outcomes, back = finished, unsent
        finished, unsent, oldest_unrecorded = [], [], None
        await asyncio.to_thread(_record, session_factory, outcomes, back)
        sent += len(outcomes)
        succeeded += sum(o.succeeded for o in outcomes)
        given_back += len(back)

    next_claim = last_claim = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            may_claim = len(tasks) < capacity and now < run_until
            if may_claim and (not tasks or now >= next_claim):
                exclude = [e for e, n in outstanding.items() if n >= per_endpoint]
                asked = min(capacity - len(tasks), limit)
                last_claim = now
                batch = await asyncio.to_thread(_claim, session_factory, asked, per_endpoint,
                                                exclude)
                start_by = now + start_budget  # the leases were taken after `now`
                for item in batch:
                    outstanding[item.endpoint_id] += 1
                    tasks[asyncio.create_task(one(item, start_by))] = item
                # A full claim: there may be more, take it at once; else look again soon.
                next_claim = now if len(batch) >= asked else now + POLL_SECONDS
            if not tasks:
                break  # nothing due (or out of time) and nothing in flight
            now = time.monotonic()
            deadlines = []
            if may_claim and len(tasks) < capacity:
                deadlines.append(next_claim)
            if oldest_unrecorded is not None:
                deadlines.append(oldest_unrecorded + FLUSH_SECONDS)
            wait = max(0.0, min(deadlines) - now) if deadlines else None
            done, _ = await asyncio.wait(tasks, timeout=wait,
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                item = tasks.pop(task)
                outstanding[item.endpoint_id] -= 1
                if outstanding[item.endpoint_id] <= 0:
                    del outstanding[item.endpoint_id]
                outcome = task.result()
                if outcome is None:
                    unsent.append(item.delivery_id)
                else:
                    finished.append(outcome)
            now = time.monotonic()
            if done:
                oldest_unrecorded = oldest_unrecorded or now
                # Slots came free: claim again soon, but not once per finished request.
                next_claim = min(next_claim, last_claim + MIN_CLAIM_INTERVAL)
            if oldest_unrecorded is not None and (
                    not tasks or len(finished) + len(unsent) >= FLUSH_OUTCOMES
                    or now - oldest_unrecorded >= FLUSH_SECONDS):
                await flush()
        if finished or unsent:
            await flush()
    finally:
        # Only on an error (a database failure): what is still in flight is abandoned; its
        # leases run out and another sender tries again.
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        lookups.shutdown(wait=False, cancel_futures=True)
        await sessions.aclose()
    if sent or given_back:
        log.info("webhooks: %d sent (%d succeeded), %d given back", sent, succeeded,
                 given_back)
    return sent


def send_due(limit: int = 500, *, session_factory: SessionFactory = session_scope,
             resolver: Resolver = system_resolver, connector: Connector | None = None,
             max_seconds: float | None = None) -> int:
    """Send every due webhook delivery with the streaming sender (`stream_due`) until nothing
    is due and nothing is in flight (bounded by `max_seconds`, default `MAX_RUN_SECONDS`).
    Answers the number of attempts made."""
    return _run(stream_due(limit, session_factory=session_factory, resolver=resolver,
                           connector=connector, max_seconds=max_seconds))


@celery_app.task(name=deliveries.SEND_TASK, autoretry_for=(OperationalError,),
                 retry_backoff=2, retry_backoff_max=60, max_retries=10)
def send_due_task(outbox_id: int | None = None, **_ignored: Any) -> int:
    """Send what is due. HTTP failures are recorded as attempts (and retried through
    `next_attempt_at`), never by retrying this task; only a database hiccup retries it."""
    sent = send_due()
    if outbox_id is not None:
        with session_scope() as session:
            outbox.mark_completed(session, outbox_id)
            session.commit()
    return sent


# ----------------------------------------------------------------------------- ping


def _ping_item(session: Session, endpoint_id: uuid.UUID) -> WebhookSend:
    endpoint = session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None:
        raise NotFound("webhook endpoint not found")
    now = get_settings().now()
    message_id = f"msg_{uuid.uuid4().hex}"
    payload = events.ping_event(endpoint.id, f"ping_{uuid.uuid4().hex}", now)
    return WebhookSend(uuid.uuid4(), message_id, endpoint.id, endpoint.url,
                       deliveries.signing_secrets(endpoint, now), payload, events.PING)


def send_ping(endpoint_id: uuid.UUID, *, session: Session | None = None,
              resolver: Resolver = system_resolver,
              connector: Connector | None = None) -> Outcome:
    """Send one signed `be.doorstroom.endpoint.ping` event to the endpoint now (enabled or
    not) and answer what came back. Nothing is stored. Pass `session` to read the endpoint
    in the caller's transaction (the API's); without it a session of its own is opened."""
    if session is None:
        with session_scope() as own:
            item = _ping_item(own, endpoint_id)
    else:
        item = _ping_item(session, endpoint_id)
    settings = get_settings()
    outcomes = _run(send_batch(
        [item], resolver=resolver, allow_loopback=settings.webhook_allow_loopback,
        require_https=require_https_for(settings), timeout=settings.webhook_timeout_seconds,
        per_endpoint=1, connector=connector))
    return outcomes[0]
