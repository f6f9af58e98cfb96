"""P1: fan-out of one update to N matching subscriptions of N distinct organisations.

Measured: `domain.routing.route_update(session, update_id)`, from its call to its commit,
for an update every one of the N subscriptions matches (no filter). Baseline, sharing none
of the routing code: in the same database and run, a table shaped like `inbox_items` (same
columns and indexes: `LIKE inbox_items INCLUDING ALL`) filled by one
`INSERT … SELECT` of the same rows from a prepared table of the N recipient ids, each with
the reasons routing writes for it (`subscription_ids` = {its subscription}, made in SQL
when the table is prepared; no rules, not the audience).

Set-up per N (not timed): organisations and subscriptions are loaded with COPY (sizes grow:
each N adds the missing ones), the recipient list is rebuilt, tables are vacuumed and
analysed. Each run starts from empty `inbox_items` / `bench_baseline` (TRUNCATE, VACUUM
ANALYZE, CHECKPOINT), baseline and routing alternate, and the medians are compared. Warm-up
runs of both sides go first and are not counted (`warm_up_runs`): a routing worker runs the
same few statements over and over, and the driver prepares a statement on its sixth run, the
server plans it generically after five more; the first runs on a connection measure parsing
and planning instead (the first routing at N=1,000 took 24 ms, the next ones 9 to 12).
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from bench.common import Measurement, Row, median, relative_row

WORKLOAD = "P1"
TITLE = "fan-out of one update to N subscriptions"
FULL_SIZES = (1_000, 10_000, 100_000, 1_000_000)
QUICK_SIZES = (1_000,)
TARGET_RATIO = 1.5
TOPIC_SLUG = "bench-fanout"
COPY_CHUNK = 50_000


def runs_for(n: int, quick: bool) -> int:
    """Counted runs per side. Many at the small sizes, where a run takes milliseconds and a
    stray scheduling delay of a fraction of one moves the median: on this shared 2-core
    machine, medians of 15 runs at N = 1,000 still differed by a tenth of the ratio from
    one run of the suite to the next."""
    if quick:
        return 3
    return 3 if n >= 1_000_000 else 41 if n <= 10_000 else 5


def warm_up_runs(n: int, quick: bool) -> int:
    """Uncounted runs of each side before the counted ones: enough at the first (smallest)
    size for the statements to be prepared and planned generically (see the module's
    docstring); one at the larger sizes, whose set-up analyses the tables anew."""
    if quick:
        return 1
    return 12 if n <= 10_000 else 1


class FanoutBench:
    """One benchmark database, growing from one size to the next."""

    def __init__(self, engine: sa.engine.Engine, log: Callable[[str], None]) -> None:
        self.engine = engine
        self.log = log
        self.loaded = 0
        self.publisher_id: uuid.UUID | None = None
        #: Recipient counts route_update answered that differ from the rows it wrote.
        self.reported_counts: set[int] = set()

    # ------------------------------------------------------------------ set-up, through the domain

    def prepare(self) -> None:
        """Publisher organisation and topic through the domain; the baseline's table."""
        from domain import directory
        from domain.audit import SYSTEM
        from domain.models import Kind, Level

        with Session(self.engine, expire_on_commit=False) as session:
            publisher = directory.create_organisation(
                session, SYSTEM, directory.OrganisationFields(
                    name="Benchmark publisher", level=Level.flemish, kind=Kind.agency))
            directory.create_topic(session, SYSTEM, slug=TOPIC_SLUG, parent=None,
                                   name_nl="Benchmark", name_en="Benchmark")
            self.publisher_id = publisher.id
        with self.engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE bench_baseline (LIKE inbox_items INCLUDING ALL)")
            conn.exec_driver_sql("CREATE TABLE bench_recipients (id uuid NOT NULL, "
                                 "subscription_ids uuid[] NOT NULL)")

    def _subscription_template(self) -> dict[str, Any]:
        """The stored form of a subscription without a filter, as the domain computes it."""
        from domain import matching
        from domain.filters import normalise_filter

        with Session(self.engine) as session:
            canonical, compiled = normalise_filter(session, {})
            session.rollback()
        assert not compiled.topic_ids and not compiled.publisher_ids
        assert (compiled.publisher_levels, compiled.prevention_levels, compiled.roles) == (
            matching.ALL_LEVELS, matching.ALL_PREVENTION, matching.ALL_ROLES)
        return {"filter": json.dumps(canonical, separators=(",", ":")),
                "publisher_levels_mask": matching.ALL_LEVELS,
                "prevention_levels_mask": matching.ALL_PREVENTION,
                "roles_mask": matching.ALL_ROLES,
                "min_priority_rank": matching.PRIORITY_RANK[compiled.min_priority]}

    def grow_to(self, n: int) -> float:
        """Add organisations and one subscription each until there are n; answers seconds."""
        from domain.models import new_id

        started = time.perf_counter()
        add = n - self.loaded
        if add > 0:
            t = self._subscription_template()
            sub_tail = (f"\t{t['publisher_levels_mask']}\t{t['prevention_levels_mask']}"
                        f"\t{t['roles_mask']}\t{t['min_priority_rank']}\timmediate\t\\N\t\\N"
                        "\tt\tinbox\t{\"type\":\"inbox\"}\t\\N\tt\t")
            raw = self.engine.raw_connection()
            try:
                conn = raw.driver_connection
                assert conn is not None
                with conn.cursor() as cur:
                    now = cur.execute("SELECT now()").fetchone()[0].isoformat()  # type: ignore[index]
                    done = 0
                    while done < add:
                        size = min(COPY_CHUNK, add - done)
                        ids = [str(new_id()) for _ in range(size)]
                        orgs = io.StringIO()
                        subs = io.StringIO()
                        for i, org in enumerate(ids, start=self.loaded + done + 1):
                            orgs.write(f"{org}\tBench municipality {i}\tlocal\tmunicipality"
                                       f"\t{now}\t{now}\n")
                            subs.write(f"{new_id()}\t{org}\t{t['filter']}\tf\tf{sub_tail}"
                                       f"{now}\t{now}\n")
                        with cur.copy("COPY organisations (id, name, level, kind, created_at, "
                                      "updated_at) FROM STDIN") as copy:
                            copy.write(orgs.getvalue())
                        with cur.copy("COPY subscriptions (id, organisation_id, filter, "
                                      "has_topic_filter, has_publisher_filter, "
                                      "publisher_levels_mask, prevention_levels_mask, roles_mask, "
                                      "min_priority_rank, cadence, send_at, weekday, "
                                      "include_directed, channel_type, channel, feed_token, "
                                      "active, created_at, updated_at) FROM STDIN") as copy:
                            copy.write(subs.getvalue())
                        done += size
                conn.commit()
            finally:
                raw.close()
            self.loaded = n
        with self.engine.begin() as conn:
            conn.exec_driver_sql("TRUNCATE bench_recipients")
            # Each organisation has the one subscription (`grow_to`): its reason.
            conn.execute(sa.text(
                "INSERT INTO bench_recipients (id, subscription_ids) SELECT o.id, ARRAY[s.id] "
                "FROM organisations o JOIN subscriptions s ON s.organisation_id = o.id "
                "WHERE o.id <> :publisher ORDER BY o.id"), {"publisher": self.publisher_id})
        with self._autocommit() as conn:
            conn.exec_driver_sql("VACUUM (FREEZE, ANALYZE) organisations, subscriptions, "
                                 "bench_recipients")
        return time.perf_counter() - started

    # ------------------------------------------------------------------ between runs

    @contextmanager
    def _autocommit(self) -> Iterator[sa.engine.Connection]:
        with self.engine.connect() as conn:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")

    def reset(self) -> None:
        """Empty both targets, vacuum and analyse them, flush dirty pages."""
        with self.engine.begin() as conn:
            conn.exec_driver_sql("TRUNCATE inbox_items, bench_baseline")
        with self._autocommit() as conn:
            conn.exec_driver_sql("VACUUM (ANALYZE) inbox_items, bench_baseline")
            with suppress(sa.exc.DBAPIError):  # CHECKPOINT needs superuser (or pg_checkpoint)
                conn.exec_driver_sql("CHECKPOINT")

    # ------------------------------------------------------------------ the two sides

    def publish(self) -> tuple[uuid.UUID, uuid.UUID]:
        """A fresh update (new chain) through the publishing use case; not routed yet."""
        from domain import publishing
        from domain.audit import Actor

        assert self.publisher_id is not None
        actor = Actor(self.publisher_id, None, frozenset({"publish"}))
        with Session(self.engine, expire_on_commit=False) as session:
            update = publishing.publish(session, actor, publishing.Draft(
                title="Benchmark fan-out", topics=[TOPIC_SLUG]))
            return update.id, update.chain_id

    def time_routing(self, n: int) -> float:
        from domain.routing import route_update

        update_id, chain_id = self.publish()
        with Session(self.engine, expire_on_commit=False) as session:
            started = time.perf_counter()
            result = route_update(session, update_id)
            elapsed = time.perf_counter() - started
        # Checked in the table, not on the result: the count routing reports is its own
        # concern (and is noted, not trusted, below). In a transaction that commits: the
        # pool would roll back one left open, and psycopg forgets its prepared statements
        # on every rollback, routing's among them.
        with self.engine.begin() as conn:
            written = conn.execute(sa.text("SELECT count(*) FROM inbox_items WHERE chain_id = "
                                           "CAST(:chain AS uuid)"), {"chain": chain_id}).scalar()
        if written != n or result.already_routed:
            raise RuntimeError(f"routing wrote {written} inbox items, expected {n}")
        if result.recipients != n:
            self.reported_counts.add(result.recipients)
        return elapsed

    def time_baseline(self, n: int) -> float:
        update_id, chain_id = uuid.uuid4(), uuid.uuid4()
        with self.engine.connect() as conn:
            started = time.perf_counter()
            count = conn.execute(sa.text(
                "INSERT INTO bench_baseline (chain_id, organisation_id, update_id, "
                "subscription_ids, rule_ids, via_audience, needs_ack, received_at, "
                "delivered_at) SELECT CAST(:chain AS uuid), id, CAST(:update AS uuid), "
                "subscription_ids, '{}', false, false, now(), now() FROM bench_recipients"),
                {"chain": chain_id, "update": update_id}
            ).rowcount
            conn.commit()
            elapsed = time.perf_counter() - started
        if count != n:
            raise RuntimeError(f"baseline wrote {count} rows, expected {n}")
        return elapsed

    def measure(self, n: int, runs: int, warm_up: int) -> dict[str, Any]:
        routing: list[float] = []
        baseline: list[float] = []
        for i in range(-warm_up, runs):  # the warm-up runs (i < 0) are not counted
            sides = ("baseline", "routing") if i % 2 == 0 else ("routing", "baseline")
            for side in sides:
                self.reset()
                if side == "routing":
                    routing.append(self.time_routing(n))
                else:
                    baseline.append(self.time_baseline(n))
            if i >= 0:
                self.log(f"  N={n:>9,} run {i + 1}/{runs}: routing {routing[-1]:.3f} s, "
                         f"baseline {baseline[-1]:.3f} s")
        del routing[:warm_up], baseline[:warm_up]
        self.reset()
        return {"n": n, "runs": runs, "warm_up_runs": warm_up,
                "routing_s": routing, "baseline_s": baseline,
                "routing_median_s": median(routing), "baseline_median_s": median(baseline)}


def run(engine: sa.engine.Engine, *, quick: bool, log: Callable[[str], None],
        sizes: tuple[int, ...] | None = None, runs: int | None = None) -> Measurement:
    """Run P1 in the (freshly migrated) database behind `engine`."""
    bench = FanoutBench(engine, log)
    bench.prepare()
    rows: list[Row] = []
    detail: list[dict[str, Any]] = []
    for n in sorted(sizes or (QUICK_SIZES if quick else FULL_SIZES)):
        load_s = bench.grow_to(n)
        log(f"P1 N={n:,}: loaded in {load_s:.1f} s")
        result = bench.measure(n, runs or runs_for(n, quick), warm_up_runs(n, quick))
        result["load_s"] = load_s
        detail.append(result)
        row = relative_row(f"P1 fan-out {n} subscriptions", result["routing_median_s"],
                           result["baseline_median_s"], "s", TARGET_RATIO)
        rows.append(row)
        log(f"P1 N={n:,}: routing {row.value:.3f} s, baseline {row.baseline:.3f} s, "
            f"ratio {row.ratio:.2f} (target <= {TARGET_RATIO}) {'met' if row.met else 'MISSED'}")
    notes = []
    with engine.connect() as conn:
        fks = conn.exec_driver_sql(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'inbox_items'::regclass "
            "AND contype = 'f' ORDER BY conname").scalars().all()
    if fks:
        notes.append(
            f"Note: `inbox_items` has {len(fks)} foreign key(s) ({', '.join(fks)}), each "
            "checked once per inserted row by routing; `bench_baseline` has none (LIKE copies "
            "no foreign keys), so these checks are part of the ratio.")
    if bench.reported_counts:
        notes.append(
            "Note: every run wrote the N inbox items, but `route_update` answered "
            f"`recipients` = {', '.join(map(str, sorted(bench.reported_counts)))} (and stores "
            "that as `updates.recipient_count`): the INSERT's `rowcount` is not preserved "
            "unless the statement runs with `execution_options(preserve_rowcount=True)`.")
    return Measurement(WORKLOAD, TITLE, rows, detail, notes=notes)
