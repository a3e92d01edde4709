"""`reconciler healthcheck`: does the local `reconciler run` answer /healthz (the container's HEALTHCHECK)."""

from __future__ import annotations

import httpx

from reconciler.config import ServerConfig


def health_problem(server: ServerConfig) -> str | None:
    """What is wrong with the local operations listener's /healthz, in one line; None when it answers 200."""
    host = server.ops_host
    # Not a bind: the probe reaches a server listening on all interfaces through loopback.
    if host in ("0.0.0.0", "::", ""):  # nosec B104
        host = "127.0.0.1"
    try:
        response = httpx.get(f"http://{host}:{server.ops_port}/healthz", timeout=5)
    except httpx.HTTPError as exc:
        return type(exc).__name__
    if response.status_code != 200:
        return f"HTTP {response.status_code} {response.text}"
    return None
