"""One way for every command to write its result: a table on the console, JSON, CSV or a self-contained HTML
page, to stdout or to `--output FILE`. Tables never cut a cell: in a pipe or a file they are as wide as their
rows, on a terminal a value too long for its column folds onto the next line."""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, time
from pathlib import Path
from typing import IO, Any

import typer
from rich.console import Console
from rich.table import Column, Table

# Wider than any table: rich lays a table out within the console's width, and for a pipe or a file it would
# assume 80 columns (or $COLUMNS) and squeeze the table into them.
UNBOUNDED = 100_000

STYLE = """body{font-family:system-ui,sans-serif;margin:2rem;color:#222}
table{border-collapse:collapse;font-size:.85rem}
td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left} th{background:#f3f3f3}
dl{display:grid;grid-template-columns:max-content auto;gap:.2rem 1rem} dt{font-weight:600}
.s0{fill:#4e79a7;color:#4e79a7} .s1{fill:#f28e2b;color:#f28e2b} svg{max-width:640px;border:1px solid #eee}"""


def result_console(file: IO[str] | None = None) -> Console:
    """A console for a command's result: a terminal's own width, or, for a pipe or a file, no limit, so that
    every row of a table stays one line whole (for grep, cut, a spreadsheet)."""
    console = Console(file=file, soft_wrap=True)
    if not console.file.isatty():
        console.width = UNBOUNDED
    return console


def table(title: str | None, *columns: str | Column, **options: Any) -> Table:
    """A rich Table that never cuts a cell: what does not fit its column on a narrow terminal folds onto the next
    line, where rich's default would end it in "…" and lose part of an id, an amount or a state."""
    made = Table(*columns, title=title, **options)
    for column in made.columns:
        column.overflow = "fold"
    return made


def json_value(value: object) -> object:
    """json.dumps's `default`: a value JSON has no type for, as one it has (never a Python repr). Times in ISO 8601,
    sets as lists, anything else (a Decimal, an exception, a UUID, a path) as its str()."""
    if isinstance(value, date | time):  # datetime is a date
        return value.isoformat()
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    return str(value)


def rows_csv(rows: Sequence[dict[str, Any]], fieldnames: Sequence[str] | None = None) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames or (rows[0] if rows else [])))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def rows_table_html(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "<p>None.</p>"
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in row.values()) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_page(title: str, body: str) -> str:
    """A complete page with no external resources."""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>\n{STYLE}\n</style></head><body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def emit(
    output_format: str,
    output: Path | None,
    console: Console,
    *,
    title: str,
    rows: Sequence[dict[str, Any]],
    as_json: Callable[[], str],
    as_table: Callable[[Console], None],
) -> None:
    if output_format == "table":
        if output is None:
            as_table(console)
        else:
            with output.open("w", encoding="utf-8") as handle:
                as_table(result_console(handle))
        return
    renderers = {
        "json": as_json,
        "csv": lambda: rows_csv(rows),
        "html": lambda: html_page(title, rows_table_html(rows)),
    }
    text = renderers[output_format]()
    if output is None:
        typer.echo(text.rstrip("\n"))
    else:
        output.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


@dataclass(frozen=True)
class View:
    """A command's result, ready for every format: each result's module (or the `*_render` module beside it)
    makes its own, and the command hands it to `show`."""

    title: str  # the HTML page's
    rows: Sequence[dict[str, Any]]  # CSV and HTML
    as_json: Callable[[], str]
    as_table: Callable[[Console], None]
    page: Callable[[], str] | None = None  # a page of its own for --format html, instead of the rows'


def show(view: View, output_format: str, output: Path | None, console: Console) -> None:
    if output_format == "html" and view.page is not None:
        page = view.page()
        if output:
            output.write_text(page, encoding="utf-8")
        else:
            typer.echo(page)
        return
    emit(
        output_format,
        output,
        console,
        title=view.title,
        rows=view.rows,
        as_json=view.as_json,
        as_table=view.as_table,
    )
