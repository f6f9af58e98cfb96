"""Push deliveries (webhook, e-mail): creation, claiming, outcomes, retries and replay.

A delivery is one logical push of one event to one subscription's channel; its attempts are
rows of their own. Retries are scheduled in the database (`next_attempt_at`), never as
far-future broker messages: a periodic sender picks up whatever is due.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.functions import FunctionElement

from domain import audit, events, outbox
from domain.db import rowcount
from domain.errors import InvalidInput, NotFound
from domain.models import (
    Cadence,
    ChannelType,
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    InboxItem,
    Organisation,
    Subscription,
    Update,
    WebhookEndpoint,
)
from domain.settings import get_settings

SEND_TASK = "deliveries.send_due"
SEND_EMAIL_TASK = "email.send_due"
#: Retry delays grow from 10 s by a factor of 3, capped at 6 h, jittered by ±20 %; a
#: delivery still failing 72 h after creation is given up (about 16 attempts).
FIRST_RETRY = timedelta(seconds=10)
MAX_RETRY_DELAY = timedelta(hours=6)
RETRY_HORIZON = timedelta(hours=72)
#: How long a sender holds what it claimed (`DOORSTROOM_DELIVERY_LEASE_SECONDS`, default
#: 120 s): what a dead sender claimed is sent again after this long.
LEASE = timedelta(seconds=get_settings().delivery_lease_seconds)


class new_uuid(FunctionElement[Any]):  # noqa: N801 - reads like the SQL function it is
    type = sa.Uuid()
    inherit_cache = True


@compiles(new_uuid, "postgresql")
def _new_uuid_pg(_element: new_uuid, _compiler: Any, **_kw: Any) -> str:
    return "gen_random_uuid()"


@compiles(new_uuid, "sqlite")
def _new_uuid_sqlite(_element: new_uuid, _compiler: Any, **_kw: Any) -> str:
    return "lower(hex(randomblob(16)))"  # SQLAlchemy keeps UUIDs as 32 hex digits there


class new_message_id(FunctionElement[Any]):  # noqa: N801
    type = sa.String()
    inherit_cache = True


@compiles(new_message_id, "postgresql")
def _msg_pg(_element: new_message_id, _compiler: Any, **_kw: Any) -> str:
    return "'msg_' || replace(gen_random_uuid()::text, '-', '')"


@compiles(new_message_id, "sqlite")
def _msg_sqlite(_element: new_message_id, _compiler: Any, **_kw: Any) -> str:
    return "'msg_' || lower(hex(randomblob(16)))"


# ------------------------------------------------------------------------------- creation


def update_deliveries_insert(dialect: str, subscription_ids: sa.Select[Any],
                             directed_orgs: sa.Select[Any] | None, urgent: bool) -> Any:
    """One statement: a delivery for every push subscription that should get an update
    version now. A subscription qualifies when its organisation received the update and
    either its filter matched (`subscription_ids`) or it takes directed updates and the
    organisation was reached by a rule or the audience. Daily and weekly subscriptions wait
    for their bundle, except for urgent updates. Repeats are absorbed by the unique key.

    Built once per shape by the caller (routing), so the values are bind parameters:
    update_id, chain, event_type, payload (the webhook body, `events.update_event`) and
    now, besides whatever `subscription_ids` and `directed_orgs` take. (None is named after
    a column of `updates`: routing runs this with its UPDATE of the update row.)"""
    s = Subscription
    update_id = sa.bindparam("update_id", type_=sa.Uuid)
    now = sa.bindparam("now", type_=Delivery.created_at.type)
    reached = sa.or_(s.id.in_(subscription_ids),
                     sa.and_(s.include_directed.is_(True), s.organisation_id.in_(directed_orgs))
                     if directed_orgs is not None else sa.false())
    cadence_ok = sa.true() if urgent else s.cadence == Cadence.immediate
    select = (
        sa.select(new_uuid(), new_message_id(), s.organisation_id, s.id,
                  s.webhook_endpoint_id, update_id, s.channel_type,
                  sa.bindparam("event_type", type_=Delivery.event_type.type),
                  sa.case((s.channel_type == ChannelType.webhook,
                           sa.bindparam("payload", type_=Delivery.payload.type)),
                          else_=sa.null()),
                  sa.literal(DeliveryStatus.pending.value), sa.literal(0), now, now)
        .join(InboxItem, sa.and_(InboxItem.organisation_id == s.organisation_id,
                                 InboxItem.chain_id == sa.bindparam("chain", type_=sa.Uuid),
                                 InboxItem.update_id == update_id))
        .where(takes_pushes(s), cadence_ok, reached)
    )
    return _deliveries_insert(dialect, select)


def takes_pushes(s: type[Subscription]) -> sa.ColumnElement[bool]:
    """Subscriptions that take push deliveries now: webhook or e-mail, active, not suspended.
    The channels are constants in the SQL, not parameters, so that the planner can always
    use the partial index `ix_subscriptions_push` (also in a prepared statement's generic
    plan)."""
    push: list[Any] = [sa.literal_column(f"'{c.value}'")
                       for c in (ChannelType.webhook, ChannelType.email)]
    return sa.and_(s.channel_type.in_(push), s.active.is_(True), s.suspended_at.is_(None))


def senders_to_wake(session: Session, update_id: uuid.UUID) -> tuple[str, ...]:
    """The sender tasks to run now for this update's pending deliveries, one per channel
    that has some: a webhook-only update does not wake the e-mail sender, which would
    otherwise take a sender process for nothing."""
    return wake_tasks(session.scalars(
        sa.select(Delivery.channel).distinct()
        .where(Delivery.update_id == update_id, Delivery.status == DeliveryStatus.pending)))


def wake_tasks(channels: Iterable[ChannelType]) -> tuple[str, ...]:
    """The sender tasks for deliveries waiting on these channels (see `senders_to_wake`)."""
    waiting = set(channels)
    return tuple(task for channel, task in ((ChannelType.webhook, SEND_TASK),
                                            (ChannelType.email, SEND_EMAIL_TASK))
                 if channel in waiting)


_DELIVERIES: sa.Table = Delivery.__table__  # type: ignore[assignment]
_DELIVERY_COLUMNS = ["id", "message_id", "organisation_id", "subscription_id", "endpoint_id",
                     "update_id", "channel", "event_type", "payload", "status", "attempt_count",
                     "next_attempt_at", "created_at"]


def _deliveries_insert(dialect: str, select: sa.Select[Any]) -> Any:
    """INSERT … SELECT of deliveries (the select's columns as `_DELIVERY_COLUMNS`), whose
    repeats the unique key absorbs."""
    insert = _insert_for(dialect)(_DELIVERIES)
    return (insert.from_select(_DELIVERY_COLUMNS, select.where(sa.true()))
            .on_conflict_do_nothing(index_elements=["update_id", "subscription_id",
                                                    "event_type"])
            .execution_options(preserve_rowcount=True))


def _insert_deliveries(session: Session, select: sa.Select[Any]) -> int:
    insert = _deliveries_insert(session.get_bind().dialect.name, select)
    return max(rowcount(session.execute(insert)), 0)


def _dialect_insert(session: Session) -> Any:
    return _insert_for(session.get_bind().dialect.name)


def _insert_for(dialect: str) -> Any:
    from sqlalchemy.dialects import postgresql, sqlite

    return postgresql.insert if dialect == "postgresql" else sqlite.insert


def create_withdrawal_deliveries(session: Session, update: Update) -> int:
    """Tell every push subscription that was sent a version of this chain that it is
    withdrawn (idempotent through the unique key). "Was sent" means a delivery of the chain
    that succeeded or is still pending (it may yet arrive); one that failed or was skipped
    never reached the receiver, so there is nothing to withdraw there."""
    publisher = session.get(Organisation, update.publisher_id)
    assert publisher is not None
    now = get_settings().now()
    payload = events.update_event(update, publisher, events.WITHDRAWN, now)
    earlier = (sa.select(Delivery.subscription_id).join(Update, Update.id == Delivery.update_id)
               .where(Update.chain_id == update.chain_id,
                      Delivery.event_type.in_([events.PUBLISHED, events.CORRECTED]),
                      Delivery.status.in_([DeliveryStatus.succeeded,
                                           DeliveryStatus.pending])))
    s = Subscription
    select = sa.select(
        new_uuid(), new_message_id(), s.organisation_id, s.id, s.webhook_endpoint_id,
        sa.literal(update.id, sa.Uuid), s.channel_type, sa.literal(events.WITHDRAWN),
        sa.case((s.channel_type == ChannelType.webhook, payload), else_=sa.null()),
        sa.literal(DeliveryStatus.pending.value), sa.literal(0),
        sa.literal(now, Delivery.next_attempt_at.type),
        sa.literal(now, Delivery.created_at.type),
    ).where(s.id.in_(earlier), s.active.is_(True), s.suspended_at.is_(None))
    return _insert_deliveries(session, select)


# ------------------------------------------------------------------------------- sending


@dataclass(frozen=True)
class WebhookSend:
    """Everything a sender needs for one attempt, read in the claiming transaction."""

    delivery_id: uuid.UUID
    message_id: str
    endpoint_id: uuid.UUID
    url: str
    #: Current secret first; during a rotation's grace period the previous one too.
    secrets: tuple[str, ...]
    payload: str
    event_type: str


@dataclass(frozen=True)
class Outcome:
    delivery_id: uuid.UUID
    at: datetime
    latency_ms: int | None
    status_code: int | None = None
    error: str | None = None
    #: Seconds from a 429/503 `Retry-After` header.
    retry_after: float | None = None
    #: A failure no retry can mend, whatever the status (the URL was refused before sending:
    #: an address webhooks may not reach, or a URL that breaks the rules).
    permanent: bool = False

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def retryable(self) -> bool:
        """Network errors, timeouts, 5xx and 429 are worth another try; other 4xx, 3xx and
        refused URLs are not."""
        if self.permanent:
            return False
        if self.status_code is None:
            return True
        return self.status_code >= 500 or self.status_code in (408, 429)


def next_retry_at(attempts: int, created_at: datetime, now: datetime,
                  retry_after: float | None = None,
                  rng: random.Random | None = None) -> datetime | None:
    """When to try again after `attempts` failed tries, or None when retries are over."""
    rng = rng or random.Random()
    base = min(MAX_RETRY_DELAY, FIRST_RETRY * (3 ** max(0, attempts - 1)))
    delay = base * rng.uniform(0.8, 1.2)
    if retry_after is not None:
        delay = max(delay, timedelta(seconds=min(retry_after, MAX_RETRY_DELAY.total_seconds())))
    when = now + delay
    return None if when > created_at + RETRY_HORIZON else when


def signing_secrets(endpoint: WebhookEndpoint, now: datetime) -> tuple[str, ...]:
    """The endpoint's current secret, and the previous one during a rotation's grace period."""
    from domain.secrets import decrypt

    keys = [decrypt(endpoint.secret_ciphertext)]
    if (endpoint.previous_secret_ciphertext and endpoint.previous_secret_expires_at
            and endpoint.previous_secret_expires_at > now):
        keys.append(decrypt(endpoint.previous_secret_ciphertext))
    return tuple(keys)


def _claim_per_endpoint(due: list[sa.ColumnElement[bool]], limit: int, per_endpoint: int,
                        exclude: Collection[uuid.UUID]) -> sa.Select[Any]:
    """PostgreSQL: the ids of each enabled endpoint's oldest `per_endpoint` due deliveries
    (an index probe each, `ix_deliveries_endpoint_due`), locked with SKIP LOCKED, `limit`
    in all.
    Endpoints that succeeded longest ago (or never) come first, so that when more is due
    than one claim takes, every endpoint gets its turn. The cost follows the endpoints and
    the claim, not the backlog: ranking every pending delivery instead grew with it."""
    endpoint = WebhookEndpoint.__table__.alias("endpoint")
    picked = (sa.select(Delivery.id)
              .where(*due, Delivery.endpoint_id == endpoint.c.id)
              .order_by(Delivery.next_attempt_at, Delivery.id)
              .limit(max(1, per_endpoint))
              .with_for_update(skip_locked=True)
              .lateral("picked"))
    endpoints = [endpoint.c.enabled.is_(True)]
    if exclude:
        endpoints.append(endpoint.c.id.not_in(list(exclude)))
    return (sa.select(picked.c.id)
            .select_from(endpoint.join(picked, sa.true()))
            .where(*endpoints)
            .order_by(endpoint.c.last_success_at.asc().nulls_first(), endpoint.c.id)
            .limit(limit))


def claim_due_webhooks(session: Session, limit: int = 500, *,
                       per_endpoint: int | None = None,
                       exclude: Collection[uuid.UUID] = ()) -> list[WebhookSend]:
    """Lease up to `limit` due webhook deliveries to this sender and commit the lease.

    `FOR UPDATE SKIP LOCKED` lets several senders work side by side; a sender that dies
    leaves leases that simply run out. Deliveries to endpoints that do not take the event
    type are marked skipped. With `per_endpoint`, at most that many deliveries of any one
    endpoint are claimed (the oldest due first), so one endpoint's backlog never fills the
    claim; endpoints in `exclude` (a sender's endpoints already at their limit) are left out.

    This runs many times a second under load, so it reads plain columns (no ORM objects for
    the deliveries) and leases them in one UPDATE."""
    now = get_settings().now()
    due = [Delivery.status == DeliveryStatus.pending,
           Delivery.channel == ChannelType.webhook,
           Delivery.next_attempt_at <= now,
           sa.or_(Delivery.leased_until.is_(None), Delivery.leased_until < now)]
    columns = (Delivery.id, Delivery.message_id, Delivery.endpoint_id, Delivery.payload,
               Delivery.event_type)
    postgres = session.get_bind().dialect.name == "postgresql"
    lease = {"leased_until": now + LEASE}
    if postgres and per_endpoint is not None:
        # Pick, lock and lease in one statement: one round trip, no list of ids sent back.
        picked = _claim_per_endpoint(due, limit, per_endpoint, exclude).subquery("picked")
        rows = session.execute(sa.update(Delivery).where(Delivery.id == picked.c.id)
                               .values(lease).returning(*columns)
                               .execution_options(synchronize_session=False)).all()
    else:
        if exclude:
            due.append(Delivery.endpoint_id.not_in(list(exclude)))
        stmt = (sa.select(*columns)
                .join(WebhookEndpoint, WebhookEndpoint.id == Delivery.endpoint_id)
                .where(*due, WebhookEndpoint.enabled.is_(True))
                .order_by(Delivery.next_attempt_at).limit(limit))
        if per_endpoint is not None:
            ranked = (sa.select(Delivery.id, sa.func.row_number().over(
                          partition_by=Delivery.endpoint_id,
                          order_by=(Delivery.next_attempt_at, Delivery.id)).label("rank"))
                      .where(*due).subquery())
            stmt = stmt.where(Delivery.id.in_(
                sa.select(ranked.c.id).where(ranked.c.rank <= max(1, per_endpoint))))
        if postgres:
            stmt = stmt.with_for_update(of=Delivery, skip_locked=True)
        rows = session.execute(stmt).all()
        if rows:
            session.execute(sa.update(Delivery).where(Delivery.id.in_([r.id for r in rows]))
                            .values(lease).execution_options(synchronize_session=False))
    if not rows:
        session.commit()
        return []
    endpoints = {e.id: e for e in session.scalars(sa.select(WebhookEndpoint).where(
        WebhookEndpoint.id.in_({row.endpoint_id for row in rows})))}
    secrets = {e.id: signing_secrets(e, now) for e in endpoints.values()}
    claimed: list[WebhookSend] = []
    skipped: list[uuid.UUID] = []
    for row in rows:
        endpoint = endpoints[row.endpoint_id]
        if endpoint.event_types and row.event_type not in endpoint.event_types:
            skipped.append(row.id)
            continue
        claimed.append(WebhookSend(row.id, row.message_id, endpoint.id, endpoint.url,
                                   secrets[endpoint.id], row.payload or "", row.event_type))
    if skipped:
        session.execute(sa.update(Delivery).where(Delivery.id.in_(skipped))
                        .values(status=DeliveryStatus.skipped, leased_until=None)
                        .execution_options(synchronize_session=False))
    session.commit()
    return claimed


def _among(session: Session, column: Any, ids: list[uuid.UUID]) -> sa.ColumnElement[bool]:
    """`column IN ids`; on PostgreSQL as `= ANY(array)`, one parameter, so the statement's
    text is the same whatever the number of ids (the driver prepares it once)."""
    if session.get_bind().dialect.name == "postgresql":
        return column == sa.any_(sa.bindparam("ids", ids, type_=postgresql.ARRAY(sa.Uuid)))
    return column.in_(ids)


def record_outcomes(session: Session, outcomes: list[Outcome]) -> None:
    """Store every attempt and move each delivery on: succeeded, retry later, or failed.

    A 410 disables the endpoint. An endpoint failing without a success for longer than
    `webhook_disable_after` is disabled and its organisation told. Commits once.

    Senders call this for every few dozen answers, so it works in bulk: one locking SELECT
    of the columns it needs, one INSERT of the attempts, one executemany UPDATE of the
    deliveries and one UPDATE of the endpoints that answered."""
    if not outcomes:
        return
    settings = get_settings()
    now = settings.now()
    # Lock the deliveries first (in id order, so two senders cannot deadlock) and leave out
    # any that vanished while in flight (their endpoint was deleted): an attempt row for them
    # would break the foreign key and lose the whole batch's outcomes.
    ids = sorted({o.delivery_id for o in outcomes})
    locked = {row.id: row for row in session.execute(
        sa.select(Delivery.id, Delivery.status, Delivery.attempt_count, Delivery.created_at,
                  Delivery.endpoint_id)
        .where(_among(session, Delivery.id, ids)).order_by(Delivery.id).with_for_update())}
    outcomes = [o for o in outcomes if o.delivery_id in locked]
    if not outcomes:
        session.commit()
        return
    session.execute(sa.insert(DeliveryAttempt), [
        {"delivery_id": o.delivery_id, "at": o.at, "latency_ms": o.latency_ms,
         "status_code": o.status_code, "error": (o.error or "")[:1000] or None}
        for o in outcomes])
    attempts = {row_id: row.attempt_count for row_id, row in locked.items()}
    moved: list[dict[str, Any]] = []
    endpoint_results: dict[uuid.UUID, list[Outcome]] = {}
    for outcome in outcomes:
        row = locked[outcome.delivery_id]
        attempts[row.id] += 1
        if row.endpoint_id is not None:
            endpoint_results.setdefault(row.endpoint_id, []).append(outcome)
        if row.status is not DeliveryStatus.pending:
            continue  # finished meanwhile by a sender whose lease came later: keep its result
        change: dict[str, Any] = {
            "id": row.id, "status": DeliveryStatus.pending, "last_attempt_at": outcome.at,
            "last_status_code": outcome.status_code,
            "last_error": (outcome.error or "")[:1000] or None, "leased_until": None,
            "succeeded_at": None, "next_attempt_at": None}
        if outcome.succeeded:
            change.update(status=DeliveryStatus.succeeded, succeeded_at=outcome.at)
        elif outcome.retryable:
            change["next_attempt_at"] = next_retry_at(attempts[row.id], row.created_at, now,
                                                      outcome.retry_after)
            if change["next_attempt_at"] is None:
                change["status"] = DeliveryStatus.failed
        else:
            change["status"] = DeliveryStatus.failed
        moved.append(change)
    for change in moved:
        change["attempt_count"] = attempts.pop(change["id"])
    if moved:
        session.execute(sa.update(Delivery), moved)  # executemany, by primary key
    if attempts:  # deliveries finished by another sender: only their attempt count moves
        session.execute(sa.update(Delivery), [{"id": i, "attempt_count": n}
                                              for i, n in attempts.items()])
    answered = sorted(e for e, results in endpoint_results.items()
                      if any(r.succeeded for r in results)
                      and not any(r.status_code == 410 for r in results))
    if answered:
        session.execute(sa.update(WebhookEndpoint).where(WebhookEndpoint.id.in_(answered))
                        .values(failing_since=None, last_success_at=now)
                        .execution_options(synchronize_session=False))
    # In a fixed order: two senders updating the same endpoints must not deadlock.
    for endpoint_id in sorted(set(endpoint_results) - set(answered)):
        _update_endpoint_health(session, endpoint_id, endpoint_results[endpoint_id], now)
    session.commit()


def release_leases(session: Session, delivery_ids: list[uuid.UUID]) -> None:
    """Give back deliveries a sender claimed but did not get to send (it ran out of time
    before their lease would): the next sender takes them at once. Commits."""
    if delivery_ids:
        session.execute(sa.update(Delivery)
                        .where(Delivery.id.in_(delivery_ids),
                               Delivery.status == DeliveryStatus.pending)
                        .values(leased_until=None))
    session.commit()


def _update_endpoint_health(session: Session, endpoint_id: uuid.UUID, results: list[Outcome],
                            now: datetime) -> None:
    endpoint = session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None:
        return
    if any(r.status_code == 410 for r in results):
        _disable(session, endpoint, "the receiver answered 410 Gone", now)
        return
    if any(r.succeeded for r in results):
        endpoint.failing_since = None
        endpoint.last_success_at = now
        return
    endpoint.failing_since = endpoint.failing_since or now
    limit = timedelta(seconds=get_settings().webhook_disable_after_seconds)
    if now - endpoint.failing_since >= limit:
        since = f"{endpoint.failing_since:%Y-%m-%d %H:%M} UTC"
        _disable(session, endpoint, f"every delivery failed since {since}", now)


def _disable(session: Session, endpoint: WebhookEndpoint, reason: str, now: datetime) -> None:
    if not endpoint.enabled:
        return
    endpoint.enabled = False
    endpoint.disabled_at = now
    endpoint.disabled_reason = reason
    audit.record(session, audit.SYSTEM, "webhook_endpoint.disabled", "webhook_endpoint",
                 endpoint.id, reason=reason)
    from domain.mail import SEND_NOTICE_TASK
    from domain.notices import notify_organisation

    title = "Webhook endpoint disabled"
    notify_organisation(
        session, endpoint.organisation_id, title=title,
        body=(f"Doorstroom stopped sending to {endpoint.url}: {reason}. Updates still reach "
              "your inbox. Fix the receiver, then re-enable the endpoint "
              "(PATCH /v1/webhook-endpoints/{id} with enabled: true) and replay what failed "
              "(POST …/replay)."),
    )
    # And by e-mail, to the organisation's escalation (or general) address: a disabled
    # endpoint is easily missed in the very inbox it was meant to feed.
    outbox.enqueue(session, SEND_NOTICE_TASK, {
        "organisation_id": str(endpoint.organisation_id),
        "subject": f"Doorstroom: {title.lower()}",
        "text": (f"Doorstroom stopped sending updates to your webhook endpoint {endpoint.url} "
                 f"(id {endpoint.id}) on {now:%Y-%m-%d %H:%M} UTC: {reason}.\n\n"
                 "Updates still reach your organisation's inbox. Fix the receiver, then "
                 f"re-enable the endpoint (PATCH /v1/webhook-endpoints/{endpoint.id} with "
                 "enabled: true) and replay what failed "
                 f"(POST /v1/webhook-endpoints/{endpoint.id}/replay).\n\n"
                 "-- \nThis is an automated message from Doorstroom.\n"),
    })


def pending_due_count(session: Session) -> int:
    now = get_settings().now()
    return session.scalar(sa.select(sa.func.count()).select_from(Delivery).where(
        Delivery.status == DeliveryStatus.pending, Delivery.channel == ChannelType.webhook,
        Delivery.next_attempt_at <= now)) or 0


# ------------------------------------------------------------------------------- replay


def get_delivery(session: Session, actor: audit.Actor, delivery_id: uuid.UUID) -> Delivery:
    delivery = session.get(Delivery, delivery_id)
    if delivery is None or (not actor.has("admin")
                            and delivery.organisation_id != actor.organisation_id):
        raise NotFound("delivery not found")
    return delivery


def retry_delivery(session: Session, actor: audit.Actor, delivery_id: uuid.UUID) -> Delivery:
    """Send again now, under the same message id (receivers deduplicate on it)."""
    delivery = get_delivery(session, actor, delivery_id)
    if delivery.status is DeliveryStatus.skipped:
        raise InvalidInput("a skipped delivery is not sent: the endpoint does not take its "
                           "event type", field="id")
    _make_due(delivery)
    audit.record(session, actor, "delivery.retried", "delivery", delivery.id)
    outbox.enqueue(session, SEND_TASK, {})
    session.commit()
    return delivery


def replay_endpoint(session: Session, actor: audit.Actor, endpoint_id: uuid.UUID,
                    since: datetime, until: datetime) -> int:
    """Make every failed delivery of the endpoint created in [since, until) due again."""
    if until <= since:
        raise InvalidInput("until must be after since", field="until")
    endpoint = session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None or endpoint.organisation_id != actor.organisation_id:
        raise NotFound("webhook endpoint not found")
    now = get_settings().now()
    result = session.execute(
        sa.update(Delivery).where(Delivery.endpoint_id == endpoint.id,
                                  Delivery.status == DeliveryStatus.failed,
                                  Delivery.created_at >= since, Delivery.created_at < until)
        .values(status=DeliveryStatus.pending, next_attempt_at=now, leased_until=None))
    count = rowcount(result)
    audit.record(session, actor, "webhook_endpoint.replayed", "webhook_endpoint", endpoint.id,
                 since=since.isoformat(), until=until.isoformat(), deliveries=count)
    outbox.enqueue(session, SEND_TASK, {})
    session.commit()
    return count


def _make_due(delivery: Delivery) -> None:
    delivery.status = DeliveryStatus.pending
    delivery.next_attempt_at = get_settings().now()
    delivery.leased_until = None
