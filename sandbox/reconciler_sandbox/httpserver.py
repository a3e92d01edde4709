"""A tiny threaded loopback HTTP server plus the plumbing shared by the sandbox fakes.

The fakes are plain objects with a ``handle(method, path, query, headers, body)`` method returning
``(status, headers, body)``; :class:`LoopbackServer` serves any such object over real HTTP/1.1 on
127.0.0.1 so the real SDKs can talk to it. Serving uses ``http.server`` threads only (no asyncio), so
freezegun's patched clock applies to the fakes as well.
"""

from __future__ import annotations

import bisect
import json
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "DROP_CONNECTION",
    "App",
    "FakeService",
    "FaultAnswered",
    "InjectedFault",
    "LoopbackServer",
    "RecordedRequest",
    "Response",
]

Response = tuple[int, dict[str, str], bytes]

# A fault "status" that closes the connection without any answer: the client sees the connection drop.
DROP_CONNECTION = 0


class App(Protocol):
    def handle(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        headers: Mapping[str, str],
        body: bytes,
    ) -> Response: ...


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "reconciler-sandbox/1"
    sys_version = ""
    # One buffered write per response (flushed by handle_one_request) and no Nagle: avoids the
    # 40 ms delayed-ACK stall per request on keep-alive connections.
    wbufsize = -1
    disable_nagle_algorithm = True

    def _dispatch(self) -> None:
        app: App = self.server.app  # type: ignore[attr-defined]
        split = urlsplit(self.path)
        query = parse_qs(split.query, keep_blank_values=True)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        headers = {k: v for k, v in self.headers.items()}
        try:
            status, resp_headers, resp_body = app.handle(self.command, split.path, query, headers, body)
        except Exception as exc:  # a bug in a fake must not hang the client
            status = 500
            resp_headers = {"Content-Type": "text/plain; charset=utf-8"}
            resp_body = f"sandbox handler crashed: {exc!r}".encode()
        if status == DROP_CONNECTION:
            self.close_connection = True
            return
        self.send_response(status)
        lowered = {k.lower() for k in resp_headers}
        for name, value in resp_headers.items():
            if name.lower() in ("content-length", "connection", "transfer-encoding"):
                continue
            self.send_header(name, value)
        if "content-type" not in lowered and resp_body:
            self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(resp_body)))
        self.end_headers()
        if self.command != "HEAD" and resp_body:
            self.wfile.write(resp_body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _dispatch

    def log_message(self, format: str, *args: Any) -> None:
        return


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # bursts of concurrent clients must not hit SYN retransmits

    def __init__(self, address: tuple[str, int], app: App) -> None:
        self.app = app
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients closing keep-alive sockets abruptly is normal in tests: stay quiet.
        return


class LoopbackServer:
    """Serves ``app`` on ``host:port`` (port 0 = any free port) from a daemon thread."""

    def __init__(self, app: App, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self._host = host
        self._port = port
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> LoopbackServer:
        if self._httpd is not None:
            return self
        self._httpd = _Server((self._host, self._port), self.app)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"sandbox-{type(self.app).__name__}",
            daemon=True,
        )
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------
# Shared plumbing for the fakes: request recording and fault injection.


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # keys lower-cased
    params: dict[str, Any]  # parsed form body / query (nested, bracket-decoded) or JSON body
    body: bytes = b""


@dataclass
class InjectedFault:
    method: str
    path_prefix: str
    status: int
    headers: dict[str, str] | None
    body: Any
    remaining: int
    after_apply: bool
    delay_seconds: float = 0.0
    hits: int = field(default=0)

    def matches(self, method: str, path: str) -> bool:
        return (
            self.remaining > 0
            and (self.method == "*" or self.method.upper() == method.upper())
            and path.startswith(self.path_prefix)
        )


# Called under the service lock with the fault, its answer, and the answer the request got when it was applied
# first (None when it was not); returns the answer to send.
FaultAnswered = Callable[[InjectedFault, Response, Response | None], Response]


GLOBAL_LIMITER = "global"


class FakeService:
    """Base class: a lock, a request log, fault injection, a clock, and for benchmarks: latency, an enforced
    request budget and the arrival time of every request."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.clock: Callable[[], float] = clock if clock is not None else (lambda: time.time())
        self.lock = threading.RLock()
        self.requests: list[RecordedRequest] = []
        self.record_requests = True  # False: keep only arrival times (benchmarks, 100,000s of requests)
        self._faults: list[InjectedFault] = []
        self.latency_seconds = 0.0  # every answer is held back this long, in real time
        # Limiter name -> (requests, per seconds): a request over any limiter it counts against is answered 429.
        self.budgets: dict[str, tuple[int, float]] = {}
        self.arrivals: list[float] = []  # time.monotonic() of every request answered, in order
        self.rate_limited = 0  # requests refused with a 429 for being over the budget
        self._recent: dict[str, deque[float]] = defaultdict(deque)

    # -- benchmarks --------------------------------------------------------------------------------

    def limit_rate(self, max_requests: int, per_seconds: float = 1.0) -> None:
        """Answer 429 (as the real API would) to a request arriving when `max_requests` were already served in
        the `per_seconds` before it."""
        with self.lock:
            self.budgets = {GLOBAL_LIMITER: (max_requests, per_seconds)}

    def max_requests_in_any_window(self, seconds: float = 1.0) -> int:
        """The most requests served within any `seconds`-long window of real time."""
        with self.lock:
            arrivals = list(self.arrivals)
        return max(
            (bisect.bisect_left(arrivals, start + seconds, lo=i) - i for i, start in enumerate(arrivals)), default=0
        )

    def _limiters(self, method: str, path: str) -> list[str]:
        """The limiters a request counts against: one for the whole API here; a fake of an API with a richer
        structure (Stripe's per-endpoint limits) says more."""
        return [GLOBAL_LIMITER]

    def _budget_of(self, limiter: str) -> tuple[int, float] | None:
        return self.budgets.get(limiter)

    def _over_budget(self, now: float, method: str, path: str) -> bool:
        """Count a request against its limiters (under the lock); True if any is full and it must be refused. A
        refused request counts too: the APIs do not say whether it does, and counting it is the worse case for a
        client that retries at once (it stays refused until it backs off)."""
        counted = [(name, budget) for name in self._limiters(method, path) if (budget := self._budget_of(name))]
        full = False
        for name, (max_requests, per_seconds) in counted:
            recent = self._recent[name]
            while recent and recent[0] <= now - per_seconds:
                recent.popleft()
            full = full or len(recent) >= max_requests
        for name, _ in counted:
            self._recent[name].append(now)
        return full

    def _rate_limited_response(self) -> Response:
        return self._fault_response(
            InjectedFault("*", "", 429, {"Retry-After": "1"}, None, remaining=0, after_apply=False)
        )

    # -- fault injection -------------------------------------------------------------------------

    def inject_fault(
        self,
        method: str,
        path_prefix: str,
        status: int,
        *,
        headers: Mapping[str, str] | None = None,
        body: Any = None,
        times: int = 1,
        after_apply: bool = False,
        delay_seconds: float = 0.0,
    ) -> InjectedFault:
        """The next ``times`` requests matching ``method`` ("*" = any) and ``path_prefix`` get ``status``.

        ``body`` may be bytes, str, or a JSON-serialisable object; ``None`` gives the service's default
        error body. With ``after_apply=True`` the request is applied first and only its response is
        replaced (a "lost response"). ``status=DROP_CONNECTION`` closes the connection without an answer;
        ``delay_seconds`` holds the answer back that long in real time (longer than the client's timeout,
        a timeout). Returns the fault; its ``hits`` count the requests it answered.
        """
        with self.lock:
            fault = InjectedFault(
                method=method,
                path_prefix=path_prefix,
                status=status,
                headers=dict(headers) if headers else None,
                body=body,
                remaining=times,
                after_apply=after_apply,
                delay_seconds=delay_seconds,
            )
            self._faults.append(fault)
            return fault

    def clear_faults(self) -> None:
        """Drop the injected faults no request has used up."""
        with self.lock:
            self._faults.clear()

    def _take_fault(self, method: str, path: str) -> InjectedFault | None:
        for fault in self._faults:
            if fault.matches(method, path):
                fault.remaining -= 1
                fault.hits += 1
                return fault
        return None

    def _fault_response(self, fault: InjectedFault) -> Response:
        headers = {"Content-Type": self._default_fault_content_type()}
        if fault.body is None:
            body = self._default_fault_body(fault.status)
        elif isinstance(fault.body, bytes):
            body = fault.body
        elif isinstance(fault.body, str):
            body = fault.body.encode()
        else:
            body = json.dumps(fault.body).encode()
        if fault.headers:
            headers.update(fault.headers)
        return fault.status, headers, body

    def _default_fault_content_type(self) -> str:
        return "application/json"

    def _default_fault_body(self, status: int) -> bytes:  # pragma: no cover - overridden
        return json.dumps({"error": f"injected fault {status}"}).encode()

    def _record(self, req: RecordedRequest) -> None:
        self.requests.append(req)

    def _serve(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        headers: dict[str, str],
        params: dict[str, Any],
        body: bytes,
        apply: Callable[[], Response],
        on_fault: FaultAnswered | None = None,
    ) -> Response:
        """Record the request, then answer it: with an injected fault (before or after applying it) or with
        `apply()`. Requests are applied one at a time, under the service lock; latency and an injected delay are
        waited out after the lock is released. Over the budget set by `limit_rate`, the answer is a 429.
        `on_fault` lets a fake finish a fault's answer under the lock (Stripe saves some to idempotency keys)."""
        with self.lock:
            arrived = time.monotonic()
            if self._over_budget(arrived, method, path):
                response, delay = self._rate_limited_response(), 0.0
                self.rate_limited += 1
            else:
                self.arrivals.append(arrived)
                if self.record_requests:
                    query = {k: list(v) for k, v in query.items()}
                    self._record(RecordedRequest(method, path, query, headers, params, bytes(body)))
                response, delay = self._answer(method, path, apply, on_fault)
        if self.latency_seconds or delay:
            # Real time, whatever clock the fake runs on; an injected delay longer than the client's timeout is
            # a timeout.
            threading.Event().wait(self.latency_seconds + delay)
        return response

    def _answer(
        self, method: str, path: str, apply: Callable[[], Response], on_fault: FaultAnswered | None
    ) -> tuple[Response, float]:
        """The answer to a request within the budget (under the lock), and how long to hold it back."""
        fault = self._take_fault(method, path)
        if fault is None:
            return apply(), 0.0
        applied = apply() if fault.after_apply else None
        response = self._fault_response(fault)
        if on_fault is not None:
            response = on_fault(fault, response, applied)
        return response, fault.delay_seconds

    def _reset_base(self) -> None:
        self.requests.clear()
        self._faults.clear()
        self.record_requests = True
        self.latency_seconds = 0.0
        self.budgets = {}
        self.reset_counters()

    def reset_counters(self) -> None:
        """Forget the arrival times and 429s counted so far (a benchmark's next phase)."""
        with self.lock:
            self.arrivals.clear()
            self._recent.clear()
            self.rate_limited = 0
