"""API keys: 256 random bits, shown once, stored as a SHA-256 hash, found by that hash.

Authenticated keys are remembered in the process for `CACHE_SECONDS` (`authenticate_cached`),
so that a busy API does not look the same key up for every request. The bound: a key revoked
through this process (`revoke_key`) is refused at once; a key revoked through another
process (another API worker, the CLI) is refused by this one at most `CACHE_SECONDS` after
the revocation commits. An entry is never renewed by use: it is dropped that long after the
lookup that made it. Unknown and revoked keys are never remembered.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from domain import audit
from domain.errors import InvalidInput, NotFound, Unauthenticated
from domain.models import ApiKey, Organisation, Scope
from domain.settings import get_settings

KEY_PREFIX = "ds_"
_PREFIX_CHARS = 8
_LAST_USED_GRANULARITY = timedelta(minutes=1)
#: How long an authenticated key is remembered (see the module's docstring for the bound).
CACHE_SECONDS = 5.0
#: At most this many keys are remembered; beyond it the cache starts afresh.
_CACHE_MAX = 10_000


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


@dataclass
class CachedKey:
    """An authenticated key as remembered: who it acts for, and when its use was last
    recorded (as far as this process knows)."""

    key_id: uuid.UUID
    actor: audit.Actor
    last_used_at: datetime | None
    expires: float  # time.monotonic()

    def touch_due(self, now: datetime) -> bool:
        return self.last_used_at is None or now - self.last_used_at >= _LAST_USED_GRANULARITY


_cache: dict[str, CachedKey] = {}
_cache_lock = threading.Lock()


def cached_key(presented: str) -> CachedKey | None:
    """The remembered authentication of a presented key, if still fresh. No database."""
    entry = _cache.get(hash_key(presented)) if presented.startswith(KEY_PREFIX) else None
    if entry is None or entry.expires <= time.monotonic():
        return None
    return entry


def authenticate_cached(session: Session, presented: str) -> CachedKey:
    """`authenticate`, answered from the cache when the key was authenticated less than
    `CACHE_SECONDS` ago; otherwise looked up, and remembered."""
    entry = cached_key(presented)
    if entry is not None:
        return entry
    key, actor = authenticate(session, presented)
    entry = CachedKey(key.id, actor, key.last_used_at, time.monotonic() + CACHE_SECONDS)
    with _cache_lock:
        if len(_cache) >= _CACHE_MAX:
            _cache.clear()
        _cache[key.key_hash] = entry
    return entry


def forget_cached(key_hash: str | None = None) -> None:
    """Drop one remembered key (by its stored hash), or all of them."""
    with _cache_lock:
        if key_hash is None:
            _cache.clear()
        else:
            _cache.pop(key_hash, None)


def touch_last_used(session: Session, key: ApiKey | CachedKey) -> None:
    """Record use at most once a minute per key, so that reads do not all become writes."""
    now = get_settings().now()
    last_used_at = key.last_used_at
    if last_used_at is not None and now - last_used_at < _LAST_USED_GRANULARITY:
        return
    key_id = key.key_id if isinstance(key, CachedKey) else key.id
    session.execute(
        sa.update(ApiKey)
        .where(ApiKey.id == key_id)
        .where(sa.or_(ApiKey.last_used_at.is_(None),
                      ApiKey.last_used_at < now - _LAST_USED_GRANULARITY))
        .values(last_used_at=now)
    )
    session.commit()
    if isinstance(key, CachedKey):
        key.last_used_at = now


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
    forget_cached(key.key_hash)  # refused by this process at once
    return key

