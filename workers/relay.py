"""Broker connectivity used by readiness and the outbox relay."""

from __future__ import annotations

import logging

from workers.celery_app import celery_app

log = logging.getLogger("doorstroom.relay")


def broker_reachable(timeout: float = 0.5) -> bool:
    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=0, timeout=timeout)
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means unreachable
        log.debug("broker unreachable: %s", exc)
        return False
