"""Stripe counts money in minor units (cents, integers); Moesif in currency units (25.0 for $25). This module is
the only place that converts between them."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

# Stripe's zero- and three-decimal currencies; every other currency has two decimals.
_ZERO_DECIMAL = frozenset(
    ["bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"]
)
_THREE_DECIMAL = frozenset(["bhd", "jod", "kwd", "omr", "tnd"])


def exponent(currency: str) -> int:
    code = currency.lower()
    if code in _ZERO_DECIMAL:
        return 0
    if code in _THREE_DECIMAL:
        return 3
    return 2


def to_units(minor: int | Decimal, currency: str) -> Decimal:
    """Stripe minor units -> currency units: 2500 USD -> 25.00, 500 JPY -> 500."""
    return (Decimal(minor) / (Decimal(10) ** exponent(currency))).quantize(Decimal(1).scaleb(-exponent(currency)))


def to_minor(units: Decimal, currency: str) -> int:
    """Currency units -> Stripe minor units, exactly (raises if the amount has finer precision)."""
    minor = units * (Decimal(10) ** exponent(currency))
    if minor != minor.to_integral_value():
        raise ValueError(f"{units} {currency.upper()} is finer than the currency's smallest unit")
    return int(minor)


def to_minor_rounded(units: Decimal, currency: str) -> int:
    """Currency units -> minor units, rounded half up (for balances Moesif reports as doubles)."""
    return int((units * (Decimal(10) ** exponent(currency))).to_integral_value(rounding=ROUND_HALF_UP))


def exactly_representable(units: Decimal, currency: str) -> bool:
    """Whether `moesif_number` carries this amount without rounding (a double holds 15-17 significant digits)."""
    return Decimal(repr(moesif_number(units, currency))) == units


def moesif_number(units: Decimal, currency: str) -> int | float:
    """The JSON number Moesif expects: 25.0 for $25.00, 500 for ¥500."""
    return int(units) if exponent(currency) == 0 else float(units)


def units_text(amount: Decimal, currency: str, *, signed: bool = False) -> str:
    """An amount in currency units as people read it: `1,234.50 USD` (`+1,234.50 USD` when `signed`)."""
    return f"{amount:{'+' if signed else ''},} {currency.upper()}"
