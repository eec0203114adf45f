"""Rating, rollups, late events and re-rating, end to end: real Kafka, the real worker,
the real ClickHouse engine, the real `tokenmeter rerate`.

The expected amounts are computed here, independently of ``pipeline.metering``: the
price card YAML is read with plain ``yaml.safe_load``, every event is priced with
Decimal (tokens per class x unit price / 1e6, Token Units = tokens x factor x class
weight rounded half-even to 0.000001, graduated tiers over each tenant's billable TU in
its Beijing-time month, in generation order = log order, one half-even rounding of the
amount per event), from the very records the simulator sent (regenerated from the
truth file's seed and now_ms). The warehouse must match to the last 0.000001 CNY.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.simulate import Simulation
from tests.integration.harness import ROOT, Harness

pytestmark = pytest.mark.integration

SHIPPED = ROOT / "config" / "price_cards"
BEIJING = timezone(timedelta(hours=8))
MICRO = Decimal("0.000001")
CLASSES = ("input", "cached_input", "output", "reasoning")
TIERED_PLAN = (
    "  tiered:\n"
    "    period: month\n"
    "    tiers:\n"
    "      - {from_tu: 2000000, discount_percent: 5}\n"
    "      - {from_tu: 10000000, discount_percent: 12.5}\n"
)
# the price fix the re-rating applies (in the mid-run version, which keeps its name)
FIX = (
    '{serving_carrier: "*", model_id: deepseek-v3,   prices: {input: 2.00, cached_input: 0.20, '
    "output: 3.00}}",
    '{serving_carrier: "*", model_id: deepseek-v3,   prices: {input: 2.00, cached_input: 0.20, '
    "output: 3.15}}",
)


# ---- the reference: price cards read as plain YAML, Decimal arithmetic -------------------


def _d(value: Any) -> Decimal:
    return Decimal(str(value))


@dataclass
class RefCard:
    version: str
    start_ms: int
    card: dict[str, Any]

    def line(self, carrier: str, model: str) -> dict[str, Any]:
        lines = {(x["serving_carrier"], x["model_id"]): x for x in self.card["lines"]}
        for key in ((carrier, model), (carrier, "*"), ("*", model), ("*", "*")):
            if key in lines:
                return dict(lines[key]["prices"])
        raise AssertionError(f"no line for {carrier}/{model} in {self.version}")

    def prices(self, carrier: str, model: str) -> dict[str, Decimal]:
        p = self.line(carrier, model)
        return {
            "input": _d(p["input"]),
            "output": _d(p["output"]),
            "cached_input": _d(p.get("cached_input", p["input"])),
            "reasoning": _d(p.get("reasoning", p["output"])),
        }

    def tu_per_token(self, model: str) -> dict[str, Decimal]:
        models = self.card["models"]
        entry = models.get(model) or models["*"]
        own = entry.get("class_weights") or {}
        card = self.card.get("class_weights") or {}

        def weight(cls: str) -> Decimal:
            for source in (own, card):
                if source.get(cls) is not None:
                    return _d(source[cls])
            if cls == "cached_input":
                return weight("input")
            if cls == "reasoning":
                return weight("output")
            return Decimal(1)

        return {cls: _d(entry["token_unit_factor"]) * weight(cls) for cls in CLASSES}


def load_reference_cards(directory: Path) -> list[RefCard]:
    cards = []
    for path in sorted(directory.glob("*.yaml")):
        card = yaml.safe_load(path.read_text())
        start = card["effective_from"]
        if isinstance(start, str):
            start = datetime.fromisoformat(start)
        start_ms = int(start.timestamp() * 1000)
        cards.append(RefCard(str(card["version"]), start_ms, card))
    return sorted(cards, key=lambda c: c.start_ms)


def reference(
    records: list[dict[str, Any]], cards: list[RefCard], plan: str | None
) -> list[tuple[Decimal, str]]:
    """(amount, price card version) per record, records in log order."""
    usage: dict[tuple[str, str], Decimal] = {}
    out = []
    lookups: dict[tuple[str, str, str], tuple[dict[str, Decimal], dict[str, Decimal]]] = {}
    with localcontext() as ctx:
        ctx.prec = 80
        for rec in records:
            card = [c for c in cards if c.start_ms <= rec["event_time"]][-1]
            key3 = (card.version, rec["serving_carrier"], rec["model_id"])
            if key3 not in lookups:
                lookups[key3] = (
                    card.prices(rec["serving_carrier"], rec["model_id"]),
                    card.tu_per_token(rec["model_id"]),
                )
            prices, per_token = lookups[key3]
            cached = rec["cached_tokens"]
            tokens = {
                "input": rec["input_tokens"] - cached,
                "cached_input": cached,
                "output": rec["output_tokens"],
                "reasoning": rec["reasoning_tokens"],
            }
            list_exact = sum(tokens[c] * prices[c] for c in CLASSES) / Decimal(1_000_000)
            tu = sum(tokens[c] * per_token[c] for c in CLASSES).quantize(MICRO, ROUND_HALF_EVEN)
            if not {**BILLABLE, **card.card.get("billable", {})}[rec["status"]]:
                out.append((Decimal(0), card.version))
                continue
            tiers = card.card["plans"][plan]["tiers"] if plan else []
            if not tiers or tu == 0:
                out.append((list_exact.quantize(MICRO, ROUND_HALF_EVEN), card.version))
                continue
            month = datetime.fromtimestamp(rec["event_time"] / 1000, BEIJING).strftime("%Y-%m")
            key = (rec["tenant_id"], month)
            before = usage.get(key, Decimal(0))
            bounds = [(Decimal(0), Decimal(1))] + [
                (_d(t["from_tu"]), 1 - _d(t["discount_percent"]) / 100) for t in tiers
            ]
            kept = Decimal(0)
            for j, (start, keep) in enumerate(bounds):
                stop = bounds[j + 1][0] if j + 1 < len(bounds) else before + tu
                part = min(before + tu, stop) - max(before, start)
                if part > 0:
                    kept += part * keep
            amount = (list_exact * kept / tu).quantize(MICRO, ROUND_HALF_EVEN)
            usage[key] = before + tu
            out.append((amount, card.version))
    return out


def regenerate(
    truth_path: Path, events: int, live_rate: float | None = None, late_share: float = 0.0
) -> list[dict[str, Any]]:
    """The valid records `tokenmeter simulate` sent, in order (same seed, same now_ms)."""
    truth = json.loads(truth_path.read_text())
    sim = Simulation(
        seed=truth["seed"],
        now_ms=truth["now_ms"],
        tenants=200,
        live_rate=live_rate,
        late_share=late_share,
    )
    records = [
        m.record
        for m in sim.messages(events, dup_rate=DUP, bad_rate=BAD)
        if m.kind == "valid" and m.record is not None
    ]
    assert len(records) == truth["unique_valid"]
    return records


DUP, BAD = 0.02, 0.01
BILLABLE = {"ok": True, "failover": True, "error": False, "timeout": False, "rate_limited": False}


# ---- helpers ------------------------------------------------------------------------------


def write_cards(directory: Path, mid_ms: int, *fixes: tuple[str, str]) -> Path:
    """The shipped cards plus a version in force from ``mid_ms``, all with the test plan."""
    directory.mkdir(parents=True)
    for path in SHIPPED.glob("*.yaml"):
        (directory / path.name).write_text(
            path.read_text().replace("plans:\n", "plans:\n" + TIERED_PLAN, 1)
        )
    mid = (directory / "2026-11.yaml").read_text()
    when = datetime.fromtimestamp(mid_ms / 1000, BEIJING).isoformat()
    for old, new in (
        ('version: "2026.11"', 'version: "2026.11-mid"'),
        ("effective_from: 2026-11-01T00:00:00+08:00", f'effective_from: "{when}"'),
        ("model_id: qwen-max,      prices: {input: 2.40,",
         "model_id: qwen-max,      prices: {input: 2.55,"),
        ("model_id: doubao-pro,    prices: {input: 0.80, cached_input: 0.16, output: 1.60}",
         "model_id: doubao-pro,    prices: {input: 0.80, cached_input: 0.16, output: 1.75}"),
        *fixes,
    ):  # fmt: skip
        assert old in mid, old
        mid = mid.replace(old, new)
    (directory / "2026-11-mid.yaml").write_text(mid)
    return directory


_METRICS = {
    "events": ("count()", "sum(events)"),
    "billable": ("countIf(billable)", "sum(billable_events)"),
    "input_tokens": ("sum(input_tokens)", "sum(input_tokens)"),
    "output_tokens": ("sum(output_tokens)", "sum(output_tokens)"),
    "cached_tokens": ("sum(cached_tokens)", "sum(cached_tokens)"),
    "reasoning_tokens": ("sum(reasoning_tokens)", "sum(reasoning_tokens)"),
    "token_units": ("sum(token_units)", "sum(token_units)"),
    "amount": ("sum(amount)", "sum(amount)"),
}
ROLLUPS = ("usage_minute", "usage_hour", "usage_day")


def snapshot(h: Harness, **extra: str) -> dict[str, Any]:
    """One `tokenmeter sql` call (each costs a process start): the sums of usage_events
    and of every rollup, counts and amounts per price card version, and ``extra`` scalar
    subqueries by name. Returns ``{"usage_events": {metric: n}, "usage_minute": ...,
    "versions": {version: (events, amount)}, name: value}``; numbers as Decimal."""
    parts = []
    for table in ("usage_events", *ROLLUPS):
        pick = 0 if table == "usage_events" else 1
        pairs = ", ".join(
            f"('{table}.{m}', toString({exprs[pick]}))" for m, exprs in _METRICS.items()
        )
        parts.append(
            "SELECT tupleElement(x, 1) AS k, tupleElement(x, 2) AS v "
            f"FROM (SELECT arrayJoin([{pairs}]) AS x FROM {table})"
        )
    parts.append(
        "SELECT concat('versions.', price_card_version) AS k, "
        "concat(toString(count()), '|', toString(sum(amount))) AS v "
        "FROM usage_events GROUP BY price_card_version"
    )
    parts += [f"SELECT '{name}' AS k, toString({sql}) AS v" for name, sql in extra.items()]
    out: dict[str, Any] = {"versions": {}}
    for row in h.sql(" UNION ALL ".join(parts)):
        key, value = str(row["k"]), str(row["v"])
        if key.startswith("versions."):
            n, amount = value.split("|")
            out["versions"][key.removeprefix("versions.")] = (int(n), Decimal(amount))
        elif "." in key:
            table, metric = key.split(".", 1)
            out.setdefault(table, {})[metric] = Decimal(value)
        else:
            out[key] = value
    return out


def assert_rollups_agree(snap: dict[str, Any]) -> dict[str, Decimal]:
    """Minute, hour and day rollups hold exactly rated_usage's sums."""
    for table in ROLLUPS:
        assert snap[table] == snap["usage_events"], f"{table} disagrees with rated_usage"
    totals: dict[str, Decimal] = snap["usage_events"]
    return totals


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, BEIJING).isoformat()


# ---- the test -----------------------------------------------------------------------------


def run_rating_end_to_end(h: Harness, tmp_path: Path, events: int, live_events: int) -> None:
    now_ms = int(time.time() * 1000)
    mid_ms = (now_ms - 3_600_000) // 60_000 * 60_000  # history mode: events in the last 2 h
    cards = write_cards(tmp_path / "cards", mid_ms)
    plans = tmp_path / "plans.yaml"
    plans.write_text("default: tiered\n")
    h.env["TOKENMETER_PRICE_CARDS"] = str(cards)
    h.env["TOKENMETER_TENANT_PLANS"] = str(plans)
    h.start_worker()

    # 1. history traffic across two card versions: exact amounts, rollups agree
    truth1 = tmp_path / "truth1.json"
    h.cli("simulate", "--events", str(events), "--seed", "31", "--dup-rate", str(DUP),
          "--bad-rate", str(BAD), "--truth", str(truth1))  # fmt: skip
    h.cli("wait", "--idle", "1", "--timeout", "300")
    records = regenerate(truth1, events)
    ref_cards = load_reference_cards(cards)
    ref = reference(records, ref_cards, "tiered")
    snap = snapshot(
        h,
        discounted="(SELECT countIf(amount < list_amount) FROM rated_usage)",
        corrections="(SELECT count() FROM usage_corrections)",
    )
    totals = assert_rollups_agree(snap)
    assert totals["events"] == len(records)
    assert totals["amount"] == sum(a for a, _ in ref)
    want: dict[str, tuple[int, Decimal]] = {}
    for amount, version in ref:
        n, a = want.get(version, (0, Decimal(0)))
        want[version] = (n + 1, a + amount)
    assert snap["versions"] == want and set(want) == {"2026.11", "2026.11-mid"}
    assert int(snap["discounted"]) > 0, "graduated tiers must be reached"
    late_before = int(snap["corrections"])

    # 2. live traffic with late reporters: late events in usage_corrections and as 'late' rows
    truth2 = tmp_path / "truth2.json"
    h.cli("simulate", "--events", str(live_events), "--seed", "32", "--dup-rate", str(DUP),
          "--bad-rate", str(BAD), "--live-rate", "2000", "--late-share", "0.05",
          "--truth", str(truth2))  # fmt: skip
    h.cli("wait", "--idle", "1", "--timeout", "300")
    live = regenerate(truth2, live_events, live_rate=2000.0, late_share=0.05)
    live_now = json.loads(truth2.read_text())["now_ms"]
    late = sorted(r["event_id"] for r in live if r["event_time"] < live_now)
    assert late, "the live run must have late reporters"
    run_tag = live[0]["event_id"].split("-")[1]  # event ids carry the simulation's run tag
    snap = snapshot(
        h,
        corrections="(SELECT count() FROM usage_corrections)",
        corrections_amount="(SELECT sum(amount) FROM usage_corrections)",
        late_minute="(SELECT sum(events) FROM usage_minute WHERE kind = 'late')",
        late_day="(SELECT sum(events) FROM usage_day WHERE kind = 'late')",
        late_amount="(SELECT sum(amount) FROM usage_minute WHERE kind = 'late')",
        live_late_ids="(SELECT arrayStringConcat(arraySort(groupArray(event_id)), ',') "
        f"FROM usage_corrections WHERE event_id LIKE '%-{run_tag}-%')",
    )
    assert int(snap["corrections"]) - late_before == len(late)
    assert snap["live_late_ids"].split(",") == late
    assert int(snap["late_minute"]) == int(snap["late_day"]) == int(snap["corrections"])
    assert Decimal(snap["late_amount"]) == Decimal(snap["corrections_amount"])
    everything = records + live
    ref = reference(everything, ref_cards, "tiered")
    totals = assert_rollups_agree(snap)
    assert totals["events"] == len(everything) and totals["amount"] == sum(a for a, _ in ref)

    # 3. re-rating needs the warehouse to itself
    window = ("--from", iso(now_ms - 3 * 3_600_000), "--to", iso(live_now + 3_600_000))
    fixed = write_cards(tmp_path / "fixed", mid_ms, FIX)
    proc = h.cli("rerate", *window, "--price-cards", str(fixed), check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "stop the worker first" in proc.stderr and "Traceback" not in proc.stderr
    assert h.stop_worker() == 0

    # 4. re-rate with one price fixed: the new totals exactly, rollups corrected
    started = time.monotonic()
    out = h.cli("rerate", *window, "--price-cards", str(fixed)).stdout
    took = time.monotonic() - started
    new_ref = reference(everything, load_reference_cards(fixed), "tiered")
    changed = sum(1 for (a, _), (b, _) in zip(ref, new_ref, strict=True) if a != b)
    assert re.search(rf"changed events: {changed:,} of {len(everything):,}", out), out
    found = re.search(r"run id: (rr_[0-9a-f]+)", out)
    assert found is not None, out
    rows = "+".join(f"(SELECT count() FROM {t})" for t in (*ROLLUPS, "rerate_runs", "price_cards"))
    snap = snapshot(
        h,
        rerated=f"(SELECT count() FROM rated_usage WHERE rating_run = '{found.group(1)}')",
        rows=rows,
    )
    totals = assert_rollups_agree(snap)
    assert totals["amount"] == sum(a for a, _ in new_ref) != sum(a for a, _ in ref)
    assert int(snap["rerated"]) == changed
    print(f"\nrerate of {len(everything):,} events ({changed:,} changed): {took:.1f} s")

    # 5. a second run changes nothing and writes nothing
    again = h.cli("rerate", *window, "--price-cards", str(fixed)).stdout
    assert "0 changed" in again and "run id:" not in again
    snap2 = snapshot(h, rows=rows)
    assert snap2["rows"] == snap["rows"]
    assert assert_rollups_agree(snap2) == totals


def test_rating_rollups_late_events_and_rerate(harness: Harness, tmp_path: Path) -> None:
    run_rating_end_to_end(harness, tmp_path, events=10_000, live_events=3000)


@pytest.mark.slow
def test_rating_at_200k_events(harness: Harness, tmp_path: Path) -> None:
    run_rating_end_to_end(harness, tmp_path, events=200_000, live_events=20_000)
