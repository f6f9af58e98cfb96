"""A throwaway PostgreSQL server for fault tests: its own data directory, port and socket
folder, so that a test can stop and start it at will. Never the shared server on 5432.

    server = PgServer().start()
    migrate.upgrade(server.url)
    server.stop()          # the database is gone for every client
    server.start()         # and back, with everything committed before
    pids = server.freeze() # SIGSTOP: connections stay open, nothing answers
    server.thaw(pids)
    server.destroy()       # stopped and its data directory removed

`initdb` refuses to run as root: when the tests run as root (as CI does), the server's
commands run as the `postgres` user through `runuser`, in a data directory that user owns.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.processes import ProcessError, accepts_connections, free_port, wait_until

SHARED_PORT = 5432


def find_bin_dir() -> Path:
    """The newest installed PostgreSQL's bin folder (Debian layout, or initdb on PATH)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(Path(p).parent.parent.name)
                        if Path(p).parent.parent.name.isdigit() else 0)
    if candidates:
        return Path(candidates[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise ProcessError("no PostgreSQL server binaries (initdb) found")


def available() -> bool:
    try:
        find_bin_dir()
    except ProcessError:
        return False
    return os.geteuid() != 0 or _has_postgres_user()


def _has_postgres_user() -> bool:
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return False
    return shutil.which("runuser") is not None


class PgServer:
    """One PostgreSQL cluster in a temporary folder, on a free port of 127.0.0.1."""

    def __init__(self, port: int | None = None) -> None:
        self.bin = find_bin_dir()
        self.port = port or free_port()
        assert self.port != SHARED_PORT, "never touch the shared PostgreSQL"
        self.root = Path(tempfile.mkdtemp(prefix="doorstroom-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "server.log"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self._initialised = False
        atexit.register(self.destroy)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / argv[0]), *argv[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL, cwd=self.root)
        if result.returncode != 0:
            raise ProcessError(f"{' '.join(command)} failed ({result.returncode}):\n"
                               f"{result.stdout}\n{result.stderr}\n{self.log()}")
        return result

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def start(self) -> PgServer:
        if not self._initialised:
            self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                      "--no-sync", "-E", "UTF8", "--locale=C")
            self._initialised = True
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   "-c max_connections=100")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-o", options,
                  "-w", "-t", "30", "start")
        wait_until(lambda: accepts_connections(self.port), 10,
                   message=lambda: f"PostgreSQL on {self.port} does not accept connections\n"
                                   f"{self.log()}")
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` disconnects every client at once (what a crash or a
        failover looks like to them); `immediate` does not even shut down cleanly."""
        if not self.running():
            return
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")
        wait_until(lambda: not accepts_connections(self.port), 10,
                   message=f"port {self.port} still accepts connections")

    def pids(self) -> list[int]:
        """The postmaster and every process it started (backends, checkpointer, ...)."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == postmaster:
                children.append(int(entry.name))
        return [postmaster, *children]

    def freeze(self) -> list[int]:
        """SIGSTOP the whole server: connections stay open but nothing answers (a stalled
        disk, a paused VM). Answers the frozen pids, for `thaw`."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        return pids

    def thaw(self, pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.thaw(self.pids())  # a frozen server would not stop
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
