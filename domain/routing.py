"""Routing: who receives an update, and why. Set-based: one statement inserts every
recipient of an update (however many subscriptions and rules match) with all its reasons.

Sources of recipients, each a row (organisation, reason kind, reason id):
- subscriptions whose filter matches (the same test as `matching.filter_matches`, in SQL);
- route rules whose filter matches the update (rules are few: matched in Python), expanded
  to their target organisations, groups and provinces;
- the audience, for restricted updates only: they reach exactly their audience, whatever
  subscriptions and rules say. On public and internal updates the audience only narrows.
Suppress rules remove their targets (except from a restricted update's audience).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.functions import FunctionElement

from domain import deliveries, events, matching, outbox
from domain.db import rowcount
from domain.filters import compile_stored_filter
from domain.models import (
    Classification,
    Delivery,
    GroupMember,
    InboxItem,
    Kind,
    Organisation,
    Priority,
    RoutingRule,
    RuleAction,
    Subscription,
    SubscriptionPublisher,
    SubscriptionTopic,
    Topic,
    Update,
    UpdateStatus,
    UpdateTopic,
)
from domain.settings import get_settings


class reasons_agg(FunctionElement[Any]):  # noqa: N801 - reads like the SQL function it is
    """JSON array of {"kind", "id"} objects over a group, per dialect."""

    type = sa.JSON()
    inherit_cache = True


@compiles(reasons_agg, "postgresql")
def _reasons_agg_pg(element: reasons_agg, compiler: Any, **kw: Any) -> str:
    # Built as text: kinds are a closed set of words and ids are UUIDs, so nothing needs
    # escaping, and this is ~3x cheaper than json_agg(json_build_object(...)) at 1M rows.
    kind, source = list(element.clauses)
    k, s = compiler.process(kind, **kw), compiler.process(source, **kw)
    return ("('[' || string_agg('{\"kind\":\"' || " + k + " || '\",\"id\":\"' || "
            + s + "::text || '\"}', ',') || ']')::json")


@compiles(reasons_agg, "sqlite")
def _reasons_agg_sqlite(element: reasons_agg, compiler: Any, **kw: Any) -> str:
    kind, source = list(element.clauses)
    return (f"json_group_array(json_object('kind', {compiler.process(kind, **kw)}, "
            f"'id', {compiler.process(source, **kw)}))")


@dataclass(frozen=True)
class Targets:
    organisations: frozenset[uuid.UUID] = frozenset()
    groups: frozenset[uuid.UUID] = frozenset()
    provinces: frozenset[str] = frozenset()

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Targets:
        data = data or {}
        return cls(frozenset(uuid.UUID(str(o)) for o in data.get("organisations") or []),
                   frozenset(uuid.UUID(str(g)) for g in data.get("groups") or []),
                   frozenset(data.get("provinces") or []))

    def __bool__(self) -> bool:
        return bool(self.organisations or self.groups or self.provinces)

    def organisation_ids(self) -> sa.Select[Any]:
        """Every organisation these targets name: listed, group members, municipalities of
        the provinces."""
        parts: list[sa.Select[Any]] = []
        if self.organisations:
            parts.append(sa.select(Organisation.id.label("org"))
                         .where(Organisation.id.in_(self.organisations)))
        if self.groups:
            parts.append(sa.select(GroupMember.organisation_id.label("org"))
                         .where(GroupMember.group_id.in_(self.groups)))
        if self.provinces:
            parts.append(sa.select(Organisation.id.label("org"))
                         .where(Organisation.kind == Kind.municipality,
                                Organisation.province_nis.in_(self.provinces)))
        if not parts:
            return sa.select(Organisation.id.label("org")).where(sa.false())
        return parts[0] if len(parts) == 1 else sa.union(*parts)  # type: ignore[return-value]


@dataclass(frozen=True)
class Plan:
    """Everything the routing statement needs, worked out before it runs."""

    facts: matching.UpdateFacts
    classification: Classification
    audience: Targets | None
    route_rules: list[tuple[uuid.UUID, Targets]]
    suppressed: list[Targets]
    update_id: uuid.UUID | None


def topic_ancestors(session: Session, topic_ids: frozenset[uuid.UUID]) -> frozenset[uuid.UUID]:
    """The topics and all their ancestors (one recursive query)."""
    if not topic_ids:
        return frozenset()
    tree = (sa.select(Topic.id, Topic.parent_id).where(Topic.id.in_(topic_ids))
            .cte("ancestors", recursive=True))
    tree = tree.union(sa.select(Topic.id, Topic.parent_id)
                      .join(tree, Topic.id == tree.c.parent_id))
    return frozenset(session.scalars(sa.select(tree.c.id)))


def make_plan(session: Session, *, publisher_id: uuid.UUID, topic_ids: frozenset[uuid.UUID],
              prevention_level: Any, priority: Priority, roles_mask: int,
              classification: Classification, audience: dict[str, Any] | None,
              update_id: uuid.UUID | None) -> Plan:
    publisher = session.get(Organisation, publisher_id)
    assert publisher is not None
    facts = matching.UpdateFacts(
        publisher_id=publisher_id, publisher_level=publisher.level, topic_ids=topic_ids,
        topic_ids_with_ancestors=topic_ancestors(session, topic_ids),
        prevention_level=prevention_level, priority=priority, roles_mask=roles_mask)
    route_rules: list[tuple[uuid.UUID, Targets]] = []
    suppressed: list[Targets] = []
    if classification is not Classification.restricted:
        rules = session.scalars(sa.select(RoutingRule).where(RoutingRule.active.is_(True),
                                                             RoutingRule.deleted_at.is_(None))
                                .order_by(RoutingRule.id))
        for rule in rules:
            if matching.filter_matches(compile_stored_filter(session, rule.filter), facts):
                targets = Targets.from_json(rule.targets)
                if rule.action is RuleAction.route:
                    route_rules.append((rule.id, targets))
                else:
                    suppressed.append(targets)
    return Plan(facts=facts, classification=classification,
                audience=Targets.from_json(audience) if audience else None,
                route_rules=route_rules, suppressed=suppressed, update_id=update_id)


def plan_for_update(session: Session, update: Update) -> Plan:
    topic_ids = frozenset(session.scalars(sa.select(UpdateTopic.topic_id)
                                          .where(UpdateTopic.update_id == update.id)))
    return make_plan(session, publisher_id=update.publisher_id, topic_ids=topic_ids,
                     prevention_level=update.prevention_level, priority=update.priority,
                     roles_mask=update.roles_mask, classification=update.classification,
                     audience=update.audience, update_id=update.id)


def matching_subscriptions(facts: matching.UpdateFacts) -> sa.Select[Any]:
    """Subscriptions whose filter matches: `matching.filter_matches`, said in SQL."""
    s = Subscription
    topic_ok = sa.or_(
        s.has_topic_filter.is_(False),
        sa.exists().where(SubscriptionTopic.subscription_id == s.id,
                          SubscriptionTopic.topic_id.in_(facts.topic_ids_with_ancestors))
        if facts.topic_ids_with_ancestors else sa.false(),
    )
    publisher_ok = sa.or_(
        s.has_publisher_filter.is_(False),
        sa.exists().where(SubscriptionPublisher.subscription_id == s.id,
                          SubscriptionPublisher.publisher_id == facts.publisher_id),
    )
    return sa.select(s.organisation_id.label("org"), sa.literal("subscription").label("kind"),
                     s.id.label("source")).where(
        s.active.is_(True), topic_ok, publisher_ok,
        s.publisher_levels_mask.op("&")(matching.LEVEL_BITS[facts.publisher_level]) != 0,
        s.prevention_levels_mask.op("&")(matching.PREVENTION_BITS[facts.prevention_level]) != 0,
        s.min_priority_rank <= matching.PRIORITY_RANK[facts.priority],
        s.roles_mask.op("&")(facts.roles_mask) != 0,
    )


def candidates(plan: Plan) -> sa.Select[Any]:
    """Rows (org, kind, source) of every reason an organisation receives the update."""
    parts: list[sa.Select[Any]] = []
    if plan.classification is Classification.restricted:
        assert plan.audience is not None, "validate_draft refuses a restricted update without one"
        audience = plan.audience.organisation_ids().subquery()
        parts.append(sa.select(audience.c.org, sa.literal("audience").label("kind"),
                               sa.literal(plan.update_id, sa.Uuid).label("source")))
    else:
        parts.append(matching_subscriptions(plan.facts))
        for rule_id, targets in plan.route_rules:
            sub = targets.organisation_ids().subquery()
            parts.append(sa.select(sub.c.org, sa.literal("rule").label("kind"),
                                   sa.literal(rule_id, sa.Uuid).label("source")))
    union = (parts[0] if len(parts) == 1 else sa.union_all(*parts)).subquery("reasons")
    stmt = sa.select(union.c.org, union.c.kind, union.c.source)
    if plan.classification is not Classification.restricted:
        if plan.audience is not None:
            stmt = stmt.where(union.c.org.in_(plan.audience.organisation_ids()))
        for targets in plan.suppressed:
            stmt = stmt.where(union.c.org.not_in(targets.organisation_ids()))
    return stmt


def _grouped(plan: Plan) -> sa.Select[Any]:
    rows = candidates(plan).subquery("candidates")
    return (sa.select(rows.c.org, reasons_agg(rows.c.kind, rows.c.source).label("reasons"))
            .group_by(rows.c.org))


def _insert(session: Session) -> Any:
    return (postgresql.insert if session.get_bind().dialect.name == "postgresql"
            else sqlite.insert)


@dataclass(frozen=True)
class RoutingResult:
    update_id: uuid.UUID
    recipients: int
    already_routed: bool = False
    #: Sender tasks to run once this has committed (push deliveries are waiting).
    wake: tuple[str, ...] = ()


def route_update(session: Session, update_id: uuid.UUID,
                 outbox_id: int | None = None) -> RoutingResult:
    """Route one update version to its recipients' inboxes, in one transaction.

    Idempotent: the update row is locked and `routed_at` guards against a second run; if a
    worker dies half-way the transaction rolls back and a re-run starts clean. The unique
    (chain, organisation) key absorbs any repeat. Commits once.
    """
    update = session.get(Update, update_id, with_for_update=True, populate_existing=True)
    if update is None:
        outbox.mark_completed(session, outbox_id)
        session.commit()
        return RoutingResult(update_id, 0)
    if update.routed_at is not None or update.status is UpdateStatus.withdrawn:
        outbox.mark_completed(session, outbox_id)
        session.commit()
        return RoutingResult(update_id, update.recipient_count or 0, already_routed=True)
    now = get_settings().now()
    if update.publish_at > now:
        session.rollback()  # not due yet; the outbox row stays pending for its time
        return RoutingResult(update_id, 0)

    plan = plan_for_update(session, update)
    if session.get_bind().dialect.name == "postgresql":
        # The planner overestimates the OR'd EXISTS filters and would JIT-compile a statement
        # that runs in a few seconds; compiling costs more than it saves here.
        session.execute(sa.text("SET LOCAL jit = off"))
    grouped = _grouped(plan).subquery("grouped")
    insert = _insert(session)(InboxItem).from_select(
        ["chain_id", "organisation_id", "update_id", "reasons", "needs_ack", "received_at",
         "delivered_at"],
        sa.select(sa.literal(update.chain_id, sa.Uuid), grouped.c.org,
                  sa.literal(update.id, sa.Uuid), grouped.c.reasons,
                  sa.literal(update.priority is Priority.urgent),
                  sa.literal(now, InboxItem.received_at.type),
                  sa.literal(now, InboxItem.delivered_at.type))
        # SQLite needs a WHERE here to tell the upsert's ON CONFLICT from a join condition.
        .where(sa.true()),
    )
    # A first version of a chain has no inbox rows yet (the lock and `routed_at` see to
    # that), so a plain INSERT will do; the upsert is for corrections and forced re-runs.
    fresh_chain = update.version == 1 and session.scalar(
        sa.select(sa.func.count()).select_from(
            sa.select(InboxItem.organisation_id)
            .where(InboxItem.chain_id == update.chain_id).limit(1).subquery())) == 0
    new_version = InboxItem.update_id != insert.excluded.update_id
    upsert = insert.on_conflict_do_update(
        index_elements=["chain_id", "organisation_id"],
        set_={
            "update_id": insert.excluded.update_id,
            "reasons": insert.excluded.reasons,
            "needs_ack": insert.excluded.needs_ack,
            "received_at": sa.case((new_version, insert.excluded.received_at),
                                   else_=InboxItem.received_at),
            "read_at": sa.case((new_version, None), else_=InboxItem.read_at),
            "acked_at": sa.case((new_version, None), else_=InboxItem.acked_at),
        },
    )
    statement = insert if fresh_chain else upsert
    # SQLAlchemy reports an INSERT's rowcount only when asked to (else -1 on PostgreSQL).
    count = rowcount(session.execute(statement.execution_options(preserve_rowcount=True)))
    if update.version > 1 and update.classification is not Classification.restricted:
        # A correction reaches the earlier recipients again, even those it no longer matches.
        count += rowcount(session.execute(
            sa.update(InboxItem)
            .where(InboxItem.chain_id == update.chain_id, InboxItem.update_id != update.id)
            .values(update_id=update.id, received_at=now, delivered_at=now, read_at=None,
                    acked_at=None, needs_ack=update.priority is Priority.urgent)
        ))
    # The senders are woken after the commit, straight through the broker (workers/tasks.py):
    # no outbox row is needed, since a lost wake-up only waits for the periodic sender run
    # (`delivery_poll_seconds`), the deliveries themselves being rows already committed.
    wake = (deliveries.senders_to_wake(session, update.id)
            if _create_push_deliveries(session, update, plan) else ())
    update.routed_at = now
    update.recipient_count = count
    update.status = UpdateStatus.published
    outbox.mark_completed(session, outbox_id)
    session.commit()
    return RoutingResult(update_id, count, wake=wake)


def _create_push_deliveries(session: Session, update: Update, plan: Plan) -> int:
    """Deliveries for the recipients' webhook and e-mail subscriptions (see
    `deliveries.create_update_deliveries`); a correction also goes to every subscription
    that was pushed an earlier version."""
    matched = matching_subscriptions(plan.facts).subquery()
    subscription_ids = sa.select(matched.c.source)
    if update.version > 1:
        earlier = (sa.select(Delivery.subscription_id)
                   .join(Update, Update.id == Delivery.update_id)
                   .where(Update.chain_id == update.chain_id, Update.id != update.id))
        subscription_ids = sa.union(subscription_ids, earlier)  # type: ignore[assignment]
    directed = [targets.organisation_ids() for _, targets in plan.route_rules]
    if plan.classification is Classification.restricted and plan.audience is not None:
        directed.append(plan.audience.organisation_ids())
    directed_orgs = (None if not directed else directed[0] if len(directed) == 1
                     else sa.union(*directed))
    event_type = events.CORRECTED if update.version > 1 else events.PUBLISHED
    return deliveries.create_update_deliveries(session, update, subscription_ids,
                                               directed_orgs, event_type)  # type: ignore[arg-type]


def announce_withdrawal(session: Session, update_id: uuid.UUID,
                        outbox_id: int | None = None) -> int:
    """Create withdrawal deliveries for a withdrawn update's chain; commits once."""
    update = session.get(Update, update_id)
    created = 0
    if update is not None:
        created = deliveries.create_withdrawal_deliveries(session, update)
        for task in deliveries.senders_to_wake(session, update.id) if created else ():
            outbox.enqueue(session, task, {})
    outbox.mark_completed(session, outbox_id)
    session.commit()
    return created


@dataclass(frozen=True)
class PreviewRecipient:
    organisation_id: uuid.UUID
    name: str
    reasons: list[dict[str, str]]


def preview(session: Session, plan: Plan) -> list[PreviewRecipient]:
    """Who would receive an update and why, without writing anything."""
    grouped = _grouped(plan).subquery("grouped")
    rows = session.execute(
        sa.select(Organisation.id, Organisation.name, grouped.c.reasons)
        .join(grouped, grouped.c.org == Organisation.id).order_by(Organisation.name)
    ).all()
    return [PreviewRecipient(org_id, name, normalise_reasons(reasons))
            for org_id, name, reasons in rows]


def normalise_reasons(reasons: Any) -> list[dict[str, str]]:
    """Reasons as stored (SQLite keeps UUIDs as bare hex) in one canonical, sorted form."""
    if isinstance(reasons, str):
        import json

        reasons = json.loads(reasons)
    seen = {(r["kind"], str(uuid.UUID(str(r["id"])))) for r in reasons or []}
    return [{"kind": kind, "id": source} for kind, source in sorted(seen)]
