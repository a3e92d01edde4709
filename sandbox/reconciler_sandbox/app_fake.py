"""A fake of the app's internal subscription-sync endpoint (seed 004): it records what it was told."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from reconciler_sandbox.httpserver import FakeService, Response

SYNC_PATH = "/api/internal/subscription/sync"


class FakeApp(FakeService):
    def __init__(
        self,
        api_key: str = "app_sandbox_key",
        header: str = "X-Internal-API-Key",
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(clock)
        self.api_key = api_key
        self.header = header.lower()
        self.users: dict[str, dict[str, str]] = {}  # userId -> {"plan", "status"}: what the app now believes
        self.updates: list[dict[str, Any]] = []  # every accepted update, in order

    def reset(self) -> None:
        with self.lock:
            self._reset_base()
            self.users.clear()
            self.updates.clear()

    def handle(
        self, method: str, path: str, query: dict[str, list[str]], headers: Mapping[str, str], body: bytes
    ) -> Response:
        hdrs = {k.lower(): v for k, v in headers.items()}
        try:
            payload = json.loads(body) if body else {}
        except ValueError:
            payload = None
        params = payload if isinstance(payload, dict) else {}
        return self._serve(
            method.upper(), path, query, hdrs, params, body, lambda: self._apply(method, path, hdrs, payload)
        )

    def _apply(self, method: str, path: str, headers: dict[str, str], payload: Any) -> Response:
        if method.upper() != "POST" or path != SYNC_PATH:
            return _json(404, {"detail": "not found"})
        if headers.get(self.header) != self.api_key:
            return _json(401, {"detail": "invalid internal API key"})
        if not isinstance(payload, dict) or not all(
            isinstance(payload.get(k), str) for k in ("userId", "plan", "status")
        ):
            return _json(422, {"detail": "userId, plan and status are required strings"})
        self.users[payload["userId"]] = {"plan": payload["plan"], "status": payload["status"]}
        self.updates.append(dict(payload))
        return _json(200, {"ok": True})


def _json(status: int, body: dict[str, Any]) -> Response:
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode()
