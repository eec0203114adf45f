"""The settlement report of a period: one self-contained HTML file, plus CSV and Parquet.

``write_report(wh, period, out_dir)`` writes, for the period's current reconciliation
run and current settlement:

* ``settlement-report-YYYY-MM.html``: what a settlement clerk opens. Tables and inline
  SVG charts (no script, no web font, no CDN; it opens offline and prints): the
  discrepancies by category and carrier pair, the decisions taken, what each carrier
  bills each other, net positions, bilateral and multilateral transfers, revenue shares,
  the tenants with the most money in dispute, disputes carried over from earlier
  periods, and the largest settlement lines.
* ``settlement-lines-YYYY-MM.csv`` / ``.parquet``: every settlement line;
  ``revenue-shares-YYYY-MM.csv`` / ``.parquet``: every share. Amounts are exact
  decimals (Parquet: decimal128; CSV: plain text, never floats).

Numbers in the HTML carry their exact value in ``data-value`` attributes (tables of
``recon_summary`` also name their ``data-category`` and ``data-pair``), so a test can
check the page against the warehouse.
"""

from __future__ import annotations

import csv
import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.reconcile import (
    BEIJING,
    CARRIERS,
    CATEGORIES,
    DISCREPANCIES,
    Period,
    current_run,
    decided_results_sql,
    decision_counts,
    run_info,
    summary,
)
from jobs.settle import Settlement, current_settlement, load_settlement
from pipeline.warehouse import Warehouse, rows
from pipeline.warehouse.base import quote_literal

CATEGORY_COLORS = {
    "matched": "#2e7d32",
    "token_mismatch": "#ef6c00",
    "amount_mismatch": "#f9a825",
    "missing_at_home": "#1565c0",
    "missing_at_serving": "#6a1b9a",
    "duplicate": "#c62828",
    "period_boundary": "#00838f",
}
CATEGORY_LABELS = {
    "matched": "Matched",
    "token_mismatch": "Token mismatch",
    "amount_mismatch": "Amount mismatch",
    "missing_at_home": "Missing at home carrier",
    "missing_at_serving": "Missing at serving carrier",
    "duplicate": "Duplicate",
    "period_boundary": "Period boundary",
}
CARRIER_NAMES = {"CMCC": "China Mobile", "CTCC": "China Telecom", "CUCC": "China Unicom"}
PARTY_LABELS = {
    "serving_carrier": "Serving carrier",
    "model_provider": "Model provider",
    "channel": "Entry channel",
}
TOP_TENANTS = 10
TOP_LINES = 25
CARRIED_ROWS = 20
ZERO = Decimal(0)


# ---- data ----------------------------------------------------------------------------


@dataclass
class ReportData:
    """Everything the report shows, read from the warehouse by ``load_report_data``."""

    period: Period
    carriers: tuple[str, ...]
    generated_at: datetime
    run: dict[str, Any] | None = None
    summary: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    settlement: Settlement | None = None
    settlement_run: dict[str, Any] | None = None
    lines: list[dict[str, Any]] = field(default_factory=list)
    line_count: int = 0
    shares: list[dict[str, Any]] = field(default_factory=list)
    tenants: list[dict[str, Any]] = field(default_factory=list)
    carried: list[dict[str, Any]] = field(default_factory=list)
    carried_total: dict[str, Any] = field(default_factory=dict)
    carried_by: list[dict[str, Any]] = field(default_factory=list)

    @property
    def pairs(self) -> list[str]:
        """Carrier pairs "SERVING>HOME" of the run's carriers."""
        return [f"{s}>{h}" for s in self.carriers for h in self.carriers if s != h]


def load_report_data(
    wh: Warehouse, period: Period | str, carriers: Sequence[str] = CARRIERS
) -> ReportData:
    """Read the period's current run and settlement (either may be missing)."""
    p = period if isinstance(period, Period) else Period.parse(period)
    data = ReportData(period=p, carriers=tuple(carriers), generated_at=datetime.now(UTC))
    run_id = current_run(wh, p, carriers)
    if run_id is not None:
        data.run = run_info(wh, run_id)
        data.summary = summary(wh, run_id)
        data.decisions = decision_counts(wh, run_id)
        data.tenants = _tenants(wh, run_id)
    sid = current_settlement(wh, p.label)
    if sid is not None:
        data.settlement = load_settlement(wh, sid)
        data.settlement_run = rows(
            wh.query_arrow(
                f"SELECT * FROM settlement_runs WHERE settlement_id = {quote_literal(sid)}"
            )
        )[0]
        data.lines = rows(
            wh.query_arrow(
                "SELECT line_id, toString(serving_carrier) AS serving_carrier,"
                " toString(home_carrier) AS home_carrier, toString(model_id) AS model_id,"
                " toString(provider) AS provider, toString(channel) AS channel,"
                " transactions, list_amount, rate_percent, amount FROM settlement_lines"
                f" WHERE settlement_id = {quote_literal(sid)}"
                f" ORDER BY amount DESC, line_id LIMIT {TOP_LINES}"
            )
        )
        data.line_count = int(
            rows(
                wh.query_arrow(
                    "SELECT count() AS n FROM settlement_lines"
                    f" WHERE settlement_id = {quote_literal(sid)}"
                )
            )[0]["n"]
        )
        data.shares = rows(
            wh.query_arrow(
                "SELECT toString(party_type) AS party_type, party, sum(amount) AS amount"
                f" FROM revenue_shares WHERE settlement_id = {quote_literal(sid)}"
                " GROUP BY party_type, party ORDER BY party_type, amount DESC, party"
            )
        )
    data.carried, data.carried_total, data.carried_by = _carried(wh, p, carriers)
    return data


def _tenants(wh: Warehouse, run_id: str) -> list[dict[str, Any]]:
    """The tenants with the most money not settled: disputed or still open."""
    inner = decided_results_sql(
        [run_id],
        "r.tenant_id AS tenant_id, r.category AS category,"
        " if(r.serving_records > 0, r.serving_amount, r.home_amount) AS amount",
    )
    return rows(
        wh.query_arrow(
            "SELECT tenant_id, countIf(decision = 'dispute') AS disputed,"
            " sumIf(amount, decision = 'dispute') AS disputed_amount,"
            " countIf(decision = '') AS open, sumIf(amount, decision = '') AS open_amount"
            f" FROM ({inner}) WHERE category != 'matched' AND decision != 'accept'"
            " GROUP BY tenant_id"
            " ORDER BY disputed_amount + open_amount DESC, tenant_id"
            f" LIMIT {TOP_TENANTS}"
        )
    )


def _carried(
    wh: Warehouse, period: Period, carriers: Sequence[str]
) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """Disputed transactions of earlier periods' current runs (still disputed): the
    largest ones, the total, and counts per period and category."""
    earlier = rows(
        wh.query_arrow(
            "SELECT period, argMax(run_id, activated_at) AS run_id FROM recon_activations"
            f" WHERE carriers = {_array(carriers)} AND period < {quote_literal(period.label)}"
            " GROUP BY period ORDER BY period"
        )
    )
    if not earlier:
        return [], {"transactions": 0, "amount": ZERO}, []
    inner = decided_results_sql(
        [r["run_id"] for r in earlier],
        "r.period AS period, r.run_id AS run_id, r.transaction_id AS transaction_id,"
        " toString(r.category) AS category, toString(r.serving_carrier) AS serving_carrier,"
        " toString(r.home_carrier) AS home_carrier, r.tenant_id AS tenant_id,"
        " if(r.serving_records > 0, r.serving_amount, r.home_amount) AS amount",
    )
    disputed = f"SELECT * FROM ({inner}) WHERE decision = 'dispute'"
    total = rows(
        wh.query_arrow(f"SELECT count() AS transactions, sum(amount) AS amount FROM ({disputed})")
    )[0]
    by = rows(
        wh.query_arrow(
            "SELECT period, category, count() AS transactions, sum(amount) AS amount"
            f" FROM ({disputed}) GROUP BY period, category"
            f" ORDER BY period, indexOf({_array(CATEGORIES)}, category)"
        )
    )
    listing = rows(
        wh.query_arrow(
            f"SELECT * EXCEPT decision FROM ({disputed})"
            f" ORDER BY amount DESC, period, transaction_id LIMIT {CARRIED_ROWS}"
        )
    )
    total["amount"] = total["amount"] or ZERO
    return listing, total, by


def _array(values: Sequence[str]) -> str:
    return "[" + ", ".join(quote_literal(v) for v in values) + "]"


# ---- formatting ------------------------------------------------------------------------------


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _money(value: Decimal | int | None, places: int = 2) -> str:
    amount = Decimal(value or 0)
    return f"{amount:,.{places}f}"


def _plain(value: Decimal) -> str:
    """A decimal without trailing zeros and never in exponent form (70, not 7E+1)."""
    return format(value.normalize(), "f")


def _int(value: int | None) -> str:
    return f"{int(value or 0):,}"


def _num_cell(value: Any, text: str, **attrs: str) -> str:
    extra = "".join(f' data-{k.replace("_", "-")}="{_e(v)}"' for k, v in attrs.items())
    return f'<td class="num" data-value="{_e(value)}"{extra}>{_e(text)}</td>'


def _pair(row: dict[str, Any]) -> str:
    return f"{row['serving_carrier']}>{row['home_carrier']}"


# ---- SVG charts (hand-made: no scripts, no libraries) ------------------------------------------


def _svg(width: int, height: int, body: str, title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" height="{height}"'
        f' viewBox="0 0 {width} {height}" aria-label="{_e(title)}"><title>{_e(title)}</title>'
        f"{body}</svg>"
    )


def hbar_chart(items: Sequence[tuple[str, float, str, str]], title: str, width: int = 560) -> str:
    """Horizontal bars: (label, value, color, value text) per bar."""
    label_w, bar_h, gap, right = 190, 22, 8, 110
    height = max(1, len(items)) * (bar_h + gap) + gap
    top = max((v for _, v, _, _ in items), default=0.0) or 1.0
    span = width - label_w - right
    parts = []
    for i, (label, value, color, text) in enumerate(items):
        y = gap + i * (bar_h + gap)
        w = 0 if value <= 0 else max(1.5, span * value / top)
        parts.append(
            f'<text x="{label_w - 8}" y="{y + bar_h * 0.7:.1f}" text-anchor="end"'
            f' class="lbl">{_e(label)}</text>'
            f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" rx="3"'
            f' fill="{color}"/>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + bar_h * 0.7:.1f}" class="val">'
            f"{_e(text)}</text>"
        )
    return _svg(width, height, "".join(parts), title)


def stacked_hbar_chart(
    items: Sequence[tuple[str, Sequence[tuple[float, str]], str]],
    legend: Sequence[tuple[str, str]],
    title: str,
    width: int = 560,
) -> str:
    """Horizontal stacked bars: (label, [(value, color), ...], total text) per bar."""
    label_w, bar_h, gap, right, legend_h = 150, 20, 7, 120, 26
    height = legend_h + max(1, len(items)) * (bar_h + gap) + gap
    top = max((sum(v for v, _ in segs) for _, segs, _ in items), default=0.0) or 1.0
    span = width - label_w - right
    parts = []
    x = label_w
    for name, color in legend:
        parts.append(
            f'<rect x="{x}" y="6" width="12" height="12" rx="2" fill="{color}"/>'
            f'<text x="{x + 17}" y="16" class="lbl">{_e(name)}</text>'
        )
        x += 24 + 7 * len(name)
    for i, (label, segs, text) in enumerate(items):
        y = legend_h + gap + i * (bar_h + gap)
        parts.append(
            f'<text x="{label_w - 8}" y="{y + bar_h * 0.72:.1f}" text-anchor="end"'
            f' class="lbl">{_e(label)}</text>'
        )
        x0 = float(label_w)
        for value, color in segs:
            w = span * value / top
            if w > 0:
                parts.append(
                    f'<rect x="{x0:.1f}" y="{y}" width="{max(w, 1.0):.1f}" height="{bar_h}"'
                    f' fill="{color}"/>'
                )
                x0 += w
        parts.append(
            f'<text x="{x0 + 6:.1f}" y="{y + bar_h * 0.72:.1f}" class="val">{_e(text)}</text>'
        )
    return _svg(width, height, "".join(parts), title)


def diverging_chart(items: Sequence[tuple[str, float, str]], title: str, width: int = 560) -> str:
    """Bars left (negative, red) or right (positive, green) of a zero line."""
    label_w, bar_h, gap = 130, 26, 10
    height = max(1, len(items)) * (bar_h + gap) + gap + 16
    top = max((abs(v) for _, v, _ in items), default=0.0) or 1.0
    half = (width - label_w - 20) / 2 - 80
    zero = label_w + 10 + (width - label_w - 20) / 2
    parts = [
        f'<line x1="{zero:.1f}" y1="4" x2="{zero:.1f}" y2="{height - 14}" class="axis"/>',
        f'<text x="{zero - 8:.1f}" y="{height - 2}" text-anchor="end" class="note">pays</text>',
        f'<text x="{zero + 8:.1f}" y="{height - 2}" class="note">receives</text>',
    ]
    for i, (label, value, text) in enumerate(items):
        y = gap + i * (bar_h + gap)
        w = half * abs(value) / top
        x = zero if value >= 0 else zero - w
        color = "#2e7d32" if value >= 0 else "#c62828"
        tx = zero + w + 6 if value >= 0 else zero - w - 6
        anchor = "start" if value >= 0 else "end"
        parts.append(
            f'<text x="{label_w - 8}" y="{y + bar_h * 0.68:.1f}" text-anchor="end"'
            f' class="lbl">{_e(label)}</text>'
            f'<rect x="{x:.1f}" y="{y}" width="{max(w, 1.0):.1f}" height="{bar_h}" rx="3"'
            f' fill="{color}"/>'
            f'<text x="{tx:.1f}" y="{y + bar_h * 0.68:.1f}" text-anchor="{anchor}"'
            f' class="val">{_e(text)}</text>'
        )
    return _svg(width, height, "".join(parts), title)


def transfer_diagram(
    carriers: Sequence[str], transfers: Sequence[tuple[str, str, Decimal]], title: str
) -> str:
    """The carriers on a circle, an arrow per payment (payer -> payee) with its amount."""
    width, height, radius = 420, 300, 105
    cx, cy = width / 2, height / 2 + 6
    pos = {}
    for i, c in enumerate(carriers):
        angle = -math.pi / 2 + 2 * math.pi * i / max(1, len(carriers))
        pos[c] = (cx + radius * math.cos(angle), cy + radius * math.sin(angle))
    parts = [
        '<defs><marker id="arr" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7"'
        ' markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z"'
        ' fill="#37474f"/></marker></defs>'
    ]
    for payer, payee, amount in transfers:
        (x1, y1), (x2, y2) = pos[payer], pos[payee]
        dx, dy = x2 - x1, y2 - y1
        dist = math.hypot(dx, dy) or 1.0
        ux, uy = dx / dist, dy / dist
        node = 38
        sx, sy, ex, ey = x1 + ux * node, y1 + uy * node, x2 - ux * node, y2 - uy * node
        mx, my = (sx + ex) / 2 - uy * 18, (sy + ey) / 2 + ux * 18  # bend to one side
        parts.append(
            f'<path d="M{sx:.1f},{sy:.1f} Q{mx:.1f},{my:.1f} {ex:.1f},{ey:.1f}" fill="none"'
            ' stroke="#37474f" stroke-width="2.2" marker-end="url(#arr)"/>'
            f'<text x="{mx - uy * 8:.1f}" y="{my + ux * 8 + 4:.1f}" text-anchor="middle"'
            f' class="flow">CNY {_e(_money(amount))}</text>'
        )
    for c, (x, y) in pos.items():
        parts.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="34" fill="#eceff1" stroke="#455a64"'
            ' stroke-width="1.5"/>'
            f'<text x="{x:.1f}" y="{y + 5:.1f}" text-anchor="middle" class="node">{_e(c)}</text>'
        )
    if not transfers:
        parts.append(
            f'<text x="{cx:.1f}" y="{cy + 5:.1f}" text-anchor="middle" class="note">'
            "no payments: every position is zero</text>"
        )
    return _svg(width, height, "".join(parts), title)


# ---- HTML ------------------------------------------------------------------------------------

_CSS = """
:root { --ink:#1f2933; --mute:#616e7c; --line:#d9e2ec; --bg:#f5f7fa; --accent:#0b4f8a; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 "Noto Sans","Segoe UI","PingFang SC","Microsoft YaHei",
       Helvetica,Arial,sans-serif; color:var(--ink); background:var(--bg); }
header { background:var(--accent); color:#fff; padding:22px 32px 18px; }
header h1 { margin:0 0 4px; font-size:22px; font-weight:600; }
header .sub { opacity:.85; font-size:13px; }
main { padding:18px 32px 40px; max-width:1280px; }
section { background:#fff; border:1px solid var(--line); border-radius:8px;
          padding:16px 20px; margin:0 0 18px; }
h2 { font-size:17px; margin:0 0 4px; color:var(--accent); }
p.note, .muted { color:var(--mute); font-size:12.5px; margin:2px 0 10px; }
.kpis { display:flex; flex-wrap:wrap; gap:12px; margin:0 0 18px; }
.kpi { background:#fff; border:1px solid var(--line); border-radius:8px; padding:10px 16px;
       min-width:170px; }
.kpi .v { font-size:20px; font-weight:600; }
.kpi .k { color:var(--mute); font-size:12px; }
.grid { display:flex; flex-wrap:wrap; gap:22px; align-items:flex-start; }
table { border-collapse:collapse; margin:6px 0 4px; font-size:13px; }
th, td { border-bottom:1px solid var(--line); padding:5px 9px; text-align:left; }
th { background:#f0f4f8; font-weight:600; white-space:nowrap; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
tr.total td { font-weight:600; border-top:2px solid #9fb3c8; }
.swatch { display:inline-block; width:10px; height:10px; border-radius:2px;
          margin-right:6px; vertical-align:baseline; }
.warn { background:#fff4e5; border:1px solid #ffb74d; padding:8px 12px; border-radius:6px; }
code { font-family:"DejaVu Sans Mono",Consolas,monospace; font-size:12px; }
svg text { font-family:inherit; fill:var(--ink); }
svg .lbl { font-size:12px; } svg .val { font-size:12px; fill:#334e68; }
svg .note { font-size:11px; fill:#829ab1; } svg .axis { stroke:#9fb3c8; stroke-width:1; }
svg .node { font-size:14px; font-weight:600; }
svg .flow { font-size:12px; font-weight:600; paint-order:stroke; stroke:#fff; stroke-width:4px;
            stroke-linejoin:round; }
footer { color:var(--mute); font-size:12px; padding:0 32px 30px; max-width:1280px; }
@media print { body { background:#fff; } section { break-inside:avoid; } }
"""


def _table(head: Sequence[str], body: Iterable[str], num_from: int = 1) -> str:
    cells = "".join(
        f'<th class="num">{_e(h)}</th>' if i >= num_from else f"<th>{_e(h)}</th>"
        for i, h in enumerate(head)
    )
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _swatch(category: str) -> str:
    return (
        f'<span class="swatch" style="background:{CATEGORY_COLORS[category]}"></span>'
        f"{_e(CATEGORY_LABELS[category])}"
    )


def _recon_section(data: ReportData) -> str:
    if data.run is None:
        return (
            "<section><h2>Reconciliation</h2><p class='warn'>No reconciliation run for this"
            f" period. Run <code>tokenmeter reconcile --period {_e(data.period.label)}</code>."
            "</p></section>"
        )
    pairs = data.pairs
    cell: dict[tuple[str, str], dict[str, Any]] = {}
    for row in data.summary:
        cell[(row["category"], _pair(row))] = row
    body = []
    for cat in CATEGORIES:
        cols = [f"<td data-category='{cat}'>{_swatch(cat)}</td>"]
        total = 0
        s_amt = h_amt = diff = ZERO
        for pair in pairs:
            found = cell.get((cat, pair))
            n = int(found["transactions"]) if found else 0
            total += n
            if found:
                s_amt += found["serving_amount"]
                h_amt += found["home_amount"]
                diff += found["amount_diff"]
            cols.append(_num_cell(n, _int(n), category=cat, pair=pair, field="transactions"))
        cols.append(_num_cell(total, _int(total), category=cat, pair="all", field="transactions"))
        cols.append(_num_cell(s_amt, _money(s_amt), category=cat, field="serving_amount"))
        cols.append(_num_cell(h_amt, _money(h_amt), category=cat, field="home_amount"))
        cols.append(_num_cell(diff, _money(diff), category=cat, field="amount_diff"))
        body.append("<tr>" + "".join(cols) + "</tr>")
    grand = sum(int(r["transactions"]) for r in data.summary)
    body.append(
        "<tr class='total'><td>All transactions</td>"
        + "".join(
            _num_cell(n, _int(n), pair=p, field="pair_total")
            for p in pairs
            for n in [sum(int(r["transactions"]) for r in data.summary if _pair(r) == p)]
        )
        + _num_cell(grand, _int(grand), field="grand_total")
        + "<td></td><td></td><td></td></tr>"
    )
    table = _table(["Category", *pairs, "All", "Serving amount", "Home amount", "Difference"], body)
    counts = {c: 0 for c in CATEGORIES}
    for row in data.summary:
        counts[row["category"]] += int(row["transactions"])
    chart = hbar_chart(
        [
            (CATEGORY_LABELS[c], float(counts[c]), CATEGORY_COLORS[c], _int(counts[c]))
            for c in DISCREPANCIES
        ],
        "Discrepancies by category",
    )
    run = data.run
    return (
        "<section id='reconciliation'><h2>Discrepancies by category</h2>"
        "<p class='note'>Transactions per category and carrier pair (serving carrier &gt;"
        " home carrier). Amounts are list amounts in CNY at the serving carrier's price card;"
        " the difference is serving minus home. Tolerances: tokens"
        f" {_int(run['token_tolerance'])}, amount {_e(_plain(run['amount_tolerance']))}"
        f" (relative); period-boundary window {_int(run['boundary_window_s'])} s.</p>"
        f"<div class='grid'><div>{chart}</div></div>{table}</section>"
    )


def _decision_section(data: ReportData) -> str:
    if data.run is None:
        return ""
    body = []
    for row in data.decisions:
        cat = row["category"]
        body.append(
            f"<tr><td>{_swatch(cat)}</td>"
            + _num_cell(row["accepted"], _int(row["accepted"]), category=cat, field="accepted")
            + _num_cell(row["accepted_amount"], _money(row["accepted_amount"]))
            + _num_cell(row["disputed"], _int(row["disputed"]), category=cat, field="disputed")
            + _num_cell(row["disputed_amount"], _money(row["disputed_amount"]))
            + _num_cell(row["open"], _int(row["open"]), category=cat, field="open")
            + _num_cell(row["open_amount"], _money(row["open_amount"]))
            + "</tr>"
        )
    run_id = data.run["run_id"]
    return (
        "<section id='decisions'><h2>Decisions</h2><p class='note'>Only matched and accepted"
        " transactions are settled. Record a decision with <code>tokenmeter recon accept"
        f"|dispute --run {_e(run_id)} --category C [--transaction T]</code>, then"
        " <code>tokenmeter settle</code> again. Amounts: the list amount the line would bill"
        " (CNY).</p>"
        + _table(
            ["Category", "Accepted", "CNY", "Disputed", "CNY", "Open", "CNY"],
            body or ["<tr><td colspan='7'>No discrepancies.</td></tr>"],
        )
        + "</section>"
    )


def _settlement_section(data: ReportData) -> str:
    st = data.settlement
    if st is None:
        return (
            "<section id='settlement'><h2>Settlement</h2><p class='warn'>Not settled yet. Run"
            f" <code>tokenmeter settle --period {_e(data.period.label)}</code>.</p></section>"
        )
    warn = ""
    if data.run is not None and st.run_id != data.run["run_id"]:
        warn = (
            "<p class='warn'>This settlement is based on an earlier reconciliation run"
            f" ({_e(st.run_id)}); the current run is {_e(data.run['run_id'])}. Run"
            " <code>tokenmeter settle</code> again.</p>"
        )
    carriers = sorted({c for pair in st.bills for c in pair} | set(st.positions))
    head = ["Serving \\ Home", *carriers, "Receivable"]
    body = []
    for s in carriers:
        cols = [
            f"<td><b>{_e(s)}</b> <span class='muted'>{_e(CARRIER_NAMES.get(s, ''))}</span></td>"
        ]
        for h in carriers:
            if s == h:
                cols.append("<td class='num muted'>-</td>")
            else:
                amount = st.bills.get((s, h), Decimal("0.00"))
                cols.append(_num_cell(amount, _money(amount), pair=f"{s}>{h}", field="bill"))
        recv = st.positions[s].receivable if s in st.positions else ZERO
        cols.append(_num_cell(recv, _money(recv), carrier=s, field="receivable"))
        body.append("<tr>" + "".join(cols) + "</tr>")
    body.append(
        "<tr class='total'><td>Payable</td>"
        + "".join(
            _num_cell(
                st.positions[h].payable, _money(st.positions[h].payable), carrier=h, field="payable"
            )
            for h in carriers
        )
        + _num_cell(st.amount, _money(st.amount), field="settled_total")
        + "</tr>"
    )
    bills = _table(head, body)
    pos_body = [
        f"<tr><td><b>{_e(c)}</b> <span class='muted'>{_e(CARRIER_NAMES.get(c, ''))}</span></td>"
        + _num_cell(p.receivable, _money(p.receivable))
        + _num_cell(p.payable, _money(p.payable))
        + _num_cell(p.net, _money(p.net), carrier=c, field="net")
        + "</tr>"
        for c, p in st.positions.items()
    ]
    positions = _table(["Carrier", "Receivable", "Payable", "Net"], pos_body)
    pos_chart = diverging_chart(
        [(c, float(p.net), _money(p.net)) for c, p in st.positions.items()],
        "Net positions (CNY)",
        width=520,
    )

    def transfers_table(items: Sequence[Any], scheme: str) -> str:
        rows_ = [
            f"<tr><td>{_e(t.payer)}</td><td>{_e(t.payee)}</td>"
            + _num_cell(t.amount, _money(t.amount), scheme=scheme, payer=t.payer, payee=t.payee)
            + "</tr>"
            for t in items
        ]
        total = sum((t.amount for t in items), Decimal("0.00"))
        rows_.append(
            "<tr class='total'><td colspan='2'>Money moved</td>"
            + _num_cell(total, _money(total), scheme=scheme, field="moved")
            + "</tr>"
        )
        return _table(["Payer", "Payee", "CNY"], rows_, num_from=2)

    diagram = transfer_diagram(
        carriers,
        [(t.payer, t.payee, t.amount) for t in st.multilateral],
        "Multilateral netting: payments",
    )
    sr = data.settlement_run or {}
    return (
        "<section id='settlement'><h2>What each carrier bills each other</h2>"
        f"{warn}<p class='note'>Settlement <code>{_e(st.settlement_id)}</code> of run"
        f" <code>{_e(st.run_id)}</code>: {_int(st.items)} transactions settled, list amount"
        f" CNY {_money(st.list_amount, 6)}. Wholesale agreement"
        f" {_e(sr.get('wholesale_version', ''))}: each line bills its list amount times the"
        " rate, rounded half-even to the cent; every total here is a sum of line amounts."
        f"</p>{bills}</section>"
        "<section id='positions'><h2>Net positions and transfers</h2><p class='note'>Net ="
        " receivable - payable; the nets add up to zero. Bilateral: one payment per carrier"
        " pair. Multilateral netting: at most n - 1 payments for n carriers, the least money"
        " moved.</p>"
        f"<div class='grid'><div>{positions}{pos_chart}</div>"
        f"<div><h3>Multilateral netting</h3>{transfers_table(st.multilateral, 'multilateral')}"
        f"{diagram}</div>"
        f"<div><h3>Bilateral</h3>{transfers_table(st.bilateral, 'bilateral')}</div></div>"
        "</section>"
    )


def _shares_section(data: ReportData) -> str:
    if data.settlement is None:
        return ""
    blocks = []
    for party_type, label in PARTY_LABELS.items():
        items = [r for r in data.shares if r["party_type"] == party_type]
        body = [
            f"<tr><td>{_e(r['party'])}</td>"
            + _num_cell(r["amount"], _money(r["amount"]), party_type=party_type, party=r["party"])
            + "</tr>"
            for r in items
        ]
        total = sum((r["amount"] for r in items), Decimal("0.00"))
        body.append(
            "<tr class='total'><td>Total</td>"
            + _num_cell(total, _money(total), party_type=party_type, field="total")
            + "</tr>"
        )
        blocks.append(f"<div><h3>{_e(label)}</h3>{_table([label, 'CNY'], body)}</div>")
    sr = data.settlement_run or {}
    return (
        "<section id='revenue-shares'><h2>Revenue shares</h2><p class='note'>Each line's"
        " amount shared between the serving carrier, the model provider and the entry channel"
        f" (agreement {_e(sr.get('revenue_share_version', ''))}); per line the shares add up"
        " to the line's amount to the cent.</p>"
        f"<div class='grid'>{''.join(blocks)}</div></section>"
    )


def _tenants_section(data: ReportData) -> str:
    if data.run is None:
        return ""
    if not data.tenants:
        return (
            "<section id='tenants'><h2>Top disputed tenants</h2><p class='note'>No"
            " transaction is disputed or open.</p></section>"
        )
    chart = stacked_hbar_chart(
        [
            (
                r["tenant_id"],
                [(float(r["disputed_amount"]), "#c62828"), (float(r["open_amount"]), "#f9a825")],
                f"CNY {_money(r['disputed_amount'] + r['open_amount'])}",
            )
            for r in data.tenants
        ],
        [("disputed", "#c62828"), ("open (no decision)", "#f9a825")],
        "Top tenants by money in dispute",
    )
    body = [
        f"<tr><td>{_e(r['tenant_id'])}</td>"
        + _num_cell(r["disputed"], _int(r["disputed"]), tenant=r["tenant_id"], field="disputed")
        + _num_cell(r["disputed_amount"], _money(r["disputed_amount"]))
        + _num_cell(r["open"], _int(r["open"]), tenant=r["tenant_id"], field="open")
        + _num_cell(r["open_amount"], _money(r["open_amount"]))
        + "</tr>"
        for r in data.tenants
    ]
    table = _table(["Tenant", "Disputed", "CNY", "Open", "CNY"], body)
    return (
        "<section id='tenants'><h2>Top disputed tenants</h2><p class='note'>Tenants with the"
        " most list amount in transactions that are not settled: disputed, or still without"
        f" a decision (top {TOP_TENANTS}).</p>"
        f"<div class='grid'><div>{chart}</div><div>{table}</div></div></section>"
    )


def _carried_section(data: ReportData) -> str:
    total = data.carried_total
    n = int(total.get("transactions", 0) or 0)
    if not n:
        return (
            "<section id='carried-over'><h2>Disputes carried over</h2><p class='note'>No"
            " disputes from earlier periods are open.</p></section>"
        )
    body = [
        f"<tr><td>{_e(r['period'])}</td><td><code>{_e(r['transaction_id'])}</code></td>"
        f"<td>{_e(r['serving_carrier'])}&gt;{_e(r['home_carrier'])}</td>"
        f"<td>{_swatch(r['category'])}</td><td>{_e(r['tenant_id'])}</td>"
        + _num_cell(r["amount"], _money(r["amount"], 6))
        + f"<td><code>{_e(r['run_id'])}</code></td></tr>"
        for r in data.carried
    ]
    by_body = [
        f"<tr><td>{_e(r['period'])}</td><td>{_swatch(r['category'])}</td>"
        + _num_cell(
            r["transactions"],
            _int(r["transactions"]),
            period=r["period"],
            category=r["category"],
            field="carried",
        )
        + _num_cell(r["amount"], _money(r["amount"], 6))
        + "</tr>"
        for r in data.carried_by
    ]
    return (
        "<section id='carried-over'><h2>Disputes carried over from earlier periods</h2>"
        f"<p class='note'><span data-field='carried_transactions' data-value='{n}'>{_int(n)}"
        f"</span> disputed transactions, CNY <span data-field='carried_amount'"
        f" data-value='{_e(total['amount'])}'>{_money(total['amount'], 6)}</span>. Accept them"
        " in their own run and settle that period again (a supplementary settlement).</p>"
        + _table(["Period", "Category", "Transactions", "CNY"], by_body, 2)
        + f"<h3>The {min(CARRIED_ROWS, n)} largest</h3>"
        + _table(["Period", "Transaction", "Pair", "Category", "Tenant", "CNY", "Run"], body, 5)
        + "</section>"
    )


def _lines_section(data: ReportData, exports: Sequence[str]) -> str:
    if data.settlement is None:
        return ""
    body = [
        f"<tr><td><code>{_e(r['line_id'])}</code></td>"
        + _num_cell(r["transactions"], _int(r["transactions"]))
        + _num_cell(r["list_amount"], _money(r["list_amount"], 6))
        + _num_cell(r["rate_percent"], f"{_plain(r['rate_percent'])} %")
        + _num_cell(r["amount"], _money(r["amount"]), line=r["line_id"], field="line_amount")
        + "</tr>"
        for r in data.lines
    ]
    files = ", ".join(f"<code>{_e(x)}</code>" for x in exports)
    sid = data.settlement.settlement_id
    return (
        f"<section id='lines'><h2>Largest settlement lines</h2><p class='note'>Top"
        f" {min(TOP_LINES, data.line_count)} of {_int(data.line_count)} lines (serving &gt; home"
        " / model / provider / channel). All lines: "
        f"{files}. Every line traces to its event ids:"
        " <code>SELECT l.line_id, i.transaction_id, i.serving_event_id, i.home_event_id FROM"
        " settlement_lines l JOIN settlement_items i USING (settlement_id, line_id) WHERE"
        f" settlement_id = '{_e(sid)}'</code></p>"
        + _table(["Line", "Transactions", "List amount", "Rate", "Amount (CNY)"], body)
        + "</section>"
    )


def _kpis(data: ReportData) -> str:
    counts = {c: 0 for c in CATEGORIES}
    for row in data.summary:
        counts[row["category"]] += int(row["transactions"])
    total = sum(counts.values())
    matched_share = f"{100 * counts['matched'] / total:.2f} %" if total else "-"
    open_n = sum(int(r["open"]) for r in data.decisions)
    disputed_n = sum(int(r["disputed"]) for r in data.decisions)
    st = data.settlement
    items = [
        ("Transactions reconciled", _int(total), total),
        ("Matched", matched_share, counts["matched"]),
        ("Discrepancies", _int(total - counts["matched"]), total - counts["matched"]),
        ("Disputed / open", f"{_int(disputed_n)} / {_int(open_n)}", disputed_n),
        ("Settled (CNY)", _money(st.amount) if st else "not settled", st.amount if st else ""),
        (
            "Carried-over disputes",
            _int(data.carried_total.get("transactions", 0)),
            data.carried_total.get("transactions", 0),
        ),
    ]
    return (
        "<div class='kpis'>"
        + "".join(
            f"<div class='kpi'><div class='v' data-kpi='{_e(k)}' data-value='{_e(raw)}'>"
            f"{_e(v)}</div><div class='k'>{_e(k)}</div></div>"
            for k, v, raw in items
        )
        + "</div>"
    )


def render_html(data: ReportData, exports: Sequence[str] = ()) -> str:
    """The report page for ``data``; ``exports`` names the export files to point to."""
    p = data.period
    month = p.start.strftime("%B %Y")
    run = data.run
    meta = [
        f"Period {p.label}: {p.start.strftime('%Y-%m-%d %H:%M')} to"
        f" {p.end.strftime('%Y-%m-%d %H:%M')} Beijing time (UTC+08:00)",
        f"carriers {', '.join(data.carriers)}",
    ]
    if run is not None:
        meta.append(f"run {run['run_id']}")
    if data.settlement is not None:
        meta.append(f"settlement {data.settlement.settlement_id}")
    generated = data.generated_at.astimezone(BEIJING).strftime("%Y-%m-%d %H:%M:%S")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>Cross-carrier settlement {_e(p.label)}</title><style>{_CSS}</style></head>"
        f"<body><header><h1>Cross-carrier Token settlement: {_e(month)}</h1>"
        f"<div class='sub'>{_e(' · '.join(meta))}</div></header><main>"
        + _kpis(data)
        + _recon_section(data)
        + _decision_section(data)
        + _settlement_section(data)
        + _shares_section(data)
        + _tenants_section(data)
        + _carried_section(data)
        + _lines_section(data, exports)
        + "</main><footer>Generated "
        + _e(generated)
        + " Beijing time by tokenmeter. Money in CNY. Record amounts are list amounts rounded"
        " half-even to 0.000001; line amounts are rounded half-even to the cent once per line."
        " See docs/settlement.md.</footer></body></html>"
    )


# ---- files -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportFiles:
    """The files ``write_report`` wrote."""

    html: Path
    lines_csv: Path
    lines_parquet: Path
    shares_csv: Path
    shares_parquet: Path


def _export(table: pa.Table, csv_path: Path, parquet_path: Path) -> None:
    pq.write_table(table, parquet_path)
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(table.column_names)
        for row in table.to_pylist():
            writer.writerow(["" if v is None else _csv_value(v) for v in row.values()])


def _csv_value(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def write_report(
    wh: Warehouse, period: Period | str, out_dir: Path, carriers: Sequence[str] = CARRIERS
) -> ReportFiles:
    """Write the HTML report and the CSV/Parquet exports of the current settlement."""
    data = load_report_data(wh, period, carriers)
    label = data.period.label
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(
        html=out_dir / f"settlement-report-{label}.html",
        lines_csv=out_dir / f"settlement-lines-{label}.csv",
        lines_parquet=out_dir / f"settlement-lines-{label}.parquet",
        shares_csv=out_dir / f"revenue-shares-{label}.csv",
        shares_parquet=out_dir / f"revenue-shares-{label}.parquet",
    )
    sid = data.settlement.settlement_id if data.settlement is not None else ""
    where = f"WHERE settlement_id = {quote_literal(sid)}"
    lines = wh.query_arrow(f"SELECT * FROM settlement_lines {where} ORDER BY line_id")
    shares = wh.query_arrow(
        f"SELECT * FROM revenue_shares {where} ORDER BY line_id, party_type, party"
    )
    if lines.num_columns == 0:  # empty result without a schema
        lines = wh.query_arrow("SELECT * FROM settlement_lines LIMIT 0")
        shares = wh.query_arrow("SELECT * FROM revenue_shares LIMIT 0")
    _export(lines, files.lines_csv, files.lines_parquet)
    _export(shares, files.shares_csv, files.shares_parquet)
    exports = [
        files.lines_csv.name,
        files.lines_parquet.name,
        files.shares_csv.name,
        files.shares_parquet.name,
    ]
    files.html.write_text(render_html(data, exports), encoding="utf-8")
    return files
