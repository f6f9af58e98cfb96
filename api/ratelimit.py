"""Per-key rate limits in Redis: a fixed one-minute window per key.

Fails open: when Redis is unreachable the request goes through (publishing must keep
working during a Redis outage; the limit protects capacity, not secrecy).
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache

import redis

from domain.settings import get_settings

log = logging.getLogger("doorstroom.ratelimit")
WINDOW_SECONDS = 60


class RateLimited(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"rate limit exceeded; retry after {retry_after} s")
        self.retry_after = retry_after


@lru_cache
def _client() -> redis.Redis | None:
    url = get_settings().redis_url
    if not url:
        return None
    # Short timeouts: a hung Redis must not hold requests up for long.
    return redis.Redis.from_url(url, socket_timeout=0.2, socket_connect_timeout=0.2)


def rate_limiting() -> bool:
    """Whether requests are counted (a Redis URL and a limit are configured)."""
    return get_settings().rate_limit_per_minute > 0 and _client() is not None


def enforce_rate_limit(key_id: str) -> None:
    limit = get_settings().rate_limit_per_minute
    client = _client()
    if client is None or limit <= 0:
        return
    now = time.time()
    window = int(now // WINDOW_SECONDS)
    bucket = f"doorstroom:ratelimit:{key_id}:{window}"
    try:
        pipe = client.pipeline(transaction=False)
        pipe.incr(bucket)
        pipe.expire(bucket, WINDOW_SECONDS * 2)
        count, _ = pipe.execute()
    except redis.RedisError as exc:
        log.warning("rate limiter unavailable, letting the request through: %s",
                    type(exc).__name__)
        return
    if int(count) > limit:
        raise RateLimited(max(1, int((window + 1) * WINDOW_SECONDS - now) + 1))
