"""Reconciliation, settlement and the report over a simulated month in the embedded
warehouse (the session's shared one, see tests/conftest.py).

The month: November 2026 (Beijing time), calls between all three carriers with faults
of every category at known counts, calls straddling the month's end (period_boundary
here) and its start (October's), plus same-carrier calls that must be ignored. Every
expected number is computed independently from the simulator's records with the price
cards (``PriceBook.rate``) and Python Decimal; nothing is read back from the jobs'
own arithmetic.
"""

from __future__ import annotations

import csv
import html.parser
import re
import zlib
from collections import defaultdict
from collections.abc import Iterator
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from jobs.agreements import DEFAULT_AGREEMENTS_DIR, Agreements, load_agreements
from jobs.reconcile import (
    CATEGORIES,
    Period,
    ReconError,
    ReconParams,
    classify,
    current_run,
    reconcile,
    record_decision,
)
from jobs.report import load_report_data, render_html, write_report
from jobs.settle import settle
from pipeline.metering.pricing import PriceBook, Rating, load_cards
from pipeline.settings import Settings
from pipeline.simulate_recon import ReconSimulation, usage_events_batch
from pipeline.warehouse import Warehouse, rows, scalar

D = Decimal
NOV, OCT = Period.parse("2026-11"), Period.parse("2026-10")
CALLS, FAULT_RATE, START_BOUNDARY = 3000, 0.07, 9
MY_TABLES = (
    "usage_events",
    "recon_prices",
    "recon_runs",
    "recon_activations",
    "recon_results",
    "recon_summary",
    "recon_decisions",
    "settlement_runs",
    "settlement_activations",
    "settlement_items",
    "settlement_lines",
    "revenue_shares",
    "settlement_positions",
    "settlement_transfers",
)
_PER_REPORT = ("event_id", "reporting_carrier", "event_time", "source_id")


class Month:
    """The simulated month and what is expected of it."""

    def __init__(self, book: PriceBook, agreements: Agreements) -> None:
        self.book = book
        self.agreements = agreements
        self.sim = ReconSimulation.for_period(
            2026,
            "2026-11",
            CALLS,
            fault_rate=FAULT_RATE,
            start_boundary_calls=START_BOUNDARY,
            book=book,
        )
        self.records = self.sim.records()
        self.by_tx: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for rec in self.records:
            self.by_tx[rec["transaction_id"]].append(rec)
        self.truth = self.sim.truth.to_json()

    def in_period(self, label: str, category: str | None = None) -> list[str]:
        return sorted(
            tx
            for tx, (p, c) in self.sim.transactions.items()
            if p == label and (category is None or c == category)
        )

    def settled_record(self, tx: str) -> dict[str, Any]:
        """The record a settled transaction bills: the earliest serving record, or the
        home record when the serving carrier has none."""
        recs = self.by_tx[tx]
        serving = [r for r in recs if r["reporting_carrier"] == r["serving_carrier"]]
        return min(serving or recs, key=lambda r: (r["event_time"], r["event_id"]))

    def list_amount(self, rec: dict[str, Any]) -> Decimal:
        rating = self.book.rate(rec)
        assert isinstance(rating, Rating)
        return rating.list_amount

    def expected_lines(self, accepted: set[str]) -> dict[str, Decimal]:
        """Line id -> settled amount, from scratch: matched and accepted transactions,
        list amounts from the price cards, the wholesale rate, half-even to the cent."""
        sums: dict[str, Decimal] = defaultdict(Decimal)
        keys: dict[str, tuple[str, str, str]] = {}
        for tx, (p, category) in self.sim.transactions.items():
            if p != "2026-11" or (category != "matched" and category not in accepted):
                continue
            rec = self.settled_record(tx)
            line = (
                f"{rec['serving_carrier']}>{rec['home_carrier']}/{rec['model_id']}/"
                f"{rec['provider']}/{rec['channel']}"
            )
            sums[line] += self.list_amount(rec)
            keys[line] = (rec["serving_carrier"], rec["home_carrier"], rec["model_id"])
        out = {}
        for line, total in sums.items():
            rate = _rate(*keys[line])
            out[line] = (total * rate / 100).quantize(D("0.01"), rounding=ROUND_HALF_EVEN)
        return out


def _rate(serving: str, home: str, model: str) -> Decimal:
    """The shipped wholesale agreement, written out by hand (config/agreements)."""
    if serving == "CMCC" and model == "jiutian-13b":
        return D(80)
    if model == "deepseek-r1":
        return D(75)
    if {serving, home} == {"CTCC", "CUCC"}:
        return D(65)
    return D(70)


def _truncate(wh: Warehouse) -> None:
    for table in MY_TABLES:
        wh.execute(f"TRUNCATE TABLE IF EXISTS {table}")


@pytest.fixture(scope="module")
def month(warehouse: Warehouse) -> Iterator[Month]:
    # chdb finds a Variant type when two branches of an if() have no common type; a
    # ClickHouse server (default settings) refuses such a query: test as the server does
    variant = scalar(warehouse.query_arrow("SELECT getSetting('use_variant_as_common_type')"))
    warehouse.execute("SET use_variant_as_common_type = 0")
    _truncate(warehouse)
    m = Month(load_cards(Path("config/price_cards")), load_agreements(DEFAULT_AGREEMENTS_DIR))
    warehouse.insert_arrow("usage_events", usage_events_batch(m.records, b"k" * 32, book=m.book))
    # calls within one carrier (home == serving): not cross-carrier, never reconciled
    local = []
    for original in m.records[:40]:
        rec = dict(original, attributes={})
        rec["event_id"] += "-local"
        rec["home_carrier"] = rec["serving_carrier"] = rec["reporting_carrier"]
        rec["transaction_id"] = None
        local.append(rec)
    warehouse.insert_arrow("usage_events", usage_events_batch(local, b"k" * 32, book=m.book))
    yield m
    _truncate(warehouse)
    warehouse.execute(f"SET use_variant_as_common_type = {int(bool(variant))}")


@pytest.fixture(scope="module")
def run_id(warehouse: Warehouse, month: Month) -> str:
    run = reconcile(warehouse, ReconParams(NOV), month.book)
    assert run.created
    return run.run_id


def _results(wh: Warehouse, run_id: str) -> dict[str, dict[str, Any]]:
    return {
        r["transaction_id"]: r
        for r in rows(wh.query_arrow(f"SELECT * FROM recon_results WHERE run_id = '{run_id}'"))
    }


def _summary_counts(wh: Warehouse, run_id: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in rows(
        wh.query_arrow(
            "SELECT toString(serving_carrier) AS s, toString(home_carrier) AS h,"
            " toString(category) AS c, transactions"
            f" FROM recon_summary WHERE run_id = '{run_id}'"
        )
    ):
        out.setdefault(f"{r['s']}>{r['h']}", dict.fromkeys(CATEGORIES, 0))[r["c"]] = int(
            r["transactions"]
        )
    return out


# ---- reconciliation ---------------------------------------------------------------------


def test_summary_counts_equal_the_injected_counts(
    warehouse: Warehouse, month: Month, run_id: str
) -> None:
    by_pair = _summary_counts(warehouse, run_id)
    totals = dict.fromkeys(CATEGORIES, 0)
    for cells in by_pair.values():
        for c, n in cells.items():
            totals[c] += n
    assert totals == month.truth["periods"]["2026-11"]
    assert all(totals[c] > 0 for c in CATEGORIES)
    assert by_pair == month.truth["by_pair"]["2026-11"]


def test_every_transaction_is_in_its_category(
    warehouse: Warehouse, month: Month, run_id: str
) -> None:
    results = _results(warehouse, run_id)
    expected = {tx: c for tx, (p, c) in month.sim.transactions.items() if p == "2026-11"}
    assert {tx: r["category"] for tx, r in results.items()} == expected
    # the calls that straddle the month's start are October's, not November's
    assert not set(month.in_period("2026-10")) & set(results)


def test_amounts_are_the_price_cards_list_amounts(
    warehouse: Warehouse, month: Month, run_id: str
) -> None:
    for tx, r in _results(warehouse, run_id).items():
        recs = month.by_tx[tx]
        for side, carrier in (("serving", r["serving_carrier"]), ("home", r["home_carrier"])):
            own = [x for x in recs if x["reporting_carrier"] == carrier]
            assert r[f"{side}_records"] == len(own)
            assert r[f"{side}_event_ids"] == sorted(x["event_id"] for x in own)
            if not own:
                assert r[f"{side}_amount"] == 0 and r[f"{side}_event_id"] == ""
                continue
            first = min(own, key=lambda x: (x["event_time"], x["event_id"]))
            assert r[f"{side}_event_id"] == first["event_id"]
            assert r[f"{side}_amount"] == month.list_amount(first), (tx, side)
            assert r[f"{side}_output_tokens"] == first["output_tokens"]
            assert r[f"{side}_priced"] == 1
        assert r["amount_diff"] == r["serving_amount"] - r["home_amount"]


def test_sql_and_python_classification_agree(
    warehouse: Warehouse, month: Month, run_id: str
) -> None:
    params = ReconParams(NOV)
    for r in _results(warehouse, run_id).values():
        times = [t for t in (r["serving_event_time"], r["home_event_time"]) if t is not None]
        straddles = any(t.timestamp() * 1000 >= NOV.end_ms for t in times) or (
            r["serving_records"] + r["home_records"] > len(times)
            and r["category"] == "period_boundary"
        )
        got = classify(
            r["serving_records"],
            r["home_records"],
            straddles,
            r["token_diff"],
            r["serving_amount"],
            r["home_amount"],
            params,
        )
        assert got == r["category"]


def test_previous_month_gets_the_calls_across_its_end(warehouse: Warehouse, month: Month) -> None:
    run = reconcile(warehouse, ReconParams(OCT), month.book)
    assert run.counts() == month.truth["periods"]["2026-10"]
    assert run.counts()["period_boundary"] == START_BOUNDARY


def test_reconcile_again_changes_nothing(warehouse: Warehouse, month: Month, run_id: str) -> None:
    def snapshot() -> dict[str, Any]:
        return {
            t: scalar(warehouse.query_arrow(f"SELECT count() FROM {t}"))
            for t in ("recon_results", "recon_summary", "recon_runs", "recon_activations")
        } | {
            "hash": scalar(
                warehouse.query_arrow(
                    "SELECT sum(cityHash64(transaction_id, category, serving_amount, home_amount,"
                    " serving_event_id, home_event_id)) FROM recon_results"
                    f" WHERE run_id = '{run_id}'"
                )
            )
        }

    before = snapshot()
    again = reconcile(warehouse, ReconParams(NOV), month.book)
    assert (again.run_id, again.created, again.reactivated) == (run_id, False, False)
    assert snapshot() == before


def test_other_inputs_make_another_run(warehouse: Warehouse, month: Month, run_id: str) -> None:
    lenient = reconcile(warehouse, ReconParams(NOV, token_tolerance=10_000), month.book)
    assert lenient.run_id != run_id
    counts = lenient.counts()
    assert counts["token_mismatch"] == 0
    # a token mismatch within the tolerance is matched: the amounts then decide
    injected = month.truth["periods"]["2026-11"]
    assert counts["matched"] + counts["amount_mismatch"] == (
        injected["matched"] + injected["amount_mismatch"] + injected["token_mismatch"]
    )
    pair = reconcile(warehouse, ReconParams(NOV, carriers=("CMCC", "CTCC")), month.book)
    got = _summary_counts(warehouse, pair.run_id)
    assert set(got) == {"CMCC>CTCC", "CTCC>CMCC"}
    assert got == {k: v for k, v in month.truth["by_pair"]["2026-11"].items() if k in got}
    # a new run becomes the current one of its period and carriers; the pair's run is
    # current only for the pair
    assert current_run(warehouse, NOV) == lenient.run_id
    assert current_run(warehouse, NOV, ("CMCC", "CTCC")) == pair.run_id
    lenient_again = reconcile(warehouse, ReconParams(NOV, token_tolerance=10_000), month.book)
    assert not lenient_again.created and not lenient_again.reactivated
    # going back to the first inputs finds the first run and makes it current again
    back = reconcile(warehouse, ReconParams(NOV), month.book)
    assert back.run_id == run_id and back.reactivated and not back.created
    assert current_run(warehouse, NOV) == run_id


def test_new_input_makes_a_new_run(warehouse: Warehouse, month: Month, run_id: str) -> None:
    late = dict(month.records[0], attributes={})
    late["event_id"] += "-late"
    late["transaction_id"] = "tx-late-arrival"
    late["event_time"] = NOV.start_ms + 86_400_000
    late["reporting_carrier"] = late["serving_carrier"]
    warehouse.insert_arrow("usage_events", usage_events_batch([late], b"k" * 32, book=month.book))
    try:
        run = reconcile(warehouse, ReconParams(NOV), month.book)
        assert run.created and run.run_id != run_id
        assert (
            run.counts()["missing_at_home"]
            == month.truth["periods"]["2026-11"]["missing_at_home"] + 1
        )
    finally:
        warehouse.execute("DELETE FROM usage_events WHERE transaction_id = 'tx-late-arrival'")
    assert reconcile(warehouse, ReconParams(NOV), month.book).run_id == run_id


def test_decisions_are_checked(warehouse: Warehouse, run_id: str) -> None:
    with pytest.raises(ReconError, match="category"):
        record_decision(warehouse, run_id, "matched", "accept")
    with pytest.raises(ReconError, match="no reconciliation run"):
        record_decision(warehouse, "0" * 16, "duplicate", "accept")
    with pytest.raises(ReconError, match="not in category"):
        record_decision(warehouse, run_id, "duplicate", "accept", transaction_id="tx-nope")
    with pytest.raises(ReconError, match="decision"):
        record_decision(warehouse, run_id, "duplicate", "maybe")


# ---- settlement -----------------------------------------------------------------------------


def _lines(wh: Warehouse, sid: str) -> dict[str, Decimal]:
    return {
        r["line_id"]: r["amount"]
        for r in rows(
            wh.query_arrow(
                f"SELECT line_id, amount FROM settlement_lines WHERE settlement_id = '{sid}'"
            )
        )
    }


def _snapshot(wh: Warehouse) -> dict[str, int]:
    tables = (
        "settlement_runs",
        "settlement_activations",
        "settlement_items",
        "settlement_lines",
        "revenue_shares",
        "settlement_positions",
        "settlement_transfers",
    )
    return {t: int(scalar(wh.query_arrow(f"SELECT count() FROM {t}"))) for t in tables}


@pytest.fixture(scope="module")
def settled(warehouse: Warehouse, month: Month, run_id: str) -> str:
    reconcile(warehouse, ReconParams(NOV), month.book)  # make sure it is current
    st = settle(warehouse, NOV, month.agreements)
    return st.settlement_id


def test_settlement_equals_an_independent_computation(
    warehouse: Warehouse, month: Month, settled: str
) -> None:
    expected = month.expected_lines(accepted=set())
    assert _lines(warehouse, settled) == expected
    head = rows(
        warehouse.query_arrow(f"SELECT * FROM settlement_runs WHERE settlement_id = '{settled}'")
    )[0]
    assert head["amount"] == sum(expected.values())
    assert head["items"] == len(month.in_period("2026-11", "matched"))
    list_total = sum(
        (
            month.list_amount(month.settled_record(tx))
            for tx in month.in_period("2026-11", "matched")
        ),
        D(0),
    )
    assert head["list_amount"] == list_total


def test_shares_add_up_to_each_line(warehouse: Warehouse, month: Month, settled: str) -> None:
    lines = _lines(warehouse, settled)
    shares: dict[str, Decimal] = defaultdict(Decimal)
    kinds: dict[str, set[str]] = defaultdict(set)
    for r in rows(
        warehouse.query_arrow(
            "SELECT line_id, toString(party_type) AS t, party, share_percent, amount"
            f" FROM revenue_shares WHERE settlement_id = '{settled}'"
        )
    ):
        shares[r["line_id"]] += r["amount"]
        kinds[r["line_id"]].add(r["t"])
        assert r["amount"] >= 0 and r["amount"] == r["amount"].quantize(D("0.01"))
    assert shares == lines
    assert all(k == {"serving_carrier", "model_provider", "channel"} for k in kinds.values())


def test_netting_settles_the_positions(warehouse: Warehouse, settled: str) -> None:
    pos = {
        r["carrier"]: r
        for r in rows(
            warehouse.query_arrow(
                "SELECT toString(carrier) AS carrier, receivable, payable, net"
                f" FROM settlement_positions WHERE settlement_id = '{settled}'"
            )
        )
    }
    bills = rows(
        warehouse.query_arrow(
            "SELECT toString(serving_carrier) AS s, toString(home_carrier) AS h, sum(amount) AS a"
            f" FROM settlement_lines WHERE settlement_id = '{settled}' GROUP BY s, h"
        )
    )
    for c, p in pos.items():
        assert p["receivable"] == sum((b["a"] for b in bills if b["s"] == c), D(0))
        assert p["payable"] == sum((b["a"] for b in bills if b["h"] == c), D(0))
        assert p["net"] == p["receivable"] - p["payable"]
    assert sum(p["net"] for p in pos.values()) == 0
    transfers = rows(
        warehouse.query_arrow(
            "SELECT toString(scheme) AS scheme, toString(payer) AS payer,"
            f" toString(payee) AS payee, amount FROM settlement_transfers"
            f" WHERE settlement_id = '{settled}'"
        )
    )
    for scheme in ("bilateral", "multilateral"):
        got = dict.fromkeys(pos, D(0))
        for t in transfers:
            if t["scheme"] == scheme:
                got[t["payee"]] += t["amount"]
                got[t["payer"]] -= t["amount"]
        assert got == {c: p["net"] for c, p in pos.items()}, scheme
    assert sum(1 for t in transfers if t["scheme"] == "multilateral") <= 2


def test_every_line_traces_to_its_events(warehouse: Warehouse, month: Month, settled: str) -> None:
    traced = rows(
        warehouse.query_arrow(
            "SELECT l.line_id AS line_id, l.transactions AS n, count() AS joined,"
            " groupArray(i.serving_event_id) AS ids"
            " FROM settlement_lines AS l JOIN settlement_items AS i USING (settlement_id, line_id)"
            f" WHERE l.settlement_id = '{settled}' GROUP BY l.line_id, l.transactions"
        )
    )
    assert len(traced) == len(_lines(warehouse, settled))
    ids = set()
    for r in traced:
        assert r["n"] == r["joined"]
        ids.update(r["ids"])
    known = {rec["event_id"] for rec in month.records}
    assert ids <= known and len(ids) == len(month.in_period("2026-11", "matched"))


def test_settle_again_changes_nothing(warehouse: Warehouse, month: Month, settled: str) -> None:
    before = _snapshot(warehouse)
    again = settle(warehouse, NOV, month.agreements)
    assert (again.settlement_id, again.created, again.reactivated) == (settled, False, False)
    assert _snapshot(warehouse) == before


def test_accepting_a_category_moves_exactly_its_amounts(
    warehouse: Warehouse, month: Month, run_id: str, settled: str
) -> None:
    category = "missing_at_serving"
    txs = month.in_period("2026-11", category)
    record_decision(warehouse, run_id, category, "dispute", note="home record only")
    disputed = settle(warehouse, NOV, month.agreements)
    assert disputed.settlement_id == settled and not disputed.created  # disputes settle nothing

    record_decision(warehouse, run_id, category, "accept", note="confirmed by CMCC")
    accepted = settle(warehouse, NOV, month.agreements)
    assert accepted.created and accepted.settlement_id != settled
    moved = sum((month.list_amount(month.settled_record(tx)) for tx in txs), D(0))
    assert accepted.list_amount - disputed.list_amount == moved
    assert accepted.items - disputed.items == len(txs)
    new_items = {
        r["transaction_id"]
        for r in rows(
            warehouse.query_arrow(
                "SELECT transaction_id FROM settlement_items"
                f" WHERE settlement_id = '{accepted.settlement_id}'"
                " AND transaction_id NOT IN (SELECT transaction_id FROM settlement_items"
                f" WHERE settlement_id = '{settled}')"
            )
        )
    }
    assert new_items == set(txs)
    assert _lines(warehouse, accepted.settlement_id) == month.expected_lines({category})

    # one transaction disputed again: exactly its amount moves back out
    tx = txs[0]
    record_decision(warehouse, run_id, category, "dispute", transaction_id=tx)
    partial = settle(warehouse, NOV, month.agreements)
    assert accepted.list_amount - partial.list_amount == month.list_amount(month.settled_record(tx))
    # and the whole category disputed again: back to the first settlement, re-activated
    record_decision(warehouse, run_id, category, "dispute")
    record_decision(warehouse, run_id, category, "accept", transaction_id=tx)
    record_decision(warehouse, run_id, category, "dispute", transaction_id=tx)
    back = settle(warehouse, NOV, month.agreements)
    assert back.settlement_id == settled and back.reactivated


# ---- the report ---------------------------------------------------------------------


class _Cells(html.parser.HTMLParser):
    """Every element with a data-value attribute, as its attribute dict."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        if "data-value" in found:
            self.cells.append(found)


def test_report_numbers_match_the_warehouse(
    warehouse: Warehouse, month: Month, run_id: str, settled: str, tmp_path: Path
) -> None:
    # a dispute from October carries over into November's report
    oct_run = current_run(warehouse, OCT)
    assert oct_run is not None
    record_decision(warehouse, oct_run, "period_boundary", "dispute", note="times differ")
    files = write_report(warehouse, NOV, tmp_path)
    page = files.html.read_text()
    assert "<script" not in page and "http://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )
    assert "E+" not in page and "70 %" in page  # rates in plain notation
    parser = _Cells()
    parser.feed(page)
    cells = parser.cells

    counts = _summary_counts(warehouse, run_id)
    shown = {
        (c["data-pair"], c["data-category"]): int(c["data-value"])
        for c in cells
        if c.get("data-field") == "transactions" and c.get("data-pair") != "all"
    }
    for pair, by_cat in counts.items():
        for cat, n in by_cat.items():
            assert shown[(pair, cat)] == n
    summary_amounts = {
        r["c"]: r
        for r in rows(
            warehouse.query_arrow(
                "SELECT toString(category) AS c, sum(serving_amount) AS s, sum(home_amount) AS h,"
                f" sum(amount_diff) AS d FROM recon_summary WHERE run_id = '{run_id}' GROUP BY c"
            )
        )
    }
    for c in cells:
        if c.get("data-field") == "serving_amount":
            assert D(c["data-value"]) == summary_amounts[c["data-category"]]["s"]
        if c.get("data-field") == "amount_diff":
            assert D(c["data-value"]) == summary_amounts[c["data-category"]]["d"]
    grand = [c for c in cells if c.get("data-field") == "grand_total"]
    assert int(grand[0]["data-value"]) == CALLS

    data = load_report_data(warehouse, NOV)
    assert data.settlement is not None
    bills = {c["data-pair"]: D(c["data-value"]) for c in cells if c.get("data-field") == "bill"}
    for (s, h), amount in data.settlement.bills.items():
        assert bills[f"{s}>{h}"] == amount
    nets = {c["data-carrier"]: D(c["data-value"]) for c in cells if c.get("data-field") == "net"}
    assert nets == {c: p.net for c, p in data.settlement.positions.items()}
    total = [c for c in cells if c.get("data-field") == "settled_total"][0]
    assert D(total["data-value"]) == sum(_lines(warehouse, settled).values())
    carried = [c for c in cells if c.get("data-field") == "carried_transactions"][0]
    assert int(carried["data-value"]) == START_BOUNDARY

    # the exports hold every line, with exact decimals
    table = pq.read_table(files.lines_parquet)
    assert str(table.schema.field("amount").type) == "decimal128(38, 2)"
    assert dict(
        zip(table.column("line_id").to_pylist(), table.column("amount").to_pylist(), strict=True)
    ) == _lines(warehouse, settled)
    with files.lines_csv.open() as fh:
        from_csv = {r["line_id"]: D(r["amount"]) for r in csv.DictReader(fh)}
    assert from_csv == _lines(warehouse, settled)
    with files.shares_csv.open() as fh:
        assert sum(D(r["amount"]) for r in csv.DictReader(fh)) == sum(from_csv.values())
    assert re.search(r"settlement-lines-2026-11\.parquet", page)


def test_report_without_a_settlement() -> None:
    from datetime import UTC, datetime

    from jobs.report import ReportData

    page = render_html(
        ReportData(
            period=Period.parse("2027-01"),
            carriers=("CMCC", "CTCC", "CUCC"),
            generated_at=datetime(2027, 2, 1, tzinfo=UTC),
        )
    )
    assert "No reconciliation run for this period" in page
    assert "Not settled yet" in page


# ---- the command line ---------------------------------------------------------------


class _Shared:
    """The session's warehouse for the CLI, which must not close it."""

    def __init__(self, wh: Warehouse) -> None:
        self._wh = wh

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wh, name)

    def close(self) -> None:
        pass


def test_cli(
    warehouse: Warehouse,
    warehouse_settings: Settings,
    month: Month,
    run_id: str,
    settled: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipeline import cli_recon

    monkeypatch.setattr(cli_recon, "open_warehouse", lambda settings: _Shared(warehouse))
    app = typer.Typer()

    @app.callback()
    def _root(ctx: typer.Context) -> None:
        ctx.obj = warehouse_settings

    cli_recon.register(app)
    runner = CliRunner()

    result = runner.invoke(app, ["reconcile", "--period", "2026-11"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert f"run id: {run_id} (unchanged" in result.output
    assert re.search(
        r"duplicate\s.*\s" + str(month.truth["periods"]["2026-11"]["duplicate"]), result.output
    )

    result = runner.invoke(app, ["recon", "list", "--period", "2026-11"], terminal_width=200)
    assert result.exit_code == 0 and run_id in result.output

    result = runner.invoke(
        app, ["recon", "dispute", "--run", run_id, "--category", "duplicate", "--note", "x"]
    )
    assert result.exit_code == 0, result.output
    assert "disputeed" not in result.output and "disputed category duplicate" in result.output

    result = runner.invoke(app, ["recon", "accept", "--run", run_id, "--category", "matched"])
    assert result.exit_code == 2 and "error:" in result.output

    result = runner.invoke(app, ["recon", "show", "--run", run_id], terminal_width=200)
    assert result.exit_code == 0 and "Decisions" in result.output

    result = runner.invoke(app, ["settle", "--period", "2026-11"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "multilateral transfers:" in result.output and "settlement id:" in result.output

    result = runner.invoke(app, ["report", "--period", "2026-11", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "settlement-report-2026-11.html").exists()

    result = runner.invoke(app, ["reconcile", "--period", "2026-13"])
    assert result.exit_code == 2

    bad = tmp_path / "bad-agreements"
    bad.mkdir()
    (bad / "wholesale.yaml").write_text("version: x\n")
    result = runner.invoke(app, ["settle", "--period", "2026-11", "--agreements", str(bad)])
    assert result.exit_code == 1 and "wholesale.yaml" in result.output


def test_reconcile_is_quick_enough(warehouse: Warehouse, month: Month) -> None:
    """Guards against an accidental quadratic query: a fresh run of the month (a new run
    id through a new tolerance) stays well under the time of the whole test module."""
    run = reconcile(
        warehouse, ReconParams(NOV, token_tolerance=zlib.crc32(b"x") % 97 + 1), month.book
    )
    assert run.created and run.duration_s < 30


def test_a_period_without_calls(warehouse: Warehouse, month: Month, tmp_path: Path) -> None:
    empty = Period.parse("2027-03")
    run = reconcile(warehouse, ReconParams(empty), month.book)
    assert run.created and run.transactions == 0 and set(run.counts().values()) == {0}
    st = settle(warehouse, empty, month.agreements)
    assert st.items == 0 and st.amount == 0 and st.multilateral == []
    assert all(p.net == 0 for p in st.positions.values())
    files = write_report(warehouse, empty, tmp_path)
    assert "Transactions reconciled" in files.html.read_text()


_TIE_CARD = """
version: "tie-1"
effective_from: 2020-01-01T00:00:00+08:00
models: {"*": {token_unit_factor: 1}}
lines:
  - {serving_carrier: "*", model_id: tie-model,
     prices: {input: 0.5, cached_input: 0.25, output: 1.5, reasoning: 2.5}}
"""


def test_half_even_ties_match_the_price_book(
    warehouse: Warehouse, month: Month, tmp_path: Path
) -> None:
    """Amounts that end in exactly half a micro-CNY round to the even neighbour, as
    ``PriceBook.rate`` does (0.5 CNY per million tokens: one token is 0.5 micro-CNY)."""
    (tmp_path / "tie.yaml").write_text(_TIE_CARD)
    book = load_cards(tmp_path)
    period = Period.parse("2027-05")
    base = dict(month.records[0], attributes={}, model_id="tie-model", status="ok")
    records = []
    for n in range(1, 41):
        for side in ("serving_carrier", "home_carrier"):
            rec = dict(base, attributes={})
            rec["transaction_id"] = f"tx-tie-{n}"
            rec["reporting_carrier"] = rec[side]
            rec["event_id"] = f"tie-{n}-{side}"
            rec["event_time"] = period.start_ms + 86_400_000 + n * 1000
            rec.update(
                input_tokens=n, cached_tokens=n // 3, output_tokens=n % 7, reasoning_tokens=n % 5
            )
            records.append(rec)
    warehouse.insert_arrow("usage_events", usage_events_batch(records, b"k" * 32, book=book))
    try:
        run = reconcile(warehouse, ReconParams(period), book)
        assert run.counts()["matched"] == 40
        got = {
            r["transaction_id"]: r["serving_amount"]
            for r in rows(
                warehouse.query_arrow(
                    "SELECT transaction_id, serving_amount FROM recon_results"
                    f" WHERE run_id = '{run.run_id}'"
                )
            )
        }
        expected = {}
        for rec in records[::2]:
            rating = book.rate(rec)
            assert isinstance(rating, Rating)
            expected[rec["transaction_id"]] = rating.list_amount
        assert got == expected
        exact = [
            (
                D(r["input_tokens"] - r["cached_tokens"]) * D("0.5")
                + D(r["cached_tokens"]) * D("0.25")
                + D(r["output_tokens"]) * D("1.5")
                + D(r["reasoning_tokens"]) * D("2.5")
            )
            for r in records[::2]
        ]  # micro-CNY
        ties = [x for x in exact if x % 1 == D("0.5")]
        assert len(ties) >= 10  # the case under test occurs, rounding both up and down
        assert {int(x + D("0.5")) % 2 for x in ties} == {0, 1}
    finally:
        warehouse.execute("DELETE FROM usage_events WHERE transaction_id LIKE 'tx-tie-%'")
