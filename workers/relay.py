"""The outbox relay: hands committed outbox rows to the broker.

Two paths: right after a commit (best-effort, short timeout, for latency) and a polling
thread in the scheduler process that catches whatever the first path missed (a broker
outage, a crash between commit and send) and runs the sweeper. When the broker is down,
rows simply wait in PostgreSQL.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from domain import outbox
from domain.db import session_scope
from domain.settings import get_settings
from workers.celery_app import celery_app

log = logging.getLogger("doorstroom.relay")

#: After a failed send, skip the fast path for a moment rather than make every request wait.
_BROKER_BACKOFF_SECONDS = 5.0
_broker_down_until = 0.0


def broker_reachable(timeout: float = 0.5) -> bool:
    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=0, timeout=timeout)
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means unreachable
        log.debug("broker unreachable: %s", exc)
        return False


def _send_tasks(tasks: list[tuple[str, dict[str, Any]]]) -> int:
    """Send (task name, keyword arguments) pairs in order; answer how many reached the
    broker. On a failure the rest wait (for the poller) and the fast path backs off."""
    global _broker_down_until
    sent = 0
    timeout = get_settings().relay_publish_timeout_seconds
    try:
        # A pooled producer and its pooled connection: checking a fresh connection costs a
        # new socket every time (~2.5 ms); a pooled one that is up answers at once, and one
        # that is down fails within `timeout`.
        with celery_app.producer_or_acquire() as producer:
            producer.connection.ensure_connection(max_retries=0, timeout=timeout)
            for name, kwargs in tasks:
                # The representations Celery would otherwise compute with its (costly)
                # saferepr: the arguments are a few ids.
                celery_app.send_task(name, kwargs=kwargs, producer=producer, retry=False,
                                     argsrepr="()", kwargsrepr=repr(kwargs))
                sent += 1
    except Exception as exc:  # noqa: BLE001 - the poller will try again
        _broker_down_until = time.monotonic() + _BROKER_BACKOFF_SECONDS
        log.warning("broker unavailable, %d task(s) wait for the poller: %s",
                    len(tasks) - sent, type(exc).__name__)
    return sent


def _send(messages: list[outbox.Claimed]) -> int:
    """Send what can be sent, in order; answer how many reached the broker."""
    return _send_tasks([(m.task, {**m.args, "outbox_id": m.id}) for m in messages])


def wake(tasks: tuple[str, ...]) -> None:
    """Run these argument-less tasks soon (a sender after routing made deliveries): straight
    to the broker, best effort. A lost wake-up costs only latency: the periodic run of the
    same task picks the work up from the database. Never raises."""
    if not tasks or time.monotonic() < _broker_down_until:
        return
    _send_tasks([(task, {}) for task in tasks])


def dispatch_due(limit: int = 500) -> int:
    """Claim due rows (marked dispatched), send them, give back what did not reach the
    broker, commit: one transaction."""
    with session_scope() as session:
        messages = outbox.claim_due(session, limit)
        sent = _send(messages) if messages else 0
        outbox.unclaim(session, [m.id for m in messages[sent:]])
        session.commit()
    return sent


def dispatch_after_commit() -> None:
    """The fast path, called right after a use case committed outbox rows. Never raises."""
    if time.monotonic() < _broker_down_until:
        return
    try:
        dispatch_due(limit=50)
    except Exception as exc:  # noqa: BLE001 - best effort; the poller catches up
        log.warning("dispatch after commit failed: %s", type(exc).__name__)


def relay_forever(stop: threading.Event) -> None:
    settings = get_settings()
    last_sweep = 0.0
    while not stop.is_set():
        try:
            while dispatch_due() > 0 and not stop.is_set():
                pass
            if time.monotonic() - last_sweep >= settings.sweeper_stale_seconds / 2:
                with session_scope() as session:
                    outbox.release_stuck(session)
                last_sweep = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - keep relaying through outages
            log.warning("outbox relay pass failed: %s", type(exc).__name__)
        stop.wait(settings.outbox_poll_seconds)


_relay_stop = threading.Event()


def start_relay_thread() -> threading.Thread:
    thread = threading.Thread(target=relay_forever, args=(_relay_stop,), name="outbox-relay",
                              daemon=True)
    thread.start()
    log.info("outbox relay started")
    return thread
