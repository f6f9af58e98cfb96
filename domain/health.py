"""Figures about the platform's own health, read for `/metrics`."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session


@dataclass(frozen=True)
class HealthFigures:
    oldest_outbox_age_seconds: float


def read_health_figures(session: Session) -> HealthFigures:
    # The outbox arrives with the publishing pipeline; until then nothing waits in it.
    session.connection()
    return HealthFigures(oldest_outbox_age_seconds=0.0)
