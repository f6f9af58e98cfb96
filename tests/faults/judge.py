"""The judge of a fault test: what was promised against what happened.

A fault test publishes updates through the real API (some answered 202, some perhaps
refused), injects a fault, lets the system recover and then asks the judge:

    figures = judge.settle(accepted=ids, refused=refused, requests=receiver.received(),
                           recipients=[org.id for org in subscribers],
                           webhooks=["/hook"], since=started, timeout=30)
    judge.record("worker-sigkill-mid-routing", figures)

The rules (`judge.judge` asserts them; `judge.measure` only counts):

- no loss: every accepted update routed (`routed_at` set) to every expected recipient (an
  inbox item exists), and every expected webhook received at least once;
- no phantom: nothing routed, stored or sent for a publish that was refused or rolled back
  (refused ids and titles; with `publisher_ids`, any update of those publishers that is not
  accepted), and no webhook request for an update that was not accepted;
- duplicates only as retries: two requests for the same update to the same endpoint carry
  the same `webhook-id` and a byte-identical body (`duplicate_deliveries` counts the extra
  requests); a different id or body is a `conflicting_duplicate` and must never happen;
- nothing stuck: once settled, no pending delivery of an accepted update and no outbox row
  (created since the test began) that is undispatched or uncompleted for longer than the
  sweeper period.

Figures (`measure` answers them all; `record` writes all but `_examples`):

- published: accepted updates; refused: refused publishes;
- delivered: expected webhooks received at least once (an (update, endpoint key) or
  (update, subscription) pair); inbox_items / expected_inbox_items: routing's share;
- lost = lost_routing (expected inbox items missing) + lost_webhooks (expected webhooks
  never received);
- phantom: refused or unknown updates that were routed, stored or pushed;
- duplicate_deliveries: extra requests repeating a message (same webhook-id and body);
- conflicting_duplicates: units pushed under different webhook-ids or bodies (must be 0);
- pending/stuck_deliveries, open/stuck_outbox_rows, unrouted_updates, failed_deliveries,
  bad_signatures, unparsed_events, unknown_webhook_ids: what did not finish or add up.

Stable API (other fault tests import it): `measure`, `judge`, `settle`, `record`,
`read_metrics`, `metric`, `JudgeError`, `RESULTS`.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[2]
#: One JSON line per judged test, for docs/reliability.md.
RESULTS = ROOT / "var" / "reliability" / "results.jsonl"

#: The figures every result carries (more detail keys may follow).
FIGURE_KEYS = ("published", "refused", "delivered", "lost", "phantom", "duplicate_deliveries",
               "conflicting_duplicates")

UPDATE_EVENT_PREFIX = "be.doorstroom.update."

Ids = Iterable[str | uuid.UUID]
#: Expected recipients (organisation ids) or webhooks (receiver paths): one collection for
#: every accepted update, or a mapping update id -> collection.
PerUpdate = Iterable[Any] | Mapping[Any, Iterable[Any]]


class JudgeError(AssertionError):
    """A rule was broken; the message carries the figures and the first offenders."""


# ----------------------------------------------------------------------------- helpers


def _uuid(value: Any) -> uuid.UUID | None:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except (ValueError, TypeError, AttributeError):
        return None


def _per_update(spec: PerUpdate | None, accepted: list[uuid.UUID],
                convert: Callable[[Any], Any]) -> dict[uuid.UUID, set[Any]]:
    if spec is None:
        return {u: set() for u in accepted}
    if isinstance(spec, Mapping):
        by_update = {_uuid(k): {convert(v) for v in values} for k, values in spec.items()}
        return {u: by_update.get(u, set()) for u in accepted}
    common = {convert(v) for v in spec}
    return {u: set(common) for u in accepted}


def _request_items(requests: Any) -> list[tuple[str, Any]]:
    """(endpoint key, request): the key is the path, or "label:path" when `requests` is a
    mapping label -> requests (several receivers)."""
    if requests is None:
        return []
    if isinstance(requests, Mapping):
        return [(f"{label}:{r.path.split('?', 1)[0]}", r)
                for label, items in requests.items() for r in items]
    return [(r.path.split("?", 1)[0], r) for r in requests]


def _event_of(request: Any) -> tuple[str | None, uuid.UUID | None]:
    """(event type, update id) of a recorded request, from its body (parsed by hand, so that a
    request the receiver could not parse as a CloudEvent still counts)."""
    try:
        body = json.loads(request.body)
    except (ValueError, TypeError):
        return None, None
    if not isinstance(body, dict):
        return None, None
    data: Any = body.get("data")
    update: Any = data.get("update") if isinstance(data, dict) else None
    if not isinstance(update, dict):
        update = {}
    return body.get("type"), _uuid(update.get("id"))


def _default_session_factory() -> AbstractContextManager[Any]:
    from domain.db import session_scope

    return session_scope()


# ----------------------------------------------------------------------------- measuring


def measure(*, accepted: Ids, refused: Iterable[str] = (), requests: Any = None,
            recipients: PerUpdate | None = None, webhooks: PerUpdate | None = None,
            publisher_ids: Ids = (), ignore: Ids = (), since: datetime | None = None,
            stale_seconds: float = 5.0,
            session_factory: Callable[[], AbstractContextManager[Any]] | None = None,
            now: datetime | None = None) -> dict[str, Any]:
    """Count everything the rules look at; assert nothing.

    accepted: ids of updates whose publish was answered 202.
    refused: ids or titles of publishes that were refused (or rolled back).
    requests: a receiver's recorded requests (`Receiver.received()`), or a mapping
      label -> requests for several receivers (endpoint keys are then "label:path").
    recipients: organisation ids each accepted update must reach (or update id -> ids).
    webhooks: what each accepted update must be pushed to: endpoint keys (receiver paths,
      "label:path" with several receivers) and/or webhook subscription ids (received when a
      request's webhook-id names a delivery of that subscription).
    publisher_ids: publishers whose every update that is not accepted is a phantom suspect.
    ignore: update ids whose fate is unknown (e.g. a client timeout): neither counted as
      accepted nor as phantom.
    since: when the test began; outbox rows created before it are not judged.
    stale_seconds: the sweeper period of the processes under test.
    """
    from domain.models import Delivery, DeliveryStatus, InboxItem, OutboxMessage, Update

    accepted_ids = list(dict.fromkeys(u for u in (_uuid(a) for a in accepted) if u))
    accepted_set = set(accepted_ids)
    ignored = {u for u in (_uuid(i) for i in ignore) if u}
    refused_list = [str(r) for r in refused]
    refused_ids = {u for u in (_uuid(r) for r in refused_list) if u}
    refused_titles = {r for r in refused_list if _uuid(r) is None}
    publishers = [u for u in (_uuid(p) for p in publisher_ids) if u]
    expected_orgs = _per_update(recipients, accepted_ids, lambda v: _uuid(v))
    expected_hooks = _per_update(webhooks, accepted_ids, str)
    factory = session_factory or _default_session_factory
    now = now or datetime.now(UTC)
    stale = timedelta(seconds=stale_seconds)

    with factory() as session:
        # -- routing of accepted updates
        routed_pairs: set[tuple[uuid.UUID, uuid.UUID]] = set()
        unrouted: list[str] = []
        if accepted_ids:
            for chunk_start in range(0, len(accepted_ids), 500):
                chunk = accepted_ids[chunk_start:chunk_start + 500]
                # All items of these updates (a few hundred thousand rows at most): cheaper
                # than sending a long list of expected organisations.
                rows = session.execute(
                    sa.select(InboxItem.update_id, InboxItem.organisation_id)
                    .where(InboxItem.update_id.in_(chunk))).all()
                routed_pairs.update((u, o) for u, o in rows)
                unrouted += [str(u) for u in session.scalars(
                    sa.select(Update.id).where(Update.id.in_(chunk),
                                               Update.routed_at.is_(None)))]
                missing_rows = set(chunk) - set(session.scalars(
                    sa.select(Update.id).where(Update.id.in_(chunk))))
                unrouted += [f"{u} (no such update)" for u in missing_rows]
        expected_pairs = {(u, o) for u in accepted_ids for o in expected_orgs[u]}
        lost_routing = sorted(expected_pairs - routed_pairs, key=str)

        # -- phantoms in the database
        suspects: set[uuid.UUID] = set(refused_ids)
        if refused_titles:
            stmt = sa.select(Update.id).where(Update.title.in_(refused_titles))
            suspects.update(session.scalars(stmt))
        if publishers:
            suspects.update(session.scalars(
                sa.select(Update.id).where(Update.publisher_id.in_(publishers))))
        suspects -= accepted_set | ignored
        phantom_db: dict[str, str] = {}
        if suspects:
            existing = dict(session.execute(sa.select(Update.id, Update.title)
                                            .where(Update.id.in_(suspects))).all())
            with_items = set(session.scalars(sa.select(InboxItem.update_id).distinct()
                                             .where(InboxItem.update_id.in_(suspects))))
            with_deliveries = set(session.scalars(
                sa.select(Delivery.update_id).distinct().where(Delivery.update_id.in_(suspects))))
            for u in suspects:
                why = []
                if u in with_items:
                    why.append("routed to inboxes")
                if u in with_deliveries:
                    why.append("has push deliveries")
                if u in existing and (u in refused_ids or existing[u] in refused_titles):
                    why.append("committed although the publish was refused")
                if why:
                    phantom_db[str(u)] = ", ".join(why)

        # -- deliveries and outbox rows that did not finish
        pending = []
        if accepted_ids:
            pending = [(str(d.id), d.status.value if hasattr(d.status, "value") else d.status,
                        d.created_at, d.leased_until, d.attempt_count)
                       for d in session.scalars(
                           sa.select(Delivery).where(
                               Delivery.update_id.in_(accepted_ids),
                               Delivery.status == DeliveryStatus.pending))]
        stuck_deliveries = [p for p in pending if p[2] < now - stale]
        failed_deliveries = session.scalar(
            sa.select(sa.func.count()).select_from(Delivery).where(
                Delivery.update_id.in_(accepted_ids or [uuid.uuid4()]),
                Delivery.status == DeliveryStatus.failed)) or 0
        outbox_filter = [OutboxMessage.completed_at.is_(None)]
        scope = []
        if since is not None:
            scope.append(OutboxMessage.created_at >= since)
        if accepted_ids:
            scope.append(OutboxMessage.args["update_id"].as_string()
                         .in_([str(u) for u in accepted_ids]))
        open_rows = list(session.scalars(
            sa.select(OutboxMessage).where(*outbox_filter, sa.or_(*scope))
            .order_by(OutboxMessage.id))) if scope else []
        stuck_outbox = [
            {"id": r.id, "task": r.task, "args": r.args, "created_at": r.created_at.isoformat(),
             "dispatched_at": r.dispatched_at.isoformat() if r.dispatched_at else None,
             "dispatch_count": r.dispatch_count}
            for r in open_rows
            if r.available_at <= now - stale
            and (r.dispatched_at is None or r.dispatched_at <= now - stale)]
        seen_ids = sorted({str(r.headers.get("webhook-id"))
                           for _key, r in _request_items(requests)})
        message_ids: dict[str, tuple[uuid.UUID | None, uuid.UUID | None]] = {}
        for chunk_start in range(0, len(seen_ids), 1000):
            message_ids.update(
                (m, (u, sub)) for m, u, sub in session.execute(
                    sa.select(Delivery.message_id, Delivery.update_id, Delivery.subscription_id)
                    .where(Delivery.message_id.in_(seen_ids[chunk_start:chunk_start + 1000]))))

    # -- webhook requests: one unit per (endpoint key, update, event type, subscription); the
    # subscription comes from the delivery the webhook-id names, so several subscriptions
    # pushing the same update to one endpoint are told apart.
    units: dict[tuple[str, uuid.UUID, str, uuid.UUID | None], list[Any]] = defaultdict(list)
    phantom_hooks: list[str] = []
    foreign_ids: list[str] = []
    bad_signatures = 0
    unparsed = 0
    requests_seen = 0
    for key, request in _request_items(requests):
        event_type, update_id = _event_of(request)
        if not event_type or not str(event_type).startswith(UPDATE_EVENT_PREFIX):
            continue  # pings and bundles are not judged here
        requests_seen += 1
        if getattr(request, "event_error", None):
            unparsed += 1
        if (getattr(request, "verify_error", None) or getattr(request, "verified_with", None)) \
                and not request.verified:
            bad_signatures += 1
        if update_id is None or update_id in ignored:
            continue
        if update_id not in accepted_set:
            phantom_hooks.append(f"{key} {event_type} {update_id}")
            continue
        message_id = str(request.headers.get("webhook-id"))
        delivery_update, subscription = message_ids.get(message_id, (None, None))
        if delivery_update != update_id:
            foreign_ids.append(f"{key} {message_id} for {update_id}")
        units[(key, update_id, str(event_type), subscription)].append(request)
    duplicate_deliveries = 0
    conflicting: list[str] = []
    for (key, update_id, event_type, subscription), same in units.items():
        ids = {r.headers.get("webhook-id") for r in same}
        bodies = {bytes(r.body) for r in same}
        if len(ids) > 1 or len(bodies) > 1:
            conflicting.append(f"{key} {event_type} {update_id} subscription {subscription}: "
                               f"{len(same)} requests, {len(ids)} webhook-ids, "
                               f"{len(bodies)} bodies")
        else:
            duplicate_deliveries += len(same) - 1
    delivered_units: set[tuple[uuid.UUID, str]] = set()
    for key, update_id, _event_type, subscription in units:
        delivered_units.add((update_id, key))
        if subscription is not None:
            delivered_units.add((update_id, str(subscription)))
    expected_webhook_pairs = {(u, k) for u in accepted_ids for k in expected_hooks[u]}
    lost_webhooks = sorted(expected_webhook_pairs - delivered_units, key=str)

    routed_count = len(expected_pairs & routed_pairs)
    delivered = len(expected_webhook_pairs & delivered_units)
    phantom = len(phantom_db) + len(phantom_hooks)
    return {
        "published": len(accepted_ids),
        "refused": len(refused_list),
        "delivered": delivered,
        "lost": len(lost_routing) + len(lost_webhooks),
        "phantom": phantom,
        "duplicate_deliveries": duplicate_deliveries,
        "conflicting_duplicates": len(conflicting),
        # detail
        "expected_inbox_items": len(expected_pairs),
        "inbox_items": routed_count,
        "unexpected_inbox_items": len(routed_pairs - expected_pairs) if recipients is not None
        else 0,
        "expected_webhooks": len(expected_webhook_pairs),
        "webhook_requests": requests_seen,
        "lost_routing": len(lost_routing),
        "lost_webhooks": len(lost_webhooks),
        "unrouted_updates": len(unrouted),
        "pending_deliveries": len(pending),
        "stuck_deliveries": len(stuck_deliveries),
        "failed_deliveries": int(failed_deliveries),
        "open_outbox_rows": len(open_rows),
        "stuck_outbox_rows": len(stuck_outbox),
        "bad_signatures": bad_signatures,
        "unparsed_events": unparsed,
        "unknown_webhook_ids": len(foreign_ids),
        "_examples": {
            "lost_routing": [f"{u} -> {o}" for u, o in lost_routing[:5]],
            "lost_webhooks": [f"{u} -> {k}" for u, k in lost_webhooks[:5]],
            "unrouted": unrouted[:5],
            "phantom": (list(phantom_db.items()) + phantom_hooks)[:5],
            "conflicting": conflicting[:5],
            "stuck_deliveries": [str(p) for p in stuck_deliveries[:5]],
            "stuck_outbox": stuck_outbox[:5],
            "unknown_webhook_ids": foreign_ids[:5],
        },
    }


def problems(figures: Mapping[str, Any], *, allow_duplicates: bool = True) -> list[str]:
    """The rules the figures break (empty when all hold)."""
    broken = []
    if figures["lost"]:
        broken.append(f"lost {figures['lost']} (routing {figures['lost_routing']}, "
                      f"webhooks {figures['lost_webhooks']})")
    if figures["unrouted_updates"]:
        broken.append(f"{figures['unrouted_updates']} accepted updates never routed")
    if figures["phantom"]:
        broken.append(f"{figures['phantom']} phantom(s)")
    if figures["conflicting_duplicates"]:
        broken.append(f"{figures['conflicting_duplicates']} conflicting duplicates")
    if not allow_duplicates and figures["duplicate_deliveries"]:
        broken.append(f"{figures['duplicate_deliveries']} duplicate deliveries (none allowed)")
    if figures["stuck_deliveries"]:
        broken.append(f"{figures['stuck_deliveries']} deliveries stuck pending")
    if figures["stuck_outbox_rows"]:
        broken.append(f"{figures['stuck_outbox_rows']} outbox rows stuck")
    if figures["bad_signatures"]:
        broken.append(f"{figures['bad_signatures']} requests with a bad signature")
    if figures["unknown_webhook_ids"]:
        broken.append(f"{figures['unknown_webhook_ids']} webhook-ids of another update")
    return broken


def judge(*, allow_duplicates: bool = True, **kwargs: Any) -> dict[str, Any]:
    """`measure(**kwargs)` and assert every rule; answers the figures. `allow_duplicates=False`
    also forbids retries of the same message (a graceful shutdown must not cause any)."""
    figures = measure(**kwargs)
    broken = problems(figures, allow_duplicates=allow_duplicates)
    if broken:
        raise JudgeError("; ".join(broken) + "\n" + json.dumps(figures, indent=1, default=str))
    return figures


def settle(*, timeout: float = 30.0, interval: float = 0.5, quiet: float = 1.0,
           allow_duplicates: bool = True, on_wait: Callable[[], None] | None = None,
           requests: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Wait (bounded by `timeout`) until nothing is lost, no delivery is pending and no
    outbox row is open past the sweeper period, then `quiet` seconds more (for late
    duplicates), and judge: whatever is still lost or stuck by then fails. `requests` may
    be a callable answering the requests (e.g. `receiver.received`) so each look sees the
    latest; `on_wait` is called on every look (e.g. `worker.check_alive`)."""
    def current() -> Any:
        return requests() if callable(requests) else requests

    deadline = time.monotonic() + timeout
    figures: dict[str, Any] = {}
    while True:
        if on_wait is not None:
            on_wait()
        figures = measure(requests=current(), **kwargs)
        # Rows older than the sweeper period may still be in a backlog the restarted worker
        # is working through: settled means none is left, not none at this instant.
        settled = (not figures["lost"] and not figures["unrouted_updates"]
                   and not figures["pending_deliveries"]
                   and not figures["stuck_outbox_rows"])
        if settled or time.monotonic() >= deadline:
            break
        time.sleep(interval)
    if quiet:
        time.sleep(quiet)
    figures = judge(allow_duplicates=allow_duplicates, requests=current(), **kwargs)
    return figures


# ----------------------------------------------------------------------------- results


def record(name: str, figures: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """Append one JSON line {"test", "at", figures..., extra...} to var/reliability/
    results.jsonl (for docs/reliability.md). Answers the line written."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    line = {"test": name, "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "pid": os.getpid(),
            **{k: v for k, v in figures.items() if not k.startswith("_")}, **extra}
    with RESULTS.open("a", encoding="utf-8") as out:
        out.write(json.dumps(line, default=str, sort_keys=False) + "\n")
    return line


# ----------------------------------------------------------------------------- metrics


def read_metrics(base_url: str, timeout: float = 5.0) -> dict[tuple[str, tuple[tuple[str, str],
                                                                            ...]], float]:
    """Scrape `/metrics` of a running API: {(name, sorted labels): value}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{base_url.rstrip('/')}/metrics", timeout=timeout)
    response.raise_for_status()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def metric(samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           default: float | None = 0.0, **labels: str) -> float | None:
    """One sample's value by name and (exact) labels; `default` when absent."""
    return samples.get((name, tuple(sorted(labels.items()))), default)
