"""Turning OpenMeter's floating-point totals into the whole quantities Stripe bills."""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal

_MODES = {"ceil": ROUND_CEILING, "floor": ROUND_FLOOR, "round": ROUND_HALF_UP}
# OpenMeter returns doubles: 3 may arrive as 3.0000000000000004, which `ceil` would bill as 4. Nine decimal
# places keep every real fraction while discarding binary floating-point noise.
_NOISE_FLOOR = Decimal("1e-9")


def round_quantity(value: float | Decimal, mode: str) -> int:
    """`ceil`, `floor` or `round` (half up) a usage total to a whole number."""
    exact = (value if isinstance(value, Decimal) else Decimal(repr(value))).quantize(_NOISE_FLOOR, ROUND_HALF_UP)
    return int(exact.to_integral_value(rounding=_MODES[mode]))
