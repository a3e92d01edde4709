"""`reconciler report --format html`: one self-contained page a billing engineer can forward.

The ledger counts money in minor units and keeps ISO timestamps; a reader wants `12.50 USD` and
`2026-12-01 13:40 UTC`, so this page converts both (JSON and CSV keep the ledger's shapes for scripts). Every
customer table starts with the customer; balance drift is one row per customer, its latest comparison, with the
history folded into `<details>`. Tables wrap long ids rather than widen the page: at 1280 px it never scrolls
sideways. Charts are inline SVG (no external resources), with axes, values on them and a legend.
"""

from __future__ import annotations

import html
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal

from reconciler.attention import PHRASES, AttentionItem
from reconciler.balances.drift import UNCORRECTED, DriftAction
from reconciler.balances.money import to_units, units_text
from reconciler.report import AuditRow, DriftRow, Report

# The section ids are a contract: links into the page and the browser test use them.
SECTIONS = ("totals", "usage-chart", "drift-chart", "attention", "drift", "unbilled", "periods", "audit")

STYLE = """body{font-family:system-ui,sans-serif;color:#222;line-height:1.4;max-width:1200px;margin:1.5rem auto;
padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.25rem} h2{font-size:1.15rem;margin:2rem 0 .5rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85rem;width:100%}
td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f3f3f3} .num{text-align:right;white-space:nowrap} time{white-space:nowrap}
.id,.customer{overflow-wrap:anywhere} th.id{overflow-wrap:normal} .customer{min-width:12em}
tbody.per-customer{border-top:2px solid #999} tr.history>td{background:#fafafa;border-top:none}
details table{margin:.4rem 0} summary{cursor:pointer;color:#345}
dl.summary{display:grid;grid-template-columns:max-content 1fr;gap:.3rem 1.5rem;margin:0} dt{font-weight:600}
.needs{color:#a32} .empty{color:#555;font-style:italic}
figure{margin:0} svg.chart{width:100%;max-width:760px;height:auto;display:block}
.chart text{font-size:11px;fill:#444} .chart .axis{stroke:#444} .chart .grid{stroke:#e6e6e6}
.s0{fill:#4e79a7} .s1{fill:#f28e2b}"""


def render_html(report: Report) -> str:
    """One file, no external resources: it opens in any browser, attached to an email or a ticket."""
    title = f"reconciler report {report.since[:10]} – {report.until[:10]}"
    sections = [
        ("totals", "Summary", _summary(report)),
        ("usage-chart", "Usage measured vs reported, per meter", _usage_chart(report)),
        ("drift-chart", "Balance drift found vs corrected, per day", _drift_chart(report.drift)),
        ("attention", "Needs a person", _attention_table(report.attention)),
        ("drift", "Balance drift: Stripe-expected balance vs Moesif, per customer", _drift_table(report.drift)),
        ("unbilled", "Metered items nobody bills", _unbilled_table(report)),
        ("periods", "Periods", _periods_table(report)),
        ("audit", "Audit trail: every write to Stripe and Moesif", _audit_table(report)),
    ]
    body = "\n".join(
        f'<section id="{sid}"><h2>{_e(heading)}</h2>{content}</section>' for sid, heading, content in sections
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>
{STYLE}
</style></head><body>
<h1>Usage and balance reconciliation</h1>
<p>From {_time(report.since)} to {_time(report.until)}, from the reconciler's ledger.</p>
{body}
</body></html>
"""


# --- formatting ---------------------------------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _time(value: str | datetime | None) -> str:
    """`2026-12-01 13:40 UTC`, with the exact ISO time kept in the element for machines."""
    if value is None:
        return ""
    moment = (datetime.fromisoformat(value) if isinstance(value, str) else value).astimezone(UTC)
    return f'<time datetime="{_e(moment.isoformat())}">{moment:%Y-%m-%d %H:%M} UTC</time>'


def _money(minor: int | None, currency: str, *, signed: bool = False) -> str:
    if minor is None:
        return ""
    return _units(to_units(minor, currency), currency, signed=signed)


def _units(amount: Decimal | str | None, currency: str | None, *, signed: bool = False) -> str:
    if amount is None:
        return "unknown"
    return units_text(Decimal(amount), currency or "", signed=signed).rstrip()


def _count(value: int | None) -> str:
    return "unknown" if value is None else f"{value:,}"


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _words(code: str) -> str:
    """A state or job name as words: `over_limit` -> `over limit`."""
    return code.replace("_", " ")


def _per_currency(sums: dict[str, Decimal]) -> str:
    return ", ".join(_units(amount, currency) for currency, amount in sorted(sums.items())) or "none"


def _row(cells: Sequence[str], kinds: Sequence[str], tag: str = "td") -> str:
    return "<tr>" + "".join(f'<{tag} class="{k}">{c}</{tag}>' for c, k in zip(cells, kinds, strict=True)) + "</tr>"


def _table(columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[str]]) -> str:
    """A customer table (customer first) of already-escaped cells. Each column has a header and a kind (a CSS
    class): `customer`, `id` (long ids and free text: may break anywhere), `num` (right-aligned), `text`."""
    kinds = [kind for _, kind in columns]
    body = "".join(_row(cells, kinds) for cells in rows)
    if not body:
        return '<p class="empty">None.</p>'
    head = _row([_e(h) for h, _ in columns], kinds, "th")
    return f'<table class="by-customer"><thead>{head}</thead><tbody>{body}</tbody></table>'


# --- sections -----------------------------------------------------------------------------------------------------


def _latest_per_customer(drift: Sequence[DriftRow]) -> dict[str, DriftRow]:
    """Each customer's latest comparison in the window (rows come oldest first)."""
    return {row.customer: row for row in drift}


def _summary(report: Report) -> str:
    totals = report.totals
    latest = _latest_per_customer(report.drift).values()
    drifting = [row for row in latest if row.difference_minor]
    absolute: dict[str, Decimal] = defaultdict(Decimal)
    for row in drifting:
        absolute[row.currency] += abs(to_units(row.difference_minor, row.currency))
    uncorrected = sum(1 for row in latest if row.action in UNCORRECTED)
    unpriced = totals["unbilled_items_amount_unknown"]
    at_risk = _per_currency(report.at_risk_by_currency())
    facts = [
        ("Items needing a person", f"{totals['needing_a_person']:,}"),
        (
            "Billing periods",
            f"{totals['periods']:,} ({totals['late_drift_periods']:,} with late drift, "
            f"{totals['failed_periods']:,} failing)",
        ),
        ("Usage measured (OpenMeter)", f"{totals['measured']:,}"),
        ("Usage reported to Stripe", f"{totals['reported']:,}"),
        ("Usage not reported", f"{totals['unreported']:,}"),
        ("Revenue at risk", at_risk + (f" (and {_plural(unpriced, 'unbilled item')} not priced)" if unpriced else "")),
        ("Metered items nobody bills", f"{totals['unbilled_items']:,}"),
        (
            "Customers with balance drift",
            f"{len(drifting)} of {len(latest)} compared (latest comparison each)" if latest else "none compared",
        ),
        ("Absolute balance drift, summed", _per_currency(absolute)),
        ("Balance drift left uncorrected", _plural(uncorrected, "customer")),
        ("Writes", f"Stripe {totals['stripe_writes']:,}, Moesif {totals['moesif_writes']:,}"),
    ]
    needs = ' class="needs"' if report.needs_a_person else ""  # the first fact, in red while anything needs one
    items = "".join(
        f"<dt>{_e(label)}</dt><dd{needs if i == 0 else ''}>{_e(v)}</dd>" for i, (label, v) in enumerate(facts)
    )
    return f'<dl class="summary">{items}</dl>'


def _attention_table(items: Sequence[AttentionItem]) -> str:
    columns = [("Customer", "customer"), ("What", "text"), ("Item", "id"), ("Since", "text"), ("Detail", "id")]
    return _table(
        columns,
        (
            (_e(i.customer), _e(PHRASES.get(i.reason, _words(i.reason))), _e(i.key), _time(i.since), _e(i.detail))
            for i in items
        ),
    )


DRIFT_COLUMNS = [("Compared", "text"), ("Stripe expected", "num"), ("Moesif", "num"), ("Difference", "num")]
DRIFT_COLUMNS += [("Action", "text"), ("Why", "id")]


def _drift_table(drift: Sequence[DriftRow]) -> str:
    """One row group per customer: the latest comparison, then all of them folded into `<details>`."""
    history: dict[str, list[DriftRow]] = defaultdict(list)
    for row in drift:
        history[row.customer].append(row)
    if not history:
        return '<p class="empty">No balance comparisons in this window.</p>'
    columns = [("Customer", "customer"), *DRIFT_COLUMNS]
    kinds = [kind for _, kind in DRIFT_COLUMNS]

    def cells(row: DriftRow) -> list[str]:
        return [
            _time(row.observed_at),
            _money(row.expected_minor, row.currency),
            _money(row.moesif_minor, row.currency),
            _money(row.difference_minor, row.currency, signed=True),
            _e(_words(row.action)),
            _e(row.reason),
        ]

    history_head = _row([h for h, _ in DRIFT_COLUMNS], kinds, "th")
    groups = []
    # Who drifts most comes first; the rest by name.
    for customer, rows in sorted(history.items(), key=lambda kv: (-abs(kv[1][-1].difference_minor), kv[0])):
        latest = _row([_e(customer), *cells(rows[-1])], ["customer", *kinds])
        every = "".join(_row(cells(r), kinds) for r in reversed(rows))
        summary = f"History: {_plural(len(rows), 'comparison')} in this window, newest first"
        table = f"<table><thead>{history_head}</thead><tbody>{every}</tbody></table>"
        folded = f"<details><summary>{summary}</summary>{table}</details>"
        groups.append(
            f'<tbody class="per-customer" data-customer="{_e(customer)}">{latest}'
            f'<tr class="history"><td colspan="{len(columns)}">{folded}</td></tr></tbody>'
        )
    head = _row([h for h, _ in columns], ["customer", *kinds], "th")
    return f'<table class="by-customer"><thead>{head}</thead>{"".join(groups)}</table>'


UNBILLED_COLUMNS = [("Customer", "customer"), ("Item", "id"), ("Meter / price", "id"), ("Why", "text")]
UNBILLED_COLUMNS += [("Period from", "text"), ("Measured", "num"), ("At risk", "num"), ("Reason", "id")]


def _unbilled_table(report: Report) -> str:
    return _table(
        UNBILLED_COLUMNS,
        (
            (
                _e(u.customer),
                _e(u.item),
                _e(u.stripe_target),
                _e(u.why),
                _time(u.period_start),
                _count(u.measured),
                _e(_units(u.at_risk, u.currency)),
                _e(u.reason),
            )
            for u in report.unbilled
        ),
    )


PERIOD_COLUMNS = [("Customer", "customer"), ("Meter / price", "id"), ("Period", "text"), ("Status", "text")]
PERIOD_COLUMNS += [("Measured", "num"), ("Reported", "num"), ("Difference", "num"), ("Stripe holds", "num")]
PERIOD_COLUMNS += [("At risk", "num"), ("Error", "id")]


def _periods_table(report: Report) -> str:
    return _table(
        PERIOD_COLUMNS,
        (
            (
                _e(p.customer),
                _e(p.stripe_target),
                f"{_time(p.period_start)} – {_time(p.period_end)}",
                _e(p.status),
                _count(p.measured),
                _count(p.reported),
                f"{p.difference:+,}",
                "not read back" if p.stripe is None else _e(p.stripe),
                _e(_units(p.at_risk, p.currency) if p.currency else "not estimated"),
                _e(p.last_error),
            )
            for p in report.periods
        ),
    )


AUDIT_COLUMNS = [("Customer", "customer"), ("Time", "text"), ("System", "text"), ("Request", "id"), ("Key", "id")]
AUDIT_COLUMNS += [("Amount", "text"), ("Outcome", "id")]


def _audit_table(report: Report) -> str:
    return _table(
        AUDIT_COLUMNS,
        (
            (
                _e(a.customer),
                _time(a.time),
                _e(a.system),
                _e(a.request),
                _e(a.key),
                _e(_audit_amount(a)),
                _e(a.outcome),
            )
            for a in report.audit
        ),
    )


def _audit_amount(row: AuditRow) -> str:
    """Money in currency units (Moesif); a usage quantity (Stripe) as a count."""
    if row.amount_in_units:
        return row.amount_in_units
    return f"quantity {int(row.amount):,}" if row.amount.isdigit() else row.amount


# --- charts -------------------------------------------------------------------------------------------------------


def _usage_chart(report: Report) -> str:
    if not report.periods:
        return '<p class="empty">No usage: no billing period in this window.</p>'
    per_meter: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for p in report.periods:
        per_meter[p.stripe_target][0] += p.measured or 0
        per_meter[p.stripe_target][1] += p.reported
    meters = sorted(per_meter)
    return bar_chart(
        meters,
        [
            ("measured (OpenMeter)", [per_meter[m][0] for m in meters]),
            ("reported (Stripe)", [per_meter[m][1] for m in meters]),
        ],
        y_label="usage units",
        description="Usage OpenMeter measured and usage reported to Stripe, summed per meter (Stripe meter or legacy "
        "price) over the billing periods in this window; the Periods table below has each customer's.",
    )


def _drift_chart(drift: Sequence[DriftRow]) -> str:
    """Per currency and day: the largest drift each customer showed that day, summed, beside what was corrected."""
    found: dict[str, dict[str, dict[str, Decimal]]] = defaultdict(lambda: defaultdict(dict))
    corrected: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for row in drift:
        if not row.difference_minor:
            continue
        day, amount = row.observed_at[:10], abs(to_units(row.difference_minor, row.currency))
        by_customer = found[row.currency][day]
        by_customer[row.customer] = max(amount, by_customer.get(row.customer, Decimal(0)))
        if row.action == DriftAction.CORRECT:
            corrected[row.currency][day] += amount
    if not found:
        return '<p class="empty">No drift: every balance comparison in this window agreed.</p>'
    charts = []
    for currency, days in sorted(found.items()):
        order = sorted(days)
        charts.append(
            bar_chart(
                [day[5:] for day in order],
                [
                    ("drift found", [sum(days[d].values(), Decimal(0)) for d in order]),
                    ("corrected", [corrected[currency][d] for d in order]),
                ],
                y_label=currency.upper(),
                description=f"Balance drift in {currency.upper()} per day (month-day): each customer's largest "
                "difference between the Stripe-expected and the Moesif balance that day, summed, beside the "
                "corrections sent to Moesif.",
            )
        )
    return "".join(charts)


def _ticks(peak: float) -> list[float]:
    """0 and four or five round steps (1, 2, 2.5 or 5 × a power of ten) up to at least `peak`."""
    raw = max(peak, 1) / 4
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(math.ceil(max(peak, 1) / step) + 1)]


def _tick_label(value: float) -> str:
    return f"{int(value):,}" if value == int(value) else f"{value:,.2f}".rstrip("0")


def bar_chart(
    categories: Sequence[str],
    series: Sequence[tuple[str, Sequence[int | Decimal]]],
    *,
    y_label: str,
    description: str,
) -> str:
    """Grouped bars as inline SVG: a y axis with round values and grid lines, category labels on the x axis, a
    legend, and each bar's exact value as its tooltip."""
    width, height, left, right, top, bottom = 760, 290, 72, 16, 40, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    ticks = _ticks(max((float(v) for _, values in series for v in values), default=0))
    scale = plot_h / ticks[-1]
    slot = plot_w / max(1, len(categories))
    bar_w = slot * 0.8 / len(series)
    labelled = bar_w >= 44
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{_e(description)}">']

    y_axis = [f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}"/>']
    for tick in ticks:
        y = top + plot_h - tick * scale
        y_axis.append(f'<line class="grid" x1="{left + 1}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}"/>')
        y_axis.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_tick_label(tick)}</text>')
    y_axis.append(
        f'<text x="14" y="{top + plot_h / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">{_e(y_label)}</text>'
    )
    parts.append(f'<g class="y-axis">{"".join(y_axis)}</g>')

    for j, (name, values) in enumerate(series):
        for i, value in enumerate(values):
            h = float(value) * scale
            x = left + i * slot + slot * 0.1 + j * bar_w
            parts.append(
                f'<rect class="s{j}" x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}">'
                f"<title>{_e(categories[i])} {_e(name)}: {value:,}</title></rect>"
            )
            if labelled:  # the exact value above its bar, where there is room for it
                parts.append(
                    f'<text class="value" x="{x + bar_w / 2:.1f}" y="{top + plot_h - h - 4:.1f}" '
                    f'text-anchor="middle">{value:,}</text>'
                )

    # Label every category when they fit, else every k-th: overlapping labels are unreadable.
    longest = max((len(c) for c in categories), default=1)
    every = max(1, math.ceil(len(categories) * longest * 6.5 / plot_w))
    x_axis = [f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}"/>']
    for i, category in enumerate(categories):
        if i % every == 0:
            x = left + (i + 0.5) * slot
            x_axis.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{_e(category)}</text>')
    parts.append(f'<g class="x-axis">{"".join(x_axis)}</g>')

    legend, x = [], left
    for j, (name, _) in enumerate(series):
        legend.append(f'<rect class="s{j}" x="{x}" y="12" width="12" height="12"/>')
        legend.append(f'<text x="{x + 17}" y="22">{_e(name)}</text>')
        x += 30 + 7 * len(name)
    parts.append(f'<g class="legend">{"".join(legend)}</g></svg>')
    return f"<figure>{''.join(parts)}<figcaption class=empty>{_e(description)}</figcaption></figure>"
