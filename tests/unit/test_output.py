"""Tables never cut a cell: on a narrow terminal a value folds onto the next line instead of ending in "…"."""

import io

from rich.console import Console
from rich.table import Column

from reconciler.output import result_console, table


def test_on_a_narrow_terminal_a_long_id_and_amount_fold_and_are_never_cut():
    customer, amount = "cus_sandbox_a_rather_long_customer_id", "-1234567.89"
    made = table("balances", "customer", Column("difference", justify="right"), "action")
    made.add_row(customer, amount, "uncorrected_drift")
    console = Console(file=io.StringIO(), width=30, force_terminal=True)
    console.print(made)
    text = console.file.getvalue()
    assert "…" not in text
    cells = ["".join(line.split("│")[i].strip() for line in text.splitlines() if "│" in line) for i in (1, 2, 3)]
    assert cells == [customer, amount, "uncorrected_drift"]


def test_a_console_for_a_file_or_a_pipe_is_not_limited_to_80_columns(tmp_path):
    with (tmp_path / "out.txt").open("w") as handle:
        console = result_console(handle)
        assert console.width > 1000
        made = table(None, "note")
        made.add_row("x" * 300)
        console.print(made)
    assert "x" * 300 in (tmp_path / "out.txt").read_text()
