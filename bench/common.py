"""What every workload shares: the benchmark database, result rows, the machine's description.

Nothing here imports the product: a workload imports what it measures (and only that), so
that a baseline can stay free of the code under test.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
#: A server-level URL (any database): the benchmark creates and drops its own database there.
ADMIN_URL = os.environ.get("DOORSTROOM_BENCH_PG_URL",
                           "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
BENCH_DB = "doorstroom_bench"


@dataclass
class Row:
    """One metric, in the shape `bench/results.json` holds (shared contract, "Benchmarks")."""

    name: str
    value: float
    unit: str
    direction: str  # "min" or "max": which way is better
    baseline: float | None
    ratio: float | None
    #: None (and `met` None) for figures reported without a target (e.g. scaling rows).
    target: float | None
    met: bool | None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Measurement:
    """What a workload hands back: its rows plus detail for the report (all samples, notes)."""

    workload: str
    title: str
    rows: list[Row]
    detail: list[dict[str, Any]]
    notes: list[str]


def relative_row(name: str, value: float, baseline: float, unit: str, target_ratio: float,
                 direction: str = "min") -> Row:
    """A row judged on value / baseline: at most `target_ratio` for "min", at least for "max"."""
    ratio = value / baseline if baseline > 0 else float("inf")
    met = ratio <= target_ratio if direction == "min" else ratio >= target_ratio
    return Row(name=name, value=round(value, 6), unit=unit, direction=direction,
               baseline=round(baseline, 6), ratio=round(ratio, 3), target=target_ratio, met=met)


def absolute_row(name: str, value: float, unit: str, target: float | None,
                 direction: str = "min") -> Row:
    """A row judged on its value alone (no baseline): at most `target` for "min", at least
    for "max"; without a target, `met` is None."""
    met = None if target is None else (value <= target if direction == "min"
                                       else value >= target)
    return Row(name=name, value=round(value, 6), unit=unit, direction=direction,
               baseline=None, ratio=None, target=target, met=met)


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def percentile(samples: list[float], p: float) -> float:
    """The p-th percentile (0-100), linear between the closest ranks (numpy's default)."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("no samples")
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def point_product_at(url: str | None) -> None:
    """Point the product's settings (and its cached engine) at the database `url`; with
    None, only close the product's connections.

    The product reads its settings once (`get_settings` is cached) and makes one engine from
    them; each workload has a database of its own, so both caches are cleared here. Imports
    nothing of the product that is not imported yet."""
    import sys

    if url is not None:
        os.environ["DOORSTROOM_DATABASE_URL"] = url

    if "domain.settings" in sys.modules:
        from domain.settings import get_settings

        get_settings.cache_clear()
    if "domain.db" in sys.modules:
        from domain.db import get_engine, get_sessionmaker

        if get_engine.cache_info().currsize:
            get_engine().dispose()
        get_engine.cache_clear()
        get_sessionmaker.cache_clear()


@contextmanager
def raw_cursor(engine: sa.engine.Engine) -> Iterator[Any]:
    """A psycopg cursor on a connection of its own (for COPY), committed when the block
    ends without an error."""
    raw = engine.raw_connection()
    try:
        conn = raw.driver_connection
        assert conn is not None
        with conn.cursor() as cur:
            yield cur
        conn.commit()
    finally:
        raw.close()


def database_url(name: str) -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def _admin_engine() -> sa.engine.Engine:
    return sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT",
                            connect_args={"connect_timeout": 5})


def recreate_database(name: str) -> str:
    """Drop (forcing out any session) and create `name`; answers its URL."""
    admin = _admin_engine()
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        admin.dispose()
    return database_url(name)


def drop_database(name: str) -> None:
    admin = _admin_engine()
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out + (" (working tree has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


PG_SETTINGS = ("shared_buffers", "work_mem", "maintenance_work_mem", "synchronous_commit",
               "max_wal_size", "jit", "max_parallel_workers_per_gather")


def machine(engine: sa.engine.Engine) -> dict[str, Any]:
    """The machine and server the figures were taken on."""
    with engine.connect() as conn:
        version = conn.exec_driver_sql("SHOW server_version").scalar()
        settings = {name: conn.exec_driver_sql(f"SHOW {name}").scalar() for name in PG_SETTINGS}
    return {
        "nproc": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "cpu": _cpu_model(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "postgresql": version,
        "postgresql_settings": settings,
        "python": platform.python_version(),
        "commit": _git_commit(),
        "date": datetime.now(UTC).replace(microsecond=0).isoformat(),
    }
