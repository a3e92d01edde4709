from decimal import Decimal

import pytest

from reconciler.usage.rounding import round_quantity


@pytest.mark.parametrize(
    ("value", "mode", "expected"),
    [
        (10.2, "ceil", 11),
        (10.2, "floor", 10),
        (10.5, "round", 11),
        (10.49, "round", 10),
        (2.5, "round", 3),  # half up, not banker's rounding
        (0.0, "ceil", 0),
        (-1.5, "ceil", -1),
        (Decimal("7"), "ceil", 7),
    ],
)
def test_modes(value, mode, expected):
    assert round_quantity(value, mode) == expected


def test_floating_point_noise_is_not_billed_as_a_whole_unit():
    noisy = 1.1 + 1.1 + 1.1 - 0.3  # 3.0000000000000004
    assert noisy != 3
    assert round_quantity(noisy, "ceil") == 3


def test_a_real_fraction_still_rounds_up():
    assert round_quantity(3.000001, "ceil") == 4
