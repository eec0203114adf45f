"""Rating: us per event, the Decimal path (``RateStage.rate``, event by event) vs the
columnar path (``RateStage.rate_columns``, int64 micro-units over a whole batch).

    .venv/bin/python tests/perf/bench_rating.py [--events 50000] [--repeat 7] [--out F.json]

Traffic: ``pipeline.simulate`` (live-shaped: 200 tenants, Zipf), the shipped price cards
and ``config/tenant_plans.yaml``. Two scenarios: ``shipped`` (stored counters empty) and
``crossing`` (the tiered tenants' counters start just below a tier boundary, so events
straddle it and take the scalar path). Each run starts from fresh counters; the figure
is this process's CPU time (``time.process_time``: waiting for a core on a shared box
does not count), best of ``--repeat`` runs, with the median and the best wall time.
Both paths must agree on the total amount and the counters, else the bench fails.
Excluded from both: building the inputs (Accepted records, the Arrow table).
Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.metering.plans import load_plans  # noqa: E402
from pipeline.metering.pricing import load_cards  # noqa: E402
from pipeline.metering.rating_columns import INPUT_COLUMNS  # noqa: E402
from pipeline.simulate import Simulation  # noqa: E402
from pipeline.stages.ingest import Accepted  # noqa: E402
from pipeline.stages.rate import RateStage  # noqa: E402

NOW = 1_795_852_800_000  # 2026-11-28T08:00:00Z


def run(events: int, repeat: int) -> dict[str, Any]:
    book = load_cards(ROOT / "config" / "price_cards")
    plans = load_plans(ROOT / "config" / "tenant_plans.yaml")
    sim = Simulation(20261128, NOW)
    records = [m.record for m in sim.messages(events, 0.0, 0.0) if m.record is not None]
    accepted = [Accepted(rec, 0, "usage", 0, i) for i, rec in enumerate(records)]
    table = pa.table({name: [r[name] for r in records] for name in INPUT_COLUMNS})
    period = "2026-11"
    crossing = {
        (tenant, period): Decimal(100_000_000 if plan == "enterprise" else 50_000_000)
        - Decimal("20000.000000")
        for tenant, plan in plans.tenants.items()
        if plan in ("enterprise", "strategic")
    }
    results: dict[str, Any] = {"events": len(records)}
    for scenario, usage in (("shipped", {}), ("crossing", crossing)):
        times: dict[str, list[float]] = {"scalar": [], "columnar": []}
        walls: dict[str, list[float]] = {"scalar": [], "columnar": []}
        totals: dict[str, tuple[int, dict[tuple[str, str], Decimal]]] = {}
        for _ in range(repeat):
            stage = RateStage(book, plans)
            stage.usage = dict(usage)
            c0, t0 = time.process_time(), time.perf_counter()
            rated, _ = stage.rate(accepted)
            times["scalar"].append(time.process_time() - c0)
            walls["scalar"].append(time.perf_counter() - t0)
            totals["scalar"] = (
                sum(int(r.rating.amount.scaleb(6)) for r in rated),
                stage.usage,
            )
            stage = RateStage(book, plans)
            stage.usage = dict(usage)
            c0, t0 = time.process_time(), time.perf_counter()
            out = stage.rate_columns(table)
            times["columnar"].append(time.process_time() - c0)
            walls["columnar"].append(time.perf_counter() - t0)
            totals["columnar"] = (int(out.amount_micro.sum()), stage.usage)
        if totals["scalar"] != totals["columnar"]:
            raise SystemExit(f"{scenario}: the two paths disagree")
        for path, seconds in times.items():
            results[f"{scenario}_{path}_us_per_event"] = round(min(seconds) / len(records) * 1e6, 3)
            results[f"{scenario}_{path}_median_us_per_event"] = round(
                statistics.median(seconds) / len(records) * 1e6, 3
            )
            results[f"{scenario}_{path}_wall_us_per_event"] = round(
                min(walls[path]) / len(records) * 1e6, 3
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = run(args.events, args.repeat)
    head = f"CPU best of {args.repeat}, CPU median, wall best"
    print(f"rating, {results['events']} events, us/event ({head})")
    for scenario in ("shipped", "crossing"):
        for path in ("scalar", "columnar"):
            best = results[f"{scenario}_{path}_us_per_event"]
            median = results[f"{scenario}_{path}_median_us_per_event"]
            wall = results[f"{scenario}_{path}_wall_us_per_event"]
            print(f"  {scenario:9} {path:9} {best:8.3f} {median:8.3f} {wall:8.3f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
