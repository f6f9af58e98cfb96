"""P4: end-to-end latency, publish → webhook received, at 20 updates per second.

Real processes, as deployed (`make run`, compose): the API (`doorstroom api`), a worker for
the default queue with the scheduler embedded (`doorstroom worker --queues doorstroom --beat
--concurrency 2`: prefork, prefetch 1, late acks; routing runs there, and the outbox relay
thread), a sender worker for the deliveries queue (`doorstroom worker --queues deliveries
--concurrency 2`: webhook and e-mail sending), Redis as the broker, the benchmark database,
and the receiver (`bench/receiver.py` under uvicorn), which notes when each update's
CloudEvent first arrives (`time.time()`). A publisher organisation with a key, a topic, and a
subscribing organisation with a webhook endpoint and an immediate webhook subscription to the
topic are made through the domain's use cases (committed) before the processes start.

Measured: for each of M updates (~1 kB bodies) POSTed to `/v1/updates`, paced at 20 per
second, latency = the receiver's arrival time − the time the POST was sent, both on this
machine's clock. Three warm-up updates (one at a time) go first and are not counted.
Reported: p50 and p99 (absolute targets, no baseline), and where the time went, from the
timestamps the product stores: the update's `created_at` (the API's clock reading in the
publish transaction), the routing outbox row's `dispatched_at`, `routed_at` (routing's clock
reading), the delivery's `created_at`, and its first attempt's `at`.
"""

from __future__ import annotations

import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.orm import Session

from bench.common import Measurement, absolute_row, median, percentile
from bench.procs import Receiver

WORKLOAD = "P4"
TITLE = "end-to-end latency, publish → webhook received, at 20 updates/s"
RATE = 20.0
FULL_UPDATES = 200
QUICK_UPDATES = 20
WARM_UP = 3
TARGET_P50_MS = 50.0
TARGET_P99_MS = 250.0
TOPIC_SLUG = "bench-latency"
#: The brief's broker database for the full run (flushed first); the quick run prefers a
#: throwaway redis-server so that it never meets a full run's workers.
FULL_BROKER_URL = "redis://127.0.0.1:6379/12"
ARRIVAL_TIMEOUT_S = 60.0

PROCESS_SETTINGS: dict[str, str | None] = {
    "DOORSTROOM_WEBHOOK_ALLOW_LOOPBACK": "true",
    "DOORSTROOM_ENVIRONMENT": "test",
    "DOORSTROOM_OUTBOX_POLL_SECONDS": "0.5",
    "DOORSTROOM_RATE_LIMIT_PER_MINUTE": "0",
    "DOORSTROOM_REDIS_URL": None,
    "DOORSTROOM_CLOCK": None,
}

#: Stages between the stored timestamps, in order (name, from, to).
STAGES = [
    ("POST sent → API clock reading in publish (`updates.created_at`)", "sent", "created"),
    ("→ routing task handed to the broker (`outbox.dispatched_at`, relay fast path after "
     "commit)", "created", "dispatched"),
    ("→ routing started (`updates.routed_at`: broker → worker pickup)", "dispatched", "routed"),
    ("→ delivery row written (`deliveries.created_at`, in routing)", "routed", "delivery"),
    ("→ first attempt started (`delivery_attempts.at`: routing commit, send task dispatched "
     "and picked up, `send_due` claim)", "delivery", "attempt"),
    ("→ received (signing, HTTP)", "attempt", "arrived"),
]


def body_text() -> str:
    paragraph = ("De gemeenten ontvangen vanaf volgende week de nieuwe richtlijnen voor "
                 "lokale preventieprojecten, met aangepaste termijnen en formulieren. ")
    return (paragraph * 8)[:1000]


class LatencyBench:
    def __init__(self, engine: sa.engine.Engine, log: Callable[[str], None],
                 receiver: Receiver) -> None:
        self.engine = engine
        self.log = log
        self.receiver = receiver
        self.key = ""
        # A topic of the run's own: a second run on the same database (P6 runs P4 several
        # times) adds a publisher and subscriber whose subscription matches only its updates.
        self.topic = f"{TOPIC_SLUG}-{secrets.token_hex(4)}"

    def prepare(self) -> None:
        """Publisher + key, topic, subscriber + endpoint + immediate webhook subscription,
        through the use cases (each commits)."""
        from domain import directory, endpoints, keys, subscriptions
        from domain.audit import SYSTEM, Actor
        from domain.models import Cadence, Kind, Level

        with Session(self.engine, expire_on_commit=False) as session:
            publisher = directory.create_organisation(
                session, SYSTEM, directory.OrganisationFields(
                    name="Benchmark publisher", level=Level.flemish, kind=Kind.agency))
            self.key = keys.issue_key(session, SYSTEM, publisher.id, ["publish"]).plaintext
            directory.create_topic(session, SYSTEM, slug=self.topic, parent=None,
                                   name_nl="Benchmark latency", name_en="Benchmark latency")
            subscriber = directory.create_organisation(
                session, SYSTEM, directory.OrganisationFields(
                    name="Benchmark subscriber", level=Level.local, kind=Kind.municipality))
            actor = Actor(subscriber.id, None, frozenset({"subscribe"}))
            endpoint = endpoints.create_endpoint(
                session, actor, url=self.receiver.url("/latency/e0")).endpoint
            subscriptions.create_subscription(session, actor, subscriptions.SubscriptionInput(
                filter={"topics": [self.topic]}, cadence=Cadence.immediate,
                channel={"type": "webhook", "endpoint_id": str(endpoint.id)}))

    def publish(self, client: httpx.Client, i: int) -> tuple[str, float, float]:
        """POST one update; answers (id, time.time() when sent, seconds the POST took)."""
        sent = time.time()
        started = time.perf_counter()
        response = client.post("/v1/updates", json={
            "title": f"Benchmark latency update {i}", "topics": [self.topic],
            "summary": "Nieuwe richtlijnen voor lokale preventieprojecten.",
            "body": body_text()})
        took = time.perf_counter() - started
        if response.status_code != 202:
            raise RuntimeError(f"POST /v1/updates answered {response.status_code}: "
                               f"{response.text[:300]}")
        return response.json()["id"], sent, took

    def wait_for(self, ids: list[str], timeout: float) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            arrivals = self.receiver.stats(arrivals=True)["arrivals"]
            if all(i in arrivals for i in ids) or time.monotonic() > deadline:
                return {i: arrivals[i] for i in ids if i in arrivals}
            time.sleep(0.1)

    def run_load(self, base_url: str, count: int) -> dict[str, Any]:
        with httpx.Client(base_url=base_url, timeout=10, trust_env=False,
                          headers={"Authorization": f"Bearer {self.key}"}) as client:
            for i in range(WARM_UP):  # cold worker children, first connections: not counted
                update_id, _, _ = self.publish(client, -1 - i)
                self.wait_for([update_id], ARRIVAL_TIMEOUT_S)
            self.receiver.reset()
            sent: dict[str, float] = {}
            post_s: list[float] = []
            start = time.monotonic()
            for i in range(count):
                delay = start + i / RATE - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                update_id, at, took = self.publish(client, i)
                sent[update_id] = at
                post_s.append(took)
            paced_s = time.monotonic() - start
        arrivals = self.wait_for(list(sent), ARRIVAL_TIMEOUT_S)
        stats = self.receiver.stats()
        return {"sent": sent, "arrivals": arrivals, "post_s": post_s, "paced_s": paced_s,
                "receiver": stats}

    def breakdown(self, sent: dict[str, float], arrivals: dict[str, float]
                  ) -> list[dict[str, Any]]:
        """Per update: every stored timestamp, as seconds since the epoch."""
        rows = []
        with self.engine.connect() as conn:
            result = conn.execute(sa.text(
                "SELECT u.id::text, extract(epoch FROM u.created_at), "
                "extract(epoch FROM o.dispatched_at), extract(epoch FROM u.routed_at), "
                "extract(epoch FROM d.created_at), "
                "(SELECT extract(epoch FROM min(a.at)) FROM delivery_attempts a "
                " WHERE a.delivery_id = d.id), d.attempt_count "
                "FROM updates u "
                "JOIN outbox o ON o.task = 'routing.route_update' "
                " AND o.args ->> 'update_id' = u.id::text "
                "LEFT JOIN deliveries d ON d.update_id = u.id "
                "WHERE u.id = ANY(CAST(:ids AS uuid[]))"), {"ids": list(sent)})
            for update_id, created, dispatched, routed, delivery, attempt, attempts in result:
                rows.append({"id": update_id, "sent": sent[update_id],
                             "created": _f(created), "dispatched": _f(dispatched),
                             "routed": _f(routed), "delivery": _f(delivery),
                             "attempt": _f(attempt), "arrived": arrivals.get(update_id),
                             "attempts": attempts})
        return rows


def _f(value: Any) -> float | None:
    return None if value is None else float(value)


def stage_figures(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    figures = []
    for name, start, end in STAGES:
        values = [(r[end] - r[start]) * 1000 for r in rows
                  if r[start] is not None and r[end] is not None]
        if values:
            figures.append({"stage": name, "p50_ms": percentile(values, 50),
                            "p99_ms": percentile(values, 99), "max_ms": max(values),
                            "samples": len(values)})
    return figures


_TASK_LINE = re.compile(r"Task ([\w.]+)\[[^\]]+\] succeeded in ([0-9.]+)s")


def task_runtimes(worker_log: str) -> list[dict[str, Any]]:
    """Celery's own "Task X[id] succeeded in Ns" lines: count and run time per task name."""
    runs: dict[str, list[float]] = {}
    for name, seconds in _TASK_LINE.findall(worker_log):
        runs.setdefault(name, []).append(float(seconds) * 1000)
    return [{"task": name, "count": len(ms), "p50_ms": percentile(ms, 50),
             "p99_ms": percentile(ms, 99), "total_ms": sum(ms)}
            for name, ms in sorted(runs.items(), key=lambda kv: -sum(kv[1]))]


def _broker(quick: bool, log_dir: Path) -> tuple[str, Any]:
    """A broker URL, and the throwaway server to stop afterwards (or None)."""
    import redis

    from tests.processes import ProcessError, RedisServer

    if quick and shutil.which("redis-server"):
        try:
            server = RedisServer(log_dir).start()
            return server.url(0), server
        except ProcessError:
            pass
    client = redis.Redis.from_url(FULL_BROKER_URL, socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()
    return FULL_BROKER_URL, None


def run(engine: sa.engine.Engine, *, quick: bool, log: Callable[[str], None],
        sizes: tuple[int, ...] | None = None, runs: int | None = None) -> Measurement:
    from tests.processes import Api, Worker, process_env, running
    from workers.celery_app import DEFAULT_QUEUE, DELIVERIES_QUEUE

    count = QUICK_UPDATES if quick else FULL_UPDATES
    log_dir = Path(tempfile.mkdtemp(prefix="doorstroom-bench-p4-"))
    receiver = Receiver(log_dir)
    redis_server = None
    ok = False
    try:
        receiver.start()
        bench = LatencyBench(engine, log, receiver)
        bench.prepare()
        broker_url, redis_server = _broker(quick, log_dir)
        env = process_env({**PROCESS_SETTINGS,
                           "DOORSTROOM_DATABASE_URL": engine.url.render_as_string(
                               hide_password=False),
                           "DOORSTROOM_BROKER_URL": broker_url,
                           "DOORSTROOM_BEAT_SCHEDULE_FILE": log_dir / "celerybeat-schedule"})
        api = Api(env, log_dir, ready_timeout=60)
        # As deployed (`make run`, compose): routing and the scheduler on the default queue,
        # sending on a worker of its own for the deliveries queue.
        worker = Worker(env, log_dir, beat=True, concurrency=2, ready_timeout=60)
        worker.argv += ["--queues", DEFAULT_QUEUE]
        sender = Worker(env, log_dir, beat=False, concurrency=2, name="sender",
                        ready_timeout=60)
        sender.argv += ["--queues", DELIVERIES_QUEUE]
        started = time.perf_counter()
        with running(api, worker, sender):
            log(f"P4: API, worker and sender ready in {time.perf_counter() - started:.1f} s; "
                f"publishing {count} updates at {RATE:g}/s")
            offsets = [len(w.current_log()) for w in (worker, sender)]
            load = bench.run_load(api.base_url, count)
            time.sleep(1.0)  # the last tasks' log lines
            tasks = task_runtimes("".join(w.current_log()[o:] for w, o in
                                          zip((worker, sender), offsets, strict=True)))
        ok = True
    finally:
        receiver.stop()
        if redis_server is not None:
            redis_server.stop()
        if ok:
            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            log(f"P4: process logs kept in {log_dir}")
    sent, arrivals = load["sent"], load["arrivals"]
    latencies = [(arrivals[i] - sent[i]) * 1000 for i in sent if i in arrivals]
    missing = len(sent) - len(latencies)
    rows_db = bench.breakdown(sent, arrivals)
    stages = stage_figures(rows_db)
    # An update that never arrived counts as arriving at the end of the wait (a lower bound).
    if missing:
        latencies += [ARRIVAL_TIMEOUT_S * 1000] * missing
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    rows = [
        absolute_row(f"P4 latency publish to webhook p50 ({RATE:g} updates/s, {count} updates)",
                     p50, "ms", TARGET_P50_MS),
        absolute_row(f"P4 latency publish to webhook p99 ({RATE:g} updates/s, {count} updates)",
                     p99, "ms", TARGET_P99_MS),
    ]
    for row in rows:
        log(f"{row.name}: {row.value:,.0f} ms (target <= {row.target:g}) "
            f"{'met' if row.met else 'MISSED'}")
    for s in stages:
        log(f"  {s['stage']}: p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms")
    for t in tasks:
        log(f"  task {t['task']}: {t['count']} runs, p50 {t['p50_ms']:.0f} ms, "
            f"p99 {t['p99_ms']:.0f} ms, {t['total_ms'] / 1000:.1f} s in all")
    notes = []
    if missing:
        notes.append(f"Note: {missing} of {len(sent)} updates never reached the receiver "
                     f"within {ARRIVAL_TIMEOUT_S:.0f} s; they count as {ARRIVAL_TIMEOUT_S:.0f} s.")
    retried = sum(1 for r in rows_db if (r["attempts"] or 0) > 1)
    if retried:
        notes.append(f"Note: {retried} deliveries needed more than one attempt.")
    if load["receiver"]["duplicates"]:
        notes.append(f"Note: the receiver got {load['receiver']['duplicates']} duplicate "
                     "requests (same webhook-id).")
    detail = [{"count": count, "latencies_ms": latencies, "stages": stages, "tasks": tasks,
               "post_ms_p50": median(load["post_s"]) * 1000,
               "post_ms_max": max(load["post_s"]) * 1000, "paced_s": load["paced_s"],
               "achieved_rate": count / load["paced_s"] if load["paced_s"] else 0.0,
               "broker": "throwaway redis-server" if redis_server is not None
               else FULL_BROKER_URL, "mean_ms": sum(latencies) / len(latencies),
               "max_ms": max(latencies), "min_ms": min(latencies)}]
    return Measurement(WORKLOAD, TITLE, rows, detail, notes)


def docs_section(m: Measurement) -> list[str]:
    d = m.detail[0]
    p50, p99 = m.rows
    lines = [
        f"## P4: {m.title}",
        "",
        "**Measured**: real processes as deployed (`make run`, compose): `doorstroom api`, "
        "`doorstroom worker --queues doorstroom --beat --concurrency 2` (routing; Celery "
        "prefork, prefetch 1, late acks; the outbox relay runs in it, polling every 0.5 s), "
        "`doorstroom worker --queues deliveries --concurrency 2` (the sender), Redis as the "
        f"broker ({d['broker']}), the "
        "benchmark database, and the receiver (`bench/receiver.py` under uvicorn, in a "
        "process of its own), which notes when each update's CloudEvent first arrives. A "
        "publisher with a key, a topic, and a subscriber with a webhook endpoint and an "
        "immediate webhook subscription to that topic are made through the use cases before "
        f"the processes start. {d['count']} updates (~1 kB bodies) are POSTed to "
        f"`/v1/updates` paced at {RATE:g} per second (achieved {d['achieved_rate']:.1f}/s); "
        "latency = arrival at the receiver − the moment the POST was sent, both "
        f"`time.time()` on this machine. {WARM_UP} warm-up updates go first, one at a time, "
        "and are not counted. Rate limiting is off (`DOORSTROOM_RATE_LIMIT_PER_MINUTE=0`, "
        "no `DOORSTROOM_REDIS_URL`). Targets: p50 ≤ 50 ms, p99 ≤ 250 ms (absolute).",
        "",
        "| updates | p50 (ms) | p99 (ms) | min / mean / max (ms) | targets | met |",
        "|---:|---:|---:|---:|---:|:---:|",
        f"| {d['count']} | {p50.value:,.0f} | {p99.value:,.0f} | {d['min_ms']:,.0f} / "
        f"{d['mean_ms']:,.0f} / {d['max_ms']:,.0f} | p50 ≤ {TARGET_P50_MS:g}; p99 ≤ "
        f"{TARGET_P99_MS:g} | {'yes' if p50.met else '**no**'}; "
        f"{'yes' if p99.met else '**no**'} |",
        "",
        "Where the time goes (from the timestamps the product stores; each stage from the "
        "previous one; POST round trip p50 "
        f"{d['post_ms_p50']:.0f} ms, max {d['post_ms_max']:.0f} ms):",
        "",
        "| stage | p50 (ms) | p99 (ms) | max (ms) |",
        "|---|---:|---:|---:|",
    ]
    for s in d["stages"]:
        lines.append(f"| {s['stage']} | {s['p50_ms']:,.1f} | {s['p99_ms']:,.1f} | "
                     f"{s['max_ms']:,.1f} |")
    lines += [
        "",
        "Tasks the workers ran while the updates were published (Celery's own run times "
        "from their logs; the beat's periodic tasks included), over "
        f"{d['count'] / RATE:.0f} s of load:",
        "",
        "| task | runs | p50 (ms) | p99 (ms) | total (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for t in d.get("tasks", []):
        lines.append(f"| `{t['task']}` | {t['count']} | {t['p50_ms']:,.0f} | "
                     f"{t['p99_ms']:,.0f} | {t['total_ms'] / 1000:.1f} |")
    lines += [""] + m.notes + ([""] if m.notes else [])
    return lines

