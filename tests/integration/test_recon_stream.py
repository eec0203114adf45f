"""Reconciliation through the real path: `tokenmeter simulate --recon-faults` sends both
carriers' reports of cross-carrier calls (with discrepancies injected at known counts)
through Kafka; the worker meters them; `tokenmeter reconcile` then finds exactly the
injected counts, per period, category and carrier pair, and `settle` balances."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from pipeline.simulate_recon import CATEGORIES
from tests.integration.harness import Harness

pytestmark = pytest.mark.integration


def _summary(h: Harness, period: str) -> dict[str, dict[str, int]]:
    rows = h.sql(
        "SELECT serving_carrier AS s, home_carrier AS h, category AS c, transactions AS n "
        f"FROM recon_summary WHERE period = '{period}'"
    )
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        out.setdefault(f"{r['s']}>{r['h']}", dict.fromkeys(CATEGORIES, 0))[r["c"]] = int(r["n"])
    return out


def test_simulated_faults_are_found_exactly_after_the_pipeline(
    harness: Harness, tmp_path: Path
) -> None:
    truth_path = tmp_path / "truth.json"
    out = harness.cli(
        "simulate", "--events", "3000", "--seed", "41", "--dup-rate", "0.03",
        "--bad-rate", "0.01", "--recon-calls", "700", "--recon-faults", "0.09",
        "--truth", str(truth_path),
    ).stdout  # fmt: skip
    assert "cross-carrier calls" in out
    truth = json.loads(truth_path.read_text())
    recon = truth["recon"]
    injected = {c: sum(p[c] for p in recon["periods"].values()) for c in CATEGORIES}
    # round(700 * 0.09) = 63 faults: 10 or 11 in each of the six categories
    assert sum(injected.values()) - injected["matched"] == 63
    assert all(injected[c] >= 10 for c in CATEGORIES)
    # the stream's own cross-carrier calls are matched too
    assert injected["matched"] == 700 - 63 + truth["cross_carrier_transactions"]

    harness.start_worker()
    harness.cli("wait", "--idle", "2", "--timeout", "300")
    assert harness.stop_worker() == 0
    # every report, recon ones included, was metered exactly once
    assert harness.scalar("SELECT count() FROM usage_events") == truth["unique_valid"]

    for period, expected in recon["periods"].items():
        run = harness.cli("reconcile", "--period", period).stdout
        assert "run id:" in run
        found = _summary(harness, period)
        totals = {c: sum(pair[c] for pair in found.values()) for c in CATEGORIES}
        assert totals == expected, period
        assert found == recon["by_pair"][period], period

    # a second run on the same inputs is the same run and writes nothing
    period = max(recon["periods"])
    rows_before = harness.scalar("SELECT count() FROM recon_results")
    again = harness.cli("reconcile", "--period", period).stdout
    assert "run id:" in again
    assert harness.scalar("SELECT count() FROM recon_results") == rows_before

    # settlement over the matched calls balances to the cent per line
    harness.cli("settle", "--period", period)
    lines = harness.sql(
        "SELECT l.line_id AS line, l.amount AS amount, sum(r.amount) AS shares "
        "FROM settlement_lines AS l INNER JOIN revenue_shares AS r ON r.line_id = l.line_id "
        "GROUP BY l.line_id, l.amount"
    )
    assert lines, "settle wrote no lines"
    for line in lines:
        assert Decimal(str(line["amount"])) == Decimal(str(line["shares"])), line["line"]
