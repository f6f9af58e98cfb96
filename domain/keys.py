"""API keys: 256 random bits, shown once, stored as a SHA-256 hash, found by that hash."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from domain import audit
from domain.errors import InvalidInput, NotFound, Unauthenticated
from domain.models import ApiKey, Organisation, Scope
from domain.settings import get_settings

KEY_PREFIX = "ds_"
_PREFIX_CHARS = 8
_LAST_USED_GRANULARITY = timedelta(minutes=1)


def hash_key(key: str) -> str:
    # A slow password hash would cost every request; a 256-bit random key needs none.
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedKey:
    key: ApiKey
    plaintext: str


def generate_key() -> tuple[str, str]:
    """Return (visible prefix, whole key): `ds_<8 visible chars>_<43 secret chars>`."""
    visible = secrets.token_urlsafe(6)[:_PREFIX_CHARS]
    prefix = f"{KEY_PREFIX}{visible}"
    return prefix, f"{prefix}_{secrets.token_urlsafe(32)}"


def issue_key(
    session: Session,
    actor: audit.Actor,
    organisation_id: uuid.UUID,
    scopes: list[str],
    name: str | None = None,
) -> IssuedKey:
    """Create a key for an organisation; the plaintext is returned once and never stored."""
    if session.get(Organisation, organisation_id) is None:
        raise NotFound("organisation not found")
    if not scopes:
        raise InvalidInput("a key needs at least one scope")
    valid = {s.value for s in Scope}
    unknown = sorted(set(scopes) - valid)
    if unknown:
        raise InvalidInput(f"unknown scopes: {', '.join(unknown)}")
    prefix, plaintext = generate_key()
    key = ApiKey(
        organisation_id=organisation_id,
        prefix=prefix,
        key_hash=hash_key(plaintext),
        scopes=sorted(set(scopes)),
        name=name,
        created_at=get_settings().now(),
    )
    session.add(key)
    session.flush()
    audit.record(session, actor, "key.issued", "api_key", key.id,
                 organisation_id=str(organisation_id), scopes=key.scopes, prefix=prefix)
    session.commit()
    return IssuedKey(key=key, plaintext=plaintext)


def authenticate(session: Session, presented: str) -> tuple[ApiKey, audit.Actor]:
    """Find the live key for a presented secret, or raise Unauthenticated.

    Found through the unique index on the hash; the final comparison is constant-time so
    that response timing says nothing about how much of a hash matched.
    """
    if not presented.startswith(KEY_PREFIX) or len(presented) > 200:
        raise Unauthenticated("unknown API key")
    digest = hash_key(presented)
    key = session.scalars(sa.select(ApiKey).where(ApiKey.key_hash == digest)).one_or_none()
    if key is None or not hmac.compare_digest(key.key_hash, digest):
        raise Unauthenticated("unknown API key")
    if key.revoked_at is not None:
        raise Unauthenticated("this API key has been revoked")
    return key, audit.Actor(key.organisation_id, key.id, frozenset(key.scopes))


def touch_last_used(session: Session, key: ApiKey) -> None:
    """Record use at most once a minute per key, so that reads do not all become writes."""
    now = get_settings().now()
    if key.last_used_at is not None and now - key.last_used_at < _LAST_USED_GRANULARITY:
        return
    session.execute(
        sa.update(ApiKey)
        .where(ApiKey.id == key.id)
        .where(sa.or_(ApiKey.last_used_at.is_(None),
                      ApiKey.last_used_at < now - _LAST_USED_GRANULARITY))
        .values(last_used_at=now)
    )
    session.commit()


def list_keys(session: Session, organisation_id: uuid.UUID) -> list[ApiKey]:
    if session.get(Organisation, organisation_id) is None:
        raise NotFound("organisation not found")
    return list(
        session.scalars(
            sa.select(ApiKey).where(ApiKey.organisation_id == organisation_id).order_by(ApiKey.id)
        )
    )


def revoke_key(session: Session, actor: audit.Actor, key_id: uuid.UUID) -> ApiKey:
    """Revoke a key (idempotent: revoking twice keeps the first time)."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound("key not found")
    if key.revoked_at is None:
        key.revoked_at = get_settings().now()
        audit.record(session, actor, "key.revoked", "api_key", key.id, prefix=key.prefix)
    session.commit()
    return key

