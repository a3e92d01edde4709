"""The HTTP listeners inside `reconciler run`, two of them so the private surface stays off the public one.

Operations (server.ops_host:ops_port, loopback by default):
    GET /healthz   200 while the process and its scheduler run (liveness: restart me if not)
    GET /readyz    200 when the database answers, its migrations are current, and every enabled job completed
                   a cycle within `server.max_cycle_age` (readiness: something is wrong if not)
    GET /metrics   Prometheus text format
Webhooks (server.host:port, what Stripe reaches):
    POST /webhooks/stripe        snapshot events, signed with stripe.webhook_secret
    POST /webhooks/stripe/thin   thin events (meter error reports), signed with stripe.thin_webhook_secret

Starlette routes, uvicorn serves each app on a background thread; signals stay with the daemon's main thread.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import stripe
import structlog
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import Engine, func, select, text
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from reconciler.errors import SetupError
from reconciler.ledger.database import DatabaseNotMigratedError, require_migrated
from reconciler.ledger.schema import Run
from reconciler.metrics import Metrics
from reconciler.results import COMPLETED
from reconciler.webhooks.events import event_problem
from reconciler.webhooks.inbox import WebhookInbox

log = structlog.get_logger(__name__)


@dataclass
class WebhookEndpoint:
    """POST /webhooks/stripe and /webhooks/stripe/thin: verify, store with its work, answer; `wake` nudges the
    worker. Each destination signs with a secret of its own (https://docs.stripe.com/event-destinations)."""

    secret: Callable[[], str | None]
    inbox: WebhookInbox
    wake: Callable[[], None]
    thin_secret: Callable[[], str | None] = lambda: None
    # (payload, Stripe-Signature, secret) -> the verified thin event notification; the SDK's
    # StripeClient.parse_event_notification (StripeGateway.parse_thin_event)
    parse_thin: Callable[[bytes, str | None, str], dict[str, Any]] | None = None
    max_body_bytes: Callable[[], int] = lambda: 1024 * 1024  # server.max_body_bytes


@dataclass
class Probes:
    """What the endpoints look at; the daemon owns the pieces."""

    engine: Engine
    metrics: Metrics
    scheduler_running: Callable[[], bool]
    jobs: Callable[[], list[str]]  # names of the enabled jobs
    max_cycle_age: Callable[[], timedelta]
    clock: Callable[[], datetime]


def readiness_problems(probes: Probes) -> list[str]:
    try:
        with probes.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        require_migrated(probes.engine)
    except DatabaseNotMigratedError as exc:
        return [str(exc)]
    except Exception as exc:
        return [f"database unreachable: {type(exc).__name__}"]
    problems = []
    oldest_allowed = probes.clock() - probes.max_cycle_age()
    with probes.engine.connect() as connection:
        for job in probes.jobs():
            last = connection.execute(
                select(func.max(Run.finished_at)).where(Run.job == job, Run.status.in_(sorted(COMPLETED)))
            ).scalar()
            if last is None:
                problems.append(f"{job}: no completed cycle yet")
            elif last < oldest_allowed:
                problems.append(f"{job}: last completed cycle at {last:%Y-%m-%d %H:%M:%S} UTC is overdue")
    return problems


def build_ops_app(probes: Probes) -> Starlette:
    def healthz(_: Request) -> Response:
        if probes.scheduler_running():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "scheduler not running"}, status_code=503)

    def readyz(_: Request) -> Response:
        problems = readiness_problems(probes)
        if problems:
            return JSONResponse({"status": "not ready", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    def metrics(_: Request) -> Response:
        return Response(generate_latest(probes.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics)])


class BodyTooLargeError(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (BodyTooLargeError) as soon as it is known to exceed `limit`: from Content-Length
    before anything is read, else while it streams (a chunked body declares no length), so no more than `limit`
    bytes are ever held. The unread rest stays in the socket: uvicorn stops reading until the app asks."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLargeError
    return bytes(body)


def build_webhook_app(webhooks: WebhookEndpoint) -> Starlette:
    async def stripe_webhook(request: Request) -> Response:
        secret = webhooks.secret()
        if not secret:
            return JSONResponse({"error": "webhooks are off (stripe.webhook_secret is not set)"}, status_code=404)
        payload = await read_body(request, webhooks.max_body_bytes())
        try:
            event = stripe.Webhook.construct_event(payload, request.headers.get("stripe-signature"), secret)
        except stripe.SignatureVerificationError:
            return JSONResponse({"error": "invalid signature"}, status_code=400)
        except (ValueError, AttributeError, TypeError):  # signed, but not JSON, or JSON but not an object
            return invalid_payload("not a JSON event object")
        body = event.to_dict()
        if body.get("object") == "v2.core.event":  # thin events have a destination and a secret of their own
            return JSONResponse({"error": "a thin event: send it to /webhooks/stripe/thin"}, status_code=400)
        if problem := event_problem(body):
            return invalid_payload(problem)
        return await store(body, payload)

    async def stripe_thin_webhook(request: Request) -> Response:
        secret = webhooks.thin_secret()
        if webhooks.parse_thin is None or not secret:
            return JSONResponse(
                {"error": "thin webhooks are off (stripe.thin_webhook_secret is not set)"}, status_code=404
            )
        payload = await read_body(request, webhooks.max_body_bytes())
        try:
            event = webhooks.parse_thin(payload, request.headers.get("stripe-signature"), secret)
        except stripe.SignatureVerificationError:
            return JSONResponse({"error": "invalid signature"}, status_code=400)
        # not JSON, not an object, a snapshot event, or a thin event missing its fields
        except (ValueError, KeyError, TypeError, AttributeError):
            return invalid_payload("not a thin event")
        if problem := event_problem(event):
            return invalid_payload(problem)
        return await store(event, payload)

    async def store(event: dict[str, Any], payload: bytes) -> Response:
        try:
            new = await run_in_threadpool(webhooks.inbox.record, event, payload.decode("utf-8"))
        except Exception:
            log.exception("webhook could not be stored; Stripe will redeliver it")
            return JSONResponse({"error": "not stored"}, status_code=500)
        if new:
            webhooks.wake()
        return JSONResponse({"received": True, "duplicate": not new})

    def too_large(_: Request, __: Exception) -> Response:
        # Connection: close, so uvicorn drops the unread rest of the body instead of parsing it as a next request.
        limit = webhooks.max_body_bytes()
        return JSONResponse(
            {"error": f"body larger than {limit} bytes (server.max_body_bytes)"},
            status_code=413,
            headers={"Connection": "close"},
        )

    return Starlette(
        routes=[
            Route("/webhooks/stripe", stripe_webhook, methods=["POST"]),
            Route("/webhooks/stripe/thin", stripe_thin_webhook, methods=["POST"]),
        ],
        exception_handlers={BodyTooLargeError: too_large},
    )


def invalid_payload(reason: str) -> Response:
    return JSONResponse({"error": f"invalid payload: {reason}"}, status_code=400)


class Listener:
    """One app served by uvicorn on a daemon thread; `stop()` asks it to finish and waits.

    The socket is bound when the listener is made, on the caller's thread: a port in use is a SetupError naming
    host:port and the config key, raised before the daemon starts any job (uvicorn would only log it from its
    thread and exit that thread)."""

    def __init__(self, name: str, app: Starlette, host: str, port: int, key: str):
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
        self.name = name
        self._socket = _bind(host, port, key)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name=f"{name}-listener", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        while not self._server.started and self._thread.is_alive():
            time.sleep(0.05)
        if not self._server.started:
            raise RuntimeError(f"the {self.name} listener did not start")

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): with port 0 the system picked the port."""
        host, port = self._socket.getsockname()[:2]
        return host, port

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._socket.close()


def _bind(host: str, port: int, key: str) -> socket.socket:
    """A listening socket as uvicorn would make it (IPv6 for an address with a colon, SO_REUSEADDR)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SetupError(f"cannot listen on {host}:{port} ({key}): {exc.strerror or exc}") from None
    return sock
