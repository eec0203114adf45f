"""pipeline.simulate_recon: exact fault counts, valid records, truth files. No warehouse
(tests/unit/jobs/test_recon_warehouse.py reconciles the records and compares)."""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path

import pytest

from jobs.reconcile import CATEGORIES, Period
from pipeline.events import Rules, check_record
from pipeline.simulate import Simulation
from pipeline.simulate_recon import (
    FAULTS,
    ReconSimulation,
    ReconTruth,
    fault_counts,
    usage_events_batch,
    write_recon_truth,
)


def test_fault_counts_are_exact_and_even() -> None:
    counts = fault_counts(1000, 0.05, random.Random(1))
    assert sum(counts.values()) == 1000
    assert counts["matched"] == 950
    assert sorted(counts[f] for f in FAULTS) == [8, 8, 8, 8, 9, 9]
    assert fault_counts(10, 0.25, random.Random(1))["matched"] == 8  # round(2.5) == 2
    with pytest.raises(ValueError):
        fault_counts(10, 1.5, random.Random(1))


def test_a_month_has_the_planned_transactions() -> None:
    sim = ReconSimulation.for_period(5, "2026-11", 600, fault_rate=0.1, start_boundary_calls=4)
    records = sim.records()
    by_tx: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_tx[rec["transaction_id"]].append(rec)
    truth = sim.truth.to_json()
    assert truth["periods"]["2026-11"] == {
        "matched": 540,
        **{f: 10 for f in FAULTS},
    }
    assert truth["periods"]["2026-10"]["period_boundary"] == 4
    assert sum(sum(p.values()) for p in truth["by_pair"]["2026-11"].values()) == 600
    assert truth["records"] == len(records)
    period = Period.parse("2026-11")
    kinds = Counter()
    for tx, (label, category) in sim.transactions.items():
        recs = by_tx[tx]
        kinds[category] += 1
        serving = [r for r in recs if r["reporting_carrier"] == r["serving_carrier"]]
        home = [r for r in recs if r["reporting_carrier"] == r["home_carrier"]]
        assert recs[0]["home_carrier"] != recs[0]["serving_carrier"]
        times = [r["event_time"] for r in recs]
        if category == "period_boundary":
            edge = period.end_ms if label == "2026-11" else period.start_ms
            assert min(times) < edge <= max(times)
            assert max(times) - min(times) < 3600 * 1000
        else:
            assert label == "2026-11"
            assert all(period.start_ms <= t < period.end_ms for t in times)
        if category == "missing_at_home":
            assert (len(serving), len(home)) == (1, 0)
        elif category == "missing_at_serving":
            assert (len(serving), len(home)) == (0, 1)
        elif category == "duplicate":
            assert sorted((len(serving), len(home))) == [1, 2]
        else:
            assert (len(serving), len(home)) == (1, 1)
            s, h = serving[0], home[0]
            if category == "token_mismatch":
                assert h["output_tokens"] > s["output_tokens"]
            elif category == "amount_mismatch":
                assert h["model_id"] != s["model_id"]
                amounts = [sim.book.rate(r).list_amount for r in (s, h)]  # type: ignore[union-attr]
                assert abs(amounts[0] - amounts[1]) > Decimal("0.001") * max(amounts)
            else:
                assert {k: v for k, v in s.items() if k not in _PER_REPORT} == {
                    k: v for k, v in h.items() if k not in _PER_REPORT
                }
    assert kinds["period_boundary"] == 14


_PER_REPORT = {"event_id", "reporting_carrier", "event_time", "source_id"}


def test_same_seed_same_records() -> None:
    a = ReconSimulation.for_period(9, "2026-11", 200, fault_rate=0.2).records()
    b = ReconSimulation.for_period(9, "2026-11", 200, fault_rate=0.2).records()
    c = ReconSimulation.for_period(10, "2026-11", 200, fault_rate=0.2).records()
    assert a == b
    assert a != c


def test_explicit_fault_counts() -> None:
    sim = ReconSimulation.for_period(3, "2026-11", 50, faults={"duplicate": 5, "token_mismatch": 2})
    sim.records()
    assert sim.truth.periods["2026-11"]["matched"] == 43
    assert sim.truth.periods["2026-11"]["duplicate"] == 5
    with pytest.raises(ValueError, match="add up"):
        ReconSimulation.for_period(3, "2026-11", 5, faults={"duplicate": 9})


@pytest.mark.parametrize(
    "now_ms",
    [
        Period.parse("2026-11").start_ms + 5 * 86_400_000,  # five days into a month
        Period.parse("2026-11").start_ms + 20 * 60_000,  # twenty minutes into a month
        Period.parse("2026-11").start_ms + 1000,  # one second into a month
    ],
)
def test_stream_records_pass_the_worker_checks(now_ms: int) -> None:
    sim = ReconSimulation.for_stream(4, now_ms, 120, fault_rate=0.3)
    rules = Rules()
    for rec in sim.records():
        assert check_record(rec, now_ms, rules) is None, rec
    periods = sim.truth.to_json()["periods"]
    assert sum(sum(v.values()) for v in periods.values()) == 120
    assert sum(v["period_boundary"] for v in periods.values()) == 6


def test_truth_adds_the_main_streams_clean_pairs(tmp_path: Path) -> None:
    now = Period.parse("2026-11").start_ms + 10 * 86_400_000
    main = Simulation(1, now)
    records = [m.record for m in main.messages(2000) if m.kind == "valid"]
    truth = ReconTruth(seed=1)
    added = truth.add_matched_calls(records)  # type: ignore[arg-type]
    assert added == main.truth.cross_carrier_transactions > 0
    assert truth.periods["2026-11"]["matched"] == added
    path = tmp_path / "truth.json"
    path.write_text(json.dumps({"messages": 2000}))
    write_recon_truth(truth, path)
    data = json.loads(path.read_text())
    assert data["messages"] == 2000
    assert data["recon"]["periods"]["2026-11"]["matched"] == added
    assert set(data["recon"]["periods"]["2026-11"]) == set(CATEGORIES)


def test_usage_events_batch_pseudonymises_and_prices() -> None:
    sim = ReconSimulation.for_period(2, "2026-11", 20)
    table = usage_events_batch(sim.records(), b"k" * 32)
    assert table.num_rows == 40
    subscribers = table.column("subscriber_id").to_pylist()
    assert all(s.startswith("sub_") and len(s) == 36 for s in subscribers)
    assert all(h != 0 for h in table.column("payload_hash").to_pylist())


def test_stream_runs_never_reuse_ids() -> None:
    now = Period.parse("2026-11").start_ms + 5 * 86_400_000
    first = ReconSimulation.for_stream(4, now, 50, fault_rate=0.2).records()
    later = ReconSimulation.for_stream(4, now + 60_000, 50, fault_rate=0.2).records()
    assert not {r["event_id"] for r in first} & {r["event_id"] for r in later}
    assert not {r["transaction_id"] for r in first} & {r["transaction_id"] for r in later}


# ---- `tokenmeter simulate --recon-faults` ------------------------------------------------


def test_recon_faults_option_gives_exact_counts_per_category() -> None:
    from pipeline.simulate_run import ReconFaults

    even = ReconFaults.parse("0.06").simulation(3, 1_795_000_000_000, 500, 35 * 86_400)
    assert sorted(even.counts[f] for f in FAULTS) == [5] * 6  # round(500 * 0.06) = 30
    picked = ReconFaults.parse("token_mismatch=0.01, duplicate=0.02")
    sim = picked.simulation(3, 1_795_000_000_000, 500, 35 * 86_400)
    assert {f: sim.counts[f] for f in FAULTS if sim.counts[f]} == {
        "token_mismatch": 5,
        "duplicate": 10,
    }
    assert sim.counts["matched"] == 485
    records = sim.records()
    assert sum(sum(p.values()) for p in sim.truth.periods.values()) == 500
    assert len(records) == sim.truth.records


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("lots", "neither a rate"),
        ("1.2", "must lie in [0, 1]"),
        ("mismatch=0.1", "unknown category 'mismatch'"),
        ("duplicate=x", "duplicate: 'x' is not a rate"),
        ("duplicate=0.6,token_mismatch=0.6", "add up to more than 1"),
    ],
)
def test_bad_recon_faults_are_named_without_a_traceback(spec: str, message: str) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "simulate", "--recon-faults", spec],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert result.returncode == 2
    output = " ".join((result.stdout + result.stderr).split())  # rich may wrap the line
    assert "--recon-faults" in output and message in output
    assert "Traceback" not in output
