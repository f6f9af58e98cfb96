"""Hand the outbox rows a request committed to the broker from a thread of the API process.

The relay's fast path (`workers.relay.dispatch_after_commit`: claim the due rows, send them,
mark them dispatched, commit) costs about a third of a publish's CPU when each request runs
it for its own row, and the request waits for the broker meanwhile. Requests instead wake one
thread, which runs the fast path for whatever is due: under load one pass sends the rows of
several requests, and no request waits for the broker. What the thread misses (the process
stops, the broker is down) waits in the outbox for the relay's poller, as before.
"""

from __future__ import annotations

import threading

from workers.relay import dispatch_after_commit

_wake = threading.Event()
_start = threading.Lock()
_thread: threading.Thread | None = None


def dispatch_soon() -> None:
    """Called right after a commit that wrote outbox rows. Never blocks on the database or
    the broker, never raises."""
    global _thread
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
