"""P2: publish API requests per second, 32 concurrent clients, ~1 kB bodies.

Product: the API served exactly as deployed, `doorstroom api` (uvicorn, one worker process,
its own defaults for the event loop and HTTP parser), in a process of its own, against the
benchmark database. Every request is a real publish: `POST /v1/updates` with
`Authorization: Bearer <key>` (a key with the `publish` scope, issued through the use case)
and a ~1 kB JSON body (title, summary, body, one topic). The API authenticates the key,
validates the draft, writes the update, its topic row, the routing outbox row and the audit
entry in one statement (autocommit, on the driver's connection) and answers 202. The
outbox's trigger notifies the relay at the commit; the relay runs as deployed beside the
API (`doorstroom relay`, a process of its own; the scheduler runs the same loop) and hands
the routing task to the broker at once (claim and mark the due rows, send, commit; one
pass serves whatever was committed since the last), and its CPU is reported too. The
broker is kombu's in-memory transport (`memory://`, as every workload here runs): the
handoff's Python work is measured, but no broker server is, and nothing consumes the tasks
(no worker runs, so no routing happens). Rate limiting is off (no `DOORSTROOM_REDIS_URL`,
`DOORSTROOM_RATE_LIMIT_PER_MINUTE=0`): one key sends far more than the production limit of
600 a minute.

Baseline (shares none of the code under test): `bench/bare_publish_app.py`, a bare FastAPI
app whose one `POST /v1/updates` (a plain `def`, like the product's) validates the same body
with a pydantic model and stores it with one `INSERT … RETURNING id` on an autocommit psycopg
connection from a small pool, in the same database, served by `uvicorn.run` with the very
keyword arguments `doorstroom api` passes (read from `cli.main.api` with `uvicorn.run`
replaced by a recorder), in a process of its own.

Load: 32 asyncio tasks in the benchmark's process, each with a keep-alive connection of one
aiohttp session, posting back to back; the same bytes go to both sides (the baseline
ignores the Authorization header). After a warm-up, the figure is
the 2xx answers completed in a fixed window divided by its length. Product and baseline
alternate (baseline first in odd runs); before every run the database is vacuumed and
analysed and a CHECKPOINT is taken; medians of the runs.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import sqlalchemy as sa
from sqlalchemy.orm import Session

from bench.common import Measurement, Row, median, percentile, relative_row
from tests.processes import (
    Api,
    Process,
    Relay,
    accepts_connections,
    free_port,
    process_env,
    wait_until,
)

WORKLOAD = "P2"
TITLE = "publish API requests per second, 32 concurrent clients, ~1 kB bodies"
CLIENTS = 32
BODY_BYTES = 1_024
TARGET_RATIO = 0.5
TOPIC_SLUG = "bench-publish"
FULL_WARM_UP_S, FULL_WINDOW_S = 2.0, 10.0
QUICK_WARM_UP_S, QUICK_WINDOW_S = 0.5, 1.0
READY_TIMEOUT_S = 60.0
#: Error answers kept (status and the start of the body) for the report.
ERROR_SAMPLES = 3

#: The product's settings for this workload, on top of the benchmark's (`bench.run`
#: sets `DOORSTROOM_BROKER_URL=memory://` and the rest in this process's environment).
PROCESS_SETTINGS: dict[str, str | None] = {
    "DOORSTROOM_RATE_LIMIT_PER_MINUTE": "0",
    "DOORSTROOM_REDIS_URL": None,
    "DOORSTROOM_CLOCK": None,
}


def runs_for(quick: bool) -> int:
    return 1 if quick else 5


# ---------------------------------------------------------------------- request bodies


def body_parts(size: int = BODY_BYTES) -> tuple[bytes, bytes]:
    """(prefix, suffix) of a JSON update of `size` bytes give or take the digits of the
    counter that goes between them, so that every title differs."""
    summary = ("Wijziging in de procedure voor de aanvraag van subsidies voor lokale "
               "preventieprojecten; de nieuwe termijnen gelden vanaf volgende maand.")
    paragraph = ("De gemeenten ontvangen vanaf volgende week de nieuwe richtlijnen voor "
                 "lokale preventieprojecten, met aangepaste termijnen en formulieren. ")

    def encoded(body: str) -> str:
        return json.dumps({"title": "Nieuwe richtlijnen preventieprojecten, bericht @N@",
                           "summary": summary, "body": body, "topics": [TOPIC_SLUG]},
                          ensure_ascii=False)

    text = encoded("")
    body = (paragraph * 20)[:max(0, size - len(text.encode()) - 6)]
    prefix, suffix = encoded(body).split("@N@")
    return prefix.encode(), suffix.encode()


# ---------------------------------------------------------------------- processes


def serving_options(port: int) -> dict[str, Any]:
    """The keyword arguments `doorstroom api --host 127.0.0.1 --port PORT` passes to
    `uvicorn.run`, read by calling the command with `uvicorn.run` replaced by a recorder:
    the baseline is served with exactly these (and follows them if they change)."""
    import uvicorn

    from cli import main as cli

    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    with mock.patch.object(uvicorn, "run", lambda *a, **kw: calls.append((a, kw))):
        cli.api(host="127.0.0.1", port=port)
    if len(calls) != 1 or calls[0][0] != ("api.app:app",):
        raise RuntimeError(f"`doorstroom api` no longer calls uvicorn.run('api.app:app', …) "
                           f"once: {calls}")
    return dict(calls[0][1])


class BareApi(Process):
    """`bench/bare_publish_app.py` served with the given `uvicorn.run` options; ready when
    its port accepts connections (uvicorn binds after start-up)."""

    def __init__(self, env: Mapping[str, str], log_dir: Path, options: dict[str, Any],
                 ready_timeout: float = READY_TIMEOUT_S) -> None:
        self.port = int(options["port"])
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ready_timeout = ready_timeout
        super().__init__("bare-api", [sys.executable, "-m", "bench.bare_publish_app",
                                      json.dumps(options)],
                         env, log_dir / f"bare-api-{self.port}.log")

    def wait_ready(self) -> None:
        def ready() -> bool:
            self.check_alive()
            return accepts_connections(self.port)

        wait_until(ready, self.ready_timeout, interval=0.1,
                   message=lambda: f"the bare app never listened: {self.describe()}")


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all CPUs (`/proc/stat`)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is counted in user already
    return (total - idle) / tick, total / tick


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------- load generator


#: One POST: answers the status (or the exception's name) and the body.
Post = Callable[[bytes], Awaitable[tuple[int | str, str]]]


@asynccontextmanager
async def http_client(url: str, headers: dict[str, str], clients: int
                      ) -> AsyncIterator[tuple[str, Post]]:
    """One aiohttp session (a faster load generator than httpx) with a keep-alive
    connection for each of `clients` concurrent requests to `url`."""
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=clients),
            timeout=aiohttp.ClientTimeout(total=30), headers=headers) as session:

        async def post(body: bytes) -> tuple[int | str, str]:
            try:
                async with session.post(url, data=body) as response:
                    return response.status, await response.text()
            except (aiohttp.ClientError, TimeoutError) as exc:
                return type(exc).__name__, str(exc)

        yield f"aiohttp {aiohttp.__version__}", post


async def drive(url: str, headers: dict[str, str], parts: tuple[bytes, bytes], clients: int,
                warm_up_s: float, window_s: float, watch: Callable[[], dict[str, float]]
                ) -> dict[str, Any]:
    """`clients` tasks posting back to back for warm_up_s + window_s; answers the 2xx
    answers completed in the window per second, and what went wrong."""
    prefix, suffix = parts
    counter = itertools.count()
    state: dict[str, Any] = {"stop": False, "ok": 0, "window": None}
    errors: Counter[str] = Counter()
    samples: list[str] = []
    latencies: list[float] = []

    async def one(post: Post) -> None:
        started = time.perf_counter()
        status, text = await post(prefix + str(next(counter)).encode() + suffix)
        ended = time.perf_counter()
        if isinstance(status, int) and 200 <= status < 300:
            state["ok"] += 1
            window = state["window"]
            if window is not None and window[0] <= ended <= window[1]:
                latencies.append(ended - started)
        else:
            errors[str(status)] += 1
            if len(samples) < ERROR_SAMPLES:
                samples.append(f"{status}: {text[:200]}")

    async with http_client(url, headers, clients) as (client_name, post):

        async def client() -> None:
            while not state["stop"]:
                await one(post)

        tasks = [asyncio.create_task(client()) for _ in range(clients)]
        await asyncio.sleep(warm_up_s)
        ok0, errors0, cpu0 = state["ok"], sum(errors.values()), watch()
        machine0, process0, t0 = machine_cpu(), time.process_time(), time.perf_counter()
        state["window"] = (t0, t0 + window_s)
        await asyncio.sleep(window_s)
        ok1, errors1, cpu1 = state["ok"], sum(errors.values()), watch()
        machine1, process1, t1 = machine_cpu(), time.process_time(), time.perf_counter()
        state["stop"] = True
        await asyncio.gather(*tasks)
    elapsed = t1 - t0
    ok = ok1 - ok0
    cpu = {name: (cpu1.get(name, 0.0) - cpu0.get(name, 0.0)) / ok if ok else 0.0
           for name in cpu1}
    cpu["load generator"] = (process1 - process0) / ok if ok else 0.0
    busy, total = machine1[0] - machine0[0], machine1[1] - machine0[1]
    return {"rate": ok / elapsed if elapsed > 0 else 0.0, "ok": ok, "window_s": elapsed,
            "window_errors": errors1 - errors0, "sent": next(counter),
            "answered_2xx": state["ok"], "errors": dict(errors), "error_samples": samples,
            "p50_ms": percentile(latencies, 50) * 1000 if latencies else 0.0,
            "p99_ms": percentile(latencies, 99) * 1000 if latencies else 0.0,
            "cpu_ms_per_request": {k: v * 1000 for k, v in cpu.items()},
            "machine_busy": busy / total if total > 0 else 0.0,
            "client": client_name}


# ---------------------------------------------------------------------- the workload


class PublishBench:
    def __init__(self, engine: sa.engine.Engine, log: Callable[[str], None]) -> None:
        self.engine = engine
        self.log = log
        self.key = ""
        self.publisher_id: Any = None
        self.parts = body_parts()

    def prepare(self) -> None:
        """A publisher with a `publish` key and a topic, through the use cases (each
        commits); the baseline's table."""
        from bench.bare_publish_app import CREATE_TABLE
        from domain import directory, keys
        from domain.audit import SYSTEM
        from domain.models import Kind, Level

        with Session(self.engine, expire_on_commit=False) as session:
            publisher = directory.create_organisation(
                session, SYSTEM, directory.OrganisationFields(
                    name="Benchmark publisher", level=Level.flemish, kind=Kind.agency))
            self.publisher_id = publisher.id
            self.key = keys.issue_key(session, SYSTEM, publisher.id, ["publish"]).plaintext
            directory.create_topic(session, SYSTEM, slug=TOPIC_SLUG, parent=None,
                                   name_nl="Benchmark publiceren", name_en="Benchmark publish")
        with self.engine.begin() as conn:
            conn.exec_driver_sql(CREATE_TABLE)

    def settle(self) -> None:
        """The same starting point for every run: statistics fresh, dead rows gone, no
        checkpoint debt."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql("VACUUM ANALYZE")
            conn.exec_driver_sql("CHECKPOINT")

    def one_run(self, server: Process, url: str, clients: int, warm_up_s: float,
                window_s: float, relay: Process | None = None) -> dict[str, Any]:
        self.settle()

        def watch() -> dict[str, float]:
            server.check_alive()
            cpu = {"API process": cpu_seconds(server.pid)}
            if relay is not None:
                relay.check_alive()
                cpu["relay process"] = cpu_seconds(relay.pid)
            return cpu

        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        result = asyncio.run(drive(url, headers, self.parts, clients, warm_up_s, window_s,
                                   watch))
        server.check_alive()
        return result

    def stored(self) -> dict[str, int]:
        """Rows each side wrote, and the product's routing outbox rows not yet handed to
        the broker (the relay's fast path after commit should have sent every one)."""
        from bench.bare_publish_app import TABLE

        with self.engine.connect() as conn:
            return {
                "updates": conn.execute(sa.text(
                    "SELECT count(*) FROM updates WHERE publisher_id = :p"),
                    {"p": self.publisher_id}).scalar_one(),
                "outbox_undispatched": conn.exec_driver_sql(
                    "SELECT count(*) FROM outbox WHERE task = 'routing.route_update' "
                    "AND dispatched_at IS NULL").scalar_one(),
                "baseline_rows": conn.exec_driver_sql(f"SELECT count(*) FROM {TABLE}"
                                                      ).scalar_one()}

    def measure(self, product: Api, relay: Relay, bare: BareApi, clients: int, runs: int,
                warm_up_s: float, window_s: float) -> dict[str, Any]:
        sides: dict[str, tuple[Process, str]] = {
            "product": (product, f"{product.base_url}/v1/updates"),
            "baseline": (bare, f"{bare.base_url}/v1/updates")}
        results: dict[str, list[dict[str, Any]]] = {"product": [], "baseline": []}
        for i in range(runs):
            order = ("baseline", "product") if i % 2 == 0 else ("product", "baseline")
            for side in order:
                server, url = sides[side]
                results[side].append(self.one_run(server, url, clients, warm_up_s, window_s,
                                                  relay if side == "product" else None))
            p, b = results["product"][-1], results["baseline"][-1]
            self.log(f"  run {i + 1}/{runs}: " + "; ".join(
                f"{side} {r['rate']:,.0f}/s (p50 {r['p50_ms']:.0f} ms, API CPU "
                f"{r['cpu_ms_per_request']['API process']:.2f} ms/request"
                + (f", relay CPU {r['cpu_ms_per_request']['relay process']:.2f} ms/request"
                   if "relay process" in r["cpu_ms_per_request"] else "")
                + ", machine busy "
                f"{r['machine_busy']:.0%}, {sum(r['errors'].values())} errors)"
                for side, r in (("product", p), ("baseline", b))))
        return results


def _cpu_medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    names = runs[0]["cpu_ms_per_request"]
    return {n: median([r["cpu_ms_per_request"][n] for r in runs]) for n in names}


def run(engine: sa.engine.Engine, *, quick: bool, log: Callable[[str], None],
        sizes: tuple[int, ...] | None = None, runs: int | None = None) -> Measurement:
    clients = (sizes or (CLIENTS,))[0]
    runs = runs or runs_for(quick)
    warm_up_s, window_s = ((QUICK_WARM_UP_S, QUICK_WINDOW_S) if quick
                           else (FULL_WARM_UP_S, FULL_WINDOW_S))
    bench = PublishBench(engine, log)
    url = engine.url.render_as_string(hide_password=False)
    env = process_env({**PROCESS_SETTINGS, "DOORSTROOM_DATABASE_URL": url,
                       "BENCH_P2_DSN": url.replace("postgresql+psycopg://", "postgresql://")})
    options = serving_options(free_port())
    log_dir = Path(tempfile.mkdtemp(prefix="doorstroom-bench-p2-"))
    product = Api(env, log_dir, ready_timeout=READY_TIMEOUT_S)
    relay = Relay(env, log_dir, ready_timeout=READY_TIMEOUT_S)
    bare = BareApi(env, log_dir, options)
    ok = False
    try:
        started = time.perf_counter()
        # Both import while the publisher, its key and the baseline's table are made.
        product.launch()
        relay.launch()
        bare.launch()
        bench.prepare()
        product.wait_ready()
        relay.wait_ready()
        bare.wait_ready()
        log(f"P2: product API, its relay and the bare app ready in "
            f"{time.perf_counter() - started:.1f} s; "
            f"{clients} clients, {runs} run(s) per side of {warm_up_s:g} s warm-up + "
            f"{window_s:g} s measured; uvicorn.run options "
            f"{ {k: v for k, v in options.items() if k != 'port'} }")
        results = bench.measure(product, relay, bare, clients, runs, warm_up_s, window_s)
        ok = True
    finally:
        bare.stop()
        relay.stop()
        product.stop()
        if ok:
            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            log(f"P2: process logs kept in {log_dir}")
    stored = bench.stored()
    rate = median([r["rate"] for r in results["product"]])
    base = median([r["rate"] for r in results["baseline"]])
    rows: list[Row] = [relative_row(
        f"P2 publish requests per second vs bare FastAPI INSERT ({clients} clients, "
        f"{BODY_BYTES // 1024} kB bodies)", rate, base, "requests/s", TARGET_RATIO,
        direction="max")]
    for row in rows:
        log(f"{row.name}: {row.value:,.0f} {row.unit}, baseline {row.baseline:,.0f}, ratio "
            f"{row.ratio:.2f} (target ≥ {row.target:g}) {'met' if row.met else 'MISSED'}")
    detail = [{"clients": clients, "runs": runs, "warm_up_s": warm_up_s, "window_s": window_s,
               "options": {k: v for k, v in options.items() if k not in ("host", "port")},
               "body_bytes": len(bench.parts[0]) + len(bench.parts[1]) + 4,
               "product": results["product"], "baseline": results["baseline"],
               "product_cpu": _cpu_medians(results["product"]),
               "baseline_cpu": _cpu_medians(results["baseline"]),
               "stored": stored, "client": results["product"][0]["client"]}]
    for side in ("product", "baseline"):
        cpu = detail[0][f"{side}_cpu"]
        log(f"  {side} CPU per request (median ms): "
            + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
    return Measurement(WORKLOAD, TITLE, rows, detail, notes_for(detail[0]))


def notes_for(d: dict[str, Any]) -> list[str]:
    notes = []
    for side in ("product", "baseline"):
        errors: Counter[str] = Counter()
        for r in d[side]:
            errors.update(r["errors"])
        if errors:
            samples = [s for r in d[side] for s in r["error_samples"]][:ERROR_SAMPLES]
            notes.append(f"Note ({side}): {sum(errors.values()):,} requests did not get a 2xx "
                         f"answer ({', '.join(f'{k}: {v:,}' for k, v in errors.items())}); "
                         f"first: {' | '.join(samples)}.")
    answered = {side: sum(r["answered_2xx"] for r in d[side]) for side in ("product",
                                                                         "baseline")}
    stored = d["stored"]
    if stored["updates"] != answered["product"]:
        notes.append(f"Note: the product answered 2xx {answered['product']:,} times but "
                     f"stored {stored['updates']:,} updates.")
    if stored["baseline_rows"] != answered["baseline"]:
        notes.append(f"Note: the baseline answered 2xx {answered['baseline']:,} times but "
                     f"stored {stored['baseline_rows']:,} rows.")
    if stored["outbox_undispatched"]:
        notes.append(f"Note: {stored['outbox_undispatched']:,} routing outbox rows were not "
                     "handed to the broker by the end (the relay missed their "
                     "notification; its next poll would send them).")
    return notes


def _fmt(value: float) -> str:
    return f"{value:,.0f}"


def docs_section(m: Measurement) -> list[str]:
    d = m.detail[0]
    row = m.rows[0]
    options = ", ".join(f"`{k}={v!r}`" for k, v in d["options"].items())
    cpu_names = list(d["product_cpu"])
    lines = [
        f"## P2: {m.title}",
        "",
        "**Measured**: the API served as deployed, `doorstroom api` (uvicorn, one worker "
        "process) in a process of its own, against this workload's database. Every "
        "request is a real publish: `POST /v1/updates` with `Authorization: Bearer <key>` "
        "(a key with the `publish` scope, issued through the use case) and a "
        f"{d['body_bytes']:,}-byte JSON body (title numbered per request, summary, Markdown "
        "body, one topic). The API authenticates the key, validates the draft, writes the "
        "update, its topic row, the routing outbox row and the audit entry in one "
        "statement (in autocommit, on the driver's connection) and answers 202. The "
        "outbox's trigger notifies the relay at the commit, and the relay, run as deployed "
        "beside the API (`doorstroom relay`, in a process of its own; the scheduler runs "
        "the same loop), hands the routing task to the broker (claim the due rows and mark "
        "them dispatched, send, commit; one pass serves every row committed since the last, "
        "and under load, when a pass found more than one row, passes start 50 ms apart), "
        "and its CPU is reported too. The "
        "broker is kombu's in-memory transport (`memory://`, as for every "
        "workload here): the handoff's Python work counts, but no broker server runs, and "
        "no worker consumes the tasks, so no routing happens. Rate limiting is off (no "
        "`DOORSTROOM_REDIS_URL`, `DOORSTROOM_RATE_LIMIT_PER_MINUTE=0`: one key sends far "
        "more than the 600 a minute a key may send in production). No `Idempotency-Key`.",
        "",
        "**Baseline** (shares none of the code under test): `bench/bare_publish_app.py`, a "
        "bare FastAPI app whose one endpoint, `POST /v1/updates` (a plain `def`, run in "
        "FastAPI's thread pool like the product's), validates the same body with a pydantic "
        "model and stores it with one `INSERT … RETURNING id` into a table of its own "
        "(uuid primary key, the four fields, a timestamp) on an autocommit psycopg 3 "
        "connection (the product's driver) from a pool of at most 50 (the product's pool "
        "size plus overflow), in the same database, answering 202 with the id. It is served "
        "by `uvicorn.run` with the very keyword arguments `doorstroom api` passes (read "
        "from `cli.main.api` with `uvicorn.run` replaced by a recorder): "
        f"{options}, so the event loop and HTTP parser are uvicorn's defaults on both sides "
        "(uvloop and httptools, both installed), with the access log on.",
        "",
        f"**Load**: {d['clients']} asyncio tasks in the benchmark's process, each on a "
        f"keep-alive connection of one {d['client']} session, posting back to back; both "
        "sides get the same bytes (the baseline ignores the Authorization header). After "
        f"{d['warm_up_s']:g} s of warm-up, the figure is the 2xx answers completed in the "
        f"next {d['window_s']:g} s divided by the window's length; any other answer is an "
        "error and reported below. Before every run the database is vacuumed and analysed "
        "and a CHECKPOINT is taken; product and baseline alternate (baseline first in odd "
        "runs); medians. The load generator, both servers and PostgreSQL share the "
        "machine's CPUs (listed above; other work ran on them at times). Target: product "
        f"≥ {TARGET_RATIO} × baseline.",
        "",
        "| clients | runs | product (requests/s, median) | baseline (requests/s, median) "
        "| ratio | target | met |",
        "|---:|---:|---:|---:|---:|---:|:---:|",
        f"| {d['clients']} | {d['runs']} | {_fmt(row.value)} | {_fmt(row.baseline or 0)} | "
        f"{row.ratio:.2f} | ≥ {TARGET_RATIO} | {'yes' if row.met else '**no**'} |",
        "",
        "All samples: product " + ", ".join(
            f"{_fmt(r['rate'])}/s (p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms)"
            for r in d["product"])
        + "; baseline " + ", ".join(
            f"{_fmt(r['rate'])}/s (p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms)"
            for r in d["baseline"]) + ".",
        "",
        "CPU time per 2xx answer in the window (medians; from `/proc`: the API's process "
        "with all its threads, the product's relay, the load generator's process), and how "
        "busy the whole "
        "machine was (all CPUs, every process: PostgreSQL, both sides and whatever else "
        "ran). The API's CPU per request depends little on the throughput reached, so it "
        "says where the difference goes even on a busy machine:",
        "",
        "| side | " + " | ".join(f"{n} (ms/request)" for n in cpu_names)
        + " | machine busy |",
        "|---|" + "---:|" * (len(cpu_names) + 1),
    ]
    for side in ("product", "baseline"):
        lines.append(f"| {side} | "
                     + " | ".join(f"{d[f'{side}_cpu'][n]:.2f}" if n in d[f"{side}_cpu"]
                                  else "–" for n in cpu_names)
                     + f" | {median([r['machine_busy'] for r in d[side]]):.0%} |")
    lines += [""] + m.notes + ([""] if m.notes else [])
    return lines
