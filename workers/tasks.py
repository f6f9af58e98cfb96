"""Celery tasks: thin shells (name, queue, retry policy) around core functions in `domain/`.

Tasks take ids and plain JSON values, re-read the database, and are idempotent; the core
function commits once and marks its outbox row completed in the same transaction.
"""

from __future__ import annotations

import logging
import uuid

from celery.signals import beat_init, worker_process_init
from sqlalchemy.exc import OperationalError

from domain import outbox, routing
from domain.db import get_engine, session_scope
from workers.celery_app import celery_app

log = logging.getLogger("doorstroom.tasks")

#: Only infrastructure failures are worth retrying here; a bug would fail the same way again.
RETRYABLE = (OperationalError, ConnectionError, TimeoutError)


@worker_process_init.connect
def _fresh_connections_in_child(**_kwargs: object) -> None:
    # A forked pool process must not share the parent's database sockets.
    get_engine().dispose(close=False)


@beat_init.connect
def _start_relay(**_kwargs: object) -> None:
    from workers.relay import start_relay_thread

    start_relay_thread()


@celery_app.task(name="routing.route_update", autoretry_for=RETRYABLE, retry_backoff=2,
                 retry_backoff_max=60, max_retries=10)
def route_update(update_id: str, outbox_id: int | None = None) -> int:
    """Route one update to its recipients' inboxes (idempotent: guarded by `routed_at`)."""
    with session_scope() as session:
        result = routing.route_update(session, uuid.UUID(update_id), outbox_id)
    # Push deliveries are waiting: wake their senders now, not at the next periodic run.
    from workers.relay import wake

    wake(result.wake)
    log.info("routed update %s to %d recipients%s", update_id, result.recipients,
             " (already routed)" if result.already_routed else "")
    return result.recipients


@celery_app.task(name="routing.announce_withdrawal", autoretry_for=RETRYABLE, retry_backoff=2,
                 max_retries=10)
def announce_withdrawal(update_id: str, outbox_id: int | None = None) -> int:
    """Tell push subscriptions that received the chain that it is withdrawn (the inboxes
    show it already: that changed with the withdrawal itself). Idempotent: the deliveries'
    unique key absorbs a second run."""
    with session_scope() as session:
        created = routing.announce_withdrawal(session, uuid.UUID(update_id), outbox_id)
    from workers.relay import dispatch_after_commit

    dispatch_after_commit()
    return created


@celery_app.task(name="bundles.run_due", autoretry_for=RETRYABLE, retry_backoff=2,
                 max_retries=5)
def run_due_bundles() -> int:
    """Build every daily and weekly bundle that is due (exactly once per window: row locks,
    `bundled_until` and a unique key see to that, whoever else runs at the same time)."""
    from domain.bundles import run_due_bundles as build

    with session_scope() as session:
        report = build(session)
    if report.windows:
        log.info("bundles: %s", report)
    from workers.relay import dispatch_after_commit

    dispatch_after_commit()
    return report.bundles


@celery_app.task(name="outbox.sweep")
def sweep() -> int:
    """Make work that was dispatched but never completed due again (see domain.outbox)."""
    with session_scope() as session:
        released = outbox.release_stuck(session)
    if released:
        log.warning("sweeper released %d stuck outbox rows", released)
    return released
