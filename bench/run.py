"""Run the benchmarks: `python -m bench.run [--quick] [--only P1]`.

Full mode writes `bench/results.json` and `docs/benchmarks.md`. `--quick` runs tiny sizes in
a few seconds (it is part of `make test`), writes `bench/results-quick.json` only, and exits 0
when a target is missed: a miss is reported, only a crash of the benchmark itself fails.

Each workload gets a database of its own (dropped and recreated, then migrated), so that one
workload's rows never change another's figures: P1 uses `doorstroom_bench`, the others
`doorstroom_bench_p3` and so on; a quick run uses throwaway databases and drops them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH_DB,
    ROOT,
    Measurement,
    drop_database,
    machine,
    point_product_at,
    recreate_database,
)

RESULTS = ROOT / "bench" / "results.json"
QUICK_RESULTS = ROOT / "bench" / "results-quick.json"
DOCS = ROOT / "docs" / "benchmarks.md"
WORKLOADS = ("P1", "P2", "P3", "P4", "P5", "P6")
#: Quick mode must stay bounded: no statement may run longer than this.
QUICK_STATEMENT_TIMEOUT_MS = 60_000


def log(message: str) -> None:
    print(message, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes; writes bench/results-quick.json only")
    parser.add_argument("--only", action="append", metavar="WORKLOAD", type=str.upper,
                        help=f"run only this workload (repeatable): {', '.join(WORKLOADS)}")
    parser.add_argument("--sizes", type=lambda s: tuple(int(x) for x in s.split(",")),
                        help="sizes to run instead of the defaults: P1 subscriptions, e.g. "
                             "100000,1000000; P2 concurrent clients (the first); P3 "
                             "deliveries (the first); P5 subscriptions "
                             "(the first) (writes nothing but the log)")
    parser.add_argument("--runs", type=int, help="runs per side instead of the defaults")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only or ()) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(unknown)}; known: {', '.join(WORKLOADS)}")
    return args


#: Settings every workload runs with (the product reads them from the environment):
#: webhooks to 127.0.0.1 over plain HTTP (P3, P4), and no broker connection in this process
#: (P4's processes get a real one in their own environment).
PRODUCT_ENV = {
    "DOORSTROOM_WEBHOOK_ALLOW_LOOPBACK": "true",
    "DOORSTROOM_ENVIRONMENT": "test",
    "DOORSTROOM_BROKER_URL": "memory://",
}


def database_for(workload: str, quick: bool) -> str:
    name = BENCH_DB if workload == "P1" else f"{BENCH_DB}_{workload.lower()}"
    return f"{name}_quick_{os.getpid()}" if quick else name


def runner_for(workload: str) -> Callable[..., Measurement]:
    if workload == "P1":
        from bench import fanout

        return fanout.run
    if workload == "P2":
        from bench import publish

        return publish.run
    if workload == "P3":
        from bench import webhooks

        return webhooks.run
    if workload == "P4":
        from bench import latency

        return latency.run
    if workload == "P6":
        from bench import history

        return history.run
    from bench import bundles

    return bundles.run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    selected = [w for w in WORKLOADS if not args.only or w in args.only]
    started = time.perf_counter()
    # The product reads its settings once; they are set (and the database pointed at) before
    # any domain module is imported, and again for each workload's database.
    os.environ.update(PRODUCT_ENV)
    os.environ.pop("DOORSTROOM_CLOCK", None)
    measurements: list[Measurement] = []
    runs_info: dict[str, dict[str, Any]] = {}
    info: dict[str, Any] = {}
    for workload in selected:
        log(f"== {workload}")
        workload_started = time.perf_counter()
        # The quick run gets databases of its own, so that `make test` never disturbs (or is
        # disturbed by) a full run in progress; they are dropped at the end.
        db_name = database_for(workload, args.quick)
        url = recreate_database(db_name)
        point_product_at(url)
        from domain import migrate
        from domain.db import make_engine

        migrate.upgrade(url)
        options = f"-c statement_timeout={QUICK_STATEMENT_TIMEOUT_MS}" if args.quick else ""
        engine = make_engine(url, connect_args={"connect_timeout": 5, "options": options})
        try:
            measurements.append(runner_for(workload)(engine, quick=args.quick, log=log,
                                                     sizes=args.sizes, runs=args.runs))
            info = machine(engine)
        finally:
            engine.dispose()
            if args.quick:
                point_product_at(None)
                drop_database(db_name)
        runs_info[workload] = {"seconds": time.perf_counter() - workload_started,
                               "date": info["date"], "database": db_name}
        log(f"== {workload} done in {runs_info[workload]['seconds']:.1f} s")
    elapsed = time.perf_counter() - started
    rows = [row.as_json() for m in measurements for row in m.rows]
    custom = args.sizes is not None or args.runs is not None
    if args.quick:
        write_json(QUICK_RESULTS, rows)
        log(f"wrote {QUICK_RESULTS.relative_to(ROOT)}")
    elif not custom:
        write_json(RESULTS, merge_rows(RESULTS, rows, selected))
        previous = DOCS.read_text() if DOCS.exists() else ""
        DOCS.write_text(render_docs(measurements, info, elapsed, argv_command(args),
                                    runs_info, kept_sections(previous, selected)))
        log(f"wrote {RESULTS.relative_to(ROOT)} and {DOCS.relative_to(ROOT)}")
    for note in (n for m in measurements for n in m.notes):
        log(note)
    missed = [r["name"] for r in rows if r["met"] is False]
    log(f"done in {elapsed:.1f} s; {len(rows)} metrics, "
        + (f"{len(missed)} target(s) missed: {'; '.join(missed)}" if missed else "all targets met"))
    return 0


def write_json(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    tmp.replace(path)


def merge_rows(path: Path, rows: list[dict[str, Any]], selected: list[str]) -> list[dict[str, Any]]:
    """With --only, keep the other workloads' rows from the previous results."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        previous = []
    kept = [r for r in previous if isinstance(r, dict)
            and str(r.get("name", "")).split(" ", 1)[0] not in selected]
    return sorted(kept + rows, key=lambda r: str(r["name"]).split(" ", 1)[0])


def kept_sections(previous: str, selected: list[str]) -> dict[str, list[str]]:
    """The previous document's sections of workloads not run now (with --only), verbatim."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in previous.splitlines():
        if line.startswith("## "):
            workload = line[3:].split(":", 1)[0].strip()
            current = (sections.setdefault(workload, [])
                       if workload in WORKLOADS and workload not in selected else None)
        if current is not None:
            current.append(line)
    return sections


def argv_command(args: argparse.Namespace) -> str:
    return ".venv/bin/python -m bench.run" + "".join(f" --only {w}" for w in args.only or ())


def _fmt_s(value: float) -> str:
    # A tenth of a millisecond at the small sizes, where the whole run takes a few.
    return f"{value:.4f}" if value < 0.1 else f"{value:.3f}"


def render_docs(measurements: list[Measurement], info: dict[str, Any], elapsed: float,
                command: str, runs_info: dict[str, dict[str, Any]] | None = None,
                kept: dict[str, list[str]] | None = None) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in info["postgresql_settings"].items())
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`.venv/bin/python -m bench.run`); do not edit by hand.",
        "`bench/results.json` holds the same figures in the shared contract's format.",
        "",
        "## Machine",
        "",
        f"- Date: {info['date']}",
        f"- CPU: {info['nproc']} × {info['cpu']}; memory {info['memory_gib']} GiB; "
        f"load average at the end {', '.join(map(str, info['load_average']))} "
        "(a shared machine: expect noise)",
        f"- PostgreSQL {info['postgresql']} ({settings})",
        f"- Python {info['python']}; commit {info['commit']}",
        f"- Command: `{command}` ({elapsed:.0f} s in all, set-up included)",
        "",
    ]
    if kept:
        lines += ["Sections of workloads not in this command are kept from an earlier run "
                  "(each says when it ran).", ""]
    fresh = {m.workload: m for m in measurements}
    for workload in WORKLOADS:
        if workload in fresh:
            section = _section(fresh[workload])
            run = (runs_info or {}).get(workload)
            if run:
                section[1:1] = ["", f"_Run {run['date']}, {run['seconds']:.0f} s with set-up, "
                                    f"database `{run['database']}`._"]
            lines += section
        elif kept and workload in kept:
            lines += kept[workload]
            if kept[workload][-1].strip():
                lines.append("")
    lines += [
        "## Reproducing",
        "",
        "```",
        "make bench                                   # everything, writes this file",
        ".venv/bin/python -m bench.run --only P1      # one workload (others keep their rows)",
        ".venv/bin/python -m bench.run --only P3 --only P4   # several",
        ".venv/bin/python -m bench.run --quick        # tiny sizes, bench/results-quick.json",
        "```",
        "",
        "To see where routing's time goes, after a full run (it leaves its largest N "
        f"loaded in `{BENCH_DB}`): `.venv/bin/python -m bench.profile_fanout` runs "
        "`EXPLAIN (ANALYZE, BUFFERS)` on the exact statement `route_update` sends (captured "
        "while routing a fresh update) in a rolled-back transaction; `--variant FILE.sql` "
        "explains an alternative with the same parameters, `--set jit=off` adds a "
        "`SET LOCAL` and `--before SQL` runs DDL first (all rolled back).",
        "",
        "The database server is `DOORSTROOM_BENCH_PG_URL` "
        "(default `postgresql+psycopg://postgres@127.0.0.1:5432/postgres`); the benchmark "
        f"drops and recreates a database per workload there: `{BENCH_DB}` for P1, "
        f"`{BENCH_DB}_p2`, `{BENCH_DB}_p3`, `{BENCH_DB}_p4` and `{BENCH_DB}_p5` for the "
        "others (the quick "
        "run uses databases of its own and drops them). P4 also uses the Redis database "
        "`redis://127.0.0.1:6379/12` as its broker (flushed first; the quick run starts a "
        "throwaway `redis-server` instead when one is installed).",
        "",
    ]
    return "\n".join(lines)


def _section(m: Measurement) -> list[str]:
    if m.workload == "P1":
        return _p1_section(m)
    if m.workload == "P2":
        from bench import publish

        return publish.docs_section(m)
    if m.workload == "P3":
        from bench import webhooks

        return webhooks.docs_section(m)
    if m.workload == "P4":
        from bench import latency

        return latency.docs_section(m)
    if m.workload == "P6":
        from bench import history

        return history.docs_section(m)
    from bench import bundles

    return bundles.docs_section(m)


def _p1_section(m: Measurement) -> list[str]:
    lines = [
        f"## P1: {m.title}",
        "",
        "**Measured**: `domain.routing.route_update(session, update_id)` from its call to its "
        "commit, for an update (published through `domain.publishing.publish`, with one "
        "topic) that all N subscriptions match. Each of the N subscriptions belongs to its "
        "own organisation and has no filter (all mask bits, `min_priority_rank` 0, cadence "
        "immediate, inbox channel, active); organisations and subscriptions are loaded with "
        "COPY before timing. No subscription on this platform takes push deliveries "
        "(webhook or e-mail), and routing reads that with the update, so it skips its "
        "deliveries statement here; where some do, that statement (an INSERT … SELECT over "
        "the push subscriptions, through their partial index) is one more round trip.",
        "",
        "**Baseline** (shares none of the routing code): in the same database and run, "
        "`CREATE TABLE bench_baseline (LIKE inbox_items INCLUDING ALL)` (same columns, "
        "primary key and indexes; LIKE copies no foreign keys) and "
        "`INSERT INTO bench_baseline (chain_id, organisation_id, update_id, "
        "subscription_ids, rule_ids, via_audience, needs_ack, received_at, delivered_at) "
        "SELECT <chain>, id, <update>, subscription_ids, '{}', false, false, now(), now() "
        "FROM bench_recipients` plus its commit, where `bench_recipients` is a table of the "
        "N recipient ids prepared before timing, each with the reasons routing writes for it "
        "(`subscription_ids` = its subscription's id, made in SQL from the recipient's "
        "subscription): the same rows, byte for byte.",
        "",
        "**Method**: before every run both target tables are emptied (TRUNCATE), "
        "vacuumed and analysed, and a CHECKPOINT is taken; baseline and routing alternate "
        "(baseline first in odd runs, routing first in even ones); the figure is the median "
        "of the runs. Warm-up runs of both sides go first and are not counted (12 at "
        "N ≤ 10,000, then 1): a routing worker runs the same few statements over and over, "
        "prepared by the driver from their sixth run and planned generically by the server "
        "after five more, so that the first runs on a connection measure parsing and "
        "planning rather than routing. Target: routing / baseline ≤ 1.5.",
        "",
        "| N | runs | routing (s, median) | baseline (s, median) | ratio | target | met |",
        "|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for row, d in zip(m.rows, m.detail, strict=True):
        lines.append(f"| {d['n']:,} | {d['runs']} | {_fmt_s(row.value)} | "
                     f"{_fmt_s(row.baseline or 0)} | {row.ratio:.2f} | ≤ {row.target} | "
                     f"{'yes' if row.met else '**no**'} |")
    lines += ["", "All samples (seconds):", ""]
    for d in m.detail:
        lines.append(f"- N={d['n']:,}: routing "
                     f"{', '.join(_fmt_s(x) for x in d['routing_s'])}; baseline "
                     f"{', '.join(_fmt_s(x) for x in d['baseline_s'])} "
                     f"(load {d['load_s']:.1f} s)")
    lines += [""] + m.notes + ([""] if m.notes else [])
    return lines


if __name__ == "__main__":
    sys.exit(main())
