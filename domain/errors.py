"""Business errors. They carry no HTTP status: `api/problems.py` maps each kind to one."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base of every error a use case raises on purpose."""

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class NotFound(DomainError):
    """The object does not exist, or belongs to another organisation (the two look the same)."""


class InvalidInput(DomainError):
    """The request is well-formed but breaks a business rule (unknown topic, bad dates...)."""


class Conflict(DomainError):
    """The request clashes with the current state (a duplicate name, a request in flight)."""


class InFlight(Conflict):
    """An `Idempotency-Key` whose first request has not finished yet."""


class IdempotencyMismatch(InvalidInput):
    """An `Idempotency-Key` reused with another body."""


class Unauthenticated(DomainError):
    """No key, an unknown key or a revoked key."""


class Forbidden(DomainError):
    """A valid key without the scope the operation needs."""
