"""`doorstroom up` (what `make run` calls): one command that runs the whole platform locally.

It migrates and seeds, then starts as child processes the API, a worker for the default queue
with the scheduler embedded and a sender worker for the `deliveries` queue (webhooks, e-mail),
waits until the API is ready, plays the demo and prints where to look. Ctrl-C (or SIGTERM)
stops every child: each runs in its own process group, which is terminated and, if it does not
leave in time, killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request

from domain.settings import VAR_DIR, get_settings

_STOP_GRACE_SECONDS = 10


def _doorstroom(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


def _wait_ready(url: str, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - local URL
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.3)
    return False


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    # SIGTERM to each leader only: Celery's main process then lets its pool finish the
    # running tasks (a group-wide signal would kill them mid-task). Stragglers get SIGKILL.
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + _STOP_GRACE_SECONDS
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def _banner(base: str) -> None:
    print()
    print(f"Doorstroom is running at {base}")
    print(f"  API documentation: {base}/docs")
    print(f"  readiness:         {base}/readyz")
    print(f"  metrics:           {base}/metrics", flush=True)


def run_all(host: str, port: int) -> int:
    from workers.celery_app import DEFAULT_QUEUE, DELIVERIES_QUEUE

    settings = get_settings()
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    print(f"database: {settings.database_url}")
    print(f"broker:   {settings.broker_url}")
    subprocess.run(_doorstroom("migrate"), check=True)
    subprocess.run(_doorstroom("seed"), check=True)

    children: list[subprocess.Popen[bytes]] = []

    def _terminate(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        children.append(subprocess.Popen(_doorstroom("api", "--host", host, "--port", str(port)),
                                         start_new_session=True))
        # As in production: routing on the default queue (with the scheduler embedded), and
        # a sender of its own for webhooks and e-mail, so slow receivers never hold up routing.
        children.append(subprocess.Popen(
            _doorstroom("worker", "--queues", DEFAULT_QUEUE, "--beat", "--concurrency", "2"),
            start_new_session=True))
        children.append(subprocess.Popen(
            _doorstroom("worker", "--queues", DELIVERIES_QUEUE, "--concurrency", "2"),
            start_new_session=True))
        base = f"http://{host}:{port}"
        if not _wait_ready(f"{base}/readyz"):
            print("the API did not become ready; stopping", file=sys.stderr)
            return 1
        _banner(base)
        print("Playing the demo scenario (Ctrl-C stops everything at any time)...\n",
              flush=True)
        demo = subprocess.run(_doorstroom("demo"), check=False)
        if demo.returncode != 0:
            print("(the demo did not run to the end; see above)", file=sys.stderr)
        _banner(base)
        print("Press Ctrl-C to stop everything.", flush=True)
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        print("a process stopped unexpectedly; stopping the others", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping...")
        return 0
    finally:
        _stop(children)
