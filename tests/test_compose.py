"""The production shape (compose.yaml, Dockerfile) stays valid and in step with the CLI.

No Docker engine is needed: the Compose file is checked against the Compose specification's
JSON schema (kept in tests/schemas/), and every command it or the image runs is resolved
against the real `doorstroom` click tree, so renaming a command or option breaks this test
rather than a deployment.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import typer
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = Path(__file__).resolve().parent / "schemas" / "compose-spec.json"

REQUIRED_SERVICES = {"postgres", "redis", "migrate", "api", "worker", "sender", "beat"}
# Anything in an environment whose name says it is a secret.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|(^|_)KEY$")
# A required variable: Compose refuses to start without it, so there is no default to leak.
REQUIRED_VAR = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:\?[^}]*\}")
# The password part of a URL's user info (scheme://user:password@host).
URL_PASSWORD = re.compile(r"://[^:/@\s]+:(?P<password>[^@\s]+)@")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def is_one_off(service: dict[str, Any]) -> bool:
    """A job that runs to completion (migrate, seed): it is never 'healthy', only done."""
    return str(service.get("restart", "no")) == "no"


def app_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in services.items()
        if isinstance(service.get("command"), list) and service["command"][:1] == ["doorstroom"]
    }


def resolve_cli(argv: list[str]) -> Any:
    """The click command that `argv` would run; raises click's UsageError if it would not parse.

    Nothing is invoked: groups only route to a sub-command, and the leaf command parses its
    options (unknown options, missing values and bad types fail here). Duck-typed rather than
    isinstance(click.Group): recent typer releases bring their own copy of click.
    """
    from cli.main import app

    assert argv[0] == "doorstroom", argv
    command = typer.main.get_command(app)
    name, args = "doorstroom", list(argv[1:])
    ctx = None
    while hasattr(command, "resolve_command"):
        # Resilient: a group's own no-args help must not fire while we only route.
        ctx = command.make_context(name, [], parent=ctx, resilient_parsing=True)
        sub_name, sub, args = command.resolve_command(ctx, args)
        if sub is None or sub_name is None:  # resilient parsing returns None, not an error
            ctx.fail(f"no such command in {argv}")
        command, name = sub, sub_name
    command.make_context(name, args, parent=ctx)
    return command


def is_usage_error(error: BaseException) -> bool:
    return any(cls.__name__ == "UsageError" for cls in type(error).__mro__)


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(compose), key=lambda e: e.json_path)
    assert not errors, "\n".join(f"{e.json_path}: {e.message}" for e in errors)
    # The Compose specification dropped `version:`; current Compose warns about it.
    assert "version" not in compose


def test_the_production_services_are_all_there(services: dict[str, dict[str, Any]]) -> None:
    assert services.keys() >= REQUIRED_SERVICES


def test_every_long_running_service_has_a_healthcheck(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        if is_one_off(service):
            continue
        healthcheck = service.get("healthcheck") or {}
        assert healthcheck.get("test") and not healthcheck.get("disable"), name
    assert not is_one_off(services["api"]) and is_one_off(services["migrate"])


def test_app_services_start_after_migration_on_healthy_backends(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in app_services(services).items():
        if is_one_off(service):
            continue
        depends_on = service["depends_on"]
        assert depends_on["migrate"]["condition"] == "service_completed_successfully", name
        assert depends_on["postgres"]["condition"] == "service_healthy", name
        assert depends_on["redis"]["condition"] == "service_healthy", name


def test_secrets_come_from_required_variables(compose: dict[str, Any]) -> None:
    environments = [service.get("environment") or {} for service in compose["services"].values()]
    environments += [value for key, value in compose.items() if key.startswith("x-")]
    checked = 0
    for environment in environments:
        if not isinstance(environment, dict):
            continue
        for key, value in environment.items():
            value = str(value)
            if SECRET_NAME.search(key):
                assert REQUIRED_VAR.fullmatch(value), f"{key} must be ${{VAR:?message}}"
                checked += 1
            if match := URL_PASSWORD.search(value):
                assert REQUIRED_VAR.fullmatch(match["password"]), f"password in {key}"
                checked += 1
    assert checked, "no secret found to check: did the environment move?"


def test_every_app_command_is_a_real_doorstroom_command(
    services: dict[str, dict[str, Any]],
) -> None:
    commands = app_services(services)
    assert commands.keys() >= {"migrate", "api", "worker", "sender", "beat"}
    for name, service in commands.items():
        resolved = resolve_cli(service["command"])
        assert resolved.name == service["command"][1], name


@pytest.mark.parametrize("name", ["worker", "sender"])
def test_the_worker_healthcheck_names_the_real_celery_app(
    services: dict[str, dict[str, Any]], name: str,
) -> None:
    test = " ".join(services[name]["healthcheck"]["test"])
    match = re.search(r"-A\s+(?P<module>[\w.]+)(:(?P<attr>\w+))?", test)
    assert match, test
    assert importlib.util.find_spec(match["module"]) is not None, match["module"]
    if match["attr"]:
        # Importing it builds the Celery app without connecting to the broker.
        module = importlib.import_module(match["module"])
        assert hasattr(module, match["attr"]), match["attr"]


def test_routing_and_sending_run_in_workers_of_their_own(
    services: dict[str, dict[str, Any]],
) -> None:
    """Slow receivers must not hold up routing: the worker takes the default queue only, the
    sender the deliveries queue, and together they take every queue the tasks are routed to."""
    from workers.celery_app import DEFAULT_QUEUE, DELIVERIES_QUEUE, DELIVERY_TASKS, celery_app

    def queues(service: dict[str, Any]) -> set[str]:
        command = service["command"]
        return set(command[command.index("--queues") + 1].split(","))

    assert queues(services["worker"]) == {DEFAULT_QUEUE}
    assert queues(services["sender"]) == {DELIVERIES_QUEUE}
    celery_app.loader.import_default_modules()  # the task modules, as a worker does
    router = celery_app.amqp.router
    routed = {name: router.route({}, name)["queue"].name for name in celery_app.tasks
              if not name.startswith("celery.")}
    assert {routed[name] for name in DELIVERY_TASKS} == {DELIVERIES_QUEUE}
    assert {q for name, q in routed.items() if name not in DELIVERY_TASKS} == {DEFAULT_QUEUE}


def test_the_image_runs_a_real_doorstroom_command() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmds = re.findall(r"^CMD\s+(.+)$", dockerfile, flags=re.MULTILINE)
    assert cmds, "the Dockerfile has no CMD"
    # Exec form (a JSON array): signals reach the app directly, not through /bin/sh.
    argv = json.loads(cmds[-1])
    assert resolve_cli(argv).name == "api"


def test_resolve_cli_rejects_what_the_cli_would_reject() -> None:
    for argv in (["doorstroom", "no-such-command"], ["doorstroom", "api", "--no-such-option"]):
        with pytest.raises(Exception) as caught:
            resolve_cli(argv)
        assert is_usage_error(caught.value), argv
