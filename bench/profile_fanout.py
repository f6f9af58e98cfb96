"""Profile P1's routing statement: `python -m bench.profile_fanout [--variant FILE.sql]`.

Works on the database a full `python -m bench.run` leaves behind (`doorstroom_bench`, with
its largest N loaded). Publishes one update, routes it once with the real `route_update`
while capturing the INSERT it sends, empties `inbox_items`, and then runs
`EXPLAIN (ANALYZE, BUFFERS)` on that exact statement (and parameters) in a transaction that
is rolled back (as are `--set` and `--before`). Each `--variant` file holds an alternative
SQL text using the same parameters (`%(name)s`), explained the same way, for comparison;
`inbox_items` is emptied and vacuumed before each EXPLAIN.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.common import BENCH_DB, database_url


def reset(engine: sa.engine.Engine) -> None:
    from bench.fanout import FanoutBench

    FanoutBench(engine, print).reset()


def capture_routing_statement(engine: sa.engine.Engine) -> tuple[str, dict[str, Any]]:
    from sqlalchemy.orm import Session

    from bench.fanout import FanoutBench
    from domain import routing

    bench = FanoutBench(engine, print)
    with engine.connect() as conn:
        bench.publisher_id = conn.exec_driver_sql(
            "SELECT id FROM organisations WHERE name = 'Benchmark publisher'").scalar_one()
    update_id, _ = bench.publish()
    captured: list[tuple[str, dict[str, Any]]] = []
    # On PostgreSQL routing runs its writes on the driver's cursor (`_write`), past
    # SQLAlchemy's execution events: its one door to the driver is wrapped instead.
    execute = routing.execute_in_transaction

    def capture(connection: Any, statement: Any, values: Any) -> int:
        if statement.sql.lstrip().upper().startswith("INSERT INTO INBOX_ITEMS"):
            captured.append((statement.sql, statement.parameters(values)))
        return execute(connection, statement, values)

    routing.execute_in_transaction = capture  # type: ignore[assignment]
    try:
        bench.reset()
        with Session(engine) as session:
            routing.route_update(session, update_id)
    finally:
        routing.execute_in_transaction = execute  # type: ignore[assignment]
    bench.reset()
    assert len(captured) == 1, captured
    return captured[0]


def explain(engine: sa.engine.Engine, sql: str, params: dict[str, Any],
            settings: list[str], before: list[str]) -> str:
    reset(engine)
    with engine.connect() as conn:
        for setting in settings:
            conn.exec_driver_sql(f"SET LOCAL {setting}")
        for statement in before:
            conn.exec_driver_sql(statement)
        rows = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS, VERBOSE, SETTINGS) " + sql,
                                    params).scalars().all()
        conn.rollback()
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_fanout")
    parser.add_argument("--variant", action="append", default=[], type=Path,
                        help="a file with an alternative statement (same %%(name)s parameters)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a SET LOCAL before each EXPLAIN, e.g. work_mem=256MB")
    parser.add_argument("--before", action="append", default=[], metavar="SQL",
                        help="a statement to run first in the same rolled-back transaction, "
                             "e.g. 'ALTER TABLE inbox_items DROP CONSTRAINT …'")
    parser.add_argument("--print-sql", action="store_true")
    args = parser.parse_args(argv)
    url = database_url(BENCH_DB)
    os.environ["DOORSTROOM_DATABASE_URL"] = url
    from domain.db import make_engine

    engine = make_engine(url)
    try:
        sql, params = capture_routing_statement(engine)
        if args.print_sql:
            print(sql, "\n", params, "\n")
        print("== route_update's statement")
        print(explain(engine, sql, params, args.set, args.before))
        for variant in args.variant:
            print(f"\n== {variant}")
            print(explain(engine, variant.read_text(), params, args.set, args.before))
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
