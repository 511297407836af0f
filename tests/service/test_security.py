"""The token guard at the ASGI level: every kind of connection but the lifespan and the open HTTP paths needs it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("fastapi")

from graphflow.service.security import BearerAuth


def _call(scope: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    sent: list[dict[str, Any]] = []
    reached = [False]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached[0] = True

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(BearerAuth(app, "secret")(scope, receive, send))
    return sent, reached[0]


def test_a_websocket_without_the_token_is_closed_before_the_app_sees_it() -> None:
    sent, reached = _call({"type": "websocket", "path": "/ws", "headers": []})
    assert sent == [{"type": "websocket.close", "code": 1008}] and not reached
    sent, reached = _call({"type": "websocket", "path": "/ws", "headers": [(b"authorization", b"Bearer secret")]})
    assert sent == [] and reached


def test_http_needs_the_token_except_on_the_open_paths() -> None:
    sent, reached = _call({"type": "http", "path": "/api/jobs", "headers": []})
    assert sent[0]["status"] == 401 and not reached
    _, reached = _call({"type": "http", "path": "/api/health", "headers": []})
    assert reached
    _, reached = _call({"type": "lifespan"})
    assert reached
