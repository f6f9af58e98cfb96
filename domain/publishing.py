"""Publishing: new updates, corrections and withdrawals, with `Idempotency-Key` support.

A publish writes the update, its topic rows and an outbox row in one transaction; routing
happens later, in a worker (`domain/routing.py`).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, make_transient_to_detached

from domain import audit, matching, outbox
from domain.db import DriverStatement, autocommit_engine, execute_in_autocommit, rowcount
from domain.errors import IdempotencyMismatch, InFlight, InvalidInput, NotFound
from domain.filters import existing_organisations, topic_ids_for_slugs
from domain.models import (
    AuditEntry,
    Classification,
    Group,
    IdempotencyKey,
    InboxItem,
    Organisation,
    OutboxMessage,
    PreventionLevel,
    Priority,
    Role,
    Topic,
    Update,
    UpdateStatus,
    UpdateTopic,
    new_id,
)
from domain.pagination import Page, paginate
from domain.settings import get_settings

ROUTE_TASK = "routing.route_update"
_UPDATES: sa.Table = Update.__table__  # type: ignore[assignment]
_UPDATE_TOPICS: sa.Table = UpdateTopic.__table__  # type: ignore[assignment]
_OUTBOX: sa.Table = OutboxMessage.__table__  # type: ignore[assignment]
_AUDIT: sa.Table = AuditEntry.__table__  # type: ignore[assignment]
_TOPICS: sa.Table = Topic.__table__  # type: ignore[assignment]
MAX_BODY_BYTES = 100 * 1024
#: An in-flight idempotency key older than this belongs to a request that died: retry it.
IN_FLIGHT_TIMEOUT = timedelta(seconds=60)


@dataclass
class Draft:
    """An update as the publisher sends it (already shape-checked by the API)."""

    title: str
    topics: list[str]
    priority: Priority = Priority.routine
    classification: Classification = Classification.public
    prevention_level: PreventionLevel = PreventionLevel.none
    target_roles: list[Role] = field(default_factory=lambda: [Role.all])
    summary: str = ""
    body: str = ""
    audience: dict[str, list[str]] | None = None
    supersedes: uuid.UUID | None = None
    publish_at: datetime | None = None
    expires_at: datetime | None = None
    links: list[dict[str, Any]] = field(default_factory=list)
    language: str = "nl"

    def fingerprint(self) -> str:
        """A hash of the request's meaning, to recognise a retry of the same request."""
        data = asdict(self)
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def validate_draft(session: Session, publisher_id: uuid.UUID, draft: Draft
                   ) -> tuple[dict[str, uuid.UUID], dict[str, list[str]] | None]:
    """Business checks on a draft; answers the topic ids and the canonical audience."""
    _check_fields(draft)
    topic_ids = topic_ids_for_slugs(session, draft.topics)
    return topic_ids, _checked_audience(session, draft)


def _check_fields(draft: Draft) -> None:
    """The checks that need no database."""
    if not draft.title.strip():
        raise InvalidInput("title must not be empty", field="title")
    if len(draft.title) > 200:
        raise InvalidInput("title is at most 200 characters", field="title")
    if len(draft.body.encode()) > MAX_BODY_BYTES:
        raise InvalidInput("body is at most 100 kB of Markdown", field="body")
    if not draft.topics:
        raise InvalidInput("an update needs at least one topic", field="topics")
    publish_at = draft.publish_at or get_settings().now()
    if draft.expires_at is not None and draft.expires_at <= publish_at:
        raise InvalidInput("expires_at must be after publish_at", field="expires_at")
    if draft.language not in ("nl", "fr", "en"):
        raise InvalidInput("language is nl, fr or en", field="language")


def _checked_audience(session: Session, draft: Draft) -> dict[str, list[str]] | None:
    audience = _canonical_audience(session, draft.audience)
    if draft.classification is Classification.restricted and not audience:
        raise InvalidInput("a restricted update needs an audience: it reaches exactly the "
                           "organisations named there", field="audience")
    return audience


def _canonical_audience(session: Session, audience: dict[str, list[str]] | None
                        ) -> dict[str, list[str]] | None:
    if not audience:
        return None
    orgs = [_uuid(v, "audience.organisations") for v in audience.get("organisations") or []]
    existing_organisations(session, orgs, "audience.organisations")
    groups = [_uuid(v, "audience.groups") for v in audience.get("groups") or []]
    if groups:
        found = set(session.scalars(sa.select(Group.id).where(Group.id.in_(groups))))
        missing = sorted(str(g) for g in set(groups) - found)
        if missing:
            raise InvalidInput(f"unknown groups: {', '.join(missing)}", field="audience.groups")
    provinces = sorted(set(audience.get("provinces") or []))
    if provinces:
        known = set(session.scalars(sa.select(Organisation.province_nis)
                                    .where(Organisation.province_nis.in_(provinces))))
        missing = sorted(set(provinces) - known)
        if missing:
            raise InvalidInput(f"unknown provinces: {', '.join(missing)}",
                               field="audience.provinces")
    canonical = {"organisations": sorted({str(o) for o in orgs}),
                 "groups": sorted({str(g) for g in groups}), "provinces": provinces}
    return canonical if any(canonical.values()) else None


def _uuid(value: str, field_name: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError as exc:
        raise InvalidInput(f"{field_name}: {value!r} is not a valid id", field=field_name) from exc


@dataclass(frozen=True)
class Receipt:
    """What a publish answers its publisher: which update it is, and its state."""

    id: uuid.UUID
    chain_id: uuid.UUID
    version: int
    status: UpdateStatus


def publish(session: Session, actor: audit.Actor, draft: Draft,
            idempotency_key: str | None = None) -> Update:
    """Publish an update (or a correction, when `supersedes` is set); answers it as a
    persistent object of `session`, as if it had been loaded (every column is set, so
    nothing is read back).

    With an `Idempotency-Key`: a retry with the same body answers the first update; another
    body raises IdempotencyMismatch; a retry while the first is running raises InFlight.
    Nothing changes in those cases. The key is claimed in its own short transaction so that
    concurrent retries can see it.
    """
    published = _submit(session, actor, draft, idempotency_key)
    if isinstance(published, Update):  # an Idempotency-Key's retry: the first update
        return published
    update = Update(**published)
    make_transient_to_detached(update)
    session.add(update)
    session.commit()
    return update


def submit(session: Session, actor: audit.Actor, draft: Draft,
           idempotency_key: str | None = None) -> Receipt:
    """`publish` for a caller that needs only the receipt (the API): the update is not made
    an object of the session, whose bookkeeping is a measurable share of the API's hottest
    write (P2 in docs/benchmarks.md)."""
    published = _submit(session, actor, draft, idempotency_key)
    if isinstance(published, Update):
        return Receipt(published.id, published.chain_id, published.version, published.status)
    return Receipt(published["id"], published["chain_id"], published["version"],
                   published["status"])


def _submit(session: Session, actor: audit.Actor, draft: Draft,
            idempotency_key: str | None) -> dict[str, Any] | Update:
    """The stored columns of the new update, or the first update of an Idempotency-Key's
    retry."""
    assert actor.organisation_id is not None
    if idempotency_key is None:
        return _publish(session, actor, draft)
    fingerprint = draft.fingerprint()
    existing = _claim_idempotency_key(session, actor.organisation_id, idempotency_key,
                                      fingerprint)
    if existing is not None:
        return existing
    try:
        return _publish(session, actor, draft, idempotency_key=idempotency_key)
    except BaseException:
        session.rollback()
        _release_idempotency_key(session, actor.organisation_id, idempotency_key)
        raise


def _claim_idempotency_key(session: Session, organisation_id: uuid.UUID, key: str,
                           fingerprint: str) -> Update | None:
    now = get_settings().now()
    session.add(IdempotencyKey(organisation_id=organisation_id, key=key,
                               request_hash=fingerprint, created_at=now))
    try:
        session.commit()
        return None
    except IntegrityError:
        session.rollback()
    row = session.get(IdempotencyKey, (organisation_id, key), populate_existing=True)
    if row is None:  # released between our insert and read: the first request failed
        return _claim_idempotency_key(session, organisation_id, key, fingerprint)
    if row.request_hash != fingerprint:
        raise IdempotencyMismatch("this Idempotency-Key was used with a different request")
    if row.completed_at is None:
        if now - row.created_at < IN_FLIGHT_TIMEOUT:
            raise InFlight("the first request with this Idempotency-Key is still running")
        # The first request died without finishing or releasing: this retry takes over.
        row.created_at = now
        session.commit()
        return None
    update = session.get(Update, row.update_id)
    assert update is not None
    return update


def _release_idempotency_key(session: Session, organisation_id: uuid.UUID, key: str) -> None:
    try:
        session.execute(sa.delete(IdempotencyKey).where(
            IdempotencyKey.organisation_id == organisation_id, IdempotencyKey.key == key,
            IdempotencyKey.completed_at.is_(None)))
        session.commit()
    except Exception:  # noqa: BLE001 - the stale-key takeover covers a failed release
        session.rollback()


def _publish(session: Session, actor: audit.Actor, draft: Draft,
             idempotency_key: str | None = None) -> dict[str, Any]:
    """Write the update and what goes with it, and commit; answers its stored columns."""
    # The caller's organisation exists: its key was just authenticated, and deleting an
    # organisation deletes its keys (the foreign key below would refuse the update anyway).
    publisher_id = actor.organisation_id
    assert publisher_id is not None
    _check_fields(draft)
    # On PostgreSQL the publication statement looks the topics up itself (a round trip
    # fewer on the API's hottest write); elsewhere they are looked up first.
    postgres = session.get_bind().dialect.name == "postgresql"
    topic_ids = None if postgres else topic_ids_for_slugs(session, draft.topics)
    audience = _checked_audience(session, draft)
    now = get_settings().now()
    update_id = new_id()
    chain_id, version = update_id, 1
    if draft.supersedes is not None:
        previous = session.get(Update, draft.supersedes, with_for_update=True)
        if previous is None or previous.publisher_id != publisher_id:
            raise InvalidInput("supersedes must name one of your own updates",
                               field="supersedes")
        if previous.status is UpdateStatus.withdrawn:
            raise InvalidInput("a withdrawn update cannot be corrected", field="supersedes")
        chain_id = previous.chain_id
        version = (session.scalar(sa.select(sa.func.max(Update.version))
                                  .where(Update.chain_id == chain_id)) or 0) + 1
    publish_at = draft.publish_at or now
    values: dict[str, Any] = dict(
        id=update_id, chain_id=chain_id, version=version, supersedes_id=draft.supersedes,
        publisher_id=publisher_id, title=draft.title.strip(), summary=draft.summary,
        body=draft.body, topics=sorted(set(draft.topics)),
        prevention_level=draft.prevention_level,
        target_roles=sorted({r.value for r in draft.target_roles}) or [Role.all.value],
        roles_mask=matching.roles_mask(draft.target_roles),
        priority=draft.priority, classification=draft.classification, audience=audience,
        links=draft.links, language=draft.language, publish_at=publish_at,
        expires_at=draft.expires_at,
        status=UpdateStatus.published if publish_at <= now else UpdateStatus.scheduled,
        created_at=now, withdrawn_at=None, routed_at=None, recipient_count=None,
    )
    audit_entry = audit.entry(
        actor, "update.corrected" if draft.supersedes else "update.published", "update",
        update_id, chain_id=str(chain_id), version=version,
        classification=values["classification"].value)
    outbox_row = outbox.row(ROUTE_TASK, {"update_id": str(update_id)}, publish_at)
    # Core INSERTs, no unit of work: a publish is the API's hottest write, and these rows
    # need none of it (`outbox.enqueue` and `audit.record`, written at once).
    if postgres:
        # A plain publish is this one statement, so it needs no transaction of its own:
        # in autocommit it is one round trip instead of three (BEGIN, INSERT, COMMIT). An
        # Idempotency-Key or a correction adds statements, which share a transaction.
        single = idempotency_key is None and draft.supersedes is None
        _insert_publication_pg(session, single, values, outbox_row, audit_entry)
    else:
        assert topic_ids is not None
        _insert_publication(session, values, list(topic_ids.values()), outbox_row,
                            audit_entry)
    if idempotency_key is not None:
        session.execute(sa.update(IdempotencyKey).where(
            IdempotencyKey.organisation_id == publisher_id, IdempotencyKey.key == idempotency_key
        ).values(update_id=update_id, completed_at=now))
    if session.in_transaction():  # a plain publish on PostgreSQL has committed already
        session.commit()
    return values


def _insert_publication(session: Session, update: dict[str, Any], topic_ids: list[uuid.UUID],
                        outbox_row: dict[str, Any], audit_entry: dict[str, Any]) -> None:
    """Write a new update, its topic rows, its routing outbox row and its audit entry, as
    four INSERTs in the order the keys need (SQLite; see `_insert_publication_pg`)."""
    session.execute(sa.insert(_UPDATES), update)
    session.execute(sa.insert(_UPDATE_TOPICS),
                    [{"update_id": update["id"], "topic_id": t} for t in topic_ids])
    session.execute(sa.insert(_OUTBOX), outbox_row)
    session.execute(sa.insert(_AUDIT), audit_entry)


def _insert_publication_pg(session: Session, single: bool, update: dict[str, Any],
                           outbox_row: dict[str, Any], audit_entry: dict[str, Any]) -> None:
    """`_insert_publication` on PostgreSQL: one statement, which also looks up the topics
    by slug and writes nothing unless it finds them all (then the error names the unknown
    ones). `single`: the statement is the whole unit of work, so it may run in autocommit
    on the driver's connection (`db.execute_in_autocommit`)."""
    slugs = update["topics"]
    params = {**{f"u_{k}": v for k, v in update.items()}, "topic_slugs": slugs,
              "topic_count": len(slugs), **{f"o_{k}": v for k, v in outbox_row.items()},
              **{f"a_{k}": v for k, v in audit_entry.items()}}
    columns = (tuple(update), tuple(outbox_row), tuple(audit_entry))
    engine = autocommit_engine(session) if single else None

    def run() -> int:
        if engine is not None:
            return execute_in_autocommit(
                engine, _publication_driver_statement(engine.dialect, *columns), params)
        return rowcount(session.connection().execute(_publication_statement(*columns),
                                                     params))

    if run() == 0:
        topic_ids_for_slugs(session, slugs)  # raises InvalidInput, naming the unknown topics
        # All there now: one was created while the statement ran. Its second run sees it.
        if run() == 0:
            raise InvalidInput("a topic changed while publishing; send it again",
                               field="topics")


@lru_cache
def _publication_driver_statement(dialect: sa.Dialect, *columns: tuple[str, ...]
                                  ) -> DriverStatement:
    return DriverStatement.compile(_publication_statement(*columns), dialect)


@lru_cache
def _publication_statement(update_columns: tuple[str, ...], outbox_columns: tuple[str, ...],
                           audit_columns: tuple[str, ...]) -> sa.Insert:
    """The statement of `_insert_publication_pg`, built once (its cache key too).

    The update row is inserted only if every topic slug is found; the topic rows, the
    outbox row and the audit entry are inserted for each update row that was (data-modifying
    CTEs, which PostgreSQL runs whether or not they are referenced; the foreign keys from the
    topic rows to the update are checked at the statement's end). The statement's row count
    is the audit entry's: 1 when it wrote, 0 when a topic is unknown."""

    def bound(table: sa.Table, prefix: str, columns: tuple[str, ...]) -> list[Any]:
        return [sa.bindparam(f"{prefix}{c}", type_=table.c[c].type) for c in columns]

    found = (sa.select(_TOPICS.c.id)
             .where(_TOPICS.c.slug == sa.func.any(sa.bindparam("topic_slugs",
                                                               type_=ARRAY(sa.Text()))))
             .cte("found_topics"))
    all_found = (sa.select(sa.func.count()).select_from(found).scalar_subquery()
                 == sa.bindparam("topic_count", type_=sa.Integer()))
    new_update = (sa.insert(_UPDATES)
                  .from_select(update_columns, sa.select(*bound(_UPDATES, "u_", update_columns))
                               .where(all_found))
                  .returning(_UPDATES.c.id).cte("new_update"))
    new_topics = sa.insert(_UPDATE_TOPICS).from_select(
        ["update_id", "topic_id"],
        sa.select(new_update.c.id, found.c.id).select_from(new_update.join(found, sa.true())))
    new_message = sa.insert(_OUTBOX).from_select(
        outbox_columns, sa.select(*bound(_OUTBOX, "o_", outbox_columns)).select_from(new_update))
    return (sa.insert(_AUDIT)
            .from_select(audit_columns,
                         sa.select(*bound(_AUDIT, "a_", audit_columns)).select_from(new_update))
            .add_cte(new_topics.cte("new_update_topics"), new_message.cte("new_outbox_message"))
            .execution_options(preserve_rowcount=True))


def withdraw(session: Session, actor: audit.Actor, update_id: uuid.UUID,
             reason: str | None = None) -> Update:
    """Withdraw an update's whole version chain (idempotent). Recipients keep the item,
    marked withdrawn; push channels are told through the outbox."""
    update = get_own_update(session, actor, update_id)
    now = get_settings().now()
    latest = latest_version(session, update.chain_id)
    if latest.status is not UpdateStatus.withdrawn:
        session.execute(sa.update(Update).where(Update.chain_id == update.chain_id)
                        .values(status=UpdateStatus.withdrawn, withdrawn_at=now))
        # Recipients see that it changed: the item moves up their inbox as unread news.
        session.execute(sa.update(InboxItem).where(InboxItem.chain_id == update.chain_id)
                        .values(received_at=now, read_at=None))
        outbox.enqueue(session, "routing.announce_withdrawal",
                       {"update_id": str(latest.id)})
        audit.record(session, actor, "update.withdrawn", "update", latest.id,
                     chain_id=str(update.chain_id), reason=reason)
    session.commit()
    session.refresh(latest)
    return latest


def get_own_update(session: Session, actor: audit.Actor, update_id: uuid.UUID) -> Update:
    update = session.get(Update, update_id)
    if update is None or update.publisher_id != actor.organisation_id:
        raise NotFound("update not found")
    return update


def latest_version(session: Session, chain_id: uuid.UUID) -> Update:
    latest = session.scalars(sa.select(Update).where(Update.chain_id == chain_id)
                             .order_by(Update.version.desc()).limit(1)).one()
    return latest


def version_chain(session: Session, chain_id: uuid.UUID) -> list[Update]:
    return list(session.scalars(sa.select(Update).where(Update.chain_id == chain_id)
                                .order_by(Update.version)))


def list_own_updates(session: Session, actor: audit.Actor, cursor: str | None,
                     limit: int | None, status: UpdateStatus | None = None) -> Page[Update]:
    stmt = sa.select(Update).where(Update.publisher_id == actor.organisation_id)
    if status is not None:
        stmt = stmt.where(Update.status == status)
    return paginate(session, stmt, Update.id, cursor, limit, descending=True)
