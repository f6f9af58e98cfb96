"""P2's baseline: a bare FastAPI app with one POST endpoint that stores the posted update
with one INSERT, sharing none of the product's code (no `api`, `domain`, `workers` import).

    python -m bench.bare_publish_app '<uvicorn options as JSON>'

serves it with `uvicorn.run("bench.bare_publish_app:app", **options)`: the benchmark passes
the very keyword arguments that `doorstroom api` gives `uvicorn.run`, so that both are
served the same way. The database is `BENCH_P2_DSN` (a libpq connection string); the table
`bench_p2_baseline` must exist (the benchmark creates it).

`POST /v1/updates` takes the same JSON body as the product's publish (title, summary, body,
topics; validated by a pydantic model, unknown fields refused), runs one
`INSERT … RETURNING id` on an autocommit psycopg connection (the product's driver) taken
from a small pool, and answers 202 with the new id. The handler is a plain `def`, so FastAPI
runs it in its thread pool, as it runs the product's publish.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from fastapi import FastAPI, status
from pydantic import BaseModel, ConfigDict, Field

TABLE = "bench_p2_baseline"
CREATE_TABLE = (f"CREATE TABLE {TABLE} (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), "
                "title text NOT NULL, summary text NOT NULL, body text NOT NULL, "
                "topics text[] NOT NULL, created_at timestamptz NOT NULL DEFAULT now())")
INSERT = (f"INSERT INTO {TABLE} (title, summary, body, topics) VALUES (%s, %s, %s, %s) "
          "RETURNING id")
#: As many connections at most as the product's engine may open (pool 40 + overflow 10,
#: `domain.db.POOL_SIZE` and `MAX_OVERFLOW`); 32 clients never need more than 32.
MAX_CONNECTIONS = 50


class Pool:
    """Connections kept for reuse, opened on demand up to `size`; a caller waits when all
    are out."""

    def __init__(self, dsn: str, size: int) -> None:
        self.dsn = dsn
        self.size = size
        self.idle: queue.LifoQueue[psycopg.Connection[Any]] = queue.LifoQueue()
        self.opened = 0
        self.lock = threading.Lock()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        conn = self._take()
        try:
            yield conn
        except BaseException:
            conn.close()  # never hand a connection in an unknown state to the next request
            with self.lock:
                self.opened -= 1
            raise
        self.idle.put(conn)

    def _take(self) -> psycopg.Connection[Any]:
        try:
            return self.idle.get_nowait()
        except queue.Empty:
            pass
        with self.lock:
            grow = self.opened < self.size
            if grow:
                self.opened += 1
        if not grow:
            return self.idle.get(timeout=5)
        try:
            return psycopg.connect(self.dsn, autocommit=True)
        except BaseException:
            with self.lock:
                self.opened -= 1
            raise


class UpdateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=200)
    summary: str = Field(default="", max_length=2000)
    body: str = Field(default="", max_length=100 * 1024)
    topics: list[str] = Field(min_length=1, max_length=20)


app = FastAPI(title="P2 baseline")
pool = Pool(os.environ.get("BENCH_P2_DSN", ""), MAX_CONNECTIONS)


@app.post("/v1/updates", status_code=status.HTTP_202_ACCEPTED)
def publish(update: UpdateIn) -> dict[str, str]:
    with pool.connection() as conn:
        row = conn.execute(INSERT, (update.title, update.summary, update.body,
                                    update.topics)).fetchone()
    assert row is not None
    return {"id": str(row[0])}


def main(argv: list[str]) -> None:
    import uvicorn

    options = json.loads(argv[0]) if argv else {}
    uvicorn.run("bench.bare_publish_app:app", **options)


if __name__ == "__main__":
    main(sys.argv[1:])
