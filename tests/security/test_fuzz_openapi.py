"""Property-based fuzzing of every operation in the app's own OpenAPI document (schemathesis).

Each generated request is sent in-process (ASGI) three times, with a valid key of each scope
(admin, publish, subscribe), and, where the path takes an id, once more per key with the id of
a real object of that key's organisation; a body that names topics, organisations, groups,
endpoints or a URL goes out once more with real ones. So the 2xx answers are exercised too,
not only the 404s and 422s of random ids. (The coverage phase's many boundary cases go out
with one key that the operation accepts.) Every answer must be:
- no server error (`not_a_server_error`);
- of a documented status code (`status_code_conformance`);
- of a documented content type (`content_type_conformance`);
- valid against its documented schema (`response_schema_conformance`).

`/metrics` (Prometheus text) and `/v1/feeds/{token}` (Atom XML) are not JSON and are left out;
the feed has its own tests.

Nothing is committed: the world of real objects is built once for the module in a
transaction that is rolled back at its end, each operation's test runs in a savepoint of it
(rolled back after the test), and each request gets a session of its own (as in production)
inside a further savepoint.

The number of cases per operation comes from `SCHEMATHESIS_MAX_EXAMPLES` (default 10, and
derandomised so that `make test` is repeatable); `make fuzz` sets 500 and runs
`tests/fuzz`, which reuses this module.

Harness guards: no DNS and no address but loopback is reachable from webhook URLs (a fuzzed
endpoint URL could name any public address; nothing leaves the machine), and the rate
limiter is off (a fuzz run is one key's burst by design).
"""

from __future__ import annotations

import os
import socket
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from api.app import app
from tests.factories import bearer
from tests.security.world import World, module_world_fixtures

_DEFAULT_EXAMPLES = 10
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", _DEFAULT_EXAMPLES))
#: A run with the default count is repeatable (CI); a long run explores anew each time.
DERANDOMIZE = "SCHEMATHESIS_MAX_EXAMPLES" not in os.environ

#: Not JSON: Prometheus text and Atom XML (tested in tests/test_health.py, tests/test_feeds.py).
EXCLUDED_PATHS = ["/metrics", "/v1/feeds/{token}"]

schema = schemathesis.openapi.from_asgi("/openapi.json", app).exclude(path=EXCLUDED_PATHS)

CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
]

SCOPES = ("admin", "publish", "subscribe")


# ------------------------------------------------------------------------------- harness


def _loopback_only(ip: Any, allow_loopback: bool) -> None:
    from domain.ssrf import UnsafeTarget

    if not ip.is_loopback:
        raise UnsafeTarget(f"{ip}: the fuzz harness lets webhooks reach loopback only",
                           field="url")


def _no_dns(host: str, *_args: Any, **_kwargs: Any) -> Any:
    raise socket.gaierror(f"no DNS in the fuzz harness (asked for {host!r})")


@dataclass
class FuzzWorld:
    world: World
    #: scope -> key
    keys: dict[str, str]
    #: scope -> path parameter name -> a real value belonging to that key's organisation
    real: dict[str, dict[str, str]]
    #: operation -> a scope it does not refuse
    competent: dict[str, str] = field(default_factory=dict)


def _real_ids(world: World) -> dict[str, dict[str, str]]:
    """Real path values for each scope's organisation. Shared directory objects (topics,
    groups, organisations, rules) are the same for all."""
    a = world.a
    shared = {"group_id": str(world.group_id), "slug": world.topic,
              "rule_id": str(world.rule_id), "organisation_id": a.id,
              "key_id": str(a.spare_key_id)}
    tenant = {"subscription_id": str(a.subscription_id), "endpoint_id": str(a.endpoint_id),
              "delivery_id": str(a.delivery_ids[0]), "bundle_id": str(a.bundle_id),
              "token": a.unsubscribe_token}
    return {
        "admin": {**shared, **tenant, "update_id": str(a.received_update_id)},
        "publish": {**shared, **tenant, "update_id": str(a.own_update_id)},
        "subscribe": {**shared, **tenant, "update_id": str(a.restricted_update_id)},
    }


#: The world is built once for the module; each operation's test runs in a savepoint of it.
world_connection, module_world, db_session, world = module_world_fixtures(tenants=("a",))


@pytest.fixture
def fuzz_world(db_session, world, monkeypatch) -> Iterator[FuzzWorld]:
    from sqlalchemy.orm import Session

    from api import ratelimit
    from api.deps import get_session
    from domain import ssrf
    from domain.settings import get_settings

    a = world.a
    keys = {"admin": world.admin_key, "publish": a.keys["publish"],
            "subscribe": a.keys["subscribe"]}

    connection = db_session.get_bind()

    def per_request_session() -> Iterator[Session]:
        session = Session(bind=connection, join_transaction_mode="create_savepoint",
                          expire_on_commit=False)
        try:
            yield session
        finally:
            session.close()

    unlimited = get_settings().model_copy(update={"rate_limit_per_minute": 0})
    monkeypatch.setattr(ratelimit, "get_settings", lambda: unlimited)
    monkeypatch.setattr(ssrf, "check_address", _loopback_only)
    monkeypatch.setattr(ssrf, "socket", types.SimpleNamespace(
        getaddrinfo=_no_dns, inet_aton=socket.inet_aton, SOCK_STREAM=socket.SOCK_STREAM))
    app.dependency_overrides[get_session] = per_request_session
    try:
        yield FuzzWorld(world=world, keys=keys, real=_real_ids(world))
    finally:
        app.dependency_overrides.pop(get_session, None)


def _realistic(value: Any, fuzz: FuzzWorld, key: str | None = None) -> Any:
    """The body with references replaced by real ones (generated slugs and ids name nothing,
    so without this almost every create would stop at 422 'unknown topic')."""
    world = fuzz.world
    references: dict[str, Any] = {
        "topics": [world.topic], "publishers": [str(world.publisher.id)],
        "organisations": [world.a.id], "members": [world.a.id],
        "groups": [str(world.group_id)], "provinces": [],
        "endpoint_id": str(world.a.endpoint_id), "supersedes": None, "parent_id": None,
        "parent": None, "publisher_id": None, "url": "http://127.0.0.1:9/fuzz",
        "publish_at": None, "expires_at": None,
    }
    if isinstance(value, dict):
        return {k: _realistic(v, fuzz, k) for k, v in value.items()}
    if key in references and isinstance(value, list | str | type(None)):
        return references[key]
    return value


def _is_coverage_case(case: Any) -> bool:
    meta = getattr(case, "_meta", None)
    return meta is not None and str(meta.phase.name) == "coverage"


def _send(case: Any, fuzz: FuzzWorld, scope: str, path_parameters: dict[str, Any]) -> int:
    if path_parameters:
        case.path_parameters = dict(path_parameters)
    response = case.call(headers=bearer(fuzz.keys[scope]))
    case.validate_response(response, checks=CHECKS)
    return response.status_code


def send_and_check(case: Any, fuzz: FuzzWorld) -> None:
    """Send the generated case with each scope's key, and again with real ids where the path
    takes any, and with real references in the body where it names any.

    The coverage phase's many boundary cases (hundreds for a large body) go out once: with
    the first scope the operation does not refuse (403, found once per operation) and real
    ids, so that they reach the handler rather than stop at 404."""
    generated = dict(case.path_parameters or {})
    label = case.operation.label
    try:
        if _is_coverage_case(case) and label in fuzz.competent:
            scope = fuzz.competent[label]
            _send(case, fuzz, scope, {**generated, **_real_for(fuzz, scope, generated)})
            return
        for scope in SCOPES:
            real = _real_for(fuzz, scope, generated)
            status = _send(case, fuzz, scope, generated)
            if real:
                status = _send(case, fuzz, scope, {**generated, **real})
            if status != 403:
                fuzz.competent.setdefault(label, scope)
        body = case.body
        realistic = _realistic(body, fuzz) if isinstance(body, dict) else body
        if realistic != body:
            case.body = realistic
            try:
                for scope in ((fuzz.competent[label],) if label in fuzz.competent else SCOPES):
                    _send(case, fuzz, scope, {**generated, **_real_for(fuzz, scope, generated)})
            finally:
                case.body = body
    finally:
        if generated:
            case.path_parameters = generated


def _real_for(fuzz: FuzzWorld, scope: str, generated: dict[str, Any]) -> dict[str, str]:
    return {name: fuzz.real[scope][name] for name in generated if name in fuzz.real[scope]}


FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    derandomize=DERANDOMIZE,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)


@schema.parametrize()
@FUZZ_SETTINGS
def test_every_operation_answers_within_its_documented_contract(case, fuzz_world):
    send_and_check(case, fuzz_world)
