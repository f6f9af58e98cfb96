"""After a request committed outbox rows: who hands them to the broker.

On PostgreSQL nobody in the API: the outbox's trigger notifies the relay when the
transaction commits, and the relay (a thread of the scheduler process,
`workers.relay.relay_forever`) dispatches them at once. The API then spends nothing on the
broker and does not even need to reach it.

On SQLite (the embedded `make run`), which cannot notify, the relay would only see the rows
at its next poll, so the API runs the relay's fast path itself (`dispatch_after_commit`:
claim the due rows, send them, mark them dispatched, commit), in one thread of its own that
requests wake: under load one pass sends the rows of several requests, and no request
waits for the broker. What it misses (the process stops, the broker is down) waits in the
outbox for the relay's poller.
"""

from __future__ import annotations

import threading
from functools import cache

from domain.db import get_engine
from workers.relay import dispatch_after_commit

_wake = threading.Event()
_start = threading.Lock()
_thread: threading.Thread | None = None


@cache
def _relay_is_notified() -> bool:
    return get_engine().dialect.name == "postgresql"


def dispatch_soon() -> None:
    """Called right after a commit that wrote outbox rows. Never blocks on the database or
    the broker, never raises."""
    global _thread
    if _relay_is_notified():
        return
    if _thread is None or not _thread.is_alive():
        with _start:
            if _thread is None or not _thread.is_alive():
                _thread = threading.Thread(target=_dispatch_forever, name="outbox-dispatch",
                                           daemon=True)
                _thread.start()
    _wake.set()


def _dispatch_forever() -> None:
    while True:
        _wake.wait()
        _wake.clear()  # before the pass: a commit during it wakes the next pass
        dispatch_after_commit()
