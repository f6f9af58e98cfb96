"""The outbox relay: hands committed outbox rows to the broker.

A thread in the scheduler process (`relay_forever`) dispatches what is due, runs the
sweeper, and then waits: on PostgreSQL until a committed transaction inserted outbox rows
(the outbox's trigger notifies `OUTBOX_CHANNEL`, which the relay listens to) or the poll
interval passes, whichever comes first; so work reaches the broker within milliseconds of
its commit, and the API never talks to the broker. On SQLite, which cannot notify, the
poll interval bounds the wait and the API's own thread (`api/dispatch.py`) runs the fast
path after its commits (`dispatch_after_commit`, best effort, short timeout), as the
workers' tasks do. When the broker is down, rows simply wait in the database.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from domain import outbox
from domain.db import get_engine, session_scope
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


#: Rows a relay pass claims at most (more wait for the next pass, right after).
RELAY_BATCH = 500
#: Under load (the last pass found more than one row), passes start at least this far
#: apart, so that a burst of commits shares a pass: a pass costs about as much as sending a
#: few tasks (in P2 the relay spent 0.9 ms of CPU per publish with a 5 ms window, 0.6 with
#: 20 ms, 0.4 with 50 ms). A commit after a quiet spell is relayed at once.
RELAY_WINDOW_SECONDS = 0.05

#: Where the outbox's trigger says that rows were committed (migration 7a1c0e9b2d34).
OUTBOX_CHANNEL = "doorstroom_outbox"


class OutboxSignal:
    """Waits until outbox rows were committed (PostgreSQL: LISTEN on `OUTBOX_CHANNEL`) or a
    time has passed. Without a listening connection (SQLite; PostgreSQL unreachable, in
    which case the next wait tries again) it just waits the time out."""

    def __init__(self) -> None:
        self.connection: Any = None
        self.failing = False  # said once per outage, not at every try

    def wait(self, seconds: float, stop: threading.Event) -> None:
        deadline = time.monotonic() + seconds
        while not stop.is_set() and (remaining := deadline - time.monotonic()) > 0:
            # In slices, so that `stop` is seen within a second.
            if self._notified(min(remaining, 1.0), stop):
                return

    def listen(self) -> None:
        """Start listening now, before the first pass, so that no commit falls between
        that pass and the first wait. Best effort: the first wait tries again."""
        with contextlib.suppress(Exception):
            self._listening()

    def _notified(self, seconds: float, stop: threading.Event) -> bool:
        try:
            reconnecting = self.connection is None or self.connection.closed
            connection = self._listening()
            if connection is None:
                stop.wait(seconds)
                return False
            if reconnecting:  # commits while it was not listening notified nobody
                return True
            notified = any(True for _ in connection.notifies(timeout=seconds, stop_after=1))
            if notified:  # the rest of this burst is served by the same pass
                for _ in connection.notifies(timeout=0):
                    pass
            if self.failing:
                log.info("outbox notifications are back")
                self.failing = False
            return notified
        except Exception as exc:  # noqa: BLE001 - fall back to polling until it is back
            if not self.failing:
                log.warning("outbox notifications unavailable, polling meanwhile: %s",
                            type(exc).__name__)
                self.failing = True
            self.close()
            stop.wait(seconds)
            return False

    def _listening(self) -> Any:
        if self.connection is not None and not self.connection.closed:
            return self.connection
        engine = get_engine()
        if engine.dialect.name != "postgresql":
            return None
        pooled = engine.raw_connection()
        connection = pooled.driver_connection
        assert connection is not None
        pooled.detach()  # its own for as long as it listens, never back in the pool
        connection.rollback()
        connection.autocommit = True
        connection.execute(f"LISTEN {OUTBOX_CHANNEL}")
        self.connection = connection
        return connection

    def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):  # it is being dropped anyway
                self.connection.close()
        self.connection = None


def relay_forever(stop: threading.Event, poll_seconds: float | None = None) -> None:
    """Relay until `stop` is set; between passes wait for a notification, at most
    `poll_seconds` (`DOORSTROOM_OUTBOX_POLL_SECONDS` unless given)."""
    settings = get_settings()
    poll = settings.outbox_poll_seconds if poll_seconds is None else poll_seconds
    signal = OutboxSignal()
    signal.listen()
    last_sweep = 0.0
    try:
        while not stop.is_set():
            # The broker just failed: claiming and giving back the same rows at every
            # notification would only churn the table until it is back.
            stop.wait(max(0.0, _broker_down_until - time.monotonic()))
            passed = time.monotonic()
            sent = 0
            try:
                # A pass that sent fewer rows than it may has emptied the backlog.
                while (batch := dispatch_due(RELAY_BATCH)) and not stop.is_set():
                    sent += batch
                    if batch < RELAY_BATCH:
                        break
                if time.monotonic() - last_sweep >= settings.sweeper_stale_seconds / 2:
                    with session_scope() as session:
                        outbox.release_stuck(session)
                    last_sweep = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - keep relaying through outages
                log.warning("outbox relay pass failed: %s", type(exc).__name__)
            signal.wait(poll, stop)
            if sent > 1:
                # Commits arrive faster than passes run (every commit notifies): let the
                # window fill, so that a pass serves many commits instead of a pass (and a
                # commit) per row. After a quiet spell the next commit goes at once.
                stop.wait(max(0.0, passed + RELAY_WINDOW_SECONDS - time.monotonic()))
    finally:
        signal.close()


_relay_stop = threading.Event()


def start_relay_thread() -> threading.Thread:
    thread = threading.Thread(target=relay_forever, args=(_relay_stop,), name="outbox-relay",
                              daemon=True)
    thread.start()
    log.info("outbox relay started")
    return thread
