"""Both fakes on loopback, seeded, with a config that points the product at them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reconciler.sandbox.httpserver import LoopbackServer
from reconciler.sandbox.moesif_fake import FakeMoesif
from reconciler.sandbox.openmeter_fake import FakeOpenMeter
from reconciler.sandbox.seed import DEMO_METERS
from reconciler.sandbox.stripe_fake import FakeStripe

SANDBOX_STRIPE_KEY = "sk_test_sandbox"
SANDBOX_OPENMETER_TOKEN = "om_sandbox_token"
SANDBOX_MOESIF_TOKEN = "moesif_sandbox_token"


@dataclass
class Sandbox:
    stripe: FakeStripe
    openmeter: FakeOpenMeter
    moesif: FakeMoesif
    stripe_server: LoopbackServer
    openmeter_server: LoopbackServer
    moesif_server: LoopbackServer

    @classmethod
    def start(
        cls, *, host: str = "127.0.0.1", stripe_port: int = 0, openmeter_port: int = 0, moesif_port: int = 0
    ) -> Sandbox:
        stripe = FakeStripe(api_key=SANDBOX_STRIPE_KEY)
        openmeter = FakeOpenMeter(token=SANDBOX_OPENMETER_TOKEN)
        moesif = FakeMoesif(token=SANDBOX_MOESIF_TOKEN)
        return cls(
            stripe,
            openmeter,
            moesif,
            LoopbackServer(stripe, host=host, port=stripe_port).start(),
            LoopbackServer(openmeter, host=host, port=openmeter_port).start(),
            LoopbackServer(moesif, host=host, port=moesif_port).start(),
        )

    def stop(self) -> None:
        for server in (self.stripe_server, self.openmeter_server, self.moesif_server):
            server.stop()

    def config_dict(self, database_url: str, meters: list[dict[str, str]] = DEMO_METERS) -> dict[str, Any]:
        """A raw config (as config.yaml would hold it) pointing at this sandbox."""
        return {
            "database": {"url": database_url},
            "stripe": {"api_key": SANDBOX_STRIPE_KEY, "api_base": self.stripe_server.url},
            "openmeter": {"url": self.openmeter_server.url, "token": SANDBOX_OPENMETER_TOKEN},
            "usage": {"meters": meters},
            "moesif": {"url": self.moesif_server.url, "management_token": SANDBOX_MOESIF_TOKEN},
            "balances": {
                "enabled": True,
                "stripe_source": "credit_grants",
                "auto_correct": True,
                "max_auto_correction": {"usd": 100},
            },
        }
