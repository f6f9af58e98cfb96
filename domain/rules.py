"""Routing rules (admin): mandatory routing to targets, or suppression of targets."""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from domain import audit
from domain.errors import InvalidInput, NotFound
from domain.filters import existing_organisations, normalise_filter
from domain.models import Group, Organisation, RoutingRule, RuleAction
from domain.pagination import Page, paginate
from domain.settings import get_settings


def _canonical_targets(session: Session, targets: dict[str, Any]) -> dict[str, list[str]]:
    unknown = sorted(set(targets) - {"organisations", "groups", "provinces"})
    if unknown:
        raise InvalidInput(f"unknown target fields: {', '.join(unknown)}", field="targets")
    try:
        orgs = [uuid.UUID(str(o)) for o in targets.get("organisations") or []]
        groups = [uuid.UUID(str(g)) for g in targets.get("groups") or []]
    except ValueError as exc:
        raise InvalidInput("targets hold organisation and group ids", field="targets") from exc
    existing_organisations(session, orgs, "targets.organisations")
    if groups:
        found = set(session.scalars(sa.select(Group.id).where(Group.id.in_(groups))))
        if set(groups) - found:
            raise InvalidInput("unknown groups in targets", field="targets.groups")
    provinces = sorted(set(targets.get("provinces") or []))
    if provinces:
        known = set(session.scalars(sa.select(Organisation.province_nis)
                                    .where(Organisation.province_nis.in_(provinces))))
        if set(provinces) - known:
            raise InvalidInput("unknown provinces in targets", field="targets.provinces")
    canonical = {"organisations": sorted(map(str, set(orgs))),
                 "groups": sorted(map(str, set(groups))), "provinces": provinces}
    if not any(canonical.values()):
        raise InvalidInput("a rule needs at least one target", field="targets")
    return canonical


def create_rule(session: Session, actor: audit.Actor, *, name: str, action: str,
                filter: dict[str, Any], targets: dict[str, Any],
                description: str | None = None) -> RoutingRule:
    """Add a routing rule; it applies to every update routed from now on."""
    try:
        rule_action = RuleAction(action)
    except ValueError as exc:
        raise InvalidInput("action is route or suppress", field="action") from exc
    canonical_filter, _ = normalise_filter(session, filter)
    rule = RoutingRule(name=name, description=description, action=rule_action,
                       filter=canonical_filter, targets=_canonical_targets(session, targets),
                       active=True, created_at=get_settings().now())
    session.add(rule)
    session.flush()
    audit.record(session, actor, "routing_rule.created", "routing_rule", rule.id, name=name,
                 rule_action=rule_action.value, filter=canonical_filter, targets=rule.targets)
    session.commit()
    return rule


def delete_rule(session: Session, actor: audit.Actor, rule_id: uuid.UUID) -> None:
    """Retire a rule. It is kept (deleted_at) so that past reasons still name it."""
    rule = get_rule(session, rule_id)
    rule.deleted_at = get_settings().now()
    rule.active = False
    audit.record(session, actor, "routing_rule.deleted", "routing_rule", rule.id)
    session.commit()


def get_rule(session: Session, rule_id: uuid.UUID) -> RoutingRule:
    rule = session.get(RoutingRule, rule_id)
    if rule is None or rule.deleted_at is not None:
        raise NotFound("routing rule not found")
    return rule


def list_rules(session: Session, cursor: str | None, limit: int | None) -> Page[RoutingRule]:
    stmt = sa.select(RoutingRule).where(RoutingRule.deleted_at.is_(None))
    return paginate(session, stmt, RoutingRule.id, cursor, limit)
