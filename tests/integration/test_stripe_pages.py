"""Stripe's list pages as the wire may deliver them, beyond what the sandbox does: compressed (Stripe answers gzip to
a client that accepts it, as requests does), or cut off mid-answer. Pages are asked for as streams and read whole by
the product's own HTTP client (reconciler.upstream.stripe_api.StripeGateway._get_json), so both are its business."""

from __future__ import annotations

import gzip
import json
import socket
import threading
from collections.abc import Iterator

import pytest

from reconciler.upstream.stripe_api import StripeGateway
from tests.conftest import sandbox_config

PAGE = {
    "object": "list",
    "url": "/v1/webhook_endpoints",
    "has_more": False,
    "data": [{"id": "we_1", "object": "webhook_endpoint", "url": "https://example.test/hook", "status": "enabled"}],
}


class Answers:
    """A one-connection-at-a-time HTTP server on an ephemeral port that sends each request the next scripted answer
    (raw bytes, whatever they claim)."""

    def __init__(self, answers: list[bytes]) -> None:
        self._answers = iter(answers)
        self.requests: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            with connection:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += connection.recv(65536)
                self.requests.append(request)
                connection.sendall(next(self._answers, b"HTTP/1.1 500 Internal Server Error\r\n\r\n"))

    def close(self) -> None:
        self._listener.close()


def answer(body: bytes, *, encoding: str | None = None, claimed_length: int | None = None) -> bytes:
    headers = [
        "HTTP/1.1 200 OK",
        "Content-Type: application/json",
        f"Content-Length: {claimed_length if claimed_length is not None else len(body)}",
        "Connection: close",
        *([f"Content-Encoding: {encoding}"] if encoding else []),
    ]
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


@pytest.fixture
def serve(tmp_path) -> Iterator:
    servers: list[Answers] = []

    def start(answers: list[bytes]) -> tuple[Answers, StripeGateway]:
        server = Answers(answers)
        servers.append(server)
        config = sandbox_config(server.url, "http://127.0.0.1:9", f"sqlite:///{tmp_path / 'ledger.db'}")
        return server, StripeGateway(config.stripe)

    yield start
    for server in servers:
        server.close()


def test_a_gzip_compressed_page_is_read_as_json(serve):
    server, gateway = serve([answer(gzip.compress(json.dumps(PAGE).encode()), encoding="gzip")])
    try:
        assert gateway.webhook_endpoints() == PAGE["data"]
    finally:
        gateway.close()
    assert b"gzip" in server.requests[0].lower()  # asked for compressed answers, as Stripe's clients do


def test_a_page_cut_off_mid_answer_is_asked_for_again(serve):
    body = json.dumps(PAGE).encode()
    server, gateway = serve([answer(body[:20], claimed_length=len(body)), answer(body)])
    try:
        assert gateway.webhook_endpoints() == PAGE["data"]
    finally:
        gateway.close()
    assert len(server.requests) == 2
