"""Both fakes on loopback, seeded, with a config that points the product at them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reconciler.sandbox.httpserver import LoopbackServer
from reconciler.sandbox.openmeter_fake import FakeOpenMeter
from reconciler.sandbox.seed import DEMO_METERS
from reconciler.sandbox.stripe_fake import FakeStripe

SANDBOX_STRIPE_KEY = "sk_test_sandbox"
SANDBOX_OPENMETER_TOKEN = "om_sandbox_token"


@dataclass
class Sandbox:
    stripe: FakeStripe
    openmeter: FakeOpenMeter
    stripe_server: LoopbackServer
    openmeter_server: LoopbackServer

    @classmethod
    def start(cls, *, host: str = "127.0.0.1", stripe_port: int = 0, openmeter_port: int = 0) -> Sandbox:
        stripe = FakeStripe(api_key=SANDBOX_STRIPE_KEY)
        openmeter = FakeOpenMeter(token=SANDBOX_OPENMETER_TOKEN)
        stripe_server = LoopbackServer(stripe, host=host, port=stripe_port).start()
        openmeter_server = LoopbackServer(openmeter, host=host, port=openmeter_port).start()
        return cls(stripe, openmeter, stripe_server, openmeter_server)

    def stop(self) -> None:
        self.stripe_server.stop()
        self.openmeter_server.stop()

    def config_dict(self, database_url: str, meters: list[dict[str, str]] = DEMO_METERS) -> dict[str, Any]:
        """A raw config (as config.yaml would hold it) pointing at this sandbox."""
        return {
            "database": {"url": database_url},
            "stripe": {"api_key": SANDBOX_STRIPE_KEY, "api_base": self.stripe_server.url},
            "openmeter": {"url": self.openmeter_server.url, "token": SANDBOX_OPENMETER_TOKEN},
            "usage": {"meters": meters},
        }
