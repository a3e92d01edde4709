"""The read-back's rules (usage/readback.assess): resend only what Stripe's error reports explain, while the
invoice still takes usage; everything else is a person's."""

from __future__ import annotations

from decimal import Decimal

import pytest

from reconciler.usage.readback import Finding, assess


@pytest.mark.parametrize(
    ("reported", "held", "rejected", "writable", "expected"),
    [
        (7, Decimal(7), 0, True, Finding.OK),
        (7, Decimal(7), 1, True, Finding.OK),  # named, but Stripe holds it after all
        (7, Decimal(0), 1, True, Finding.RESENDING),
        (7, Decimal(0), 1, False, Finding.MISSING_IN_STRIPE),  # the invoice has finalized
        (7, Decimal(0), 0, True, Finding.MISSING_IN_STRIPE),  # no evidence: never guessed
        (7, Decimal("6.5"), 1, True, Finding.MISSING_IN_STRIPE),  # not a total we could have sent
        (7, Decimal(10), 0, True, Finding.FOREIGN_USAGE),
        (7, Decimal(10), 1, True, Finding.FOREIGN_USAGE),
        (7, None, 0, True, Finding.UNVERIFIABLE),
        (7, None, 1, True, Finding.MISSING_IN_STRIPE),  # evidence, and no way to check it: a person
    ],
)
def test_assess(reported, held, rejected, writable, expected):
    finding, note = assess(reported=reported, held=held, rejected=rejected, writable=writable)
    assert finding is expected
    assert bool(note) == (finding is not Finding.OK)
