"""A P3 sender process: `python -m bench.webhook_sender` (started by bench/webhooks.py).

Imports the sender and opens its database connection, answers `ready`, then on every `go`
command calls `workers.webhooks.send_due()` until no delivery is pending any
more (when a call finds nothing to claim while some are pending, they are leased by another
process or wait for a retry: it looks again shortly), at most `deadline_s`; it answers how
many attempts it made, with `time.monotonic()` (one clock for every process on the machine)
at the start and at the return of its last call that sent something. The database comes from
DOORSTROOM_DATABASE_URL in its environment, like a worker's.
"""

from __future__ import annotations

import os
import time

from bench.procs import answer, commands


def main() -> None:
    import sqlalchemy as sa

    from domain.db import session_scope
    from workers.webhooks import send_due

    with session_scope() as session:
        session.execute(sa.text("SELECT 1"))
    answer({"ready": True, "pid": os.getpid()})
    pending = sa.text("SELECT count(*) FROM deliveries WHERE status = 'pending'")
    for command in commands():
        started = time.monotonic()
        deadline = started + float(command.get("deadline_s", 300))
        sent = calls = 0
        ended = None
        while time.monotonic() < deadline:
            count = send_due()  # at most its own MAX_RUN_SECONDS per call
            calls += 1
            if count:
                sent += count
                ended = time.monotonic()
                continue
            with session_scope() as session:
                if not session.scalar(pending):
                    break
            time.sleep(0.1)
        answer({"sent": sent, "calls": calls, "started": started, "ended": ended})


if __name__ == "__main__":
    main()
