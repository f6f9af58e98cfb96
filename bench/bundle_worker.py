"""A P5 worker process: `python -m bench.bundle_worker` (started by bench/bundles.py).

Imports the product and opens its database connection, answers `ready`, then on every `go`
command calls `domain.bundles.run_due_bundles(session, now)` once, with the `now` it is given
(like a worker running the `bundles.run_due` task, which builds everything due and returns
after its last commit), and answers its RunReport with `time.monotonic()` (one clock for
every process on the machine) at the start and at the return of the call. The database comes
from DOORSTROOM_DATABASE_URL in its environment; BENCH_STATEMENT_TIMEOUT_MS, when set, caps
every statement, as in the benchmark's own process.
"""

from __future__ import annotations

import os
import time
from datetime import datetime

from bench.procs import answer, commands


def main() -> None:
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from domain.bundles import run_due_bundles
    from domain.db import make_engine

    timeout_ms = int(os.environ.get("BENCH_STATEMENT_TIMEOUT_MS", "0"))
    engine = make_engine(os.environ["DOORSTROOM_DATABASE_URL"], connect_args={
        "connect_timeout": 5, "options": f"-c statement_timeout={timeout_ms}"})
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    answer({"ready": True, "pid": os.getpid()})
    for command in commands():
        now = datetime.fromisoformat(command["now"])
        started = time.monotonic()
        try:
            with Session(engine) as session:
                report = run_due_bundles(session, now)
        except Exception as exc:  # noqa: BLE001 - the benchmark reports it
            answer({"error": f"{type(exc).__name__}: {exc}"[:2000], "started": started,
                    "ended": time.monotonic()})
            continue
        answer({"subscriptions": report.subscriptions, "windows": report.windows,
                "bundles": report.bundles, "empty": report.empty,
                "deliveries": report.deliveries, "started": started,
                "ended": time.monotonic()})
    engine.dispose()


if __name__ == "__main__":
    main()
