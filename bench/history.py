"""P6: P1, P3, P4 and P5 again on a database that holds a year of history.

The issue: "P1 to P5 again with one million past updates (about 20 million recipient rows,
loaded by COPY into a template database that later runs reuse) and 100 days of bundles:
within 20 % of the figures on an empty history."

The history (built once into the template database `doorstroom_bench_history_template`,
reused while its fingerprint matches, see `ensure_template`), in the tables the workloads
use, with names of its own (no workload's organisation, topic or subscription collides):

- 565 municipalities ("History municipality N", the number of Belgian municipalities) and
  8 publishers, 28 topics `history-topic-NN`;
- per municipality one daily digest subscription (inbox channel, 07:30 Europe/Brussels,
  filter: one history topic), and for every 40th also a webhook endpoint and an immediate
  webhook subscription with the same filter;
- 1,000,000 published updates over the 365 days before the build, evenly spaced, each with
  one history topic (so ~20 municipalities follow it), with their `update_topics`, routing
  `outbox` row (completed) and `update.published` audit entry;
- ~20,000,000 inbox items: each update in the inbox of every municipality that follows its
  topic (what routing would have written; half of the municipalities read theirs);
- a webhook delivery (succeeded; every 20th after a failed first attempt) with its attempt
  rows for each inbox item of a webhook municipality (~540,000 deliveries);
- 100 days of daily bundles for every digest subscription (56,500 bundles) with one entry per
  inbox item in the window (~5,500,000 bundle entries).

The history's subscriptions filter on history topics, so none of them matches a workload's
update: each workload routes, sends and bundles exactly what it does on an empty database,
with the history's rows beside its own in every table.

Loading: the database is migrated to head; the foreign keys touching the loaded tables and
those tables' indexes (primary keys included) are dropped; every table is filled by COPY
(psycopg `cursor.copy`, `FREEZE` after a TRUNCATE in the same transaction, so no later
vacuum has to rewrite the pages); indexes, keys and foreign keys are recreated; VACUUM
ANALYZE, CHECKPOINT. The fingerprint (loader version, Alembic head, sizes) and the build
time are stored as the database's comment, written last: a build that did not finish is
never reused, and a schema change rebuilds it.

Each P6 part then runs the same measured call on two fresh databases, alternating between
them run by run (so that the shared machine's load drifts hit both alike): one created empty
and migrated as usual, one created from the template (`CREATE DATABASE … TEMPLATE`). Both get
the workload's own set-up through the same code. P4 (real processes, 200 updates at 20/s a
run) runs three times on each, alternating too; the medians of the runs' p50 and p99 are
compared. Target: history / empty ≤ 1.2 for times, ≥ 1/1.2
for rates. P2 (the publish API) is not part of P6 (yet).
"""

from __future__ import annotations

import bisect
import json
import os
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
import uuid_utils

from bench.common import (
    ADMIN_URL,
    BENCH_DB,
    Measurement,
    Row,
    database_url,
    drop_database,
    median,
    point_product_at,
    raw_cursor,
    recreate_database,
    relative_row,
)

WORKLOAD = "P6"
TITLE = "P1, P3, P4 and P5 on one million past updates (history / empty history)"
TEMPLATE_DB = f"{BENCH_DB}_history_template"
#: Bump when the loader writes different rows: the template is then rebuilt.
LOADER_VERSION = 2
TARGET_RATIO = 1.2
RATE_TARGET = round(1 / TARGET_RATIO, 3)
DIGEST_NAME = "History daily digest"
WEBHOOK_SUB_NAME = "History webhook"
DIGEST_SEND_AT = "07:30"
COPY_CHUNK_ROWS = 50_000
#: Tables the history fills: their indexes and keys are dropped around the load.
LOADED_TABLES = ("updates", "update_topics", "outbox", "audit_log", "inbox_items",
                 "deliveries", "delivery_attempts", "bundles", "bundle_entries")
PROVINCES = ("10000", "20001", "30000", "40000", "70000")

# COPY's binary format, for the two largest tables (about 2.5x faster to load than text here:
# no parsing of uuids and timestamps on the server).
BINARY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
BINARY_TRAILER = struct.pack("!h", -1)
BINARY_NULL = struct.pack("!i", -1)
BINARY_TRUE = struct.pack("!ib", 1, 1)
BINARY_FALSE = struct.pack("!ib", 1, 0)
_PG_EPOCH = 946_684_800  # 2000-01-01 in Unix seconds
UUID_OID = 2950  # the type of uuid[]'s elements (pg_type)


def _b_uuid(value: str) -> bytes:
    return b"\x00\x00\x00\x10" + uuid.UUID(value).bytes


def _b_uuid_array(values: list[str]) -> bytes:
    """A `uuid[]`: dimensions (none when empty), no NULLs, the element type, then each."""
    body = (struct.pack("!iiiii", 1, 0, UUID_OID, len(values), 1) if values
            else struct.pack("!iii", 0, 0, UUID_OID))
    body += b"".join(_b_uuid(value) for value in values)
    return struct.pack("!i", len(body)) + body


def _b_text(value: str) -> bytes:
    data = value.encode()
    return struct.pack("!i", len(data)) + data


def _b_ts(unix_seconds: float) -> bytes:
    return struct.pack("!iq", 8, round((unix_seconds - _PG_EPOCH) * 1_000_000))


@dataclass(frozen=True)
class History:
    updates: int
    municipalities: int = 565
    publishers: int = 8
    topics: int = 28
    webhook_every: int = 40
    bundle_days: int = 100
    days: int = 365


FULL_HISTORY = History(1_000_000)
#: `--quick` (part of `make test`): a tiny history and parts, to check that it all runs.
QUICK_HISTORY = History(2_000, bundle_days=5)


@dataclass(frozen=True)
class Parts:
    """What P6 runs on both databases (sizes of the workloads' own set-up)."""

    p1_n: int
    p1_runs: int
    p5_subscriptions: int
    p5_updates: int
    p5_runs: int
    p3_n: int  # 0: P3 not run
    p3_runs: int
    p4_runs: int  # 0: P4 not run; each run starts the API and workers again


FULL_PARTS = Parts(p1_n=100_000, p1_runs=5, p5_subscriptions=2_000, p5_updates=200, p5_runs=5,
                   p3_n=2_000, p3_runs=3, p4_runs=3)
QUICK_PARTS = Parts(p1_n=500, p1_runs=2, p5_subscriptions=50, p5_updates=5, p5_runs=1,
                    p3_n=0, p3_runs=0, p4_runs=0)


def _ts(value: datetime) -> str:
    return value.isoformat()


def _uuid7_at(seconds: float) -> str:
    """A time-ordered id carrying the given instant, as `new_id()` would have made then."""
    return str(uuid_utils.uuid7(nanoseconds=int(seconds * 1_000_000_000)))


def _admin() -> sa.engine.Engine:
    return sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT",
                            connect_args={"connect_timeout": 5})


def alembic_head() -> str:
    from alembic.script import ScriptDirectory

    from domain import migrate

    heads = ScriptDirectory.from_config(migrate.alembic_config()).get_heads()
    return ",".join(sorted(heads))


def fingerprint(history: History) -> dict[str, Any]:
    return {"loader": LOADER_VERSION, "alembic_head": alembic_head(), "sizes": asdict(history)}


def template_info(name: str) -> dict[str, Any] | None:
    """The template's stored description (its database comment), or None if absent."""
    admin = _admin()
    try:
        with admin.connect() as conn:
            comment = conn.execute(sa.text(
                "SELECT shobj_description(oid, 'pg_database') FROM pg_database "
                "WHERE datname = :name"), {"name": name}).first()
    finally:
        admin.dispose()
    if comment is None:
        return None
    try:
        return json.loads(comment[0]) if comment[0] else {}
    except ValueError:
        return {}


def clone(template: str, name: str) -> tuple[str, float]:
    """`CREATE DATABASE name TEMPLATE template` (dropping `name` first); answers (URL, s)."""
    started = time.perf_counter()
    admin = _admin()
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            version = int(conn.exec_driver_sql("SHOW server_version_num").scalar_one())
            # FILE_COPY (PostgreSQL 15+) copies the files after a checkpoint instead of
            # WAL-logging every block: much faster for a database of several GB.
            strategy = " STRATEGY FILE_COPY" if version >= 150000 else ""
            conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"{strategy}')
    finally:
        admin.dispose()
    return database_url(name), time.perf_counter() - started


def refresh_digests(engine: sa.engine.Engine) -> None:
    """The history's digest subscriptions are up to date: nothing is due for them now (a
    template built days ago would otherwise have windows to catch up on)."""
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE subscriptions SET bundled_until = now() "
                             "WHERE name = :name AND bundled_until < now()"),
                     {"name": DIGEST_NAME})


# ---------------------------------------------------------------------------- the loader


class HistoryLoader:
    def __init__(self, engine: sa.engine.Engine, history: History,
                 log: Callable[[str], None]) -> None:
        self.engine = engine
        self.h = history
        self.log = log
        self.end = datetime.now(UTC).replace(second=0, microsecond=0)
        self.start = self.end - timedelta(days=history.days)
        self.counts: dict[str, int] = {}
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers

    def _copy(self, table: str, columns: str, lines: Iterator[str] | Iterator[bytes],
              binary: bool = False) -> int:
        """TRUNCATE + COPY … FREEZE in one transaction; answers the row count. Text lines,
        or with `binary` rows in COPY's binary format (field count included)."""
        from psycopg.copy import QueuedLibpqWriter

        started = time.perf_counter()
        count = 0
        options = "FORMAT BINARY, FREEZE" if binary else "FREEZE"
        with raw_cursor(self.engine) as cur:
            cur.execute(f"TRUNCATE {table}")
            # A queued writer sends from a thread of its own while the rows are made.
            with cur.copy(f"COPY {table} ({columns}) FROM STDIN ({options})",
                          writer=QueuedLibpqWriter(cur)) as copy:
                buffer: list[Any] = []
                join = b"".join if binary else "".join
                if binary:
                    copy.write(BINARY_HEADER)
                for line in lines:
                    buffer.append(line)
                    if len(buffer) >= COPY_CHUNK_ROWS:
                        copy.write(join(buffer))
                        count += len(buffer)
                        buffer = []
                copy.write(join(buffer))
                count += len(buffer)
                if binary:
                    copy.write(BINARY_TRAILER)
        self.counts[table] = count
        self.timings[f"copy {table}"] = time.perf_counter() - started
        self.log(f"  history: {table}: {count:,} rows in {time.perf_counter() - started:.1f} s")
        return count

    # ------------------------------------------------------------------ reference rows

    def reference(self) -> None:
        """Publishers, topics, municipalities, endpoints, subscriptions (small)."""
        from sqlalchemy.orm import Session

        from domain import matching
        from domain.filters import normalise_filter
        from domain.secrets import encrypt, new_webhook_secret

        h = self.h
        t0 = self.start.timestamp() - 86_400
        created = _ts(self.start - timedelta(days=1))
        self.publishers = [_uuid7_at(t0 + i) for i in range(h.publishers)]
        self.topic_slugs = [f"history-topic-{i:02d}" for i in range(h.topics)]
        topic_ids = [_uuid7_at(t0 + 100 + i) for i in range(h.topics)]
        self.orgs = [_uuid7_at(t0 + 1000 + i) for i in range(h.municipalities)]
        with raw_cursor(self.engine) as cur:
            with cur.copy("COPY organisations (id, name, level, kind, province_nis, "
                          "created_at, updated_at) FROM STDIN") as copy:
                for i, org in enumerate(self.publishers):
                    level = "federal" if i % 4 == 3 else "flemish"
                    kind = "federal_body" if level == "federal" else "agency"
                    copy.write(f"{org}\tHistory publisher {i}\t{level}\t{kind}\t\\N"
                               f"\t{created}\t{created}\n")
                for j, org in enumerate(self.orgs):
                    copy.write(f"{org}\tHistory municipality {j}\tlocal\tmunicipality"
                               f"\t{PROVINCES[j % len(PROVINCES)]}\t{created}\t{created}\n")
            with cur.copy("COPY topics (id, slug, name_nl, name_en, definition_nl, "
                          "definition_en, deprecated, created_at, updated_at) "
                          "FROM STDIN") as copy:
                for slug, tid in zip(self.topic_slugs, topic_ids, strict=True):
                    copy.write(f"{tid}\t{slug}\tGeschiedenis {slug[-2:]}\tHistory {slug[-2:]}"
                               f"\t\t\tf\t{created}\t{created}\n")
        with Session(self.engine) as session:
            filters = {}
            for slug in self.topic_slugs:
                canonical, compiled = normalise_filter(session, {"topics": [slug]})
                filters[slug] = (json.dumps(canonical, separators=(",", ":")), compiled)
            session.rollback()
            endpoints = {}
            for j in range(0, h.municipalities, h.webhook_every):
                endpoints[j] = _uuid7_at(t0 + 5000 + j)
            session.execute(sa.text(
                "INSERT INTO webhook_endpoints (id, organisation_id, url, event_types, enabled, "
                "secret_ciphertext, last_success_at, created_at, updated_at) VALUES (:id, "
                ":org, :url, '[]', true, :secret, :end, :created, :created)"),
                [{"id": eid, "org": self.orgs[j], "url": f"http://127.0.0.1:9/history/e{j}",
                  "secret": encrypt(new_webhook_secret()), "end": self.end,
                  "created": self.start - timedelta(days=1)} for j, eid in endpoints.items()])
            session.commit()
        # The last due time of the digests at or before the end of the history.
        self.dues = self._digest_dues()
        last_due = _ts(self.dues[-1])
        self.org_topic = [j % h.topics for j in range(h.municipalities)]
        self.digest_subs = [_uuid7_at(t0 + 2000 + j) for j in range(h.municipalities)]
        self.webhook_subs = {j: _uuid7_at(t0 + 6000 + j) for j in endpoints}
        self.endpoints = endpoints
        sub_lines = []
        topic_lines = []
        for j, org in enumerate(self.orgs):
            slug = self.topic_slugs[self.org_topic[j]]
            stored, compiled = filters[slug]
            masks = (f"{compiled.publisher_levels}\t{compiled.prevention_levels}"
                     f"\t{compiled.roles}\t{matching.PRIORITY_RANK[compiled.min_priority]}")
            sub = self.digest_subs[j]
            sub_lines.append(
                f"{sub}\t{org}\t{DIGEST_NAME}\t{stored}\tt\tf\t{masks}\tdaily"
                f"\t{DIGEST_SEND_AT}\t\\N\tt\tinbox\t{{\"type\":\"inbox\"}}\t\\N\tt"
                f"\t{last_due}\t{created}\t{created}\n")
            topic_lines.append(f"{sub}\t{topic_ids[self.org_topic[j]]}\n")
            if j in endpoints:
                wsub = self.webhook_subs[j]
                sub_lines.append(
                    f"{wsub}\t{org}\t{WEBHOOK_SUB_NAME}\t{stored}\tt\tf\t{masks}\timmediate"
                    f"\t\\N\t\\N\tt\twebhook\t{{\"type\":\"webhook\",\"endpoint_id\":"
                    f"\"{endpoints[j]}\"}}\t{endpoints[j]}\tt\t\\N\t{created}\t{created}\n")
                topic_lines.append(f"{wsub}\t{topic_ids[self.org_topic[j]]}\n")
        with raw_cursor(self.engine) as cur:
            with cur.copy("COPY subscriptions (id, organisation_id, name, filter, "
                          "has_topic_filter, has_publisher_filter, publisher_levels_mask, "
                          "prevention_levels_mask, roles_mask, min_priority_rank, cadence, "
                          "send_at, weekday, include_directed, channel_type, channel, "
                          "webhook_endpoint_id, active, bundled_until, created_at, updated_at) "
                          "FROM STDIN") as copy:
                copy.write("".join(sub_lines))
            with cur.copy("COPY subscription_topics (subscription_id, topic_id) "
                          "FROM STDIN") as copy:
                copy.write("".join(topic_lines))
        self.topic_ids = topic_ids
        # Each municipality's part of an inbox item: its reasons (every subscription of its
        # that matches: the digest, and the webhook one where it has it), as the three
        # reason fields (subscription_ids, rule_ids, via_audience) of a binary COPY row.
        self.reasons: list[bytes] = []
        for j in range(h.municipalities):
            ids = [self.digest_subs[j]] + ([self.webhook_subs[j]] if j in endpoints else [])
            self.reasons.append(_b_uuid_array(ids) + _b_uuid_array([]) + BINARY_FALSE)
        self.orgs_of_topic: list[list[int]] = [[] for _ in range(h.topics)]
        for j in range(h.municipalities):
            self.orgs_of_topic[self.org_topic[j]].append(j)

    def _digest_dues(self) -> list[datetime]:
        """The digests' due times: the last `bundle_days` + 1 at or before the end."""
        from zoneinfo import ZoneInfo

        from domain import schedule
        from domain.settings import get_settings

        tz = ZoneInfo(get_settings().timezone)
        after = self.end - timedelta(days=self.h.bundle_days + 3)
        dues = list(schedule.due_times("daily", DIGEST_SEND_AT, None, tz, after, self.end))
        return dues[-(self.h.bundle_days + 1):]

    # ------------------------------------------------------------------ keys and indexes

    def strip(self) -> list[str]:
        """Drop the loaded tables' indexes and keys and every foreign key touching them;
        answers the statements that recreate them (keys, indexes, then foreign keys)."""
        with self.engine.connect() as conn:
            tables = list(LOADED_TABLES)
            fks = conn.execute(sa.text(
                "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
                "FROM pg_constraint WHERE contype = 'f' AND connamespace = "
                "'public'::regnamespace AND (conrelid::regclass::text = ANY(:t) "
                "OR confrelid::regclass::text = ANY(:t)) ORDER BY 1, 2"), {"t": tables}).all()
            keys = conn.execute(sa.text(
                "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
                "FROM pg_constraint WHERE contype IN ('p', 'u') AND connamespace = "
                "'public'::regnamespace AND conrelid::regclass::text = ANY(:t) "
                "ORDER BY contype, 1, 2"), {"t": tables}).all()
            indexes = conn.execute(sa.text(
                "SELECT i.tablename, i.indexname, i.indexdef FROM pg_indexes i "
                "WHERE i.schemaname = 'public' AND i.tablename = ANY(:t) AND NOT EXISTS "
                "(SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname "
                " AND c.connamespace = 'public'::regnamespace) ORDER BY 1, 2"),
                {"t": tables}).all()
            for table, name, _ in fks:
                conn.exec_driver_sql(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
            for table, name, _ in keys:
                conn.exec_driver_sql(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
            for _, name, _ in indexes:
                conn.exec_driver_sql(f'DROP INDEX "{name}"')
            conn.commit()
        return ([f'ALTER TABLE {t} ADD CONSTRAINT "{n}" {d}' for t, n, d in keys]
                + [d for _, _, d in indexes]
                + [f'ALTER TABLE {t} ADD CONSTRAINT "{n}" {d}' for t, n, d in fks])

    def restore(self, statements: list[str]) -> None:
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql("SET maintenance_work_mem = '1GB'")
            for statement in statements:
                started = time.perf_counter()
                conn.exec_driver_sql(statement)
                took = time.perf_counter() - started
                if took > 5:
                    self.log(f"  history: {took:.1f} s: {statement[:100]}")

    # ------------------------------------------------------------------ the history

    def load(self) -> None:
        from domain import matching
        from domain.models import Role

        h = self.h
        span = (self.end - self.start).total_seconds() / h.updates
        t_start = self.start.timestamp()
        roles_mask = matching.roles_mask([Role.all])
        summary = ("Nieuwe richtlijnen voor lokale preventieprojecten, met aangepaste "
                   "termijnen, formulieren en een overzicht van de wijzigingen per thema.")
        body = ("Lokale besturen passen hun preventieplan aan volgens de nieuwe richtlijnen; "
                "de termijnen en formulieren staan in de bijlage. ") * 4
        levels = ("primary", "secondary", "tertiary", "none")
        started = time.perf_counter()
        uids: list[str] = []
        received: list[str] = []
        received_s: list[float] = []
        for k in range(h.updates):
            t = t_start + k * span
            uids.append(_uuid7_at(t))
            received_s.append(t + 2)
            received.append(_ts(datetime.fromtimestamp(t + 2, UTC)))
        self.log(f"  history: {h.updates:,} ids and times in {time.perf_counter() - started:.1f} s")

        def priority(k: int) -> str:
            return "urgent" if k % 50 == 0 else "important" if k % 10 == 0 else "routine"

        def update_lines() -> Iterator[str]:
            for k, uid in enumerate(uids):
                t = datetime.fromtimestamp(t_start + k * span, UTC)
                at, routed = _ts(t), _ts(t + timedelta(seconds=1))
                topic = k % h.topics
                yield (f"{uid}\t{uid}\t1\t\\N\t{self.publishers[k % h.publishers]}"
                       f"\tHistory update {k}: richtlijnen preventie\t{summary}\t{body}"
                       f"\t[\"{self.topic_slugs[topic]}\"]\t{levels[k % 4]}\t[\"all\"]"
                       f"\t{roles_mask}\t{priority(k)}\tpublic\t\\N\t[]\tnl\t{at}\t\\N"
                       f"\tpublished\t{at}\t\\N\t{routed}\t{len(self.orgs_of_topic[topic])}\n")

        self._copy("updates", "id, chain_id, version, supersedes_id, publisher_id, title, "
                   "summary, body, topics, prevention_level, target_roles, roles_mask, "
                   "priority, classification, audience, links, language, publish_at, "
                   "expires_at, status, created_at, withdrawn_at, routed_at, recipient_count",
                   update_lines())
        self._copy("update_topics", "update_id, topic_id",
                   (f"{uid}\t{self.topic_ids[k % h.topics]}\n" for k, uid in enumerate(uids)))

        def outbox_lines() -> Iterator[str]:
            for k, uid in enumerate(uids):
                at = received[k]
                yield (f"routing.route_update\t{{\"update_id\":\"{uid}\"}}\t{at}\t{at}\t{at}"
                       f"\t1\t{at}\n")

        self._copy("outbox", "task, args, created_at, available_at, dispatched_at, "
                   "dispatch_count, completed_at", outbox_lines())

        def audit_lines() -> Iterator[str]:
            for k, uid in enumerate(uids):
                yield (f"{received[k]}\t{self.publishers[k % h.publishers]}\t\\N"
                       f"\tupdate.published\tupdate\t{uid}\t{{\"chain_id\":\"{uid}\","
                       f"\"version\":1,\"classification\":\"public\"}}\n")

        self._copy("audit_log", "at, actor_organisation_id, actor_key_id, action, "
                   "object_type, object_id, detail", audit_lines())

        # Inbox items: each update in the inbox of every municipality following its topic.
        uid_b = [_b_uuid(uid) for uid in uids]
        org_b = [_b_uuid(org) for org in self.orgs]
        reasons_b = self.reasons

        def inbox_rows() -> Iterator[bytes]:
            fields = struct.pack("!h", 11)
            for k, ub in enumerate(uid_b):
                rec = _b_ts(received_s[k])
                head = (BINARY_TRUE if k % 50 == 0 else BINARY_FALSE) + rec + rec
                unread = head + BINARY_NULL + BINARY_NULL
                read = head + rec + BINARY_NULL
                for j in self.orgs_of_topic[k % h.topics]:
                    yield b"".join((fields, ub, org_b[j], ub, reasons_b[j],
                                    read if j % 2 else unread))

        self._copy("inbox_items", "chain_id, organisation_id, update_id, subscription_ids, "
                   "rule_ids, via_audience, needs_ack, received_at, delivered_at, read_at, "
                   "acked_at", inbox_rows(), binary=True)

        # Webhook deliveries of the webhook municipalities, with their attempts.
        attempts: list[tuple[str, float, bool]] = []
        publisher_names = [f"History publisher {i}" for i in range(h.publishers)]

        def delivery_lines() -> Iterator[str]:
            for k, uid in enumerate(uids):
                topic = k % h.topics
                webhook_orgs = [j for j in self.orgs_of_topic[topic] if j in self.endpoints]
                if not webhook_orgs:
                    continue
                t = received_s[k] + 1
                at = _ts(datetime.fromtimestamp(t, UTC))
                retried = k % 20 == 0
                done = _ts(datetime.fromtimestamp(t + 60, UTC)) if retried else at
                payload = (
                    f'{{"specversion":"1.0","id":"{uid}.published","source":"https://'
                    f'doorstroom.example/updates","type":"be.doorstroom.update.published",'
                    f'"time":"{received[k]}","datacontenttype":"application/json","data":'
                    f'{{"id":"{uid}","chain_id":"{uid}","version":1,"title":"History update '
                    f'{k}: richtlijnen preventie","summary":"{summary}","topics":'
                    f'["{self.topic_slugs[topic]}"],"publisher":{{"id":"'
                    f'{self.publishers[k % h.publishers]}","name":"'
                    f'{publisher_names[k % h.publishers]}"}},"priority":"{priority(k)}",'
                    f'"url":"https://doorstroom.example/v1/updates/{uid}"}}}}')
                for j in webhook_orgs:
                    did = _uuid7_at(t)
                    attempts.append((did, t, retried))
                    yield (f"{did}\tmsg_{uuid.uuid4().hex}\t{self.orgs[j]}"
                           f"\t{self.webhook_subs[j]}\t{self.endpoints[j]}\t{uid}\twebhook"
                           f"\tbe.doorstroom.update.published\t{payload}\tsucceeded"
                           f"\t{2 if retried else 1}\t\\N\t\\N\t{done}\t200\t\\N\t{at}\t{done}\n")

        self._copy("deliveries", "id, message_id, organisation_id, subscription_id, "
                   "endpoint_id, update_id, channel, event_type, payload, status, "
                   "attempt_count, next_attempt_at, leased_until, last_attempt_at, "
                   "last_status_code, last_error, created_at, succeeded_at", delivery_lines())

        def attempt_lines() -> Iterator[str]:
            for did, t, retried in attempts:
                at = _ts(datetime.fromtimestamp(t, UTC))
                if retried:
                    yield f"{did}\t{at}\t5000\t\\N\tHTTP 503 from the receiver\n"
                    at = _ts(datetime.fromtimestamp(t + 60, UTC))
                yield f"{did}\t{at}\t45\t200\t\\N\n"

        self._copy("delivery_attempts", "delivery_id, at, latency_ms, status_code, error",
                   attempt_lines())
        attempts.clear()

        # 100 days of daily bundles per digest subscription, with their entries.
        bundles: list[tuple[str, int, int, int]] = []  # (id, municipality, first k, end k)
        bundle_lines = []
        for d in range(1, len(self.dues)):
            start, end = self.dues[d - 1], self.dues[d]
            k0 = bisect.bisect_right(received_s, start.timestamp())
            k1 = bisect.bisect_right(received_s, end.timestamp())
            built = end + timedelta(seconds=30)
            s, e, b = _ts(start), _ts(end), _ts(built)
            for j in range(h.municipalities):
                topic = self.org_topic[j]
                first = k0 + (topic - k0) % h.topics
                items = len(range(first, k1, h.topics))
                if items == 0:
                    continue  # an empty window leaves no bundle
                bid = _uuid7_at(built.timestamp())
                bundles.append((bid, j, first, k1))
                bundle_lines.append(f"{bid}\t{self.digest_subs[j]}\t{self.orgs[j]}\tdaily"
                                    f"\t{s}\t{e}\t{items}\t{b}\t{b}\n")
        self._copy("bundles", "id, subscription_id, organisation_id, cadence, window_start, "
                   "window_end, item_count, created_at, built_at", iter(bundle_lines))
        del bundle_lines

        sub_b = [_b_uuid(sub) for sub in self.digest_subs]
        states = {True: _b_text("already_sent"), False: _b_text("new")}

        def entry_rows() -> Iterator[bytes]:
            fields = struct.pack("!h", 8)
            for bid, j, first, k1 in bundles:
                head = fields + _b_uuid(bid)
                sub, reasons = sub_b[j], reasons_b[j]
                for k in range(first, k1, h.topics):
                    ub = uid_b[k]
                    yield b"".join((head, ub, sub, ub, states[k % 50 == 0], reasons))

        self._copy("bundle_entries", "bundle_id, chain_id, subscription_id, update_id, state, "
                   "subscription_ids, rule_ids, via_audience", entry_rows(), binary=True)

    def finish(self) -> None:
        started = time.perf_counter()
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql("VACUUM (ANALYZE)")
            with suppress(sa.exc.DBAPIError):
                conn.exec_driver_sql("CHECKPOINT")
        self.timings["vacuum analyze"] = time.perf_counter() - started


def build_template(name: str, history: History, log: Callable[[str], None]) -> dict[str, Any]:
    """Build the history into a new database `name` (via a scratch name, renamed at the
    end); answers its description, which is also stored as the database's comment."""
    from domain import migrate
    from domain.db import make_engine

    started = time.perf_counter()
    building = f"{name}_building"
    url = recreate_database(building)
    migrate.upgrade(url)
    engine = make_engine(url, connect_args={"connect_timeout": 5})
    try:
        loader = HistoryLoader(engine, history, log)
        loader.reference()
        statements = loader.strip()
        t = time.perf_counter()
        loader.load()
        loader.timings["copy (all tables)"] = time.perf_counter() - t
        t = time.perf_counter()
        loader.restore(statements)
        loader.timings["indexes, keys, foreign keys"] = time.perf_counter() - t
        loader.finish()
        with engine.connect() as conn:
            size = conn.exec_driver_sql("SELECT pg_database_size(current_database())"
                                        ).scalar_one()
    finally:
        engine.dispose()
    info = {"fingerprint": fingerprint(history), "built": datetime.now(UTC).isoformat(),
            "history_end": loader.end.isoformat(), "build_s": round(time.perf_counter() -
                                                                    started, 1),
            "size_bytes": size, "counts": loader.counts,
            "timings_s": {k: round(v, 1) for k, v in loader.timings.items()}}
    admin = _admin()
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.exec_driver_sql(f'ALTER DATABASE "{building}" RENAME TO "{name}"')
            conn.exec_driver_sql(f"COMMENT ON DATABASE \"{name}\" IS "
                                 f"'{json.dumps(info)}'")
    finally:
        admin.dispose()
    return info


def ensure_template(name: str, history: History, log: Callable[[str], None],
                    rebuild: bool = False) -> tuple[dict[str, Any], bool]:
    """The template `name` with this history, built unless one with the same fingerprint
    exists; answers (its description, whether it was built now)."""
    wanted = fingerprint(history)
    info = template_info(name)
    if info is not None and not rebuild and info.get("fingerprint") == wanted:
        log(f"P6: reusing the history template {name} (built {info['built']} in "
            f"{info['build_s']:.0f} s)")
        return info, False
    reason = ("absent" if info is None else "rebuild asked" if rebuild
              else "built by another loader version, schema or size")
    log(f"P6: building the history template {name} ({reason}): {history.updates:,} updates")
    info = build_template(name, history, log)
    log(f"P6: history template built in {info['build_s']:.0f} s "
        f"({info['size_bytes'] / 2**30:.1f} GiB): {info['counts']}")
    return info, True


# ---------------------------------------------------------------------------- the parts


@dataclass
class Side:
    label: str  # "empty" or "history"
    db: str
    url: str
    engine: sa.engine.Engine
    setup_s: float = 0.0


def _side_engine(url: str, quick: bool) -> sa.engine.Engine:
    from domain.db import make_engine

    options = "-c statement_timeout=60000" if quick else ""
    return make_engine(url, connect_args={"connect_timeout": 5, "options": options})


@contextmanager
def two_sides(base: str, part: str, template: str, quick: bool,
              log: Callable[[str], None]) -> Iterator[tuple[Side, Side]]:
    """An empty migrated database and a copy of the template, dropped afterwards."""
    from domain import migrate

    names = (f"{base}_{part.lower()}_empty", f"{base}_{part.lower()}_history")
    sides: list[Side] = []
    try:
        started = time.perf_counter()
        url = recreate_database(names[0])
        migrate.upgrade(url)
        sides.append(Side("empty", names[0], url, _side_engine(url, quick),
                          time.perf_counter() - started))
        url, took = clone(template, names[1])
        engine = _side_engine(url, quick)
        refresh_digests(engine)
        sides.append(Side("history", names[1], url, engine, took))
        log(f"P6 {part}: databases ready (empty {sides[0].setup_s:.1f} s, copy of the "
            f"template {took:.1f} s)")
        yield sides[0], sides[1]
    finally:
        point_product_at(None)
        for side in sides:
            side.engine.dispose()
        for name in names:
            drop_database(name)


def _order(i: int, sides: tuple[Side, Side]) -> tuple[Side, Side]:
    return sides if i % 2 == 0 else (sides[1], sides[0])


def part_p1(base: str, template: str, parts: Parts, quick: bool, history_label: str,
            log: Callable[[str], None]) -> tuple[list[Row], dict[str, Any]]:
    """P1's measured call (`route_update` of an update all N subscriptions match)."""
    from bench.fanout import FanoutBench

    class HistoryFanout(FanoutBench):
        """P1's bench; between runs only its own inbox items are deleted (P1 truncates
        `inbox_items`, which would delete the history)."""

        def reset(self) -> None:
            with self.engine.begin() as conn:
                conn.execute(sa.text(
                    "DELETE FROM inbox_items WHERE update_id IN "
                    "(SELECT id FROM updates WHERE publisher_id = :p)"),
                    {"p": self.publisher_id})
            with self._autocommit() as conn:
                conn.exec_driver_sql("VACUUM (ANALYZE, INDEX_CLEANUP ON) inbox_items")
                with suppress(sa.exc.DBAPIError):
                    conn.exec_driver_sql("CHECKPOINT")

    n = parts.p1_n
    with two_sides(base, "P1", template, quick, log) as sides:
        benches = {}
        for side in sides:
            point_product_at(side.url)
            bench = HistoryFanout(side.engine, log)
            bench.prepare()
            load_s = bench.grow_to(n)
            log(f"P6 P1 {side.label}: {n:,} subscriptions loaded in {load_s:.1f} s")
            benches[side.label] = bench
        samples: dict[str, list[float]] = {"empty": [], "history": []}
        for i in range(parts.p1_runs):
            for side in _order(i, sides):
                point_product_at(side.url)
                benches[side.label].reset()
                samples[side.label].append(benches[side.label].time_routing(n))
            log(f"  P1 N={n:,} run {i + 1}/{parts.p1_runs}: empty {samples['empty'][-1]:.3f} s, "
                f"history {samples['history'][-1]:.3f} s")
        setup = {s.label: s.setup_s for s in sides}
    row = relative_row(f"P6 P1 fan-out {n} subscriptions, {history_label} / empty history",
                       median(samples["history"]), median(samples["empty"]), "s", TARGET_RATIO)
    return [row], {"part": "P1", "n": n, "runs": parts.p1_runs, "samples_s": samples,
                   "unit": "s", "setup_s": setup}


def part_p5(base: str, template: str, parts: Parts, quick: bool, history_label: str,
            log: Callable[[str], None]) -> tuple[list[Row], dict[str, Any]]:
    """P5's measured call (`run_due_bundles` for N daily subscriptions), without P5's own
    history variant: the history here is the template's."""
    from bench import bundles

    class HistoryBundles(bundles.BundleBench):
        """P5's bench; its reset moves every subscription's `bundled_until` back, which
        would make the history's digests due: they are put back up to date."""

        def reset(self) -> None:
            super().reset()
            refresh_digests(self.engine)
            with self._autocommit() as conn:
                conn.exec_driver_sql("VACUUM (ANALYZE) subscriptions")

    base_sizes = bundles.QUICK if quick else bundles.FULL
    sizes = bundles.Sizes(parts.p5_subscriptions, parts.p5_updates, base_sizes.history_days,
                          base_sizes.entries, parts.p5_runs)
    timeout = bundles.QUICK_STATEMENT_TIMEOUT_S if quick else bundles.FULL_STATEMENT_TIMEOUT_S
    with two_sides(base, "P5", template, quick, log) as sides:
        benches = {}
        for side in sides:
            point_product_at(side.url)
            bench = HistoryBundles(side.engine, log, sizes, timeout)
            load_s = bench.load()
            log(f"P6 P5 {side.label}: {sizes.subscriptions:,} subscriptions, "
                f"{sizes.updates} updates loaded in {load_s:.1f} s")
            benches[side.label] = bench
        samples: dict[str, list[float]] = {"empty": [], "history": []}
        #: The last run's slowest statements per side (text cut short, seconds).
        slowest: dict[str, list[tuple[str, float]]] = {}
        timed_out = False
        for i in range(sizes.runs + 1):  # the first round warms up and is not counted
            for side in _order(i, sides):
                point_product_at(side.url)
                benches[side.label].reset()
                elapsed, info = benches[side.label].time_run()
                timed_out = timed_out or info["timed_out"]
                if i:
                    samples[side.label].append(elapsed)
                    slowest[side.label] = info.get("statements", [])
                log(f"  P5 {f'run {i}/{sizes.runs}' if i else 'warm-up'} {side.label}: "
                    f"{elapsed:.2f} s" + (" (timed out)" if info["timed_out"] else ""))
        setup = {s.label: s.setup_s for s in sides}
    what = f"{sizes.subscriptions} subscriptions x {sizes.updates} updates"
    row = relative_row(f"P6 P5 daily bundles {what}, {history_label} / empty history",
                       median(samples["history"]), median(samples["empty"]), "s", TARGET_RATIO)
    return [row], {"part": "P5", "n": sizes.subscriptions, "updates": sizes.updates,
                   "runs": sizes.runs, "samples_s": samples, "unit": "s", "setup_s": setup,
                   "timed_out": timed_out, "slowest": slowest}


def part_p3(base: str, template: str, parts: Parts, quick: bool, history_label: str,
            log: Callable[[str], None]) -> tuple[list[Row], dict[str, Any]]:
    """P3's measured call (`send_due` until N pending deliveries succeeded), product side
    only (its baseline, a bare HTTP client, does not touch the database)."""
    import shutil
    import tempfile
    from pathlib import Path

    from bench import webhooks
    from bench.procs import Receiver

    class HistoryWebhooks(webhooks.WebhookBench):
        """P3's bench; its clear truncates `deliveries` and its checks count every row:
        here both keep to the workload's own update, leaving the history's deliveries."""

        def clear(self) -> None:
            own = {"u": self.update_id, "e": [e for e, _, _ in self.endpoints]}
            with self.engine.begin() as c:
                c.execute(sa.text(
                    "DELETE FROM delivery_attempts WHERE delivery_id IN "
                    "(SELECT id FROM deliveries WHERE update_id = :u)"), own)
                c.execute(sa.text("DELETE FROM deliveries WHERE update_id = :u"), own)
                c.execute(sa.text(
                    "UPDATE webhook_endpoints SET failing_since = NULL, last_success_at = NULL, "
                    "enabled = true WHERE id = ANY(:e)"), own)

        def outcome(self, n: int) -> dict[str, Any]:
            stats = self.receiver.stats()
            with self.engine.connect() as conn:
                db = conn.execute(sa.text(
                    "SELECT count(*) FILTER (WHERE status = 'succeeded'), "
                    "(SELECT count(*) FROM delivery_attempts a JOIN deliveries d "
                    " ON d.id = a.delivery_id WHERE d.update_id = :u) "
                    "FROM deliveries WHERE update_id = :u"), {"u": self.update_id}).one()
            return {"n": n, "received": stats["requests"], "unique_ids": stats["unique_ids"],
                    "duplicates": stats["duplicates"], "succeeded": db[0],
                    "attempt_rows": db[1],
                    "exactly_once": (stats["requests"] == stats["unique_ids"] == n
                                     and db[0] == db[1] == n)}

    n = parts.p3_n
    deadline_s = webhooks.QUICK_DEADLINE_S if quick else webhooks.FULL_DEADLINE_S
    log_dir = Path(tempfile.mkdtemp(prefix="doorstroom-bench-p6-"))
    receiver = Receiver(log_dir)
    ok = False
    try:
        receiver.start()
        with two_sides(base, "P3", template, quick, log) as sides:
            benches = {}
            for side in sides:
                point_product_at(side.url)
                bench = HistoryWebhooks(side.engine, log, receiver)
                bench.prepare()
                bench.time_product(webhooks.ENDPOINTS, deadline_s)  # warm-up
                benches[side.label] = bench
            samples: dict[str, list[float]] = {"empty": [], "history": []}
            outcomes: dict[str, list[dict[str, Any]]] = {"empty": [], "history": []}
            for i in range(parts.p3_runs):
                for side in _order(i, sides):
                    point_product_at(side.url)
                    elapsed, outcome = benches[side.label].time_product(n, deadline_s)
                    samples[side.label].append(outcome["succeeded"] / elapsed
                                               if elapsed > 0 else 0.0)
                    outcomes[side.label].append(outcome)
                log(f"  P3 N={n:,} run {i + 1}/{parts.p3_runs}: empty "
                    f"{samples['empty'][-1]:,.0f}/s, history {samples['history'][-1]:,.0f}/s")
            setup = {s.label: s.setup_s for s in sides}
        ok = True
    finally:
        receiver.stop()
        if ok:
            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            log(f"P6 P3: process logs kept in {log_dir}")
    row = relative_row(f"P6 P3 webhook deliveries per second ({n} deliveries), {history_label} "
                       "/ empty history", median(samples["history"]), median(samples["empty"]),
                       "deliveries/s", RATE_TARGET, direction="max")
    not_once = {label: sum(1 for o in outs if not o["exactly_once"])
                for label, outs in outcomes.items()}
    return [row], {"part": "P3", "n": n, "runs": parts.p3_runs, "samples_s": samples,
                   "unit": "deliveries/s", "setup_s": setup, "not_exactly_once": not_once}


def part_p4(base: str, template: str, parts: Parts, quick: bool, history_label: str,
            log: Callable[[str], None]) -> tuple[list[Row], dict[str, Any]]:
    """P4 as it is (`bench.latency.run`: API, worker, sender and receiver processes, updates
    POSTed at 20/s), `parts.p4_runs` times on each database, alternating which goes first;
    the medians of the runs' p50 and p99 are compared."""
    from bench import latency

    samples: dict[str, list[list[float]]] = {"empty": [], "history": []}
    load: dict[str, list[float]] = {"empty": [], "history": []}
    task_p50: dict[str, list[float]] = {"empty": [], "history": []}
    count = 0
    with two_sides(base, "P4", template, quick, log) as sides:
        for i in range(parts.p4_runs):
            for side in _order(i, sides):
                point_product_at(side.url)
                load[side.label].append(os.getloadavg()[0])
                log(f"P6 P4 {side.label}, run {i + 1}/{parts.p4_runs} (load average "
                    f"{load[side.label][-1]:.1f}):")
                m = latency.run(side.engine, quick=quick, log=log)
                count = m.detail[0]["count"]
                samples[side.label].append([m.rows[0].value, m.rows[1].value])
                # The routing task's own run time (Celery's log): less sensitive to
                # queueing than the end-to-end latency.
                task_p50[side.label] += [t["p50_ms"] for t in m.detail[0]["tasks"]
                                         if t["task"] == "routing.route_update"]
        setup = {s.label: s.setup_s for s in sides}

    def med(label: str, q: int) -> float:
        return median([run[q] for run in samples[label]])

    rows = [relative_row(f"P6 P4 latency publish to webhook {name} ({count} updates), "
                         f"{history_label} / empty history", med("history", q),
                         med("empty", q), "ms", TARGET_RATIO)
            for q, name in enumerate(("p50", "p99"))]
    return rows, {"part": "P4", "n": count, "runs": parts.p4_runs, "unit": "ms",
                  "setup_s": setup, "samples_s": samples, "load_average": load,
                  "route_task_p50_ms": {label: median(v) if v else None
                                        for label, v in task_p50.items()}}


def run(engine: sa.engine.Engine, *, quick: bool, log: Callable[[str], None],
        sizes: tuple[int, ...] | None = None, runs: int | None = None) -> Measurement:
    """Run P6. `engine` is the (empty, migrated) database run.py made for P6; the parts'
    databases are named after it. `sizes[0]`, if given, is the number of past updates;
    `runs` replaces every part's runs."""
    history = QUICK_HISTORY if quick else FULL_HISTORY
    if sizes:
        history = History(sizes[0], bundle_days=history.bundle_days)
    parts = QUICK_PARTS if quick else FULL_PARTS
    if runs:
        parts = Parts(parts.p1_n, runs, parts.p5_subscriptions, parts.p5_updates, runs,
                      parts.p3_n, runs, runs if parts.p4_runs else 0)
    base = engine.url.database
    assert base
    template = f"{TEMPLATE_DB}_quick_{os.getpid()}" if quick else TEMPLATE_DB
    history_label = f"{history.updates} past updates"
    rows: list[Row] = []
    detail: list[dict[str, Any]] = []
    try:
        started = time.perf_counter()
        info, built = ensure_template(template, history, log)
        detail.append({"part": "template", "name": template, "built_now": built,
                       "seconds": time.perf_counter() - started, "info": info,
                       "history": asdict(history)})
        for runner, wanted in ((part_p1, parts.p1_n), (part_p5, parts.p5_subscriptions),
                               (part_p3, parts.p3_n), (part_p4, parts.p4_runs)):
            if not wanted:
                continue
            part_started = time.perf_counter()
            part_rows, part_detail = runner(base, template, parts, quick, history_label, log)
            part_detail["seconds"] = time.perf_counter() - part_started
            part_detail["rows"] = [row.name for row in part_rows]
            rows += part_rows
            detail.append(part_detail)
            for row in part_rows:
                log(f"{row.name}: {row.value:,.3f} {row.unit} vs {row.baseline:,.3f}, ratio "
                    f"{row.ratio:.3f} (target {'<=' if row.direction == 'min' else '>='} "
                    f"{row.target}) {'met' if row.met else 'MISSED'}")
    finally:
        if quick:
            drop_database(template)
    notes = []
    for d in detail:
        if d.get("timed_out"):
            notes.append(f"Note ({d['part']}): a statement was cancelled after the statement "
                         "timeout; that figure is a lower bound.")
        for label, part_notes in (d.get("notes") or {}).items():
            notes += [f"Note ({d['part']}, {label}): {n.removeprefix('Note: ')}"
                      for n in part_notes]
        bad = d.get("not_exactly_once") or {}
        if any(bad.values()):
            notes.append(f"Note ({d['part']}): runs where not every delivery went out exactly "
                         f"once: {bad}.")
    return Measurement(WORKLOAD, TITLE, rows, detail, notes)


# ---------------------------------------------------------------------------- the report


def docs_section(m: Measurement) -> list[str]:
    template = next(d for d in m.detail if d["part"] == "template")
    info, h = template["info"], template["history"]
    counts = info.get("counts", {})
    reuse = (f"built by this run in {info['build_s']:.0f} s" if template["built_now"]
             else f"reused (built {info['built']} in {info['build_s']:.0f} s)")
    timings = "; ".join(f"{k} {v:.0f} s" for k, v in info.get("timings_s", {}).items()
                        if not k.startswith("copy ") or v >= 5)
    lines = [
        f"## P6: {m.title}",
        "",
        "**History** (the template database "
        f"`{template['name']}`, {info.get('size_bytes', 0) / 2**30:.1f} GiB, {reuse}): "
        f"{h['updates']:,} published updates over the {h['days']} days before the build from "
        f"{h['publishers']} publishers, one of {h['topics']} history topics each; "
        f"{h['municipalities']} municipalities, each with a daily digest subscription to "
        f"one topic (every {h['webhook_every']}th also a webhook endpoint and an immediate "
        f"webhook subscription); {counts.get('inbox_items', 0):,} inbox items (every update "
        "in the inbox of each municipality following its topic), "
        f"{counts.get('deliveries', 0):,} webhook deliveries with "
        f"{counts.get('delivery_attempts', 0):,} attempts, {h['bundle_days']} days of "
        f"bundles ({counts.get('bundles', 0):,}) with {counts.get('bundle_entries', 0):,} "
        "entries, and each update's topic row, routing outbox row and audit entry. No "
        "history subscription matches a workload's update, so every workload does exactly "
        "the work it does on an empty database.",
        "",
        "**Loading** (not timed in the figures): migrate; drop the loaded tables' indexes "
        "and keys and the foreign keys touching them; COPY every table (`FREEZE`, after a "
        "TRUNCATE in the same transaction); recreate indexes, keys and foreign keys; VACUUM "
        f"ANALYZE; CHECKPOINT. {timings}. The template is rebuilt when its fingerprint "
        "(loader version, Alembic head, sizes: the database's comment) differs, and reused "
        "otherwise; each part copies it (`CREATE DATABASE … TEMPLATE … STRATEGY "
        "FILE_COPY`).",
        "",
        "**Method**: each part makes two databases, one empty and migrated, one a copy of "
        "the template, gives both the workload's own set-up through the workload's code "
        "(`bench/fanout.py`, `bench/bundles.py`, `bench/webhooks.py`), and runs the "
        "measured call on them in turn, alternating which goes first; medians. P4 runs "
        "as `bench.latency.run` (API, worker, sender, receiver processes; 200 updates at "
        f"20/s) {FULL_PARTS.p4_runs} times on each database, alternating which goes first; "
        "the medians of the runs' p50 and p99 are compared. P2 is not part of P6. Where a "
        "workload's reset would wipe the history (P1 truncates `inbox_items`, P3 "
        "`deliveries`; P5 moves every subscription's `bundled_until`), P6 deletes only the "
        "workload's own rows instead, on both databases alike. Target: history / empty "
        f"≤ {TARGET_RATIO} for times, ≥ {RATE_TARGET} (1/1.2) for rates. The workloads run "
        "smaller than their own largest sizes, to keep P6 within minutes (the sizes are in "
        "the table; P1 goes to 1,000,000, P5 and P3 use 10,000); P3 runs the product side "
        "only (its baseline, a bare HTTP client, does not touch the database). The parts' "
        f"databases (`{BENCH_DB}_p6_<part>_empty` and `…_history`) are dropped after each "
        "part; the template stays. `.venv/bin/python -m bench.history [--rebuild]` builds "
        "(or checks) it by hand.",
        "",
        "| part | measured | runs | empty history | with history | ratio | target | met |",
        "|---|---|---:|---:|---:|---:|---:|:---:|",
    ]
    parts = [d for d in m.detail if d["part"] != "template"]
    by_name = {row.name: row for row in m.rows}
    for d, row in [(part, by_name[name]) for part in parts for name in part["rows"]]:
        def fmt(v: float, unit: str = d["unit"]) -> str:
            return f"{v:.3f} s" if unit == "s" else f"{v:,.0f} {unit}"

        what = {"P1": f"route_update, N = {d['n']:,}",
                "P5": f"run_due_bundles, {d['n']:,} subscriptions × {d.get('updates')} updates",
                "P3": f"send_due, {d['n']:,} deliveries",
                "P4": f"publish → webhook received, {d['n']} updates at 20/s, "
                      f"{'p50' if ' p50 ' in row.name else 'p99'}"}[d["part"]]
        lines.append(f"| {d['part']} | {what} | {d['runs']} | {fmt(row.baseline or 0)} | "
                     f"{fmt(row.value)} | {row.ratio:.2f} | "
                     f"{'≤' if row.direction == 'min' else '≥'} {row.target} | "
                     f"{'yes' if row.met else '**no**'} |")
    lines += ["", "All samples:", ""]
    for d in parts:
        f = (lambda v: f"{v:,.0f}") if d["unit"] != "s" else (lambda v: f"{v:.3f}")
        if d["part"] == "P4":
            e, h = d["samples_s"]["empty"], d["samples_s"]["history"]
            task = d.get("route_task_p50_ms") or {}
            la = d.get("load_average") or {}

            def runs_of(samples: list[list[float]]) -> str:
                return ", ".join(f"{r[0]:.0f} / {r[1]:.0f}" for r in samples) or "none"

            lines.append(f"- P4 (ms, p50 / p99 of each run): empty {runs_of(e)}; "
                         f"history {runs_of(h)} (part {d['seconds']:.0f} s with "
                         f"set-up; template copy {d['setup_s']['history']:.0f} s). The "
                         f"routing task's own p50 (median of the runs): empty "
                         f"{task.get('empty') or 0:.0f} ms, history "
                         f"{task.get('history') or 0:.0f} ms; load average (1 min) at the "
                         f"start of each run: empty "
                         f"{', '.join(f'{x:.1f}' for x in la.get('empty', []))}, history "
                         f"{', '.join(f'{x:.1f}' for x in la.get('history', []))}. At 20 "
                         "updates/s two worker processes have 100 ms per routing task: near "
                         "that, queueing (and so the latency) swings with whatever else the "
                         "machine runs, so this row is only meaningful on a quiet machine.")
            continue
        lines.append(f"- {d['part']} ({d['unit']}): empty "
                     f"{', '.join(f(x) for x in d['samples_s']['empty'])}; history "
                     f"{', '.join(f(x) for x in d['samples_s']['history'])} (part "
                     f"{d['seconds']:.0f} s with set-up; template copy "
                     f"{d['setup_s']['history']:.0f} s)")
    for d in parts:
        for label, statements in (d.get("slowest") or {}).items():
            lines.append(f"- {d['part']} {label}, slowest statements of the last run (s): "
                         + "; ".join(f"`{text[:60]}…` {t:.2f}" for text, t in statements[:3]))
    lines += [""] + m.notes + ([""] if m.notes else [])
    return lines


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.history [--updates N] [--rebuild]`: build (or check) the template."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.history", description=main.__doc__)
    parser.add_argument("--updates", type=int, default=FULL_HISTORY.updates)
    parser.add_argument("--bundle-days", type=int, default=FULL_HISTORY.bundle_days)
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args(argv)
    from bench.run import PRODUCT_ENV

    os.environ.update(PRODUCT_ENV)
    history = History(args.updates, bundle_days=args.bundle_days)
    info, _ = ensure_template(TEMPLATE_DB, history, lambda m: print(m, flush=True),
                              rebuild=args.rebuild)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
