"""Each request's database session is closed once the request is answered, whether or not
it left a transaction open (`api.deps.get_session`, closed by the app's middleware)."""

from __future__ import annotations

import gc

import sqlalchemy as sa


def test_a_requests_session_gives_its_connection_back_once_answered(
        engine: sa.engine.Engine) -> None:
    from fastapi.testclient import TestClient

    from api.app import app

    # With the garbage collector off, a session nobody closed would keep its connection
    # checked out of the pool after the response.
    gc.disable()
    try:
        with TestClient(app) as client:
            before = engine.pool.checkedout()  # type: ignore[attr-defined]
            for _ in range(3):
                # An unknown key is looked up in the database: the session opens a
                # transaction, and the answer is a 401.
                answer = client.get("/v1/inbox", headers={"Authorization": "Bearer ds_nope"})
                assert answer.status_code == 401, answer.text
            assert engine.pool.checkedout() == before  # type: ignore[attr-defined]
    finally:
        gc.enable()
