"""The `doorstroom` command line: set-up, processes and operator tasks."""

from __future__ import annotations

import sys
import uuid
from datetime import datetime
from typing import Annotated

import typer

app = typer.Typer(help="Doorstroom: information updates for local governments.",
                  no_args_is_help=True, add_completion=False)
org_app = typer.Typer(help="Manage organisations.", no_args_is_help=True)
key_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)
digests_app = typer.Typer(help="Daily and weekly bundles.", no_args_is_help=True)
app.add_typer(org_app, name="org")
app.add_typer(key_app, name="key")
app.add_typer(digests_app, name="digests")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@app.command()
def migrate() -> None:
    """Apply every migration to the configured database (alembic upgrade head)."""
    from domain import migrate as migrations

    migrations.upgrade()
    typer.echo("database is at the latest revision", err=True)


@app.command()
def seed() -> None:
    """Load the reference data: municipalities, provinces, bodies and topics. Idempotent."""
    from domain.db import session_scope
    from domain.seed import seed_reference_data

    with session_scope() as session:
        report = seed_reference_data(session)
    typer.echo(str(report), err=True)


@app.command()
def api(host: Annotated[str, typer.Option()] = "127.0.0.1",
        port: Annotated[int, typer.Option()] = 8000,
        workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1) -> None:
    """Serve the HTTP API with uvicorn."""
    import uvicorn

    uvicorn.run("api.app:app", host=host, port=port, workers=workers, proxy_headers=True,
                log_level="info")


@app.command()
def worker(beat: Annotated[bool, typer.Option("--beat", help="embed the scheduler")] = False,
           concurrency: Annotated[int | None, typer.Option()] = None,
           queues: Annotated[str | None, typer.Option(help="comma-separated queues")] = None,
           ) -> None:
    """Run a Celery worker (with the scheduler embedded when --beat)."""
    from workers.celery_app import celery_app

    argv = ["worker", "--loglevel=INFO", "--without-gossip", "--without-mingle"]
    if beat:
        argv.append("--beat")
        argv += _beat_schedule_args()
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    if queues:
        argv.append(f"--queues={queues}")
    celery_app.worker_main(argv)


@app.command()
def relay() -> None:
    """Run the outbox relay alone, in the foreground, until SIGTERM or Ctrl-C (the scheduler
    runs one as well; two relays never send the same row)."""
    import logging
    import signal
    import threading

    from workers.relay import relay_forever

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    typer.echo("outbox relay running", err=True)
    relay_forever(stop)


@app.command()
def beat() -> None:
    """Run the scheduler alone (compose runs it as its own service)."""
    from workers.celery_app import celery_app

    celery_app.start(["beat", "--loglevel=INFO", *_beat_schedule_args()])


def _beat_schedule_args() -> list[str]:
    from domain.settings import get_settings

    schedule = get_settings().beat_schedule_file
    schedule.parent.mkdir(parents=True, exist_ok=True)
    return [f"--schedule={schedule}"]


@org_app.command("create")
def org_create(name: Annotated[str, typer.Option()],
               level: Annotated[str, typer.Option()],
               kind: Annotated[str, typer.Option()],
               nis: Annotated[str | None, typer.Option("--nis")] = None,
               email: Annotated[str | None, typer.Option()] = None) -> None:
    """Create an organisation; prints its id alone."""
    from domain import directory
    from domain.audit import SYSTEM
    from domain.db import session_scope
    from domain.errors import DomainError
    from domain.models import Kind, Level

    try:
        fields = directory.OrganisationFields(name=name, level=Level(level), kind=Kind(kind),
                                              nis_code=nis, email=email)
    except ValueError as exc:
        _fail(str(exc))
    try:
        with session_scope() as session:
            org = directory.create_organisation(session, SYSTEM, fields)
    except DomainError as exc:
        _fail(exc.detail)
    typer.echo(str(org.id))


@key_app.command("create")
def key_create(org: Annotated[str, typer.Option("--org")],
               scope: Annotated[list[str], typer.Option("--scope")],
               name: Annotated[str | None, typer.Option()] = None) -> None:
    """Create an API key for an organisation; prints the key alone (shown only this once)."""
    from domain import keys
    from domain.audit import SYSTEM
    from domain.db import session_scope
    from domain.errors import DomainError

    try:
        org_id = uuid.UUID(org)
    except ValueError:
        _fail(f"{org!r} is not an organisation id")
    try:
        with session_scope() as session:
            issued = keys.issue_key(session, SYSTEM, org_id, scope, name)
    except DomainError as exc:
        _fail(exc.detail)
    typer.echo(issued.plaintext)


@digests_app.command("run")
def digests_run(now: Annotated[str | None, typer.Option(help="ISO 8601 instant")] = None) -> None:
    """Build and send every bundle due at --now (default: the current time). Idempotent:
    a window already built is not built again."""
    from datetime import UTC

    from domain.bundles import run_due_bundles
    from domain.db import session_scope

    at = None
    if now:
        try:
            at = datetime.fromisoformat(now)
        except ValueError:
            _fail(f"{now!r} is not an ISO 8601 time")
        assert at is not None
        at = at if at.tzinfo else at.replace(tzinfo=UTC)
    with session_scope() as session:
        report = run_due_bundles(session, at)
    typer.echo(str(report), err=True)
    from workers.relay import dispatch_after_commit

    dispatch_after_commit()


@app.command()
def demo() -> None:
    """Play the demonstration scenario and print who received what and why."""
    try:
        from cli.demo import play  # type: ignore[import-not-found]
    except ImportError:
        _fail("the demo scenario arrives with the publishing pipeline")
    play()


@app.command()
def up(host: Annotated[str, typer.Option()] = "127.0.0.1",
       port: Annotated[int, typer.Option()] = 8000) -> None:
    """Migrate, seed, start API + worker + scheduler together and play the demo (make run).

    Ctrl-C stops every process it started."""
    from cli.supervisor import run_all

    sys.exit(run_all(host, port))


if __name__ == "__main__":
    app()
