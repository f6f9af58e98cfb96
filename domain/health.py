"""Figures about the platform's own health, read for `/metrics`."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session


@dataclass(frozen=True)
class HealthFigures:
    oldest_outbox_age_seconds: float


def read_health_figures(session: Session) -> HealthFigures:
    from domain.outbox import oldest_undispatched_age

    return HealthFigures(oldest_outbox_age_seconds=oldest_undispatched_age(session))
