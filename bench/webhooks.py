"""P3: signed webhook deliveries per second to a local receiver with 50 endpoints.

Measured: `workers.webhooks.send_due()` end to end (the streaming sender: claim due
deliveries with their leases as slots free up, send them concurrently with Standard Webhooks
signatures, record outcomes in small transactions; each call runs at most its own
`MAX_RUN_SECONDS` and then finishes what is in flight), called again until every delivery
has succeeded (waiting for retries it scheduled, if any) or a deadline passes, over N
pending deliveries of ~1 kB CloudEvents spread evenly over 50 endpoints
`http://127.0.0.1:<port>/e<i>`. The figure is the deliveries that succeeded divided by the
time from the first call to the return (after the commit) of the last call that sent
something.

The receiver is `bench/receiver.py` under uvicorn in a process of its own; it answers 200,
does not verify signatures, and counts requests by `webhook-id`, which checks that every
delivery arrived exactly once.

Baseline (shares none of the code under test): a bare `aiohttp.ClientSession` posting the same
bodies with precomputed static headers to the same receiver and URLs at the same concurrency
(`webhook_per_endpoint_concurrency` per endpoint, `MAX_IN_FLIGHT` over all, as the
streaming sender uses), in the same run and process. No database.

Horizontal scale (no target): the same N pending deliveries sent by 1, 2 and 4 OS processes
(`bench/webhook_sender.py`, each calling `send_due` until nothing is pending) at once; they
share the work through `FOR UPDATE SKIP LOCKED` and leases. Every delivery should arrive
exactly once and have exactly one attempt row; the benchmark reports when not. Each of
those runs is followed by the bare loop at k times the sender's concurrency. Both targets
(the rate and the ratio) are judged on k = DEPLOYED_SENDERS, the sender as deployed on this
machine; the one-process figures are reported beside them (and judged in the quick run,
which has no scale runs).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import sqlalchemy as sa
from sqlalchemy.orm import Session

from bench.common import Measurement, Row, absolute_row, median, raw_cursor, relative_row
from bench.procs import Child, Receiver

WORKLOAD = "P3"
TITLE = "signed webhook deliveries per second"
ENDPOINTS = 50
FULL_N = 10_000
QUICK_N = 500
TARGET_RATE = 1_000.0
TARGET_RATIO = 0.5
FULL_SCALE = (1, 2, 4)
#: The quick run skips the scale rows: with N = 500 one process claims the whole batch.
QUICK_SCALE: tuple[int, ...] = ()
TOPIC_SLUG = "bench-webhooks"
EVENT_TYPE = "be.doorstroom.update.published"
PAYLOAD_BYTES = 1_000
#: A product run stops after this long even if not every delivery succeeded yet (retries
#: wait `next_attempt_at`); its figure then counts only what succeeded, and says so.
FULL_DEADLINE_S = 60.0
QUICK_DEADLINE_S = 12.0
CHILD_START_TIMEOUT_S = 60.0
#: Runs per process count (each reloads the N deliveries).
SCALE_RUNS = 3
#: The sender as deployed on this machine: `doorstroom worker --queues deliveries` (compose's
#: `sender`, `make run`) runs one process per core, 2 here. Its figure is compared with the
#: bare loop at the same total concurrency (each process keeps up to MAX_IN_FLIGHT in
#: flight, `webhook_per_endpoint_concurrency` per endpoint).
DEPLOYED_SENDERS = 2


def runs_for(quick: bool) -> int:
    return 1 if quick else 3


class WebhookBench:
    def __init__(self, engine: sa.engine.Engine, log: Callable[[str], None],
                 receiver: Receiver) -> None:
        self.engine = engine
        self.log = log
        self.receiver = receiver
        self.endpoints: list[tuple[uuid.UUID, uuid.UUID, str]] = []  # (id, org, url)
        self.payload = ""
        self.update_id: uuid.UUID | None = None

    # ------------------------------------------------------------------ set-up

    def prepare(self) -> None:
        """50 subscriber organisations with an endpoint each, and one real update whose
        CloudEvent (~1 kB) is the body of every delivery."""
        from domain import directory, events, publishing
        from domain.audit import SYSTEM, Actor
        from domain.models import Kind, Level, Organisation, WebhookEndpoint
        from domain.secrets import encrypt, new_webhook_secret
        from domain.settings import get_settings

        now = get_settings().now()
        with Session(self.engine, expire_on_commit=False) as session:
            publisher = directory.create_organisation(
                session, SYSTEM, directory.OrganisationFields(
                    name="Benchmark publisher", level=Level.flemish, kind=Kind.agency))
            directory.create_topic(session, SYSTEM, slug=TOPIC_SLUG, parent=None,
                                   name_nl="Benchmark webhooks", name_en="Benchmark webhooks")
            summary = ("Wijziging in de procedure voor de aanvraag van subsidies voor lokale "
                       "preventieprojecten; de nieuwe termijnen gelden vanaf volgende maand.")
            body = "Lokale besturen dienen hun aanvraag in via het loket. " * 4
            update = publishing.publish(session, Actor(publisher.id, None,
                                                       frozenset({"publish"})),
                                        publishing.Draft(title="Benchmark webhook update",
                                                         topics=[TOPIC_SLUG], summary=summary,
                                                         body=body))
            self.update_id = update.id
            self.payload = events.update_event(update, publisher, events.PUBLISHED, now)
            for i in range(ENDPOINTS):
                org = Organisation(name=f"Bench webhook subscriber {i}", level=Level.local,
                                   kind=Kind.municipality, created_at=now, updated_at=now)
                session.add(org)
                session.flush()
                url = self.receiver.url(f"/e{i}")
                endpoint = WebhookEndpoint(organisation_id=org.id, url=url, event_types=[],
                                           enabled=True,
                                           secret_ciphertext=encrypt(new_webhook_secret()),
                                           created_at=now, updated_at=now)
                session.add(endpoint)
                session.flush()
                self.endpoints.append((endpoint.id, org.id, url))
            session.commit()
        self.log(f"P3: {ENDPOINTS} endpoints, payload {len(self.payload.encode())} bytes")

    def load(self, n: int) -> float:
        """Exactly n pending webhook deliveries, due now, spread evenly over the endpoints;
        no attempts. Answers seconds."""
        from domain.models import new_id

        started = time.perf_counter()
        self.clear()
        due = datetime.now(UTC) - timedelta(seconds=1)
        with raw_cursor(self.engine) as cur, cur.copy(
                "COPY deliveries (id, message_id, organisation_id, endpoint_id, update_id, "
                "channel, event_type, payload, status, attempt_count, next_attempt_at, "
                "created_at) FROM STDIN") as copy:
            for i in range(n):
                endpoint_id, org_id, _ = self.endpoints[i % len(self.endpoints)]
                copy.write_row((new_id(), f"msg_{uuid.uuid4().hex}", org_id, endpoint_id,
                                self.update_id, "webhook", EVENT_TYPE, self.payload,
                                "pending", 0, due, due))
        self._vacuum("deliveries", "delivery_attempts", "webhook_endpoints")
        return time.perf_counter() - started

    def clear(self) -> None:
        """Forget every delivery and attempt; endpoints back to healthy and enabled."""
        with self.engine.begin() as conn:
            conn.exec_driver_sql("TRUNCATE delivery_attempts, deliveries")
            conn.exec_driver_sql("UPDATE webhook_endpoints SET failing_since = NULL, "
                                 "last_success_at = NULL, enabled = true")

    def _vacuum(self, *tables: str) -> None:
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql(f"VACUUM (ANALYZE) {', '.join(tables)}")
            with suppress(sa.exc.DBAPIError):  # CHECKPOINT needs superuser (or pg_checkpoint)
                conn.exec_driver_sql("CHECKPOINT")

    # ------------------------------------------------------------------ checks

    def outcome(self, n: int) -> dict[str, Any]:
        """What arrived and what was recorded: every delivery should have arrived exactly
        once and have exactly one (successful) attempt row."""
        stats = self.receiver.stats()
        with self.engine.connect() as conn:
            db = conn.exec_driver_sql(
                "SELECT count(*) FILTER (WHERE status = 'succeeded'), "
                "count(*) FILTER (WHERE attempt_count > 1), "
                "(SELECT count(*) FROM delivery_attempts), "
                "(SELECT count(*) FROM delivery_attempts WHERE status_code IS NULL), "
                "(SELECT count(*) FROM (SELECT delivery_id FROM delivery_attempts "
                " WHERE status_code BETWEEN 200 AND 299 GROUP BY delivery_id "
                " HAVING count(*) > 1) AS twice) "
                "FROM deliveries").one()
            errors = conn.exec_driver_sql(
                "SELECT left(error, 60), count(*) FROM delivery_attempts "
                "WHERE error IS NOT NULL GROUP BY 1 ORDER BY 2 DESC LIMIT 3").all()
        return {"n": n, "received": stats["requests"], "unique_ids": stats["unique_ids"],
                "duplicates": stats["duplicates"], "succeeded": db[0],
                "retried_deliveries": db[1], "attempt_rows": db[2], "failed_attempts": db[3],
                "succeeded_twice": db[4], "errors": [f"{e} ({c})" for e, c in errors],
                "exactly_once": (stats["requests"] == stats["unique_ids"] == n
                                 and db[0] == db[2] == n)}

    def pending(self) -> int:
        with self.engine.connect() as conn:
            return conn.exec_driver_sql(
                "SELECT count(*) FROM deliveries WHERE status = 'pending'").scalar_one()

    # ------------------------------------------------------------------ the two sides

    def time_product(self, n: int, deadline_s: float) -> tuple[float, dict[str, Any]]:
        """send_due until every delivery succeeded (waiting for retries it scheduled, if
        any), at most `deadline_s`. Answers (seconds to the last commit, outcome); when the
        deadline passes first, the outcome says how many succeeded."""
        from workers.webhooks import send_due

        self.load(n)
        self.receiver.reset()
        started = time.perf_counter()
        ended = started
        while time.perf_counter() - started < deadline_s:
            if send_due():
                ended = time.perf_counter()
            elif self.pending() == 0:
                break
            else:
                time.sleep(0.1)  # retries are due later (`next_attempt_at`)
        return ended - started, self.outcome(n)

    def baseline_items(self, n: int) -> list[tuple[str, str, bytes, dict[str, str]]]:
        """(endpoint key, url, body, headers) per request, all computed before timing."""
        body = self.payload.encode()
        timestamp = str(int(time.time()))
        signature = "v1," + "A" * 43 + "="  # the shape of a real one; nobody checks it
        items = []
        for i in range(n):
            _, _, url = self.endpoints[i % len(self.endpoints)]
            items.append((url, url, body, {
                "content-type": "application/cloudevents+json",
                "webhook-id": f"msg_{uuid.uuid4().hex}",
                "webhook-timestamp": timestamp, "webhook-signature": signature}))
        return items

    def time_baseline(self, n: int, per_endpoint: int, max_in_flight: int,
                      deadline_s: float) -> tuple[float, int]:
        """Answers (seconds, requests answered 200); all n unless the deadline passed."""
        items = self.baseline_items(n)
        self.receiver.reset()
        elapsed, ok = asyncio.run(bare_client_loop(items, per_endpoint, max_in_flight,
                                                   deadline_s))
        stats = self.receiver.stats()
        if ok > stats["unique_ids"] or (ok == n and stats["requests"] != n):
            raise RuntimeError(f"baseline: {ok} answered 200 of {n}; receiver {stats}")
        return elapsed, ok

    def measure(self, n: int, runs: int, deadline_s: float) -> dict[str, Any]:
        from domain.settings import get_settings
        from workers.webhooks import MAX_IN_FLIGHT

        per_endpoint = get_settings().webhook_per_endpoint_concurrency
        # Warm-up, not timed: first connections, imports, key derivation on both sides.
        self.time_product(ENDPOINTS, deadline_s)
        self.time_baseline(ENDPOINTS, per_endpoint, MAX_IN_FLIGHT, deadline_s)
        product: list[float] = []
        rates: list[float] = []
        outcomes: list[dict[str, Any]] = []
        baseline: list[float] = []
        baseline_rates: list[float] = []
        baseline_ok: list[int] = []
        for i in range(runs):
            sides = ("baseline", "product") if i % 2 == 0 else ("product", "baseline")
            for side in sides:
                if side == "product":
                    elapsed, outcome = self.time_product(n, deadline_s)
                    product.append(elapsed)
                    outcomes.append(outcome)
                    # Only what succeeded counts (all of it, unless the deadline passed).
                    rates.append(outcome["succeeded"] / elapsed if elapsed > 0 else 0.0)
                else:
                    elapsed, ok = self.time_baseline(n, per_endpoint, MAX_IN_FLIGHT,
                                                     deadline_s)
                    baseline.append(elapsed)
                    baseline_ok.append(ok)
                    baseline_rates.append(ok / elapsed if elapsed > 0 else 0.0)
            o = outcomes[-1]
            self.log(f"  N={n:,} run {i + 1}/{runs}: send_due {rates[-1]:,.0f}/s "
                     f"({product[-1]:.2f} s; {o['succeeded']:,} succeeded, "
                     f"{o['failed_attempts']:,} failed attempts, {o['duplicates']:,} "
                     f"duplicate requests), bare client {baseline_rates[-1]:,.0f}/s "
                     f"({baseline[-1]:.2f} s, {baseline_ok[-1]:,} answered)")
        return {"n": n, "runs": runs, "product_s": product, "baseline_s": baseline,
                "product_rates": rates, "outcomes": outcomes, "baseline_rates": baseline_rates,
                "baseline_ok": baseline_ok,
                "product_rate": median(rates), "baseline_rate": median(baseline_rates),
                "per_endpoint": per_endpoint, "max_in_flight": MAX_IN_FLIGHT,
                "concurrency": min(per_endpoint * ENDPOINTS, MAX_IN_FLIGHT),
                "deadline_s": deadline_s}

    # ------------------------------------------------------------------ horizontal scale

    def measure_scale(self, n: int, counts: tuple[int, ...], runs: int, deadline_s: float,
                      log_dir: Path) -> list[dict[str, Any]]:
        """Each count k: `runs` runs of k sender processes at once, each followed by the bare
        loop at k times the sender's concurrency (side by side, same run)."""
        from domain.settings import get_settings
        from tests.processes import process_env
        from workers.webhooks import MAX_IN_FLIGHT

        per_endpoint = get_settings().webhook_per_endpoint_concurrency

        env = process_env({})
        children = [Child("bench.webhook_sender", env, log_dir / f"sender-{i}.log")
                    for i in range(max(counts))]
        try:
            for child in children:
                child.receive(CHILD_START_TIMEOUT_S)  # ready
            results = []
            for k in counts:
                samples = []
                outcomes = []
                baseline_rates = []
                for _ in range(runs):
                    self.load(n)
                    self.receiver.reset()
                    go = time.monotonic()
                    for child in children[:k]:
                        child.send({"command": "go", "deadline_s": deadline_s})
                    answers = [child.receive(deadline_s + 120) for child in children[:k]]
                    ends = [a["ended"] for a in answers if a["ended"] is not None]
                    elapsed = (max(ends) if ends else time.monotonic()) - go
                    outcome = self.outcome(n)
                    outcome["sent_per_process"] = [a["sent"] for a in answers]
                    outcomes.append(outcome)
                    samples.append(outcome["succeeded"] / elapsed if elapsed > 0 else 0.0)
                    self.log(f"  {k} process(es): {samples[-1]:,.0f}/s ({elapsed:.2f} s), "
                             f"attempts per process {outcome['sent_per_process']}, "
                             f"{outcome['succeeded']:,} succeeded, {outcome['duplicates']} "
                             f"duplicate requests, {outcome['succeeded_twice']} deliveries "
                             "with two successful attempts")
                    base_s, base_ok = self.time_baseline(n, per_endpoint * k, MAX_IN_FLIGHT * k,
                                                         deadline_s)
                    baseline_rates.append(base_ok / base_s if base_s > 0 else 0.0)
                    self.log(f"    bare client at {k}× the concurrency: "
                             f"{baseline_rates[-1]:,.0f}/s")
                results.append({"processes": k, "rates": samples, "rate": median(samples),
                                "outcomes": outcomes, "baseline_rates": baseline_rates,
                                "baseline_rate": median(baseline_rates)})
            return results
        finally:
            for child in children:
                child.stop()


async def bare_client_loop(items: list[tuple[str, str, bytes, dict[str, str]]],
                           per_endpoint: int, max_in_flight: int,
                           deadline_s: float | None = None) -> tuple[float, int]:
    """POST every item with one keep-alive aiohttp session, at most `per_endpoint` requests
    per endpoint and `max_in_flight` over all at once, stopping after `deadline_s`. Answers
    (seconds, 200 answers)."""
    ok = 0
    connector = aiohttp.TCPConnector(limit=max_in_flight, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector) as client:
        gates: dict[str, asyncio.Semaphore] = {}
        overall = asyncio.Semaphore(max_in_flight)

        async def one(key: str, url: str, body: bytes, headers: dict[str, str]) -> None:
            nonlocal ok
            gate = gates.setdefault(key, asyncio.Semaphore(per_endpoint))
            async with gate, overall, client.post(url, data=body, headers=headers) as response:
                await response.read()
                ok += response.status == 200

        started = time.perf_counter()
        try:
            async with asyncio.timeout(deadline_s):
                await asyncio.gather(*(one(*item) for item in items))
        except TimeoutError:
            pass
        elapsed = time.perf_counter() - started
    return elapsed, ok


def run(engine: sa.engine.Engine, *, quick: bool, log: Callable[[str], None],
        sizes: tuple[int, ...] | None = None, runs: int | None = None) -> Measurement:
    n = (sizes or (QUICK_N if quick else FULL_N,))[0]
    runs = runs or runs_for(quick)
    log_dir = Path(tempfile.mkdtemp(prefix="doorstroom-bench-p3-"))
    receiver = Receiver(log_dir)
    ok = False
    try:
        receiver.start()
        bench = WebhookBench(engine, log, receiver)
        bench.prepare()
        deadline_s = QUICK_DEADLINE_S if quick else FULL_DEADLINE_S
        result = bench.measure(n, runs, deadline_s)
        counts = QUICK_SCALE if quick else FULL_SCALE
        scale = []
        if counts:
            log(f"P3 horizontal scale: {', '.join(map(str, counts))} sender processes")
            scale = bench.measure_scale(n, counts, SCALE_RUNS, deadline_s, log_dir)
        ok = True
    finally:
        receiver.stop()
        if ok:
            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            log(f"P3: process logs kept in {log_dir}")
    rate, base = result["product_rate"], result["baseline_rate"]
    deployed = next((s for s in scale if s["processes"] == DEPLOYED_SENDERS), None)
    one_process = (f"P3 webhook deliveries per second, one sender process ({n} deliveries, "
                   f"{ENDPOINTS} endpoints)")
    one_vs_bare = (f"P3 webhook deliveries per second, one sender process vs bare client "
                   f"({n} deliveries)")
    rows: list[Row]
    if deployed is None:  # the quick run: one process is all there is
        rows = [absolute_row(one_process, rate, "deliveries/s", TARGET_RATE, direction="max"),
                relative_row(one_vs_bare, rate, base, "deliveries/s", TARGET_RATIO,
                             direction="max")]
    else:
        rows = [
            absolute_row(f"P3 webhook deliveries per second, deployed sender "
                         f"({DEPLOYED_SENDERS} processes, {n} deliveries, {ENDPOINTS} "
                         "endpoints)", deployed["rate"], "deliveries/s", TARGET_RATE,
                         direction="max"),
            relative_row(f"P3 webhook deliveries per second vs bare client, deployed sender "
                         f"({DEPLOYED_SENDERS} processes, {n} deliveries)", deployed["rate"],
                         deployed["baseline_rate"], "deliveries/s", TARGET_RATIO,
                         direction="max"),
            # Reported beside them, not judged.
            absolute_row(one_process, rate, "deliveries/s", None, direction="max"),
            Row(name=one_vs_bare, value=round(rate, 6), unit="deliveries/s", direction="max",
                baseline=round(base, 6), ratio=round(rate / base, 3), target=None, met=None),
        ]
    for s in scale:
        rows.append(absolute_row(f"P3 webhook deliveries per second with {s['processes']} "
                                 f"sender process{'es' if s['processes'] > 1 else ''}",
                                 s["rate"], "deliveries/s", None, direction="max"))
    for row in rows:
        verdict = "" if row.met is None else (" met" if row.met else " MISSED")
        log(f"{row.name}: {row.value:,.0f} {row.unit}"
            + (f", baseline {row.baseline:,.0f}, ratio {row.ratio:.2f}" if row.baseline else "")
            + (f" (target {row.target:g}){verdict}" if row.target is not None else ""))
    detail = [{**result, "scale": scale, "payload_bytes": len(bench.payload.encode())}]
    return Measurement(WORKLOAD, TITLE, rows, detail, notes=notes_for(result, scale))


def notes_for(result: dict[str, Any], scale: list[dict[str, Any]]) -> list[str]:
    notes = []
    n = result["n"]
    for label, outcomes in [("send_due", result["outcomes"])] + [
            (f"{s['processes']} sender process(es)", s["outcomes"]) for s in scale]:
        bad = [o for o in outcomes if not o["exactly_once"]]
        if not bad:
            continue
        o = bad[0]
        notes.append(
            f"Note ({label}, {len(bad)} of {len(outcomes)} run(s)): not every delivery went out "
            f"exactly once in one attempt: of {n:,}, {o['succeeded']:,} succeeded "
            f"(within {result['deadline_s']:.0f} s), {o['attempt_rows']:,} attempt rows of "
            f"which {o['failed_attempts']:,} failed ({'; '.join(o['errors']) or 'none'}), "
            f"{o['retried_deliveries']:,} deliveries needed more than one attempt; the "
            f"receiver got {o['received']:,} requests for {o['unique_ids']:,} distinct "
            f"webhook-ids ({o['duplicates']:,} duplicates); {o['succeeded_twice']:,} "
            "deliveries have two successful attempts (a double claim would show there).")
    return notes


def _fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def docs_section(m: Measurement) -> list[str]:
    d = m.detail[0]
    n = d["n"]
    main = next(r for r in m.rows if r.name.startswith(
        "P3 webhook deliveries per second, one sender process ("))
    ratio = next(r for r in m.rows if "one sender process vs bare client" in r.name)
    deployed_rate = next((r for r in m.rows if "second, deployed sender" in r.name), None)
    deployed = next((r for r in m.rows if "vs bare client, deployed sender" in r.name), None)
    scale_rows = [r for r in m.rows if r.name.startswith("P3 webhook deliveries per second with")]
    lines = [
        f"## P3: {m.title}",
        "",
        "**Measured**: `workers.webhooks.send_due()` end to end (the streaming sender: claim "
        "due deliveries and their leases as slots free up, send them concurrently with "
        "Standard Webhooks signatures, record outcomes in small transactions; one call runs "
        "at most `MAX_RUN_SECONDS`, then finishes what is in flight), called again until "
        "every delivery has "
        f"succeeded (at most {d['deadline_s']:.0f} s; when a call finds nothing to claim "
        "while some are still pending, they wait for a retry it scheduled, and the loop "
        f"looks again every 0.1 s), over {n:,} pending deliveries "
        f"({d.get('payload_bytes', PAYLOAD_BYTES):,} byte "
        f"CloudEvents of one real update) spread evenly over {ENDPOINTS} endpoints "
        "`http://127.0.0.1:<port>/e<i>` (loopback allowed, environment `test`). Figure: "
        "deliveries that succeeded / time from the first call to the return (after its "
        "commit) of the last call that sent something.",
        "",
        "**Receiver**: `bench/receiver.py`, a bare ASGI app under uvicorn (uvloop, httptools) "
        "in a process of its own; it answers 200 at once without verifying signatures and "
        "counts requests by `webhook-id`. After every run the benchmark compares what "
        "arrived with the attempt rows: exactly once means N requests for N distinct ids "
        "and N attempt rows, all successful.",
        "",
        "**Baseline** (shares none of the code under test): a bare `aiohttp.ClientSession` "
        "posting the same bodies with precomputed static headers to the same URLs and "
        "receiver, at the same concurrency as the streaming sender: "
        f"{d['per_endpoint']} per endpoint (`webhook_per_endpoint_concurrency`) × "
        f"{ENDPOINTS} endpoints, at most "
        f"{d['max_in_flight']} over all (`MAX_IN_FLIGHT`), i.e. {d['concurrency']} in flight; "
        "one session (one pool) for the whole run, in the same process and run, no database. "
        "It uses the same HTTP client library as the sender (aiohttp, the fastest asyncio "
        "client here: about 5 times httpx on this machine), so the ratio measures the "
        "sender's own work, not the choice of library.",
        "",
        "**Method**: before every product run the deliveries are reloaded with COPY "
        "(TRUNCATE, VACUUM ANALYZE, CHECKPOINT); a warm-up of one delivery per endpoint on "
        "both sides is not timed; product and baseline alternate; medians. Targets: ≥ "
        f"{TARGET_RATE:,.0f} deliveries/s, and ≥ {TARGET_RATIO} × the baseline. Both are "
        "judged on the sender as deployed on this machine (`doorstroom worker --queues "
        f"deliveries` runs one process per core: {DEPLOYED_SENDERS} here), the ratio against "
        "the bare loop at the same total concurrency (each sender process keeps up to "
        "`MAX_IN_FLIGHT` in flight), both from the horizontal-scale runs below; the one-"
        "process figures are reported beside them. Why one process is not half the bare loop: "
        "the bare loop does nothing but HTTP, while the sender also claims, leases, signs, "
        "re-checks every URL and records every attempt in PostgreSQL, on the same two "
        "cores as the database and the receiver.",
        "",
        "| N | runs | send_due (deliveries/s, median) | bare client "
        "(deliveries/s, median) | ratio | target | met |",
        "|---:|---:|---:|---:|---:|---:|:---:|",
        f"| {n:,} | {d['runs']} | {_fmt_rate(main.value)} | {_fmt_rate(ratio.baseline or 0)} "
        f"| {ratio.ratio:.2f} | "
        + ("reported | — |" if deployed is not None else
           f"≥ {TARGET_RATE:,.0f}/s, ≥ {TARGET_RATIO} × baseline | "
           f"{'yes' if main.met and ratio.met else '**no**'} |"),
    ]
    if deployed is not None and deployed_rate is not None:
        lines.append(
            f"| {n:,} | {SCALE_RUNS} | {_fmt_rate(deployed.value)} with {DEPLOYED_SENDERS} "
            f"processes | {_fmt_rate(deployed.baseline or 0)} at {DEPLOYED_SENDERS}× the "
            f"concurrency | {deployed.ratio:.2f} | ≥ {TARGET_RATE:,.0f}/s, ≥ {TARGET_RATIO} × "
            f"baseline | {'yes' if deployed.met and deployed_rate.met else '**no**'} |")
    lines += [
        "",
        "All samples: send_due "
        + ", ".join(f"{r:,.0f}/s ({t:.2f} s, {o['succeeded']:,} succeeded, "
                    f"{o['failed_attempts']:,} failed attempts)"
                    for r, t, o in zip(d["product_rates"], d["product_s"], d["outcomes"],
                                       strict=True))
        + "; bare client " + ", ".join(f"{r:,.0f}/s ({t:.2f} s, {k:,} answered)"
                                       for r, t, k in zip(d["baseline_rates"], d["baseline_s"],
                                                          d["baseline_ok"], strict=True))
        + ".",
        "",
    ]
    if not d["scale"]:
        return lines + [""] + m.notes + ([""] if m.notes else [])
    lines += [
        "**Horizontal scale** (no target): the same N pending deliveries, sent by 1, 2 and "
        "4 OS processes at once (`bench/webhook_sender.py`: each imports the sender, then "
        "calls `send_due()` until nothing is pending); they share the work through "
        "`FOR UPDATE SKIP LOCKED` and leases. Time from the start signal to the last "
        "process's last commit (one monotonic clock for all processes). The machine has "
        "the CPU count shown above, shared with PostgreSQL and the receiver.",
        "",
        "| sender processes | deliveries/s (median) | samples | bare client at the same "
        "total concurrency (median) | attempts per process | exactly once |",
        "|---:|---:|---:|---:|---:|:---:|",
    ]
    for row, s in zip(scale_rows, d["scale"], strict=True):
        once = all(o["exactly_once"] for o in s["outcomes"])
        lines.append(f"| {s['processes']} | {_fmt_rate(row.value)} | "
                     f"{', '.join(_fmt_rate(x) for x in s['rates'])} | "
                     f"{_fmt_rate(s['baseline_rate'])} | "
                     f"{'; '.join(str(o['sent_per_process']) for o in s['outcomes'])} | "
                     f"{'yes' if once else '**no**'} |")
    lines += [""] + m.notes + ([""] if m.notes else [])
    return lines
