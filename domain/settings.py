"""The one place that reads configuration from the environment (and a `.env` file)."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Where the embedded default keeps its SQLite file and file-broker folders.
VAR_DIR = Path(__file__).resolve().parent.parent / "var"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DOORSTROOM_", env_file=".env", extra="ignore", frozen=True
    )

    database_url: str = f"sqlite:///{VAR_DIR / 'doorstroom.sqlite3'}"
    #: `filesystem://` is kombu's file transport: a real broker that needs no server.
    broker_url: str = "filesystem://"
    broker_folder: Path = VAR_DIR / "broker"
    #: Where the scheduler keeps its last-run times (one file per running scheduler).
    beat_schedule_file: Path = VAR_DIR / "celerybeat-schedule"
    redis_url: str | None = None
    secret_key: str = "development-only-secret-key-change-me"
    smtp_url: str | None = None
    #: `DOORSTROOM_MAIL_FROM`, read from the environment (or `.env`): the From of every
    #: mail, e.g. "Doorstroom <noreply@doorstroom.example>". Unset: a `from=` in the SMTP
    #: URL, else `Doorstroom <noreply@<public URL host>>`.
    mail_from: str | None = None
    public_url: str = "http://127.0.0.1:8000"
    timezone: str = "Europe/Brussels"
    webhook_allow_loopback: bool = False
    environment: str = "development"

    #: Requests per minute for one API key; 0 switches rate limiting off.
    rate_limit_per_minute: int = 600
    #: Largest request body the API reads, in bytes (the update body itself is capped at 100 kB).
    max_request_bytes: int = 128 * 1024
    #: How long the relay waits for the broker right after a commit before leaving the row
    #: to the poller.
    relay_publish_timeout_seconds: float = 0.5
    #: A request still running after this long answers 503 (0 switches the deadline off).
    request_timeout_seconds: float = 15.0
    #: How often the outbox relay polls for rows that were not dispatched right after commit.
    outbox_poll_seconds: float = 2.0
    #: Work that has been dispatched but not finished after this long is dispatched again.
    sweeper_stale_seconds: float = 60.0
    #: Webhooks: how long one attempt may take, how many requests one endpoint gets at
    #: once, and how long an endpoint may fail without a success before it is disabled.
    webhook_timeout_seconds: float = 10.0
    webhook_per_endpoint_concurrency: int = 4
    webhook_disable_after_seconds: float = 3 * 24 * 3600
    #: How often the scheduler looks for deliveries whose retry time has come.
    delivery_poll_seconds: float = 5.0
    #: How long a sender holds the deliveries it claims. A sender that dies (SIGKILL, OOM)
    #: leaves its claims to the next one after this long; a batch stops starting requests
    #: `webhook_timeout_seconds` + 10 s before its lease would run out.
    delivery_lease_seconds: float = 120.0
    #: How often the scheduler looks for bundles whose window has closed.
    bundle_poll_seconds: float = 60.0
    #: During a secret rotation the previous secret keeps signing this long.
    webhook_secret_grace_seconds: float = 24 * 3600
    #: Fixed "now" for tests and demos (ISO 8601); unset means the real clock.
    clock: datetime | None = Field(default=None)

    #: `/metrics` is only served to clients from these addresses.
    metrics_allowed_hosts: tuple[str, ...] = ("127.0.0.1", "::1", "localhost", "testclient")

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def now(self) -> datetime:
        """The platform clock: the configured instant, or the real UTC time."""
        if self.clock is not None:
            return self.clock if self.clock.tzinfo else self.clock.replace(tzinfo=UTC)
        return datetime.now(UTC)


@lru_cache
def get_settings() -> Settings:
    return Settings()
