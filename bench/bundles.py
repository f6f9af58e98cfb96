"""P5: daily bundles for 10,000 subscriptions with 200 updates in the window.

Measured: `domain.bundles.run_due_bundles(session, now)` from its call to its return (after
its last commit; it commits once per batch of `domain.bundles.BATCH_SIZE` subscriptions):
every due daily window is found, its bundle and entries written, empty bundles dropped,
`bundled_until` moved on, and the push subscriptions' bundles handed to their channel (a
webhook delivery with its rendered CloudEvent per bundle; inbox bundles need nothing more).

Set-up, loaded with COPY before timing: 10,000 organisations with one daily subscription
each (`send_at` 08:00 Europe/Brussels, no filter, `bundled_until` = the previous due time,
so exactly one window is due); 10 % of them on the webhook channel (10 endpoints), the rest
inbox; 200 updates (one publisher, one topic; 2 urgent, 8 important) published in the
window; and the inbox items routing would have written: every organisation received all 200
(2,000,000 rows, each with its reason: the subscription's id in `subscription_ids`).

History variant: the same, plus 100 days of past bundles per subscription (1,000,000
bundles, each with ENTRIES_PER_PAST_BUNDLE entries of that day's chains, and for the webhook
subscriptions their past bundle deliveries). Issue #7 asks that the time per bundle does not
grow with the number of past bundles: history / no history ≤ 1.2 ("within 20 %").

Horizontal scale (no target; full mode only): the no-history load built by 1, 2 and 4 OS
processes at once (`bench/bundle_worker.py`, each calling `run_due_bundles` once with the
same `now`, as that many workers running `bundles.run_due` at the same tick would); they
divide the work by batches (`FOR UPDATE SKIP LOCKED`). Time from the start signal to the
return of the last process's call; bundles per process; and a check that every subscription
got exactly one bundle of all the window's updates.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
import uuid_utils
from sqlalchemy import event
from sqlalchemy.orm import Session

from bench.common import Measurement, Row, absolute_row, median, raw_cursor, relative_row
from bench.procs import Child

WORKLOAD = "P5"
TITLE = "daily bundles for 10,000 subscriptions with 200 updates in the window"
TIMEZONE = "Europe/Brussels"
#: The due day (its 08:00 local time is `now`); no daylight-saving change within 100 days.
DUE_DAY = date(2026, 10, 14)
SEND_AT = "08:00"
TOPIC_SLUG = "bench-bundles"
TARGET_S = 60.0
TARGET_RATIO = 1.2
WEBHOOK_EVERY = 10  # every 10th subscription: 10 %
WEBHOOK_ENDPOINTS = 10
COPY_CHUNK = 50_000


class Sizes:
    def __init__(self, subscriptions: int, updates: int, history_days: int,
                 entries_per_past_bundle: int, runs: int) -> None:
        self.subscriptions = subscriptions
        self.updates = updates
        self.history_days = history_days
        self.entries = entries_per_past_bundle
        self.runs = runs


FULL = Sizes(10_000, 200, 100, 5, 3)
QUICK = Sizes(200, 20, 10, 5, 2)
#: A measured statement running longer than this is cancelled (3 × the target): the run
#: then counts as "at least this long" and is not repeated.
FULL_STATEMENT_TIMEOUT_S = 180.0
QUICK_STATEMENT_TIMEOUT_S = 30.0
#: Worker processes of the horizontal-scale runs. The quick run skips them: with 200
#: subscriptions (below one batch) the first process takes everything.
FULL_SCALE = (1, 2, 4)
QUICK_SCALE: tuple[int, ...] = ()
#: Runs per process count (each after a reset), unless --runs says otherwise. Two: these
#: rows have no target, and each run takes 20-30 s, a third of P5's share of the suite's
#: 30 minutes.
SCALE_RUNS = 2
CHILD_START_TIMEOUT_S = 60.0


def _s(value: object) -> str:
    return str(value)


def _ts(value: datetime) -> str:
    return value.isoformat()


class BundleBench:
    def __init__(self, engine: sa.engine.Engine, log: Callable[[str], None],
                 sizes: Sizes, statement_timeout_s: float = 180.0) -> None:
        self.engine = engine
        self.log = log
        self.sizes = sizes
        tz = ZoneInfo(TIMEZONE)
        from domain.schedule import local_instant, parse_hhmm

        at = parse_hhmm(SEND_AT)
        self.day_due = [local_instant(DUE_DAY - timedelta(days=k), at, tz)
                        for k in range(sizes.history_days + 2)]  # [due, previous, ...]
        self.due = self.day_due[0]
        self.previous = self.day_due[1]
        #: A little after the due time, like a scheduler tick.
        self.now = self.due + timedelta(seconds=30)
        self.subs: list[tuple[str, str, str | None]] = []  # (sub id, org id, endpoint id)
        self.statement_timeout_s = statement_timeout_s
        self.webhook_subs = 0
        self.timings: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ set-up

    def _copy(self, cur: Any, sql: str, lines: Iterator[str]) -> int:
        count = 0
        with cur.copy(sql) as copy:
            buffer = io.StringIO()
            for line in lines:
                buffer.write(line)
                count += 1
                if count % COPY_CHUNK == 0:
                    copy.write(buffer.getvalue())
                    buffer = io.StringIO()
            copy.write(buffer.getvalue())
        return count

    def load(self) -> float:
        """Organisations, subscriptions, endpoints, updates and inbox items."""
        from bench.fanout import FanoutBench
        from domain import directory, matching
        from domain.audit import SYSTEM
        from domain.models import Kind, Level, Role, WebhookEndpoint
        from domain.secrets import encrypt, new_webhook_secret

        started = time.perf_counter()
        n, m = self.sizes.subscriptions, self.sizes.updates
        with Session(self.engine, expire_on_commit=False) as session:
            publisher = directory.create_organisation(
                session, SYSTEM, directory.OrganisationFields(
                    name="Benchmark publisher", level=Level.flemish, kind=Kind.agency))
            topic = directory.create_topic(session, SYSTEM, slug=TOPIC_SLUG, parent=None,
                                           name_nl="Benchmark bundels",
                                           name_en="Benchmark bundles")
            publisher_id, topic_id = publisher.id, topic.id
        template = FanoutBench(self.engine, self.log)._subscription_template()
        created = _ts(self.previous - timedelta(days=self.sizes.history_days + 30))
        orgs = [str(uuid_utils.uuid7()) for _ in range(n)]
        with raw_cursor(self.engine) as cur:
            self._copy(cur, "COPY organisations (id, name, level, kind, created_at, updated_at) "
                            "FROM STDIN",
                       (f"{org}\tBench municipality {i}\tlocal\tmunicipality\t{created}"
                        f"\t{created}\n" for i, org in enumerate(orgs)))
        now = self.now
        endpoint_ids = []
        with Session(self.engine) as session:
            for i in range(WEBHOOK_ENDPOINTS):
                endpoint = WebhookEndpoint(organisation_id=uuid.UUID(orgs[i]),
                                           url=f"http://127.0.0.1:9/bundles-e{i}",
                                           event_types=[], enabled=True,
                                           secret_ciphertext=encrypt(new_webhook_secret()),
                                           created_at=now, updated_at=now)
                session.add(endpoint)
                session.flush()
                endpoint_ids.append(str(endpoint.id))
            session.commit()
        previous = _ts(self.previous)
        masks = (f"{template['publisher_levels_mask']}\t{template['prevention_levels_mask']}"
                 f"\t{template['roles_mask']}\t{template['min_priority_rank']}")
        sub_lines = []
        for i, org in enumerate(orgs):
            sub = str(uuid_utils.uuid7())
            endpoint = (endpoint_ids[(i // WEBHOOK_EVERY) % WEBHOOK_ENDPOINTS]
                        if i % WEBHOOK_EVERY == 0 else None)
            self.subs.append((sub, org, endpoint))
            channel = (f'{{"type":"webhook","endpoint_id":"{endpoint}"}}' if endpoint
                       else '{"type":"inbox"}')
            sub_lines.append(
                f"{sub}\t{org}\t{template['filter']}\tf\tf\t{masks}\tdaily\t{SEND_AT}\t\\N\tt"
                f"\t{'webhook' if endpoint else 'inbox'}\t{channel}\t{endpoint or chr(92) + 'N'}"
                f"\t\\N\tt\t{previous}\t{created}\t{created}\n")
        self.webhook_subs = sum(1 for s in self.subs if s[2])
        # Updates spread over the window (previous due, due], then their inbox items.
        span = (self.due - self.previous) / (m + 1)
        roles_mask = matching.roles_mask([Role.all])
        body = json.dumps("Lokale besturen passen hun preventieplan aan. " * 20)[1:-1]
        summary = ("Nieuwe richtlijnen voor lokale preventieprojecten, met aangepaste "
                   "termijnen, formulieren en een overzicht van de wijzigingen per thema.")
        updates = []
        update_lines = []
        for k in range(m):
            uid = str(uuid_utils.uuid7())
            at = _ts(self.previous + span * (k + 1))
            priority = "urgent" if k < 2 else "important" if k < 10 else "routine"
            updates.append((uid, at, priority == "urgent"))
            update_lines.append(
                f"{uid}\t{uid}\t1\t\\N\t{publisher_id}\tBenchmark bundle update {k}\t{summary}"
                f"\t{body}\t[\"{TOPIC_SLUG}\"]\tnone\t[\"all\"]\t{roles_mask}\t{priority}"
                f"\tpublic\t\\N\t[]\tnl\t{at}\t\\N\tpublished\t{at}\t\\N\t{at}\t{n}\n")
        with raw_cursor(self.engine) as cur:
            self._copy(cur, "COPY subscriptions (id, organisation_id, filter, has_topic_filter, "
                            "has_publisher_filter, publisher_levels_mask, "
                            "prevention_levels_mask, roles_mask, min_priority_rank, cadence, "
                            "send_at, weekday, include_directed, channel_type, channel, "
                            "webhook_endpoint_id, feed_token, active, bundled_until, "
                            "created_at, updated_at) FROM STDIN", iter(sub_lines))
            self._copy(cur, "COPY updates (id, chain_id, version, supersedes_id, publisher_id, "
                            "title, summary, body, topics, prevention_level, target_roles, "
                            "roles_mask, priority, classification, audience, links, language, "
                            "publish_at, expires_at, status, created_at, withdrawn_at, "
                            "routed_at, recipient_count) FROM STDIN", iter(update_lines))
            self._copy(cur, "COPY update_topics (update_id, topic_id) FROM STDIN",
                       (f"{uid}\t{topic_id}\n" for uid, _, _ in updates))
            # The reason columns (subscription_ids, rule_ids, via_audience), in COPY's text.
            reasons = {sub: f"{{{sub}}}\t{{}}\tf" for sub, _, _ in self.subs}
            self._copy(cur, "COPY inbox_items (chain_id, organisation_id, update_id, "
                            "subscription_ids, rule_ids, via_audience, needs_ack, received_at, "
                            "delivered_at) FROM STDIN",
                       (f"{uid}\t{org}\t{uid}\t{reasons[sub]}\t{'t' if urgent else 'f'}\t{at}"
                        f"\t{at}\n" for uid, at, urgent in updates for sub, org, _ in self.subs))
        self._vacuum()
        return time.perf_counter() - started

    def load_history(self) -> float:
        """Past bundles (one per subscription per day, each with `entries` entries of that
        day's chains) and the webhook subscriptions' past bundle deliveries."""
        started = time.perf_counter()
        days, per = self.sizes.history_days, self.sizes.entries
        chains = [[str(uuid.uuid4()) for _ in range(per)] for _ in range(days)]
        bundle_ids: list[list[str]] = []  # per day (oldest first), per subscription
        with raw_cursor(self.engine) as cur:
            bundle_lines = []
            for d in range(days, 0, -1):  # oldest first: ids grow with time, as they would
                end, start = self.day_due[d], self.day_due[d + 1]
                ids = [str(uuid_utils.uuid7()) for _ in self.subs]
                bundle_ids.append(ids)
                e, s = _ts(end), _ts(start)
                bundle_lines.extend(f"{bid}\t{sub}\t{org}\tdaily\t{s}\t{e}\t{per}\t{e}\t{e}\n"
                                    for bid, (sub, org, _) in zip(ids, self.subs, strict=True))
            self._copy(cur, "COPY bundles (id, subscription_id, organisation_id, cadence, "
                            "window_start, window_end, item_count, created_at, built_at) "
                            "FROM STDIN", iter(bundle_lines))
            del bundle_lines
            # The reason columns (subscription_ids, rule_ids, via_audience), in COPY's text.
            reasons = {sub: f"{{{sub}}}\t{{}}\tf" for sub, _, _ in self.subs}

            def entries() -> Iterator[str]:
                for ids, day_chains in zip(bundle_ids, reversed(chains), strict=True):
                    for bid, (sub, _, _) in zip(ids, self.subs, strict=True):
                        r = reasons[sub]
                        for chain in day_chains:
                            yield f"{bid}\t{chain}\t{sub}\t{chain}\tnew\t{r}\n"

            count = self._copy(cur, "COPY bundle_entries (bundle_id, chain_id, subscription_id, "
                                    "update_id, state, subscription_ids, rule_ids, via_audience) "
                                    "FROM STDIN", entries())

            def deliveries() -> Iterator[str]:
                for d, ids in zip(range(days, 0, -1), bundle_ids, strict=True):
                    at = _ts(self.day_due[d] + timedelta(seconds=30))
                    for bid, (sub, org, endpoint) in zip(ids, self.subs, strict=True):
                        if endpoint:
                            yield (f"{uuid_utils.uuid7()}\tmsg_{uuid.uuid4().hex}\t{org}\t{sub}"
                                   f"\t{endpoint}\t{bid}\twebhook\tbe.doorstroom.bundle\t{{}}"
                                   f"\tsucceeded\t1\t{at}\t{at}\n")

            self._copy(cur, "COPY deliveries (id, message_id, organisation_id, subscription_id, "
                            "endpoint_id, bundle_id, channel, event_type, payload, status, "
                            "attempt_count, created_at, succeeded_at) FROM STDIN", deliveries())
        self._vacuum()
        self.log(f"P5: history loaded: {days * len(self.subs):,} bundles, {count:,} entries")
        return time.perf_counter() - started

    @contextmanager
    def _autocommit(self) -> Iterator[sa.engine.Connection]:
        with self.engine.connect() as conn:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")

    def _vacuum(self) -> None:
        with self._autocommit() as conn:
            conn.exec_driver_sql("VACUUM (ANALYZE)")
            with suppress(sa.exc.DBAPIError):  # CHECKPOINT needs superuser (or pg_checkpoint)
                conn.exec_driver_sql("CHECKPOINT")

    def reset(self) -> None:
        """Undo a run: its bundles (entries, deliveries cascade), outbox rows, and every
        subscription's `bundled_until` back to the previous due time."""
        with self.engine.begin() as conn:
            current = "SELECT id FROM bundles WHERE window_end = :due"
            params = {"due": self.due}
            conn.execute(sa.text(f"DELETE FROM delivery_attempts WHERE delivery_id IN "
                                 f"(SELECT id FROM deliveries WHERE bundle_id IN ({current}))"),
                         params)
            conn.execute(sa.text(f"DELETE FROM deliveries WHERE bundle_id IN ({current})"),
                         params)
            conn.execute(sa.text(f"DELETE FROM bundle_entries WHERE bundle_id IN ({current})"),
                         params)
            conn.execute(sa.text("DELETE FROM bundles WHERE window_end = :due"), params)
            conn.exec_driver_sql("DELETE FROM outbox")
            conn.execute(sa.text("UPDATE subscriptions SET bundled_until = :previous"),
                         {"previous": self.previous})
        self._vacuum()

    # ------------------------------------------------------------------ the measured call

    def time_run(self) -> tuple[float, dict[str, Any]]:
        """One timed call. A statement running past `statement_timeout_s` is cancelled (the
        run rolls back): the answer is then the time until the cancel, marked timed out."""
        from domain.bundles import run_due_bundles

        statements: list[tuple[str, float]] = []
        with (self.engine.connect() as conn, _statement_timeout(conn, self.statement_timeout_s),
              Session(bind=conn) as session, _statement_timer(self.engine, statements)):
            # The call commits once per batch: the session (one connection for all of its
            # transactions) has the timeout set for all of them.
            statements.clear()
            started = time.perf_counter()
            try:
                report = run_due_bundles(session, self.now)
            except sa.exc.OperationalError as exc:
                elapsed = time.perf_counter() - started
                session.rollback()
                if "statement timeout" not in str(exc):
                    raise
                slowest = max(statements, key=lambda st: st[1])[0] if statements else "?"
                running = " ".join(str(exc.statement or "").split())[:90]
                return elapsed, {"timed_out": True, "statement": running or slowest,
                                 "sql_s": sum(t for _, t in statements),
                                 "python_s": 0.0, "statements": []}
            elapsed = time.perf_counter() - started
        n, m = self.sizes.subscriptions, self.sizes.updates
        with self.engine.connect() as conn:
            entries = conn.execute(sa.text(
                "SELECT count(*) FROM bundle_entries e JOIN bundles b ON b.id = e.bundle_id "
                "WHERE b.window_end = :due"), {"due": self.due}).scalar_one()
            pushed = conn.execute(sa.text(
                "SELECT count(*), coalesce(sum(length(d.payload)), 0) FROM deliveries d "
                "JOIN bundles b ON b.id = d.bundle_id WHERE b.window_end = :due "
                "AND d.payload IS NOT NULL"), {"due": self.due}).one()
        if (report.bundles, entries, report.deliveries, pushed[0]) != (
                n, n * m, self.webhook_subs, self.webhook_subs):
            raise RuntimeError(f"run_due_bundles built {report}; {entries:,} entries "
                               f"(expected {n * m:,}), {pushed[0]} webhook payloads "
                               f"(expected {self.webhook_subs})")
        sql_s = sum(t for _, t in statements)
        top: dict[str, float] = {}
        for text, t in statements:
            top[text] = top.get(text, 0.0) + t
        return elapsed, {"timed_out": False, "bundles": report.bundles, "entries": entries,
                         "deliveries": report.deliveries, "payload_bytes": int(pushed[1]),
                         "sql_s": sql_s, "python_s": elapsed - sql_s,
                         "statements": sorted(top.items(), key=lambda kv: -kv[1])[:6]}

    def measure(self, label: str) -> dict[str, Any]:
        samples = []
        infos = []
        # One run first, not counted: statement caches, plans and buffers warm up.
        self.reset()
        elapsed, info = self.time_run()
        self.log(f"  {label} warm-up run: {elapsed:.2f} s"
                 + (" (timed out)" if info["timed_out"] else ""))
        for i in range(self.sizes.runs):
            if info["timed_out"]:  # it will again: one timed-out sample says it all
                samples, infos = [elapsed], [info]
                self.log(f"  {label}: a statement ran past {self.statement_timeout_s:.0f} s "
                         f"and was cancelled: {info['statement']}…")
                break
            self.reset()
            elapsed, info = self.time_run()
            samples.append(elapsed)
            infos.append(info)
            if info["timed_out"]:
                continue
            self.log(f"  {label} run {i + 1}/{self.sizes.runs}: {elapsed:.2f} s "
                     f"({info['bundles']:,} bundles, {info['entries']:,} entries, "
                     f"{info['deliveries']:,} webhook deliveries; SQL {info['sql_s']:.2f} s, "
                     f"Python {info['python_s']:.2f} s)")
        timed_out = any(i["timed_out"] for i in infos)
        return {"label": label, "samples_s": samples,
                "median_s": max(samples) if timed_out else median(samples),
                "timed_out": timed_out, "statement_timeout_s": self.statement_timeout_s,
                "info": next((i for i in infos if i["timed_out"]), None)
                or (infos[samples.index(median(samples))] if len(samples) % 2
                    else infos[-1])}

    # ------------------------------------------------------------------ horizontal scale

    def outcome(self) -> dict[str, Any]:
        """What the run built for the due window: exactly once means one bundle per
        subscription, each with every update of the window, and one webhook delivery (with
        its payload) per webhook subscription."""
        n, m = self.sizes.subscriptions, self.sizes.updates
        with self.engine.connect() as conn:
            bundles = conn.execute(sa.text(
                "SELECT count(*), count(DISTINCT subscription_id), coalesce(min(item_count), 0), "
                "coalesce(max(item_count), 0) FROM bundles WHERE window_end = :due"),
                {"due": self.due}).one()
            entries = conn.execute(sa.text(
                "SELECT count(*) FROM bundle_entries e JOIN bundles b ON b.id = e.bundle_id "
                "WHERE b.window_end = :due"), {"due": self.due}).scalar_one()
            pushed = conn.execute(sa.text(
                "SELECT count(*), count(DISTINCT d.bundle_id) FROM deliveries d "
                "JOIN bundles b ON b.id = d.bundle_id WHERE b.window_end = :due "
                "AND d.payload IS NOT NULL"), {"due": self.due}).one()
            moved = conn.execute(sa.text(
                "SELECT count(*) FROM subscriptions WHERE bundled_until = :due"),
                {"due": self.due}).scalar_one()
        result = {"bundles": bundles[0], "subscriptions_with_bundle": bundles[1],
                  "min_entries": bundles[2], "max_entries": bundles[3], "entries": entries,
                  "webhook_deliveries": pushed[0], "webhook_bundles": pushed[1],
                  "moved_on": moved}
        result["exactly_once"] = (
            bundles[0] == bundles[1] == n and bundles[2] == bundles[3] == m
            and entries == n * m and pushed[0] == pushed[1] == self.webhook_subs
            and moved == n)
        return result

    def measure_scale(self, counts: tuple[int, ...], runs: int, log_dir: Path
                      ) -> list[dict[str, Any]]:
        """Each count k: `runs` runs of k worker processes calling `run_due_bundles` at once
        with the same `now`, after a reset each."""
        from tests.processes import process_env

        env = process_env({"BENCH_STATEMENT_TIMEOUT_MS":
                           str(int(self.statement_timeout_s * 1000))})
        children = [Child("bench.bundle_worker", env, log_dir / f"bundle-worker-{i}.log")
                    for i in range(max(counts))]
        try:
            for child in children:
                child.receive(CHILD_START_TIMEOUT_S)  # ready
            # Warm each process up (imports, connection, the first statements) with a call
            # at the previous due time, when nothing is due yet: it builds nothing.
            for child in children:
                child.send({"command": "go", "now": self.previous.isoformat()})
            for child in children:
                answer = child.receive(self.statement_timeout_s * 2)
                if "error" in answer or answer["windows"]:
                    raise RuntimeError(f"P5 scale warm-up: {answer}")
            results = []
            for k in counts:
                samples, outcomes = [], []
                for i in range(runs):
                    self.reset()
                    go = time.monotonic()
                    for child in children[:k]:
                        child.send({"command": "go", "now": self.now.isoformat()})
                    answers = [child.receive(self.statement_timeout_s * 20)
                               for child in children[:k]]
                    elapsed = max(a["ended"] for a in answers) - go
                    errors = [a["error"] for a in answers if "error" in a]
                    outcome = self.outcome()
                    outcome["errors"] = errors
                    outcome["exactly_once"] = outcome["exactly_once"] and not errors and sum(
                        a["bundles"] for a in answers) == self.sizes.subscriptions
                    outcome["bundles_per_process"] = [a.get("bundles") for a in answers]
                    outcome["subscriptions_per_process"] = [a.get("subscriptions")
                                                            for a in answers]
                    outcome["seconds_per_process"] = [round(a["ended"] - go, 3)
                                                      for a in answers]
                    outcomes.append(outcome)
                    samples.append(elapsed)
                    self.log(f"  {k} worker process(es), run {i + 1}/{runs}: {elapsed:.2f} s, "
                             f"bundles per process {outcome['bundles_per_process']} "
                             f"(subscriptions taken {outcome['subscriptions_per_process']}, "
                             f"done after {outcome['seconds_per_process']} s); "
                             f"{outcome['bundles']:,} bundles for "
                             f"{outcome['subscriptions_with_bundle']:,} subscriptions, "
                             f"{outcome['min_entries']}-{outcome['max_entries']} entries each; "
                             f"exactly once: {outcome['exactly_once']}"
                             + (f"; errors: {errors}" if errors else ""))
                results.append({"processes": k, "samples_s": samples,
                                "median_s": median(samples), "outcomes": outcomes})
            return results
        finally:
            for child in children:
                child.stop()


@contextmanager
def _statement_timeout(conn: sa.engine.Connection, seconds: float) -> Iterator[None]:
    """`statement_timeout` for this connection (every transaction on it) while inside."""
    conn.exec_driver_sql(f"SET statement_timeout = {int(seconds * 1000)}")
    conn.commit()
    try:
        yield
    finally:
        conn.rollback()
        conn.exec_driver_sql("RESET statement_timeout")
        conn.commit()


@contextmanager
def _statement_timer(engine: sa.engine.Engine, into: list[tuple[str, float]]
                     ) -> Iterator[None]:
    """Time every statement sent through `engine` (first words of its SQL, seconds)."""
    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        conn.info.setdefault("bench_started", []).append(time.perf_counter())

    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        started = conn.info["bench_started"].pop()
        words = " ".join(statement.split())
        into.append((words[:90], time.perf_counter() - started))

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)


def run(engine: sa.engine.Engine, *, quick: bool, log: Callable[[str], None],
        sizes: tuple[int, ...] | None = None, runs: int | None = None) -> Measurement:
    base = QUICK if quick else FULL
    chosen = Sizes(sizes[0] if sizes else base.subscriptions, base.updates, base.history_days,
                   base.entries, runs or base.runs)
    bench = BundleBench(engine, log, chosen,
                        QUICK_STATEMENT_TIMEOUT_S if quick else FULL_STATEMENT_TIMEOUT_S)
    load_s = bench.load()
    log(f"P5: loaded {chosen.subscriptions:,} subscriptions ({bench.webhook_subs:,} webhook), "
        f"{chosen.updates} updates, {chosen.subscriptions * chosen.updates:,} inbox items in "
        f"{load_s:.1f} s")
    fresh = bench.measure("no history")
    counts = QUICK_SCALE if quick else FULL_SCALE
    scale: list[dict[str, Any]] = []
    if counts:
        log(f"P5 horizontal scale: {', '.join(map(str, counts))} worker processes")
        log_dir = Path(tempfile.mkdtemp(prefix="doorstroom-bench-p5-"))
        try:
            scale = bench.measure_scale(counts, runs or SCALE_RUNS, log_dir)
        except BaseException:
            log(f"P5: worker process logs kept in {log_dir}")
            raise
        shutil.rmtree(log_dir, ignore_errors=True)
    history_s = bench.load_history()
    log(f"P5: {chosen.history_days} days of history loaded in {history_s:.1f} s")
    history = bench.measure(f"{chosen.history_days} days of history")
    n, m = chosen.subscriptions, chosen.updates
    what = f"{n} subscriptions x {m} updates"
    rows: list[Row] = [
        absolute_row(f"P5 daily bundles {what}, no history", fresh["median_s"], "s", TARGET_S),
        absolute_row(f"P5 daily bundles {what}, {chosen.history_days} days of history",
                     history["median_s"], "s", TARGET_S),
        relative_row(f"P5 daily bundles {what}, {chosen.history_days} days of history / "
                     "no history", history["median_s"], fresh["median_s"], "s", TARGET_RATIO),
    ]
    for sc in scale:
        k = sc["processes"]
        rows.append(absolute_row(f"P5 daily bundles with {k} worker process"
                                 f"{'es' if k > 1 else ''}", sc["median_s"], "s", None))
    notes = []
    for sc in scale:
        bad = [o for o in sc["outcomes"] if not o["exactly_once"]]
        if bad:
            o = bad[0]
            notes.append(
                f"Note ({sc['processes']} worker process(es), {len(bad)} of "
                f"{len(sc['outcomes'])} run(s)): not exactly one bundle per subscription: "
                f"{o['bundles']:,} bundles for {o['subscriptions_with_bundle']:,} of {n:,} "
                f"subscriptions, {o['min_entries']}-{o['max_entries']} entries each "
                f"({o['entries']:,} in all), {o['webhook_deliveries']:,} webhook deliveries, "
                f"bundles per process {o['bundles_per_process']}"
                + (f", errors: {o['errors']}" if o["errors"] else "") + ".")
    for v in (fresh, history):
        if v["timed_out"]:
            notes.append(
                f"Note ({v['label']}): a statement ran past {v['statement_timeout_s']:.0f} s "
                "and was cancelled, so the figure is a lower bound (the run rolled back and "
                f"was not repeated): `{v['info']['statement']}…`. A ratio computed from a "
                "lower bound is an upper bound.")
    for row in rows:
        log(f"{row.name}: {row.value:.2f} s"
            + (f", ratio {row.ratio:.2f}" if row.ratio is not None else "")
            + (f" (target {row.target:g}) {'met' if row.met else 'MISSED'}"
               if row.target is not None else ""))
    detail = [{"sizes": vars(chosen), "load_s": load_s, "history_load_s": history_s,
               "fresh": fresh, "history": history, "webhook_subs": bench.webhook_subs,
               "due": bench.due.isoformat(), "now": bench.now.isoformat(),
               "scale": scale}]
    return Measurement(WORKLOAD, TITLE, rows, detail, notes=notes)


def docs_section(m: Measurement) -> list[str]:
    d = m.detail[0]
    z = d["sizes"]
    n, u, days, per = z["subscriptions"], z["updates"], z["history_days"], z["entries"]
    from domain.bundles import BATCH_SIZE

    fresh_row, history_row, ratio_row, *scale_rows = m.rows
    lines = [
        f"## P5: {m.title}",
        "",
        "**Measured**: `domain.bundles.run_due_bundles(session, now)` from its call to its "
        "return after its last commit (one transaction per batch of "
        f"{BATCH_SIZE:,} subscriptions): find every due daily window, write its bundle and "
        "entries, drop empty bundles, move `bundled_until` on, and hand push bundles to "
        "their channel (one webhook delivery per bundle, with its CloudEvent rendered and "
        f"stored). `now` = {d['now']} (30 s after the 08:00 Europe/Brussels due time).",
        "",
        f"**Set-up** (COPY, not timed): {n:,} organisations with one daily subscription each "
        "(no filter, `send_at` 08:00, `bundled_until` = the previous due time, so exactly "
        f"one window is due), {d['webhook_subs']:,} of them (every 10th) on the webhook "
        f"channel over {WEBHOOK_ENDPOINTS} endpoints, the rest inbox; {u} updates of one "
        "publisher and topic (2 urgent, 8 important, the rest routine) published in the "
        f"window; and the {n * u:,} inbox items routing writes for them (every organisation "
        "received every update, through its subscription: `subscription_ids` = {<sub>}). "
        f"Loaded in {d['load_s']:.0f} s.",
        "",
        f"**History**: the same, plus {days} days of past bundles per subscription "
        f"({n * days:,} bundles) with {per} entries each ({n * days * per:,} bundle entries, "
        "that day's chains; 5 rather than the ~200 a real past bundle would hold, so that "
        "the load stays within minutes: the lookups that could grow with history are "
        "index probes per (subscription, chain), which the number of rows per past bundle "
        f"does not change), and the webhook subscriptions' {d['webhook_subs'] * days:,} "
        f"past bundle deliveries. Loaded in {d['history_load_s']:.0f} s. Past inbox items "
        "are not loaded (the window's items are found through the (organisation, "
        "received_at) index either way).",
        "",
        f"**Method**: {z['runs']} runs per variant after one warm-up run that is not "
        "counted; before each, the previous run's "
        "bundles, entries and deliveries are deleted, `bundled_until` is set back, and the "
        "database is vacuumed, analysed and checkpointed. After each run the benchmark "
        f"checks {n:,} bundles of {u} entries and {d['webhook_subs']:,} webhook deliveries "
        "with payloads. Medians. Targets: ≤ 60 s each; with history / without ≤ 1.2 "
        "(issue #7: the time per bundle stays within 20 % however many bundles came "
        "before). That row's `baseline` is the same code without history, not a bare "
        "implementation.",
        "",
        "| variant | runs | time (s, median) | per bundle (ms) | SQL / Python (s) | target "
        "| met |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for row, v in ((fresh_row, d["fresh"]), (history_row, d["history"])):
        info = v["info"]
        over = "≥ " if v["timed_out"] else ""
        split = ("cancelled" if v["timed_out"]
                 else f"{info['sql_s']:.2f} / {info['python_s']:.2f}")
        lines.append(f"| {v['label']} | {len(v['samples_s'])} | {over}{row.value:.2f} | "
                     f"{over}{row.value / n * 1000:.2f} | {split} | ≤ {TARGET_S:g} s | "
                     f"{'yes' if row.met else '**no**'} |")
    lines += [
        f"| history / no history | | "
        f"{'≤ ' if d['fresh']['timed_out'] else ''}{ratio_row.ratio:.2f} | | | ≤ {TARGET_RATIO} | "
        f"{'yes' if ratio_row.met else '**no**'} |",
        "",
        "All samples (seconds): no history "
        f"{', '.join(f'{x:.2f}' for x in d['fresh']['samples_s'])}; with history "
        f"{', '.join(f'{x:.2f}' for x in d['history']['samples_s'])}.",
        "",
        "Slowest statements of the median run (seconds, summed over executions; SQL text "
        "cut short):",
        "",
    ]
    for v in (d["fresh"], d["history"]):
        if v["timed_out"]:
            lines.append(f"- {v['label']}: cancelled after {v['statement_timeout_s']:.0f} s in "
                         f"`{v['info']['statement'][:70]}…`")
            continue
        lines.append(f"- {v['label']}: "
                     + "; ".join(f"`{text[:70]}…` {t:.2f}" for text, t in
                                 v["info"]["statements"][:4]))
    scale = d.get("scale") or []
    if scale:
        lines += [
            "",
            "**Horizontal scale** (no target): the same no-history load (before the history "
            f"is loaded), built by {', '.join(str(s['processes']) for s in scale)} OS "
            "processes at once (`bench/bundle_worker.py`: each imports the product, opens "
            "its connection and makes one call at the previous due time, when nothing is due, "
            "to warm up; then, on the start signal, calls `run_due_bundles(session, now)` "
            "once with the same `now`, as that many workers running `bundles.run_due` at the "
            "same tick would). They divide the work by batches: each locks the next "
            f"{BATCH_SIZE:,} subscriptions by id that no other holds (`FOR UPDATE SKIP "
            "LOCKED`), builds and commits them, and goes on until none is left. Time from "
            "the start signal to the return of the last process's call (one monotonic clock "
            "for all processes), after the same reset as above; "
            f"{len(scale[0]['samples_s'])} run(s) per count. After each run the benchmark "
            f"checks exactly one bundle per subscription ({n:,} bundles of {u} entries, "
            "`bundled_until` moved on for all) and one webhook delivery with payload per "
            "webhook subscription. The machine's cores (see above) are shared with "
            "PostgreSQL, which does most of the work.",
            "",
            "| worker processes | time (s, median) | samples (s) | bundles per process "
            "| done after (s, per process) | exactly once |",
            "|---:|---:|---:|---:|---:|:---:|",
        ]
        for row, sc in zip(scale_rows, scale, strict=True):
            once = all(o["exactly_once"] for o in sc["outcomes"])
            lines.append(
                f"| {sc['processes']} | {row.value:.2f} | "
                f"{', '.join(f'{x:.2f}' for x in sc['samples_s'])} | "
                f"{'; '.join(str(o['bundles_per_process']) for o in sc['outcomes'])} | "
                f"{'; '.join(str(o['seconds_per_process']) for o in sc['outcomes'])} | "
                f"{'yes' if once else '**no**'} |")
        lines.append("")
    lines += [""] + m.notes + ([""] if m.notes else [])
    return lines
