"""Daily and weekly bundles: one digest per subscription per window, across every publisher.

`run_due_bundles` is what the scheduler and `doorstroom digests run` call. It is set-based:
the windows are worked out in Python (pure arithmetic, `domain/schedule.py`), then a few
statements write every bundle's rows at once. Exactly once per (subscription, window):
due subscriptions are row-locked (`FOR UPDATE SKIP LOCKED`), `bundled_until` moves on in
the same transaction, and the unique (subscription, window end) key absorbs any repeat.
The subscriptions are taken in keyset batches of `BATCH_SIZE`, one transaction each, so that
several workers running at once divide the work instead of one holding every row.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.orm import Session, aliased

from domain import audit, events, outbox, schedule
from domain.db import rowcount
from domain.deliveries import (
    SEND_EMAIL_TASK,
    SEND_TASK,
    _dialect_insert,
    new_message_id,
    new_uuid,
)
from domain.errors import NotFound
from domain.models import (
    Bundle,
    BundleEntry,
    Cadence,
    ChannelType,
    Classification,
    Delivery,
    DeliveryStatus,
    InboxItem,
    Organisation,
    Priority,
    Subscription,
    Topic,
    Update,
    UpdateStatus,
    lists_id,
    new_id,
    reached_directly,
    reason_list,
)
from domain.pagination import Page, paginate
from domain.settings import get_settings

RUN_TASK = "bundles.run_due"
#: Subscriptions per transaction of `run_due_bundles`: concurrent runs divide the work by
#: these batches (each locks one, skipping those another run holds).
BATCH_SIZE = 1_000


@dataclass(frozen=True)
class RunReport:
    subscriptions: int
    windows: int
    bundles: int
    empty: int
    deliveries: int

    def __str__(self) -> str:
        return (f"{self.windows} window(s) of {self.subscriptions} subscription(s): "
                f"{self.bundles} bundle(s), {self.empty} empty, "
                f"{self.deliveries} push deliveries")


def _reached_through(session: Session) -> sa.ColumnElement[bool]:
    """The inbox item came through this subscription, or (include_directed) through a rule
    or the audience. Correlated on Subscription and InboxItem."""
    s, i = Subscription, InboxItem
    dialect = session.get_bind().dialect.name
    return sa.or_(lists_id(dialect, i.subscription_ids, s.id),
                  sa.and_(s.include_directed.is_(True), reached_directly(dialect, i)))


def run_due_bundles(session: Session, now: datetime | None = None) -> RunReport:
    """Build every bundle due at `now` and hand it to its channel. Idempotent; commits once
    per batch of subscriptions (and once when nothing is due).

    Subscriptions are taken in keyset batches by id (`BATCH_SIZE`, row-locked with `SKIP
    LOCKED`), each built and committed in a transaction of its own, so that runs at the
    same time divide the work: each skips the rows another holds and takes the next free
    ones. Every row a run skips is held by the run that builds it (or, held by some other
    transaction, is built at the next tick); a subscription taken again after another run
    committed it has no due window any more (`bundled_until` moved on); the unique
    (subscription, window end) key absorbs anything else."""
    settings = get_settings()
    now = now or settings.now()
    tz = ZoneInfo(settings.timezone)
    totals = [0, 0, 0, 0, 0]
    last: uuid.UUID | None = None
    while True:
        taken = _run_batch(session, now, tz, last)
        if taken is None:
            break
        last, report = taken
        totals = [a + b for a, b in zip(totals, (report.subscriptions, report.windows,
                                                  report.bundles, report.empty,
                                                  report.deliveries), strict=True)]
    return RunReport(*totals)


def _run_batch(session: Session, now: datetime, tz: ZoneInfo, after: uuid.UUID | None
               ) -> tuple[uuid.UUID, RunReport] | None:
    """The next batch of subscriptions (ids after `after`, those another run holds
    skipped), built and committed. None (after committing) when no subscription is left."""
    stmt = (sa.select(Subscription)
            .where(Subscription.cadence.in_([Cadence.daily, Cadence.weekly]),
                   Subscription.active.is_(True), Subscription.suspended_at.is_(None))
            .order_by(Subscription.id).limit(BATCH_SIZE)
            # Fresh from the database: `bundled_until` is written by Core statements below.
            .execution_options(populate_existing=True))
    if after is not None:
        stmt = stmt.where(Subscription.id > after)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    subscriptions = list(session.scalars(stmt))
    if not subscriptions:
        session.commit()
        return None
    last = subscriptions[-1].id
    rows: list[dict[str, Any]] = []
    moved: list[dict[str, Any]] = []
    for sub in subscriptions:
        assert sub.send_at is not None
        found = schedule.windows(sub.cadence.value, sub.send_at, sub.weekday, tz,
                                 sub.bundled_until, now, sub.created_at)
        for window in found:
            rows.append({"id": new_id(), "subscription_id": sub.id,
                         "organisation_id": sub.organisation_id, "cadence": sub.cadence,
                         "window_start": window.start, "window_end": window.end,
                         "item_count": 0, "created_at": now})
        if found:
            moved.append({"sub_id": sub.id, "until": found[-1].end})
    if not rows:
        session.commit()  # releases the batch's row locks
        return last, RunReport(len(subscriptions), 0, 0, 0, 0)

    # Core statements (tables, not entities): plain executemany, no ORM bookkeeping.
    insert = _dialect_insert(session)(Bundle.__table__).on_conflict_do_nothing(
        index_elements=["subscription_id", "window_end"])
    session.execute(insert, rows)
    run_ids = [r["id"] for r in rows]
    built = _write_entries(session, run_ids, now)
    empty = rowcount(session.execute(
        sa.delete(Bundle).where(Bundle.id.in_(run_ids), Bundle.item_count == 0)
        .execution_options(synchronize_session=False)))
    subscriptions_table: sa.Table = Subscription.__table__  # type: ignore[assignment]
    session.execute(
        sa.update(subscriptions_table).where(subscriptions_table.c.id == sa.bindparam("sub_id"))
        .values(bundled_until=sa.bindparam("until")), moved)
    pushed = _create_bundle_deliveries(session, run_ids, now)
    if pushed:
        outbox.enqueue(session, SEND_TASK, {})
        outbox.enqueue(session, SEND_EMAIL_TASK, {})
    session.commit()
    return last, RunReport(len(subscriptions), len(rows), built - empty, empty, pushed)


def _write_entries(session: Session, bundle_ids: list[uuid.UUID], now: datetime) -> int:
    """One statement for the entries of every new bundle, then one for their counts."""
    b, s, i, u = Bundle, Subscription, InboxItem, Update
    earlier = aliased(BundleEntry)
    before = (sa.select(sa.literal(1)).select_from(earlier)
              .where(earlier.subscription_id == b.subscription_id,
                     earlier.chain_id == i.chain_id, earlier.bundle_id != b.id))
    earlier_version = before.where(earlier.update_id != i.update_id)
    pushed_before = (sa.select(sa.literal(1)).select_from(Delivery)
                     .join(Update, Update.id == Delivery.update_id)
                     .where(Delivery.subscription_id == s.id,
                            Update.chain_id == i.chain_id))
    sent_before = sa.or_(sa.exists(before), sa.exists(pushed_before))
    state = sa.case(
        (u.status == UpdateStatus.withdrawn, "withdrawn"),
        (u.priority == Priority.urgent, "already_sent"),
        # A first version has no earlier one: no index probe for it (most entries; with a
        # year of bundles behind it, the probe was a third of this statement's buffer reads).
        (sa.and_(u.version > 1, sa.exists(earlier_version)), "corrected"),
        else_="new")
    select = (
        sa.select(b.id, i.chain_id, b.subscription_id, i.update_id, state,
                  i.subscription_ids, i.rule_ids, i.via_audience)
        .select_from(b)
        .join(s, s.id == b.subscription_id)
        .join(i, sa.and_(i.organisation_id == b.organisation_id,
                         i.received_at > b.window_start, i.received_at <= b.window_end))
        .join(u, u.id == i.update_id)
        .where(b.id.in_(bundle_ids), b.built_at.is_(None), _reached_through(session),
               sa.or_(u.expires_at.is_(None), u.expires_at > b.window_end),
               # A withdrawn update is only listed when it had gone out before.
               sa.or_(u.status != UpdateStatus.withdrawn, sent_before))
    )
    if session.get_bind().dialect.name == "postgresql":
        # With bundle_entries empty (a fresh install) the planner scans it for every new row
        # to answer "was this chain in an earlier bundle?", reading its own inserts too:
        # quadratic (500 subscriptions: 140 s instead of 4 s). The index is always right here.
        session.execute(sa.text("SET LOCAL enable_seqscan = off"))
    session.execute(sa.insert(BundleEntry).from_select(
        ["bundle_id", "chain_id", "subscription_id", "update_id", "state", "subscription_ids",
         "rule_ids", "via_audience"], select))
    counts = (sa.select(sa.func.count()).select_from(BundleEntry)
              .where(BundleEntry.bundle_id == Bundle.id).scalar_subquery())
    return rowcount(session.execute(
        sa.update(Bundle).where(Bundle.id.in_(bundle_ids), Bundle.built_at.is_(None))
        .values(item_count=counts, built_at=now)
        .execution_options(synchronize_session=False)))


def _create_bundle_deliveries(session: Session, bundle_ids: list[uuid.UUID],
                              now: datetime) -> int:
    """One webhook or e-mail delivery per non-empty bundle of a push subscription."""
    s = Subscription
    select = (
        sa.select(new_uuid(), new_message_id(), Bundle.organisation_id, s.id,
                  s.webhook_endpoint_id, Bundle.id, s.channel_type,
                  sa.literal(events.BUNDLE), sa.literal(DeliveryStatus.pending.value),
                  sa.literal(0), sa.literal(now, Delivery.next_attempt_at.type),
                  sa.literal(now, Delivery.created_at.type))
        .join(s, s.id == Bundle.subscription_id)
        .where(Bundle.id.in_(bundle_ids), Bundle.item_count > 0,
               s.channel_type.in_([ChannelType.webhook, ChannelType.email]))
    )
    columns = ["id", "message_id", "organisation_id", "subscription_id", "endpoint_id",
               "bundle_id", "channel", "event_type", "status", "attempt_count",
               "next_attempt_at", "created_at"]
    insert = _dialect_insert(session)(Delivery).from_select(columns, select.where(sa.true()))
    insert = insert.on_conflict_do_nothing(index_elements=["bundle_id"])
    created = rowcount(session.execute(insert.execution_options(preserve_rowcount=True)))
    if created > 0:
        _fill_webhook_payloads(session, bundle_ids)
    return max(created, 0)


def _fill_webhook_payloads(session: Session, bundle_ids: list[uuid.UUID]) -> None:
    """The webhook body of each bundle, rendered once and stored with its delivery."""
    deliveries = session.execute(
        sa.select(Delivery.id, Delivery.bundle_id)
        .where(Delivery.bundle_id.in_(bundle_ids), Delivery.channel == ChannelType.webhook,
               Delivery.payload.is_(None))).all()
    if not deliveries:
        return
    bundles = {bundle.id: bundle for bundle in session.scalars(
        sa.select(Bundle).where(Bundle.id.in_([d.bundle_id for d in deliveries])))}
    contents = bundle_contents(session, list(bundles.values()))
    table: sa.Table = Delivery.__table__  # type: ignore[assignment]
    session.execute(
        sa.update(table).where(table.c.id == sa.bindparam("delivery_id"))
        .values(payload=sa.bindparam("body")),
        [{"delivery_id": d.id,
          "body": events.structured(events.BUNDLE, f"{d.bundle_id}.bundle",
                                    bundles[d.bundle_id].created_at,
                                    f"bundles/{d.bundle_id}", contents[d.bundle_id])}
         for d in deliveries])


# ---------------------------------------------------------------------------------- content


def _ids_in(text: str) -> list[uuid.UUID]:
    """The ids of a `UuidList` cast to text: `{id,id}` (PostgreSQL) or `["hex","hex"]`."""
    return [uuid.UUID(part) for part in text.strip("{}[]").replace('"', "").split(",") if part]


def bundle_contents(session: Session, bundles: list[Bundle]) -> dict[uuid.UUID, dict[str, Any]]:
    """Each bundle as sections: grouped by topic, then publisher; urgent items first; counts
    per section; every item with its state and reasons. Restricted items are notices."""
    if not bundles:
        return {}
    bundle_ids = [b.id for b in bundles]
    # Plain columns, never entities: a run's webhook bundles hold hundreds of thousands of
    # entries, and loading an Update entity per entry decoded all its JSON columns each time
    # (P5: ~30 s). Each update is read once, with only the columns an item shows.
    entries = session.execute(
        sa.select(BundleEntry.bundle_id, BundleEntry.update_id, BundleEntry.state,
                  # As text, so that equal reasons are decoded and listed once.
                  sa.cast(BundleEntry.subscription_ids, sa.Text),
                  sa.cast(BundleEntry.rule_ids, sa.Text), BundleEntry.via_audience)
        .where(BundleEntry.bundle_id.in_(bundle_ids))).all()
    listed = sa.select(BundleEntry.update_id).where(BundleEntry.bundle_id.in_(bundle_ids))
    updates = session.execute(
        sa.select(Update.id, Update.chain_id, Update.version, Update.title, Update.summary,
                  Update.topics, Update.priority, Update.classification, Organisation.name)
        .join(Organisation, Organisation.id == Update.publisher_id)
        .where(Update.id.in_(listed))).all()
    slugs = {slug for update in updates for slug in update.topics[:1]}
    names = dict(session.execute(sa.select(Topic.slug, Topic.name_nl)
                                 .where(Topic.slug.in_(slugs))).all()) if slugs else {}
    # Per update: its section (topic, publisher) and its item's fields before and after the
    # entry's own `state` (the item's keys keep their order in the rendered JSON).
    shown: dict[uuid.UUID, tuple[tuple[str, str], dict[str, Any], dict[str, Any]]] = {}
    for update in updates:
        restricted = update.classification is Classification.restricted
        topic = "" if restricted else (update.topics[0] if update.topics else "")
        shown[update.id] = (
            (topic, update.name),
            {"update_id": str(update.id), "chain_id": str(update.chain_id),
             "version": update.version},
            {"title": "Restricted update" if restricted else update.title,
             "summary": None if restricted else update.summary,
             "priority": update.priority.value, "classification": update.classification.value,
             "notice": restricted, "url": events.update_link(update.id)})
    listed_reasons: dict[tuple[Any, ...], list[dict[str, str]]] = {}
    grouped: dict[uuid.UUID, dict[tuple[str, str], list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list))
    for bundle_id, update_id, state, subscription_ids, rule_ids, via_audience in entries:
        if update_id not in shown:  # its update is gone: left out, as an inner join would
            continue
        section, head, tail = shown[update_id]
        key = (subscription_ids, rule_ids, via_audience and update_id)
        if key not in listed_reasons:
            listed_reasons[key] = reason_list(_ids_in(subscription_ids), _ids_in(rule_ids),
                                              via_audience, update_id)
        grouped[bundle_id][section].append(
            {**head, "state": state, **tail, "reasons": listed_reasons[key]})
    result = {}
    for bundle in bundles:
        sections: list[dict[str, Any]] = []
        for (topic, publisher), items in grouped[bundle.id].items():
            items.sort(key=lambda item: (item["priority"] != "urgent", item["title"]))
            sections.append({"topic": topic or None,
                             "topic_name": names.get(topic) if topic else None,
                             "publisher": publisher, "count": len(items), "items": items})
        sections.sort(key=lambda sec: (not any(i["priority"] == "urgent" for i in sec["items"]),
                                       sec["topic_name"] or sec["topic"] or "~",
                                       sec["publisher"]))
        result[bundle.id] = {
            "id": str(bundle.id), "subscription_id": str(bundle.subscription_id),
            "cadence": bundle.cadence.value,
            "window": {"start": bundle.window_start.isoformat(),
                       "end": bundle.window_end.isoformat()},
            "count": sum(sec["count"] for sec in sections), "sections": sections,
        }
    return result


def list_bundles(session: Session, actor: audit.Actor, subscription_id: uuid.UUID | None,
                 cursor: str | None, limit: int | None) -> Page[Bundle]:
    stmt = sa.select(Bundle).where(Bundle.organisation_id == actor.organisation_id)
    if subscription_id is not None:
        stmt = stmt.where(Bundle.subscription_id == subscription_id)
    return paginate(session, stmt, Bundle.id, cursor, limit, descending=True)


def get_bundle(session: Session, actor: audit.Actor, bundle_id: uuid.UUID) -> Bundle:
    bundle = session.get(Bundle, bundle_id)
    if bundle is None or bundle.organisation_id != actor.organisation_id:
        raise NotFound("bundle not found")
    return bundle
