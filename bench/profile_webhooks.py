"""Profile P3's sender: `python -m bench.profile_webhooks [N]` (default 5,000).

Sets up the P3 workload (`bench.webhooks`: 50 endpoints on a local receiver, N pending
deliveries) in its own database, then runs `send_due` until nothing is pending under
pyinstrument and prints the profile (wall-clock time, async-aware). The receiver and the
database run in other processes, so what shows here is the sender's own time.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.common import BENCH_DB, point_product_at, recreate_database
from bench.run import PRODUCT_ENV


def main(argv: list[str]) -> int:
    from pyinstrument import Profiler

    n = int(argv[0]) if argv else 5_000
    os.environ.update(PRODUCT_ENV)
    url = recreate_database(f"{BENCH_DB}_profile_p3")
    point_product_at(url)
    from bench.procs import Receiver
    from bench.webhooks import WebhookBench
    from domain import migrate
    from domain.db import make_engine
    from workers.webhooks import send_due

    migrate.upgrade(url)
    engine = make_engine(url)
    log_dir = Path(tempfile.mkdtemp(prefix="doorstroom-profile-p3-"))
    receiver = Receiver(log_dir)
    receiver.start()
    try:
        bench = WebhookBench(engine, print, receiver)
        bench.prepare()
        bench.time_product(50, 30.0)  # warm-up
        bench.load(n)
        profiler = Profiler(interval=0.0005, async_mode="enabled")
        started = time.perf_counter()
        with profiler:
            while bench.pending():
                send_due()
        elapsed = time.perf_counter() - started
        print(f"{n} deliveries in {elapsed:.2f} s: {n / elapsed:.0f}/s")
        profiler.print(show_all=os.environ.get("PROFILE_ALL") == "1")
    finally:
        receiver.stop()
        engine.dispose()
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
