"""Pure matching rules, shared by the SQL routing statement and the routing rules.

Multi-valued filters become bit sets so that SQL can match them by intersection with one
`&`, on PostgreSQL and SQLite alike. An empty filter means "everything": all bits set.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from domain.models import Level, PreventionLevel, Priority, Role

ROLE_BITS: dict[Role, int] = {role: 1 << i for i, role in
                              enumerate(r for r in Role if r is not Role.all)}
ALL_ROLES = sum(ROLE_BITS.values())
PREVENTION_BITS = {level: 1 << i for i, level in enumerate(PreventionLevel)}
ALL_PREVENTION = sum(PREVENTION_BITS.values())
LEVEL_BITS = {level: 1 << i for i, level in enumerate(Level)}
ALL_LEVELS = sum(LEVEL_BITS.values())
PRIORITY_RANK = {Priority.routine: 0, Priority.important: 1, Priority.urgent: 2}


def _mask(values: Iterable[Enum | str], bits: dict[Any, int], everything: int,
           cls: type[Enum]) -> int:
    members = [v if isinstance(v, cls) else cls(v) for v in values]
    if not members:
        return everything
    return sum({bits[m] for m in members if m in bits}) or 0


def roles_mask(roles: Iterable[Role | str]) -> int:
    """`all`, or no roles at all, matches every role (on either side)."""
    members = [r if isinstance(r, Role) else Role(r) for r in roles]
    if not members or Role.all in members:
        return ALL_ROLES
    return sum({ROLE_BITS[r] for r in members})


def prevention_mask(levels: Iterable[PreventionLevel | str]) -> int:
    return _mask(levels, PREVENTION_BITS, ALL_PREVENTION, PreventionLevel)


def publisher_levels_mask(levels: Iterable[Level | str]) -> int:
    return _mask(levels, LEVEL_BITS, ALL_LEVELS, Level)


@dataclass(frozen=True)
class UpdateFacts:
    """What routing needs to know about one update version."""

    publisher_id: uuid.UUID
    publisher_level: Level
    topic_ids: frozenset[uuid.UUID]
    #: The update's topics with all their ancestors: a filter on a topic matches descendants.
    topic_ids_with_ancestors: frozenset[uuid.UUID]
    prevention_level: PreventionLevel
    priority: Priority
    roles_mask: int


@dataclass(frozen=True)
class Filter:
    """A subscription's or a rule's filter in matchable form."""

    topic_ids: frozenset[uuid.UUID] = frozenset()
    publisher_ids: frozenset[uuid.UUID] = frozenset()
    publisher_levels: int = ALL_LEVELS
    prevention_levels: int = ALL_PREVENTION
    min_priority: Priority = Priority.routine
    roles: int = ALL_ROLES
    extra: dict[str, Any] = field(default_factory=dict)


def filter_matches(f: Filter, update: UpdateFacts) -> bool:
    """The reference definition of a match; `domain.routing` says the same in SQL."""
    if f.topic_ids and not (f.topic_ids & update.topic_ids_with_ancestors):
        return False
    if f.publisher_ids and update.publisher_id not in f.publisher_ids:
        return False
    if not f.publisher_levels & LEVEL_BITS[update.publisher_level]:
        return False
    if not f.prevention_levels & PREVENTION_BITS[update.prevention_level]:
        return False
    if PRIORITY_RANK[update.priority] < PRIORITY_RANK[f.min_priority]:
        return False
    return bool(f.roles & update.roles_mask)


def role_names(mask: int) -> list[str]:
    if mask == ALL_ROLES:
        return [Role.all.value]
    return [r.value for r, bit in ROLE_BITS.items() if mask & bit]


def sorted_ids(ids: Sequence[uuid.UUID] | frozenset[uuid.UUID]) -> list[str]:
    return sorted(str(i) for i in ids)
