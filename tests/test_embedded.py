"""Smoke tests of the embedded default: a SQLite file and kombu's filesystem broker, no servers.

Every command runs as a real `doorstroom` process whose environment points at a private
temporary folder (conftest.py points this test process at PostgreSQL and Redis, so the
variables are overridden explicitly and DOORSTROOM_REDIS_URL is removed).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOORSTROOM = str(Path(sys.executable).parent / "doorstroom")
SEEDED_MUNICIPALITIES = 304


def embedded_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DOORSTROOM_REDIS_URL"}
    env.update(
        DOORSTROOM_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        DOORSTROOM_BROKER_URL="filesystem://",
        DOORSTROOM_BROKER_FOLDER=str(tmp_path / "broker"),
        # The supervisor prints with plain print(): without this its output reaches the log
        # file only when it exits.
        PYTHONUNBUFFERED="1",
    )
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([DOORSTROOM, *args], env=env, cwd=ROOT, check=True, timeout=60,
                          capture_output=True, text=True)
    return done.stdout.strip()


def wait_ready(base: str, deadline: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before ready:\n{log.read_text()}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{base}/readyz never answered 200:\n{log.read_text()}")


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the process group `proc` leads (it was started with start_new_session)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


def processes_mentioning(marker: str) -> list[str]:
    """Live processes (not zombies) whose command line or environment contains `marker`."""
    found = []
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours
            continue
        if needle in cmdline or needle in environ:
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name}: {command}")
    return found


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def paginate(client: httpx.Client, url: str) -> Iterator[dict[str, object]]:
    pages = 0
    while url:
        pages += 1
        assert pages < 50, "pagination does not end"
        response = client.get(url)
        assert response.status_code == 200, response.text
        body = response.json()
        yield from body["items"]
        cursor = body["next_cursor"]
        url = str(httpx.URL(url).copy_set_param("cursor", cursor)) if cursor else ""


@pytest.mark.timeout(180)
def test_embedded_api_boots_and_serves_the_seeded_taxonomy(tmp_path: Path) -> None:
    from domain.seed import load_topics

    env = embedded_env(tmp_path)
    cli(env, "migrate")
    cli(env, "seed")
    org_id = cli(env, "org", "create", "--name", "X", "--level", "local",
                 "--kind", "municipality")
    key = cli(env, "key", "create", "--org", org_id, "--scope", "subscribe")
    assert org_id and "\n" not in org_id
    assert key and "\n" not in key and " " not in key

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "api.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([DOORSTROOM, "api", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_ready(base, time.monotonic() + 30, proc, log)
        with httpx.Client(base_url=base, timeout=10,
                          headers={"Authorization": f"Bearer {key}"}) as client:
            assert client.get("/healthz").status_code == 200

            spec = client.get("/openapi.json")
            assert spec.status_code == 200
            assert spec.json()["openapi"].startswith("3.1")

            municipalities = list(paginate(client, "/v1/organisations?kind=municipality"
                                                   "&limit=200"))
            ids = [m["id"] for m in municipalities]
            assert len(ids) == len(set(ids))
            assert {m["kind"] for m in municipalities} == {"municipality"}
            # The 304 seeded ones (each with a NIS code) and X, created above without one.
            assert sum(1 for m in municipalities if m["nis_code"]) == SEEDED_MUNICIPALITIES
            assert [m["name"] for m in municipalities if m["id"] == org_id] == ["X"]
            assert len(municipalities) == SEEDED_MUNICIPALITIES + 1

            topics = list(paginate(client, "/v1/topics?limit=200"))
            assert {t["slug"] for t in topics} == {t["slug"] for t in load_topics()}
            for topic in topics:
                assert topic["definition_nl"] and topic["definition_en"], topic
    finally:
        stop_group(proc)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("ctrl_c", ["sigint-to-up", "sigint-to-group"])
def test_up_starts_everything_and_ctrl_c_leaves_no_process(tmp_path: Path, ctrl_c: str) -> None:
    env = embedded_env(tmp_path)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([DOORSTROOM, "up", "--port", str(port)], env=env, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        wait_ready(base, deadline, proc, log)
        # Ready is not the end of start-up: the demo runs next (it may still say it is not
        # available; the supervisor carries on), then the banner.
        while "Doorstroom is running" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"`up` exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no banner:\n{log.read_text()}"
            time.sleep(0.2)
        assert f"Doorstroom is running at {base}" in log.read_text(errors="replace")
        assert processes_mentioning(f"{tmp_path}/"), "the children should be found by the scan"

        if ctrl_c == "sigint-to-up":
            os.kill(proc.pid, signal.SIGINT)
        else:  # what a terminal does: SIGINT to the whole foreground process group
            os.killpg(proc.pid, signal.SIGINT)
        try:
            returncode = proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`up` did not exit within 30 s of Ctrl-C:\n{log.read_text()}")
        assert returncode == 0, log.read_text(errors="replace")

        leftovers = processes_mentioning(f"{tmp_path}/")
        assert not leftovers, f"still running after Ctrl-C: {leftovers}\n{log.read_text()}"
        assert not accepts_connections(port)
    finally:
        stop_group(proc)
        # Whatever escaped (the test failed): do not leave it running.
        for line in processes_mentioning(f"{tmp_path}/"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
