"""Processes the benchmarks start: the local webhook receiver and helper children.

Built on `tests/processes.py` (own session and process group, output in a log file, bounded
stop, killed with the benchmark if it dies). Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from tests.processes import (
    Process,
    ProcessError,
    _die_with_parent,
    free_port,
    process_env,
    wait_until,
)

PYTHON = sys.executable


class Receiver(Process):
    """`bench/receiver.py` under uvicorn (uvloop, httptools) in a process of its own, so
    that it competes with the sender for CPU but not for the sender's GIL."""

    def __init__(self, log_dir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        argv = [PYTHON, "-m", "uvicorn", "bench.receiver:app", "--host", "127.0.0.1",
                "--port", str(self.port), "--loop", "uvloop", "--http", "httptools",
                "--no-access-log", "--log-level", "warning", "--backlog", "4096",
                "--timeout-keep-alive", "60"]
        super().__init__(f"receiver-{self.port}", argv, process_env({}),
                         log_dir / f"receiver-{self.port}.log", stop_grace=5.0)
        self._client = httpx.Client(base_url=self.base_url, timeout=10, trust_env=False)

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def wait_ready(self) -> None:
        def ready() -> bool:
            self.check_alive()
            try:
                return self._client.get("/stats").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 20, interval=0.1,
                   message=lambda: f"the receiver never answered: {self.describe()}")

    def reset(self) -> None:
        self._client.post("/reset").raise_for_status()

    def stats(self, arrivals: bool = False) -> dict[str, Any]:
        response = self._client.get("/stats", params={"arrivals": 1} if arrivals else None)
        response.raise_for_status()
        return response.json()

    def stop(self) -> None:
        self._client.close()
        super().stop()


PROTOCOL_PREFIX = "BENCH "


class Child:
    """A Python child speaking JSON lines: commands on its stdin, answers on stdout as lines
    starting with `BENCH ` (anything else it prints, and its stderr, goes to its log)."""

    def __init__(self, module: str, env: Mapping[str, str], log_path: Path,
                 args: list[str] | None = None) -> None:
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen([PYTHON, "-m", module, *(args or [])], env=dict(env),
                                     cwd=Path(__file__).resolve().parent.parent,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, start_new_session=True,
                                     preexec_fn=_die_with_parent
                                     if sys.platform == "linux" else None)
        self._buffer = b""

    def send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        self.proc.stdin.flush()

    def receive(self, timeout: float) -> dict[str, Any]:
        """The next answer line, waiting at most `timeout` seconds."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith(PROTOCOL_PREFIX):
                    return json.loads(text[len(PROTOCOL_PREFIX):])
                with self.log_path.open("a") as log:
                    log.write(text + "\n")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProcessError(f"no answer from {self.proc.args} within {timeout:.0f} s; "
                                   f"log {self.log_path}:\n{self.log()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise ProcessError(f"{self.proc.args} exited ({self.proc.poll()}); "
                                       f"log {self.log_path}:\n{self.log()}")
                self._buffer += chunk

    def log(self, tail: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.send({"command": "quit"})
                    self.proc.wait(10)
                except (OSError, subprocess.TimeoutExpired):
                    self.proc.kill()
                    self.proc.wait(5)
        finally:
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    stream.close()
            self._log.close()


def answer(data: dict[str, Any]) -> None:
    """In a child: write one answer line."""
    sys.stdout.write(PROTOCOL_PREFIX + json.dumps(data) + "\n")
    sys.stdout.flush()


def commands() -> Any:
    """In a child: the commands from stdin, until `quit` or end of input."""
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        if command.get("command") == "quit":
            return
        yield command
