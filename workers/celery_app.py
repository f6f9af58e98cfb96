"""The Celery application, configured so that a killed worker loses no work.

The guarantee itself lives in PostgreSQL (outbox rows, state guards, sweepers); these
settings make the broker side lose as little as it can on its own.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from domain.settings import Settings, get_settings


def broker_options(settings: Settings) -> tuple[str, dict[str, Any]]:
    """The broker URL and transport options; `filesystem://` is the embedded default."""
    url = settings.broker_url
    if url.startswith("filesystem"):
        folder = settings.broker_folder
        for sub in ("out", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return url, {
            "data_folder_in": str(folder / "out"),
            "data_folder_out": str(folder / "out"),
            "processed_folder": str(folder / "processed"),
            # Exchange bindings (one per queue): kept with the broker, not in the cwd.
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
    # Above the longest task, so that Redis does not hand a running task to a second worker.
    return url, {"visibility_timeout": 3600, "socket_timeout": 5, "socket_connect_timeout": 2}


#: The default queue: routing, bundles, the outbox sweep (short database work).
DEFAULT_QUEUE = "doorstroom"
#: Sending to the outside world (webhooks, e-mail): its tasks wait on other people's servers,
#: so they get a queue of their own, and in production a worker of their own (`doorstroom
#: worker --queues deliveries`, the `sender` service), never holding up routing.
DELIVERIES_QUEUE = "deliveries"
DELIVERY_TASKS = ("deliveries.send_due", "email.send_due", "email.send_confirmation",
                  "email.send_notice")


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    url, options = broker_options(settings)
    app = Celery("doorstroom", broker=url,
                 include=["workers.tasks", "workers.webhooks", "workers.mail"])
    app.conf.update(
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # On a lost broker connection, give running tasks back (they are idempotent and
        # acknowledged late) rather than finish them unacknowledged.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_serializer="json",
        accept_content=["json"],
        timezone=settings.timezone,
        enable_utc=True,
        task_default_queue=DEFAULT_QUEUE,
        # A worker started without --queues consumes both (`make run`'s single worker, tests).
        # Each its own exchange and routing key: a shared key would put every message on both.
        task_queues=tuple(Queue(name, Exchange(name, type="direct"), routing_key=name)
                          for name in (DEFAULT_QUEUE, DELIVERIES_QUEUE)),
        task_routes={name: {"queue": DELIVERIES_QUEUE} for name in DELIVERY_TASKS},
        task_time_limit=1800,
        task_soft_time_limit=1700,
        # Publishing must never hang on a dead broker: the outbox keeps the work instead.
        broker_transport_options_publish_retry=False,
        task_publish_retry=False,
        worker_hijack_root_logger=False,
        beat_schedule={
            # Backs up the relay thread's own sweeps (see workers/relay.py).
            # Every periodic task expires after its own period: ticks that no worker took
            # while the workers were down are dropped instead of piling up in the broker.
            "outbox-sweep": {"task": "outbox.sweep", "schedule": settings.sweeper_stale_seconds,
                             "options": {"expires": settings.sweeper_stale_seconds}},
            # Retries are due at times stored in the database; these pick them up.
            "webhooks-send-due": {"task": "deliveries.send_due",
                                  "schedule": settings.delivery_poll_seconds,
                                  "options": {"expires": settings.delivery_poll_seconds}},
            "email-send-due": {"task": "email.send_due",
                               "schedule": settings.delivery_poll_seconds,
                               "options": {"expires": settings.delivery_poll_seconds}},
            # Bundle windows are rows and times in the database; this only looks for due ones.
            "bundles-run-due": {"task": "bundles.run_due",
                                "schedule": settings.bundle_poll_seconds,
                                "options": {"expires": settings.bundle_poll_seconds}},
        },
    )
    return app


celery_app = make_celery()
