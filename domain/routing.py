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
from functools import lru_cache
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key
from sqlalchemy.sql.functions import FunctionElement

from domain import deliveries, events, matching, outbox
from domain.db import (
    DriverQuery,
    DriverStatement,
    UTCDateTime,
    UuidList,
    execute_in_transaction,
    fetch_one_in_transaction,
    rowcount,
)
from domain.filters import compile_stored_filter
from domain.models import (
    Classification,
    Delivery,
    DeliveryStatus,
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
    reason_list,
)
from domain.settings import get_settings


class id_list(FunctionElement[Any]):  # noqa: N801 - reads like the SQL function it is
    """The ids of a group as a `UuidList`, optionally of the rows meeting a condition: an
    array on PostgreSQL, a JSON array on SQLite. Empty, not NULL, over no rows."""

    type = UuidList()
    inherit_cache = True


@compiles(id_list, "postgresql")
def _id_list_pg(element: id_list, compiler: Any, **kw: Any) -> str:
    source, *condition = [compiler.process(c, **kw) for c in element.clauses]
    if not condition:  # every group has a row
        return f"array_agg({source})"
    return f"coalesce(array_agg({source}) FILTER (WHERE {condition[0]}), '{{}}')"


@compiles(id_list, "sqlite")
def _id_list_sqlite(element: id_list, compiler: Any, **kw: Any) -> str:
    source, *condition = [compiler.process(c, **kw) for c in element.clauses]
    return (f"json_group_array({source})"
            + (f" FILTER (WHERE {condition[0]})" if condition else ""))


class no_ids(FunctionElement[Any]):  # noqa: N801 - reads like the SQL function it is
    """An empty `UuidList`."""

    type = UuidList()
    inherit_cache = True


@compiles(no_ids, "postgresql")
def _no_ids_pg(element: no_ids, compiler: Any, **kw: Any) -> str:
    return "'{}'::uuid[]"


@compiles(no_ids, "sqlite")
def _no_ids_sqlite(element: no_ids, compiler: Any, **kw: Any) -> str:
    return "'[]'"


class json_list(FunctionElement[Any]):  # noqa: N801 - reads like the SQL function it is
    """JSON array over a group, per dialect: of the values of one column, or of arrays of
    several columns' values. NULL (PostgreSQL) or [] (SQLite) over no rows."""

    type = sa.JSON()
    inherit_cache = True


@compiles(json_list, "postgresql")
def _json_list_pg(element: json_list, compiler: Any, **kw: Any) -> str:
    args = [compiler.process(c, **kw) for c in element.clauses]
    return (f"json_agg({args[0]})" if len(args) == 1
            else f"json_agg(json_build_array({', '.join(args)}))")


@compiles(json_list, "sqlite")
def _json_list_sqlite(element: json_list, compiler: Any, **kw: Any) -> str:
    # JSON columns are text in SQLite: json() embeds them as JSON rather than as strings.
    args = [f"json({compiler.process(c, **kw)})" if isinstance(c.type, sa.JSON)
            else compiler.process(c, **kw) for c in element.clauses]
    return (f"json_group_array({args[0]})" if len(args) == 1
            else f"json_group_array(json_array({', '.join(args)}))")


# Routing's statements are built once per shape (`Shape`) and take every value that varies
# from one update to the next as a bind parameter, so that SQLAlchemy finds them compiled
# without building or even hashing them again: routing a small update used to spend more
# time constructing SQL in Python than the database spent running it. These are the
# parameters every statement shares. No parameter is named after a column of `updates`: an
# UPDATE of that table (`_MARK_ROUTED`, also inside `_push_deliveries`) would take it for a
# value to SET.
_UPDATE_ID = sa.bindparam("update_id", type_=sa.Uuid)
_CHAIN_ID = sa.bindparam("chain", type_=sa.Uuid)
_NOW = sa.bindparam("now", type_=UTCDateTime())

_UPDATES: sa.Table = Update.__table__  # type: ignore[assignment]
_INBOX: sa.Table = InboxItem.__table__  # type: ignore[assignment]
_DELIVERIES: sa.Table = Delivery.__table__  # type: ignore[assignment]

#: Which kinds of target a `Targets` names (organisations, groups, provinces): the shape of
#: its SQL; the ids and codes themselves are parameters `<prefix>_organisations` and so on.
TargetParts = tuple[bool, bool, bool]


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

    @property
    def parts(self) -> TargetParts:
        return bool(self.organisations), bool(self.groups), bool(self.provinces)

    def params(self, prefix: str) -> dict[str, Any]:
        """The values for `organisation_ids(dialect, self.parts, prefix)`."""
        return {f"{prefix}_organisations": sorted(self.organisations),
                f"{prefix}_groups": sorted(self.groups),
                f"{prefix}_provinces": sorted(self.provinces)}


def among(dialect: str, column: sa.ColumnElement[Any] | Any, name: str
          ) -> sa.ColumnElement[bool]:
    """`column` is one of the values of the list parameter `name`. On PostgreSQL as
    `= ANY(array)`: one SQL text whatever the list's length, so that it can be compiled once
    (`DriverStatement`) and stay prepared; elsewhere `IN (…)`, expanded per execution."""
    if dialect == "postgresql":
        return column == sa.any_(sa.bindparam(name, type_=postgresql.ARRAY(column.type)))
    return column.in_(sa.bindparam(name, expanding=True))  # type: ignore[no-any-return]


def organisation_ids(dialect: str, parts: TargetParts, prefix: str) -> sa.Select[Any]:
    """Every organisation some targets name: listed, group members, municipalities of the
    provinces (the lists are the parameters of `Targets.params(prefix)`)."""
    organisations, groups, provinces = parts
    selects: list[sa.Select[Any]] = []
    if organisations:
        selects.append(sa.select(Organisation.id.label("org")).where(
            among(dialect, Organisation.id, f"{prefix}_organisations")))
    if groups:
        selects.append(sa.select(GroupMember.organisation_id.label("org")).where(
            among(dialect, GroupMember.group_id, f"{prefix}_groups")))
    if provinces:
        selects.append(sa.select(Organisation.id.label("org")).where(
            Organisation.kind == Kind.municipality,
            among(dialect, Organisation.province_nis, f"{prefix}_provinces")))
    if not selects:
        return sa.select(Organisation.id.label("org")).where(sa.false())
    return selects[0] if len(selects) == 1 else sa.union(*selects)  # type: ignore[return-value]


class Shape(NamedTuple):
    """What the SQL of a plan's statements depends on (the rest are parameters)."""

    restricted: bool
    #: Whether the update has topics: without, no topic filter can match.
    topics: bool
    audience: TargetParts | None
    route_rules: tuple[TargetParts, ...]
    suppressed: tuple[TargetParts, ...]


@dataclass(frozen=True)
class Plan:
    """Everything the routing statement needs, worked out before it runs."""

    facts: matching.UpdateFacts
    classification: Classification
    audience: Targets | None
    route_rules: list[tuple[uuid.UUID, Targets]]
    suppressed: list[Targets]
    update_id: uuid.UUID | None

    def shape(self) -> Shape:
        return Shape(restricted=self.classification is Classification.restricted,
                     topics=bool(self.facts.topic_ids_with_ancestors),
                     audience=self.audience.parts if self.audience is not None else None,
                     route_rules=tuple(targets.parts for _, targets in self.route_rules),
                     suppressed=tuple(targets.parts for targets in self.suppressed))

    def params(self) -> dict[str, Any]:
        """The bind parameters of the statements built for `shape()`."""
        facts = self.facts
        params: dict[str, Any] = {
            "update_id": self.update_id,
            "publisher": facts.publisher_id,
            "topic_ids": sorted(facts.topic_ids_with_ancestors),
            "level_bit": matching.LEVEL_BITS[facts.publisher_level],
            "prevention_bit": matching.PREVENTION_BITS[facts.prevention_level],
            "priority_rank": matching.PRIORITY_RANK[facts.priority],
            "roles": facts.roles_mask,
        }
        if self.audience is not None:
            params.update(self.audience.params("audience"))
        for i, (rule_id, targets) in enumerate(self.route_rules):
            params[f"rule{i}_id"] = rule_id
            params.update(targets.params(f"rule{i}"))
        for i, targets in enumerate(self.suppressed):
            params.update(targets.params(f"suppress{i}"))
        return params


def topic_ancestors(session: Session, topic_ids: frozenset[uuid.UUID]) -> frozenset[uuid.UUID]:
    """The topics and all their ancestors (one recursive query)."""
    if not topic_ids:
        return frozenset()
    tree = (sa.select(Topic.id, Topic.parent_id).where(Topic.id.in_(topic_ids))
            .cte("ancestors", recursive=True))
    tree = tree.union(sa.select(Topic.id, Topic.parent_id)
                      .join(tree, Topic.id == tree.c.parent_id))
    return frozenset(session.scalars(sa.select(tree.c.id)))


#: A routing rule as `_matching_rules` takes it: id, action, stored filter, targets.
RuleRow = tuple[uuid.UUID, RuleAction, dict[str, Any], dict[str, Any] | None]


def _matching_rules(session: Session, facts: matching.UpdateFacts, rules: list[RuleRow]
                    ) -> tuple[list[tuple[uuid.UUID, Targets]], list[Targets]]:
    """The route rules (with their targets) and suppress targets of the rules that match."""
    route_rules: list[tuple[uuid.UUID, Targets]] = []
    suppressed: list[Targets] = []
    for rule_id, action, rule_filter, targets in rules:
        if matching.filter_matches(compile_stored_filter(session, rule_filter), facts):
            if action is RuleAction.route:
                route_rules.append((rule_id, Targets.from_json(targets)))
            else:
                suppressed.append(Targets.from_json(targets))
    return route_rules, suppressed


def _active_rules() -> sa.Select[Any]:
    r = RoutingRule
    return sa.select(r.id, r.action, r.filter, r.targets).where(r.active.is_(True),
                                                               r.deleted_at.is_(None))


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
        rules = [tuple(row) for row in
                 session.execute(_active_rules().order_by(RoutingRule.id)).all()]
        route_rules, suppressed = _matching_rules(session, facts, rules)  # type: ignore[arg-type]
    return Plan(facts=facts, classification=classification,
                audience=Targets.from_json(audience) if audience else None,
                route_rules=route_rules, suppressed=suppressed, update_id=update_id)


def _read_update_statement() -> sa.Select[Any]:
    """Everything routing reads, in one statement: the update row, locked (`FOR UPDATE OF
    updates` on PostgreSQL; SQLite has one writer anyway), with its publisher's level and
    name, its topics and their ancestors, whether a version of its chain (and a later one)
    has been routed yet, whether any subscription takes push deliveries, and the active
    routing rules. One round trip instead of six.

    It reads no `inbox_items`: the server drops a statement's cached plan whenever a table
    it reads is analysed or truncated, and the inbox table, written by every routing, is
    analysed often. Planning this statement again took 0.6 ms, ten times what running it
    takes (server log of P1 at 1,000 subscriptions: bind 0.63 ms, against 0.08 ms)."""
    u = _UPDATES
    tree = (sa.select(Topic.id, Topic.parent_id)
            .join(UpdateTopic, UpdateTopic.topic_id == Topic.id)
            .where(UpdateTopic.update_id == _UPDATE_ID)
            .cte("ancestors", recursive=True))
    tree = tree.union(sa.select(Topic.id, Topic.parent_id)
                      .join(tree, Topic.id == tree.c.parent_id))
    rules = _active_rules().subquery("rules")
    other = u.alias("other_version")
    return (
        sa.select(
            u, Organisation.level.label("publisher_level"),
            Organisation.name.label("publisher_name"),
            sa.select(json_list(UpdateTopic.topic_id)).where(UpdateTopic.update_id == u.c.id)
            .scalar_subquery().label("topic_ids"),
            sa.select(json_list(tree.c.id)).scalar_subquery().label("ancestor_ids"),
            sa.exists().where(other.c.chain_id == u.c.chain_id, other.c.routed_at.is_not(None))
            .label("chain_routed"),
            sa.exists().where(other.c.chain_id == u.c.chain_id, other.c.version > u.c.version,
                              other.c.routed_at.is_not(None)).label("later_version_routed"),
            sa.exists().where(deliveries.takes_pushes(Subscription)).label("any_push"),
            sa.select(json_list(rules.c.id, rules.c.action, rules.c.filter, rules.c.targets))
            .scalar_subquery().label("rules"),
        )
        .join(Organisation, Organisation.id == u.c.publisher_id)
        .where(u.c.id == _UPDATE_ID)
        .with_for_update(of=u)
    )


_READ_UPDATE = _read_update_statement()


@lru_cache(maxsize=4)
def _read_query(dialect: sa.Dialect) -> DriverQuery:
    return DriverQuery.compile(_READ_UPDATE, dialect)


def _read(connection: sa.Connection, update_id: uuid.UUID) -> Any:
    """`_READ_UPDATE`'s row, or None; on PostgreSQL on the driver's cursor (see `_write`)."""
    if connection.dialect.name == "postgresql":
        return fetch_one_in_transaction(connection, _read_query(connection.dialect),
                                        {"update_id": update_id})
    return connection.execute(_READ_UPDATE, {"update_id": update_id}).one_or_none()


def _ids(values: list[Any] | None) -> frozenset[uuid.UUID]:
    """Ids from a `json_list`: text with dashes (PostgreSQL) or bare hex (SQLite)."""
    return frozenset(uuid.UUID(str(v)) for v in values or ())


def _plan_from_row(session: Session, row: Any) -> Plan:
    """The routing plan (`make_plan`), from what `_READ_UPDATE` read."""
    facts = matching.UpdateFacts(
        publisher_id=row.publisher_id, publisher_level=row.publisher_level,
        topic_ids=_ids(row.topic_ids), topic_ids_with_ancestors=_ids(row.ancestor_ids),
        prevention_level=row.prevention_level, priority=row.priority,
        roles_mask=row.roles_mask)
    route_rules: list[tuple[uuid.UUID, Targets]] = []
    suppressed: list[Targets] = []
    if row.classification is not Classification.restricted and row.rules:
        # In rule id order, as the plan always had them (UUIDs order as their bytes do).
        rules = sorted((uuid.UUID(str(rule_id)), RuleAction(action), rule_filter, targets)
                       for rule_id, action, rule_filter, targets in row.rules)
        route_rules, suppressed = _matching_rules(session, facts, rules)
    return Plan(facts=facts, classification=row.classification,
                audience=Targets.from_json(row.audience) if row.audience else None,
                route_rules=route_rules, suppressed=suppressed, update_id=row.id)


def matching_subscriptions(dialect: str, topics: bool) -> sa.Select[Any, Any, Any]:
    """Subscriptions whose filter matches: `matching.filter_matches`, said in SQL. The
    update's facts are parameters (`Plan.params`); `topics`: whether it has any."""
    s = Subscription
    topic_ok = sa.or_(
        s.has_topic_filter.is_(False),
        sa.exists().where(SubscriptionTopic.subscription_id == s.id,
                          among(dialect, SubscriptionTopic.topic_id, "topic_ids"))
        if topics else sa.false(),
    )
    publisher_ok = sa.or_(
        s.has_publisher_filter.is_(False),
        sa.exists().where(SubscriptionPublisher.subscription_id == s.id,
                          SubscriptionPublisher.publisher_id
                          == sa.bindparam("publisher", type_=sa.Uuid)),
    )
    return sa.select(s.organisation_id.label("org"), sa.literal("subscription").label("kind"),
                     s.id.label("source")).where(
        s.active.is_(True), topic_ok, publisher_ok,
        s.publisher_levels_mask.op("&")(sa.bindparam("level_bit", type_=sa.Integer)) != 0,
        s.prevention_levels_mask.op("&")(sa.bindparam("prevention_bit", type_=sa.Integer))
        != 0,
        s.min_priority_rank <= sa.bindparam("priority_rank", type_=sa.Integer),
        s.roles_mask.op("&")(sa.bindparam("roles", type_=sa.Integer)) != 0,
    )


def candidates(dialect: str, shape: Shape) -> sa.Select[Any]:
    """Rows (org, kind, source) of every reason an organisation receives the update."""
    parts: list[sa.Select[Any]] = []
    if shape.restricted:
        assert shape.audience is not None, "validate_draft refuses a restricted update without one"
        audience = organisation_ids(dialect, shape.audience, "audience").subquery()
        parts.append(sa.select(audience.c.org, sa.literal("audience").label("kind"),
                               _UPDATE_ID.label("source")))
    else:
        parts.append(matching_subscriptions(dialect, shape.topics))
        for i, rule in enumerate(shape.route_rules):
            sub = organisation_ids(dialect, rule, f"rule{i}").subquery()
            parts.append(sa.select(sub.c.org, sa.literal("rule").label("kind"),
                                   sa.bindparam(f"rule{i}_id", type_=sa.Uuid).label("source")))
    union = (parts[0] if len(parts) == 1 else sa.union_all(*parts)).subquery("reasons")
    stmt = sa.select(union.c.org, union.c.kind, union.c.source)
    if not shape.restricted:
        if shape.audience is not None:
            narrowed_to = organisation_ids(dialect, shape.audience, "audience")
            stmt = stmt.where(union.c.org.in_(narrowed_to))  # type: ignore[arg-type]
        for i, suppressed in enumerate(shape.suppressed):
            suppressed_ids = organisation_ids(dialect, suppressed, f"suppress{i}")
            stmt = stmt.where(union.c.org.not_in(suppressed_ids))  # type: ignore[arg-type]
    return stmt


#: The columns of a recipient's reasons (`models.Reasons`), as `_grouped` names them.
REASON_COLUMNS = ("subscription_ids", "rule_ids", "via_audience")


@lru_cache(maxsize=256)
def _grouped(dialect: str, shape: Shape) -> sa.Select[Any]:
    """One row per recipient organisation (org) with its reasons (`REASON_COLUMNS`)."""
    rows = candidates(dialect, shape).subquery("candidates")
    subscription_ids: sa.ColumnElement[Any] = no_ids()
    rule_ids: sa.ColumnElement[Any] = no_ids()
    if not shape.restricted and not shape.route_rules:  # subscriptions alone: the usual case
        subscription_ids = id_list(rows.c.source)
    elif not shape.restricted:
        subscription_ids = id_list(rows.c.source, rows.c.kind == "subscription")
        rule_ids = id_list(rows.c.source, rows.c.kind == "rule")
    return (sa.select(rows.c.org, subscription_ids.label("subscription_ids"),
                      rule_ids.label("rule_ids"),
                      sa.literal(shape.restricted).label("via_audience"))
            .group_by(rows.c.org))


def _insert(dialect: str) -> Any:
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


@lru_cache(maxsize=256)
def _inbox_insert(dialect: str, shape: Shape, fresh_chain: bool) -> Any:
    """INSERT … SELECT of the inbox rows: plain for a chain's first routing, else an upsert.
    Parameters: `Plan.params` and chain, needs_ack, now."""
    # The grouped select itself, with the constant columns added: as a subquery it cost
    # one more node, projecting every row once more.
    grouped = _grouped(dialect, shape)
    org, *reasons = grouped.selected_columns
    insert = _insert(dialect)(_INBOX).from_select(
        ["chain_id", "organisation_id", "update_id", *REASON_COLUMNS, "needs_ack",
         "received_at", "delivered_at"],
        grouped.with_only_columns(_CHAIN_ID, org, _UPDATE_ID, *reasons,
                                  sa.bindparam("needs_ack", type_=sa.Boolean), _NOW, _NOW)
        # SQLite needs a WHERE here to tell the upsert's ON CONFLICT from a join condition.
        .where(sa.true()),
    )
    if not fresh_chain:
        item = _INBOX.c
        new_version = item.update_id != insert.excluded.update_id
        insert = insert.on_conflict_do_update(
            index_elements=["chain_id", "organisation_id"],
            set_={
                "update_id": insert.excluded.update_id,
                **{column: insert.excluded[column] for column in REASON_COLUMNS},
                "needs_ack": insert.excluded.needs_ack,
                "received_at": sa.case((new_version, insert.excluded.received_at),
                                       else_=item.received_at),
                "read_at": sa.case((new_version, None), else_=item.read_at),
                "acked_at": sa.case((new_version, None), else_=item.acked_at),
            },
        )
    # SQLAlchemy reports an INSERT's rowcount only when asked to (else -1 on PostgreSQL).
    return insert.execution_options(preserve_rowcount=True)


@lru_cache(maxsize=512)
def _compiled(statement: sa.Executable, dialect: sa.Dialect) -> DriverStatement:
    return DriverStatement.compile(statement, dialect)


def _write(connection: sa.Connection, statement: sa.Executable, params: dict[str, Any]) -> int:
    """Run one of routing's writes; answers the rows it touched. On PostgreSQL on the
    driver's cursor, compiled once (`DriverStatement`): per statement, SQLAlchemy's
    execution layer cost as much as the database's work on an INSERT of a few hundred
    recipients (P1: 0.4 ms)."""
    if connection.dialect.name == "postgresql":
        return execute_in_transaction(connection, _compiled(statement, connection.dialect),
                                      params)
    return rowcount(connection.execute(statement, params))


#: The update is routed: what `route_update` writes on the update row last.
_MARK_ROUTED = (sa.update(_UPDATES).where(_UPDATES.c.id == _UPDATE_ID)
                .values(routed_at=_NOW,
                        recipient_count=sa.bindparam("recipients", type_=sa.Integer),
                        status=UpdateStatus.published))


@lru_cache(maxsize=256)
def _push_deliveries(dialect: str, shape: Shape, correction: bool, urgent: bool) -> Any:
    """Deliveries for the recipients' webhook and e-mail subscriptions (see
    `deliveries.update_deliveries_insert`); a correction also goes to every subscription
    that was pushed an earlier version.

    On PostgreSQL the same statement also marks the update routed and answers the channels
    of the update's pending deliveries if it created any (`deliveries.senders_to_wake`,
    which sees the deliveries just inserted as a later statement would): one round trip
    for three. Parameters: as `_inbox_insert`'s, and event_type, payload, recipients."""
    matched = matching_subscriptions(dialect, shape.topics).subquery()
    subscription_ids = sa.select(matched.c.source)
    if correction:
        earlier = (sa.select(Delivery.subscription_id)
                   .join(Update, Update.id == Delivery.update_id)
                   .where(Update.chain_id == _CHAIN_ID, Update.id != _UPDATE_ID))
        subscription_ids = sa.union(subscription_ids, earlier)  # type: ignore[assignment]
    directed = [organisation_ids(dialect, rule, f"rule{i}")
                for i, rule in enumerate(shape.route_rules)]
    if shape.restricted and shape.audience is not None:
        directed.append(organisation_ids(dialect, shape.audience, "audience"))
    directed_orgs = (None if not directed else directed[0] if len(directed) == 1
                     else sa.union(*directed))
    insert = deliveries.update_deliveries_insert(dialect, subscription_ids,
                                                 directed_orgs, urgent)  # type: ignore[arg-type]
    if dialect != "postgresql":
        return insert
    created = insert.returning(_DELIVERIES.c.channel).cte("created")
    earlier_pending = sa.select(_DELIVERIES.c.channel).where(
        _DELIVERIES.c.update_id == _UPDATE_ID, _DELIVERIES.c.status == DeliveryStatus.pending,
        sa.exists(sa.select(created.c.channel)))
    return (sa.union(sa.select(created.c.channel), earlier_pending)
            .add_cte(_MARK_ROUTED.cte("routed")))


@dataclass(frozen=True)
class RoutingResult:
    update_id: uuid.UUID
    recipients: int
    already_routed: bool = False
    #: Sender tasks to run once this has committed (push deliveries are waiting).
    wake: tuple[str, ...] = ()


def _refresh_loaded(session: Session, row: Any, **routed: Any) -> None:
    """An `Update` the session already holds shows what the database holds once routing is
    done, as when routing read it through the session (`populate_existing`) and set the
    routing columns on it: routing reads and writes plain rows, not the ORM object."""
    update = session.identity_map.get(identity_key(Update, row.id))
    if update is not None:
        for column in _UPDATES.c:
            set_committed_value(update, column.key,
                                routed.get(column.key, getattr(row, column.key)))


def route_update(session: Session, update_id: uuid.UUID,
                 outbox_id: int | None = None) -> RoutingResult:
    """Route one update version to its recipients' inboxes, in one transaction.

    Idempotent: the update row is locked and `routed_at` guards against a second run; if a
    worker dies half-way the transaction rolls back and a re-run starts clean. The unique
    (chain, organisation) key absorbs any repeat. Commits once.

    On PostgreSQL a first version takes three statements and the commit: read (and lock),
    insert the inbox rows, insert the deliveries (and mark the update routed).
    """
    try:
        return _route(session, update_id, outbox_id, upsert=False)
    except sa.exc.IntegrityError as error:
        if not _inbox_conflict(error):
            raise
        # The chain's first routing found inbox rows after all: a later version's routing
        # committed some since our read, or someone cleared `routed_at` to route this one
        # again. Start over (reading again), with the upsert.
        session.rollback()
        return _route(session, update_id, outbox_id, upsert=True)


def _inbox_conflict(error: sa.exc.IntegrityError) -> bool:
    """Whether the error is a duplicate (chain, organisation) in `inbox_items`."""
    diag = getattr(error.orig, "diag", None)
    if diag is not None:  # psycopg
        return bool(diag.constraint_name == "pk_inbox_items")
    return "UNIQUE constraint failed: inbox_items." in str(error.orig)  # sqlite3


def _route(session: Session, update_id: uuid.UUID, outbox_id: int | None, *,
           upsert: bool) -> RoutingResult:
    if session.autoflush:
        session.flush()  # as the ORM read of the update that opened this used to
    connection = session.connection()
    dialect = connection.dialect.name
    row = _read(connection, update_id)
    if row is None:
        _finish(session, outbox_id)
        return RoutingResult(update_id, 0)
    if row.routed_at is not None or row.status is UpdateStatus.withdrawn:
        _finish(session, outbox_id, row)
        return RoutingResult(update_id, row.recipient_count or 0, already_routed=True)
    now = get_settings().now()
    if row.publish_at > now:
        session.rollback()  # not due yet; the outbox row stays pending for its time
        return RoutingResult(update_id, 0)
    if row.later_version_routed:
        # A correction published right after this version was routed first (two workers):
        # the inboxes show the correction, which this version must not overwrite, nor send
        # to webhooks after it. It is done, reaching no one itself.
        _write(connection, _MARK_ROUTED, {"update_id": row.id, "now": now, "recipients": 0})
        _finish(session, outbox_id, row, routed_at=now, recipient_count=0,
                status=UpdateStatus.published)
        return RoutingResult(update_id, 0)

    plan = _plan_from_row(session, row)
    shape = plan.shape()
    params = plan.params()
    params.update(chain=row.chain_id, needs_ack=row.priority is Priority.urgent, now=now)
    # A chain none of whose versions has been routed has no inbox rows yet, so a plain
    # INSERT will do; the upsert is for corrections (and for `route_update`'s second try).
    # (Inbox rows are only written by routing, in the same transaction as it sets
    # `routed_at`; and `chain_routed` is read with the lock, so whoever held it before us
    # and routed this update shows.)
    fresh_chain = row.version == 1 and not row.chain_routed and not upsert
    count = _write(connection, _inbox_insert(dialect, shape, fresh_chain), params)
    if row.version > 1 and row.classification is not Classification.restricted:
        # A correction reaches the earlier recipients again, even those it no longer matches.
        # (Through the session: it updates any inbox items the session holds, as before.)
        count += rowcount(session.execute(
            sa.update(InboxItem)
            .where(InboxItem.chain_id == row.chain_id, InboxItem.update_id != row.id)
            .values(update_id=row.id, received_at=now, delivered_at=now, read_at=None,
                    acked_at=None, needs_ack=row.priority is Priority.urgent)
        ))
    # The senders are woken after the commit, straight through the broker (workers/tasks.py):
    # no outbox row is needed, since a lost wake-up only waits for the periodic sender run
    # (`delivery_poll_seconds`), the deliveries themselves being rows already committed.
    wake: tuple[str, ...] = ()
    params["recipients"] = count
    # No subscription takes push deliveries (read with the update): then the deliveries
    # statement would insert nothing and is not sent. (A push subscription committed since
    # then misses this update, as it would had it been committed just after that statement.)
    if row.any_push:
        event_type = events.CORRECTED if row.version > 1 else events.PUBLISHED
        params.update(event_type=event_type, payload=events.update_event(
            row, events.Publisher(row.publisher_id, row.publisher_name), event_type, now))
        push = _push_deliveries(dialect, shape, row.version > 1, row.priority is Priority.urgent)
        if dialect == "postgresql":  # which also marks the update routed
            wake = deliveries.wake_tasks(connection.execute(push, params).scalars())
        elif rowcount(connection.execute(push, params)):
            wake = deliveries.senders_to_wake(session, row.id)
    if not (row.any_push and dialect == "postgresql"):
        _write(connection, _MARK_ROUTED, params)
    _finish(session, outbox_id, row, routed_at=now, recipient_count=count,
            status=UpdateStatus.published)
    return RoutingResult(update_id, count, wake=wake)


def _finish(session: Session, outbox_id: int | None, row: Any = None, **routed: Any) -> None:
    """Complete the outbox row and commit; then an `Update` the session holds shows the
    update row as routing left it (`_refresh_loaded`)."""
    outbox.mark_completed(session, outbox_id)
    session.commit()
    if row is not None:
        _refresh_loaded(session, row, **routed)


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
    grouped = _grouped(session.get_bind().dialect.name, plan.shape()).subquery("grouped")
    rows = session.execute(
        sa.select(Organisation.id, Organisation.name,
                  *(grouped.c[column] for column in REASON_COLUMNS))
        .join(grouped, grouped.c.org == Organisation.id).order_by(Organisation.name),
        plan.params(),
    ).all()
    return [PreviewRecipient(org_id, name, reason_list(subscription_ids, rule_ids,
                                                       via_audience, plan.update_id))
            for org_id, name, subscription_ids, rule_ids, via_audience in rows]
