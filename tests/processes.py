"""Start and stop real Doorstroom processes (API, worker, scheduler) and throwaway Redis
servers for end-to-end tests.

Every process runs in its own session (so it and its children form one process group),
writes its output to a log file, gets an environment derived from `os.environ` (which
tests/conftest.py has pointed at the test database) plus explicit overrides, and is stopped
with bounded waits: SIGTERM to the leader (Celery then shuts down warm), SIGKILL to the
whole group if it does not leave in time, and SIGKILL to whatever of the group outlived its
leader. Use them as context managers (or call `stop()` in a fixture's teardown).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import httpx

ROOT = Path(__file__).resolve().parent.parent
DOORSTROOM = str(Path(sys.executable).parent / "doorstroom")

T = TypeVar("T")


class ProcessError(AssertionError):
    """A process did not start, or a wait ran out; the message carries its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accepts_connections(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def process_env(overrides: Mapping[str, str | float | int | Path | None] | None = None
                ) -> dict[str, str]:
    """os.environ plus overrides; an override of None removes the variable."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in (overrides or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.2,
               message: str | Callable[[], str] = "condition not met") -> T:
    """Call `predicate` until it answers something truthy (answered) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise ProcessError(f"after {timeout:.1f} s: {text}")
        time.sleep(interval)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the test process dies, so that a test run
    killed without teardown (SIGKILL, a CI timeout) leaves no process behind (Linux only)."""
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class Process:
    """One child process in its own session, its output in `log_path`."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log_path: Path,
                 stop_grace: float = 10.0) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.log_path = log_path
        self.stop_grace = stop_grace
        self.proc: subprocess.Popen[bytes] | None = None
        #: Where the log of the current run starts (a restarted process appends).
        self.log_offset = 0

    def launch(self) -> None:
        """Start the process without waiting for it to be ready."""
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True,
                                         preexec_fn=_die_with_parent
                                         if sys.platform == "linux" else None)

    def wait_ready(self) -> None:
        """Overridden by processes that can tell when they are ready."""

    def start(self) -> Process:
        """Launch and wait until ready (bounded); stopped again if it never gets there."""
        self.launch()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self, tail: int = 12000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-tail:]

    def describe(self) -> str:
        state = "running" if self.alive() else (
            f"exited with {self.proc.returncode}" if self.proc else "not started")
        return f"{self.name} ({state}), log {self.log_path}:\n{self.log()}"

    def check_alive(self) -> None:
        if not self.alive():
            raise ProcessError(f"{self.name} is not running: {self.describe()}")

    def current_log(self) -> str:
        """The output of the current run only."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self.log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def wait_for_log(self, text: str, timeout: float) -> None:
        """Wait until the current run has written `text` (and is still running)."""
        def seen() -> bool:
            self.check_alive()
            return text in self.current_log()

        wait_until(seen, timeout, message=lambda: f"{text!r} not in the log of "
                                                  f"{self.describe()}")

    def stop(self) -> None:
        """Bounded: SIGTERM to the leader, SIGKILL to the group after `stop_grace`."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(self.stop_grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        # Children that outlived their leader (a pool process, an embedded scheduler).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


class Api(Process):
    """`doorstroom api` on a free port; `start()` returns once /readyz answers 200."""

    def __init__(self, env: Mapping[str, str], log_dir: Path, port: int | None = None,
                 ready_timeout: float = 30.0) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ready_timeout = ready_timeout
        super().__init__("api", [DOORSTROOM, "api", "--host", "127.0.0.1", "--port",
                                 str(self.port)], env, log_dir / f"api-{self.port}.log")

    def wait_ready(self) -> None:
        wait_until(self._ready, self.ready_timeout,
                   message=lambda: f"/readyz never answered 200: {self.describe()}")

    def _ready(self) -> bool:
        self.check_alive()
        try:
            return httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def client(self, key: str | None = None, timeout: float = 10.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)


class Worker(Process):
    """`doorstroom worker [--beat] [--concurrency N]`. With `wait_ready`, `start()` returns
    once Celery says it is ready (which needs the broker) and, with --beat, once the
    scheduler has started the outbox relay."""

    def __init__(self, env: Mapping[str, str], log_dir: Path, *, beat: bool = True,
                 concurrency: int = 2, name: str = "worker", ready_timeout: float = 30.0
                 ) -> None:
        argv = [DOORSTROOM, "worker", "--concurrency", str(concurrency)]
        if beat:
            argv.append("--beat")
        self.beat = beat
        self.ready_timeout = ready_timeout
        super().__init__(name, argv, env, log_dir / f"{name}-{time.monotonic_ns()}.log")

    def wait_ready(self) -> None:
        self.wait_for_log(" ready.", self.ready_timeout)
        if self.beat:
            self.wait_for_log("outbox relay started", self.ready_timeout)


class Beat(Process):
    """`doorstroom beat`: the scheduler alone (it runs the outbox relay thread)."""

    def __init__(self, env: Mapping[str, str], log_dir: Path, ready_timeout: float = 30.0
                 ) -> None:
        self.ready_timeout = ready_timeout
        super().__init__("beat", [DOORSTROOM, "beat"], env,
                         log_dir / f"beat-{time.monotonic_ns()}.log")

    def wait_ready(self) -> None:
        self.wait_for_log("outbox relay started", self.ready_timeout)


class Relay(Process):
    """`doorstroom relay`: the outbox relay alone."""

    def __init__(self, env: Mapping[str, str], log_dir: Path, ready_timeout: float = 30.0
                 ) -> None:
        self.ready_timeout = ready_timeout
        super().__init__("relay", [DOORSTROOM, "relay"], env,
                         log_dir / f"relay-{time.monotonic_ns()}.log")

    def wait_ready(self) -> None:
        self.wait_for_log("outbox relay running", self.ready_timeout)


class RedisServer(Process):
    """A throwaway redis-server on its own port, without persistence: stopping it loses
    whatever it held, like a broker that crashed. Never the shared server on 6379."""

    def __init__(self, log_dir: Path, port: int | None = None) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise ProcessError("redis-server is not installed")
        self.port = port or free_port()
        assert self.port != 6379, "never touch the shared Redis"
        super().__init__(f"redis-{self.port}",
                         [executable, "--port", str(self.port), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no", "--daemonize", "no"],
                         os.environ, log_dir / f"redis-{self.port}.log", stop_grace=5.0)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def wait_ready(self) -> None:
        wait_until(self._answers, 10,
                   message=lambda: f"redis did not answer: {self.describe()}")

    def _answers(self) -> bool:
        self.check_alive()
        import redis

        try:
            return bool(redis.Redis.from_url(self.url(), socket_timeout=1,
                                             socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        super().stop()
        wait_until(lambda: not accepts_connections(self.port), 5,
                   message=f"port {self.port} still accepts connections")


@contextlib.contextmanager
def running(*processes: Process) -> Iterator[tuple[Process, ...]]:
    """Launch the processes together, wait until each is ready; stop them all (in reverse
    order) on the way out, also when one of them never got ready."""
    try:
        for process in processes:
            process.launch()
        for process in processes:
            process.wait_ready()
        yield processes
    finally:
        for process in reversed(processes):
            process.stop()
