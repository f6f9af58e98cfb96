"""Bad webhook receivers: nothing is lost, retries repeat the same message, and a healthy
receiver should not wait for the bad ones.

One organisation has five webhook endpoints, each behind its own subscription:

- healthy: answers 200 at once;
- slow: answers after 10 s, far past the processes' 2 s webhook timeout;
- flaky: every other answer (over the whole endpoint) is a 500;
- dead: a closed port (connection refused);
- late: the first request of each message is answered 200 only after our timeout (the
  receiver did get it), any repeat at once.

A real API, a scheduler, ONE worker for routing and ONE sender worker for the `deliveries`
queue (each concurrency 2, as compose.yaml runs them) run on a throwaway broker. First a
calm phase: updates that only the healthy endpoint takes (the baseline latency, after a
warm-up). Then 30 updates that every endpoint takes, published one after the other. Flaky,
late and dead deliveries are made due again every half second by the test (instead of after
the product's 10 s, 30 s, ... schedule, which stays as it is).

The scenario runs once per module; its tests judge different promises of it.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.faults import judge
from tests.faults.conftest import WEBHOOK_TIMEOUT_SECONDS, FaultWorld, Stack, needs_redis_server
from tests.processes import RedisServer, free_port, wait_until
from tests.receivers import OK, Behaviour, Receiver

pytestmark = [pytest.mark.faults, pytest.mark.timeout(90), needs_redis_server]

UPDATES = 24
CALM_UPDATES = 8
#: Calm updates not counted in the baseline: the first routing and sending of fresh
#: processes (imports, connection pools) take a second or two.
WARM_UP = 2
#: Seconds between two publishes (one client posting one update after the other): a rate
#: this worker sustains while every receiver is healthy (the calm phase's latency is
#: recorded, not asserted: it depends on how busy the machine is).
PUBLISH_INTERVAL = 0.4
SLOW_DELAY = 10.0
LATE_DELAY = WEBHOOK_TIMEOUT_SECONDS + 1.0
HEALTHY_P50 = 1.0
HEALTHY_MAX = 3.0
BAD = ("slow", "flaky", "dead", "late")


class FaultyReceiver(Receiver):
    """The shared test receiver, plus two behaviours that depend on the request: `/flaky`
    alternates 500 and 200 over all its requests; `/late` answers the first request of each
    `webhook-id` after LATE_DELAY and any repeat at once."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._current = threading.local()
        self._flaky_answers = 0
        self._late_seen: set[str] = set()

    def _record(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
        record = super()._record(method, path, headers, body)
        self._current.record = record  # the handler asks for the behaviour next, same thread
        return record

    def behaviour(self, path: str) -> Behaviour:
        if path == "/flaky":
            with self._lock:
                self._flaky_answers += 1
                fail = self._flaky_answers % 2 == 1
            return Behaviour(status=500, body=b"try again") if fail else OK
        if path == "/late":
            record = getattr(self._current, "record", None)
            message_id = record.headers.get("webhook-id", "") if record else ""
            with self._lock:
                first = message_id not in self._late_seen
                self._late_seen.add(message_id)
            return Behaviour(delay=LATE_DELAY) if first else OK
        return super().behaviour(path)


@dataclass
class Scenario:
    """What happened, for the tests to judge."""

    calm_sent: dict[str, float] = field(default_factory=dict)
    sent: dict[str, float] = field(default_factory=dict)
    requests: list[Any] = field(default_factory=list)
    statuses: dict[str, dict[str, int]] = field(default_factory=dict)
    endpoints: dict[str, uuid.UUID] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    attempts: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    errors: dict[str, set[str]] = field(default_factory=dict)
    attempt_rows: int = 0
    attempt_total: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)

    def phase(self, name: str, since: float) -> float:
        now = time.monotonic()
        self.phases[name] = round(now - since, 1)
        return now

    def first_healthy(self) -> dict[str, float]:
        first: dict[str, float] = {}
        for r in self.requests:
            if r.path == "/healthy" and r.data:
                first.setdefault(r.data["update"]["id"], r.started)
        return first

    def latencies(self, sent: dict[str, float]) -> list[float]:
        first = self.first_healthy()
        return [first[u] - at for u, at in sent.items() if u in first]

    def by_path(self) -> dict[str, dict[str, list[Any]]]:
        out: dict[str, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
        for r in self.requests:
            if r.data:
                out[r.path][r.data["update"]["id"]].append(r)
        return out


def _bring_retries_forward(endpoint_ids: list[uuid.UUID], stop: threading.Event) -> None:
    """Make failed deliveries of these endpoints due again every half second."""
    from domain.db import get_sessionmaker
    from domain.models import Delivery, DeliveryStatus

    while not stop.wait(0.5):
        try:
            with get_sessionmaker()() as session:
                now = datetime.now(UTC)
                session.execute(sa.update(Delivery).where(
                    Delivery.endpoint_id.in_(endpoint_ids),
                    Delivery.status == DeliveryStatus.pending,
                    Delivery.leased_until.is_(None),
                    Delivery.next_attempt_at > now).values(next_attempt_at=now))
                session.commit()
        except Exception:  # noqa: BLE001 - a lock timeout or such: try again next time
            continue


def _delivery_statuses(ids: list[uuid.UUID], endpoints: dict[str, uuid.UUID]
                       ) -> dict[str, dict[str, int]]:
    from domain.db import get_engine
    from domain.models import Delivery

    with get_engine().connect() as conn:
        rows = conn.execute(sa.select(Delivery.endpoint_id, Delivery.status, sa.func.count())
                            .where(Delivery.update_id.in_(ids))
                            .group_by(Delivery.endpoint_id, Delivery.status)).all()
    by_id: dict[Any, str] = {v: k for k, v in endpoints.items()}
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for endpoint_id, status, count in rows:
        out[by_id[endpoint_id]][str(getattr(status, "value", status))] = count
    return dict(out)


def _publish_paced(client: Any, topic: str, count: int, label: str) -> dict[str, float]:
    sent: dict[str, float] = {}
    for n in range(count):
        before = time.monotonic()
        response = client.post("/v1/updates", json={"title": f"{label} {n}", "topics": [topic]})
        assert response.status_code == 202, response.text
        sent[response.json()["id"]] = before
        time.sleep(max(0.0, PUBLISH_INTERVAL - (time.monotonic() - before)))
    return sent


@pytest.fixture(scope="module")
def scenario(migrated_database: str, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Scenario]:
    from domain.db import get_engine, get_sessionmaker
    from domain.models import Delivery, DeliveryAttempt

    tmp_path: Path = tmp_path_factory.mktemp("receiver-faults")
    world = FaultWorld(get_sessionmaker()())
    result = Scenario()
    began = time.monotonic()
    try:
        calm_topic, topic = world.topic(), world.topic()
        publisher = world.publisher()
        city = world.org("city")
        publish_key = world.key(publisher, "publish")
        receiver = FaultyReceiver(routes={"/healthy": OK, "/slow": Behaviour(delay=SLOW_DELAY)})
        urls = {"healthy": receiver.url("/healthy"), "slow": receiver.url("/slow"),
                "flaky": receiver.url("/flaky"),
                "dead": f"http://127.0.0.1:{free_port()}/dead",  # nothing listens there
                "late": receiver.url("/late")}
        for name, url in urls.items():
            endpoint, secret = world.endpoint(city, url)
            receiver.secrets.append(secret)
            world.webhook_subscription(city, endpoint,
                                       [calm_topic, topic] if name == "healthy" else [topic])
            result.endpoints[name] = endpoint.id
        world.session.commit()
        endpoints = result.endpoints

        broker = RedisServer(tmp_path)
        stack = Stack(tmp_path, broker, concurrency=2, sender=True)
        stop_bumping = threading.Event()
        bumper = threading.Thread(target=_bring_retries_forward, daemon=True, args=(
            [endpoints["flaky"], endpoints["late"], endpoints["dead"]], stop_bumping))
        with receiver:
            broker.start()
            try:
                mark = result.phase("setup", began)
                stack.start()
                mark = result.phase("start", mark)
                with stack.api.client(publish_key) as client:
                    result.calm_sent = _publish_paced(client, calm_topic, CALM_UPDATES, "Calm")
                    bumper.start()
                    result.sent = _publish_paced(client, topic, UPDATES, "Receiver faults")
                mark = result.phase("publish", mark)
                ids = [uuid.UUID(u) for u in [*result.calm_sent, *result.sent]]

                def retried_through() -> bool:
                    stack.check_alive()
                    assert stack.worker is not None
                    stack.worker.check_alive()
                    current = _delivery_statuses(ids, endpoints)
                    return (current.get("healthy", {}).get("succeeded")
                            == UPDATES + CALM_UPDATES
                            and all(current.get(name, {}).get("succeeded") == UPDATES
                                    for name in ("flaky", "late")))

                wait_until(retried_through, 40, interval=0.5,
                           message=lambda: f"deliveries: {_delivery_statuses(ids, endpoints)}"
                                           f"\n{stack.describe()}")
                mark = result.phase("converge", mark)
                # Judged while everything still runs: what is open now is really open.
                expected_hooks: dict[str, list[str]] = {u: ["/healthy"]
                                                        for u in result.calm_sent}
                expected_hooks.update({u: ["/healthy", "/flaky", "/late", "/slow"]
                                       for u in result.sent})
                result.requests = receiver.received()
                result.figures = judge.measure(
                    accepted=[*result.calm_sent, *result.sent], requests=result.requests,
                    recipients=[city.id], webhooks=expected_hooks,
                    publisher_ids=[publisher.id], since=world.started, stale_seconds=5)
            finally:
                stop_bumping.set()
                if bumper.is_alive():
                    bumper.join(5)
                stack.close()
                broker.stop()
            mark = result.phase("stop", mark)
            result.statuses = _delivery_statuses(ids, endpoints)

        with get_engine().connect() as conn:
            for name, endpoint_id in endpoints.items():
                result.attempts[name] = tuple(conn.execute(  # type: ignore[assignment]
                    sa.select(sa.func.count(), sa.func.min(Delivery.attempt_count),
                              sa.func.max(Delivery.attempt_count))
                    .where(Delivery.endpoint_id == endpoint_id)).one())
                result.errors[name] = set(conn.scalars(
                    sa.select(sa.func.substr(DeliveryAttempt.error, 1, 40)).distinct()
                    .join(Delivery).where(Delivery.endpoint_id == endpoint_id)))
            result.attempt_rows = conn.scalar(
                sa.select(sa.func.count()).select_from(DeliveryAttempt).join(Delivery)
                .where(Delivery.update_id.in_(ids))) or 0
            result.attempt_total = conn.scalar(
                sa.select(sa.func.sum(Delivery.attempt_count))
                .where(Delivery.update_id.in_(ids))) or 0
        result.seconds = time.monotonic() - began
        yield result
    finally:
        try:
            world.cleanup()
        finally:
            world.session.close()


def _round(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": round(statistics.median(ordered), 3),
            "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 3),
            "max": round(ordered[-1], 3)}


def test_bad_receivers_lose_nothing_and_retry_the_same_message(scenario: Scenario) -> None:
    figures = scenario.figures
    by_path = scenario.by_path()
    calm = scenario.latencies(dict(list(scenario.calm_sent.items())[WARM_UP:]))
    faulty = scenario.latencies(scenario.sent)
    judge.record("receivers_slow_flaky_dead_late", figures,
                 healthy_latency_calm_s=_round(calm), healthy_latency_s=_round(faulty),
                 requests_by_endpoint={p: sum(len(v) for v in by_path[p].values())
                                       for p in ("/healthy", "/slow", "/flaky", "/late")},
                 attempts_min_max={k: [v[1], v[2]] for k, v in scenario.attempts.items()},
                 statuses=scenario.statuses, scenario_seconds=round(scenario.seconds, 1),
                 phase_seconds=scenario.phases)

    # The rules: nothing lost, no phantom, duplicates only as identical retries.
    assert figures["lost"] == 0, figures
    assert figures["phantom"] == 0, figures
    assert figures["conflicting_duplicates"] == 0, figures
    assert figures["bad_signatures"] == 0 and figures["unknown_webhook_ids"] == 0, figures
    assert figures["unrouted_updates"] == 0, figures
    assert figures["failed_deliveries"] == 0, "no delivery gives up within minutes"
    assert figures["duplicate_deliveries"] >= UPDATES, "every late message came twice"

    # Healthy, flaky and late: every delivery succeeded; slow and dead: still retrying.
    statuses = scenario.statuses
    assert statuses["healthy"] == {"succeeded": UPDATES + CALM_UPDATES}, statuses
    assert statuses["flaky"] == {"succeeded": UPDATES}, statuses
    assert statuses["late"] == {"succeeded": UPDATES}, statuses
    assert statuses["dead"] == {"pending": UPDATES}, statuses
    assert statuses["slow"] == {"pending": UPDATES}, statuses

    # Healthy: sent once each. Flaky: succeeded after retries. Late: each message at least
    # twice, every repeat with the same webhook-id and body.
    assert all(len(v) == 1 for v in by_path["/healthy"].values())
    assert len(by_path["/healthy"]) == UPDATES + CALM_UPDATES
    assert scenario.attempts["flaky"][2] >= 2, scenario.attempts
    assert len(by_path["/late"]) == UPDATES
    assert min(len(v) for v in by_path["/late"].values()) >= 2
    for path in ("/late", "/slow", "/flaky"):
        for update_id, same in by_path[path].items():
            assert len({r.headers["webhook-id"] for r in same}) == 1, (path, update_id)
            assert len({r.body for r in same}) == 1, (path, update_id)

    # Dead: every delivery attempted more than once, each attempt recorded as refused.
    assert scenario.attempts["dead"][1] >= 2, scenario.attempts
    assert all(e.startswith("ConnectError") for e in scenario.errors["dead"]), scenario.errors
    assert all(e.startswith("timeout") for e in scenario.errors["slow"]), scenario.errors
    assert scenario.attempt_rows == scenario.attempt_total, "every attempt has its row"


def test_a_healthy_receiver_is_not_held_up_by_bad_ones(scenario: Scenario) -> None:
    """Sending runs on a queue and worker of its own (`deliveries`, the `sender`), and the
    sender streams: a request that hangs until its timeout holds only its own endpoint's
    slots, never routing, newer deliveries or the recording of finished ones."""
    latencies = scenario.latencies(scenario.sent)
    assert len(latencies) == UPDATES
    p50, worst = statistics.median(latencies), max(latencies)
    assert p50 < HEALTHY_P50 and worst < HEALTHY_MAX, (
        f"healthy endpoint latency p50 {p50:.2f} s, max {worst:.2f} s: "
        f"{[round(x, 2) for x in latencies]}")
