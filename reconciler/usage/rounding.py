"""Turning OpenMeter's floating-point totals into the whole quantities Stripe bills."""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal

_MODES = {"ceil": ROUND_CEILING, "floor": ROUND_FLOOR, "round": ROUND_HALF_UP}
# OpenMeter returns doubles: 3 may arrive as 3.0000000000000004, which `ceil` would bill as 4. A total within
# floating-point noise of a whole number is that whole number; the noise grows with the magnitude (a double
# carries about 16 significant digits, and a sum of many events loses a few), hence a relative tolerance.
_NOISE_FLOOR = Decimal("1e-9")
_RELATIVE_NOISE = Decimal("1e-14")


def round_quantity(value: float | Decimal, mode: str) -> int:
    """`ceil`, `floor` or `round` (half up) a usage total to a whole number."""
    exact = value if isinstance(value, Decimal) else Decimal(repr(value))
    nearest = exact.to_integral_value(rounding=ROUND_HALF_UP)
    if abs(exact - nearest) <= max(_NOISE_FLOOR, abs(exact) * _RELATIVE_NOISE):
        return int(nearest)
    return int(exact.to_integral_value(rounding=_MODES[mode]))
