"""A fast local webhook receiver for the benchmarks, run in a process of its own.

    python -m uvicorn bench.receiver:app --host 127.0.0.1 --port PORT --loop uvloop \
        --http httptools --no-access-log

A bare ASGI app (no framework): every POST is answered `200` with an empty body. It does
not verify signatures (the tests do that); it counts requests by their `webhook-id` header,
so that a benchmark can check that every delivery arrived exactly once, and for paths under
`/latency/` it notes the arrival time (`time.time()`, this machine's clock) of each update,
taken from the CloudEvent's `data.update.id`, the first time it arrives.

`GET /stats` answers the counts as JSON (`?arrivals=1` adds the arrival times);
`POST /reset` forgets everything.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

_ids: Counter[bytes] = Counter()
_arrivals: dict[str, float] = {}
_state = {"requests": 0, "bad": 0, "first": 0.0, "last": 0.0}

_OK = {"type": "http.response.start", "status": 200,
       "headers": [(b"content-length", b"0")]}
_EMPTY = {"type": "http.response.body", "body": b""}


def _reset() -> None:
    _ids.clear()
    _arrivals.clear()
    _state.update(requests=0, bad=0, first=0.0, last=0.0)


def stats(with_arrivals: bool = False) -> dict[str, Any]:
    duplicates = sum(n - 1 for n in _ids.values() if n > 1)
    answer: dict[str, Any] = {
        "requests": _state["requests"], "unique_ids": len(_ids), "duplicates": duplicates,
        "max_per_id": max(_ids.values(), default=0), "without_id": _state["bad"],
        "first": _state["first"], "last": _state["last"], "arrived_updates": len(_arrivals),
    }
    if with_arrivals:
        answer["arrivals"] = dict(_arrivals)
    return answer


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _json(send: Any, data: dict[str, Any]) -> None:
    body = json.dumps(data).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = await _read_body(receive)
    path: str = scope["path"]
    if scope["method"] == "POST" and path != "/reset":
        now = time.time()
        if not _state["requests"]:
            _state["first"] = now
        _state["requests"] += 1
        _state["last"] = now
        for name, value in scope["headers"]:
            if name == b"webhook-id":
                _ids[value] += 1
                break
        else:
            _state["bad"] += 1
        if path.startswith("/latency/"):
            try:
                update_id = json.loads(body)["data"]["update"]["id"]
            except (ValueError, KeyError, TypeError):
                update_id = None
            if update_id is not None and update_id not in _arrivals:
                _arrivals[update_id] = now
        await send(_OK)
        await send(_EMPTY)
        return
    if path == "/reset":
        _reset()
        await _json(send, {"reset": True})
        return
    if path == "/stats":
        await _json(send, stats(b"arrivals=1" in scope.get("query_string", b"")))
        return
    await send({"type": "http.response.start", "status": 404,
                "headers": [(b"content-length", b"0")]})
    await send(_EMPTY)
