"""Rating a batch in int64 micro-units (``rate_columns``) against the Decimal reference:
``RateStage.rate``, which calls ``PriceBook.rate`` event by event. Every field of every
row and the final tier usage counters must be identical, on 100k simulated events
(shipped cards, a card change mid-batch, tiered tenants crossing boundaries, unpriced
rows of every kind) and on hand-made edge cases."""

from __future__ import annotations

from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from pipeline.metering.plans import TenantPlans
from pipeline.metering.pricing import PriceBook, Unpriced, load_cards
from pipeline.metering.rating_columns import INPUT_COLUMNS as COLUMNS
from pipeline.metering.rating_columns import RatedColumns, rate_columns
from pipeline.simulate import Simulation
from pipeline.stages.ingest import Accepted
from pipeline.stages.rate import RateStage

REPO = Path(__file__).resolve().parents[3]
CARDS = REPO / "config" / "price_cards"
# 2026-10-31T17:00:00Z = 2026-11-01 01:00 Beijing: the 2 h of simulated traffic span the
# 2026.11 card's start, a Beijing month and a Beijing day boundary
NOW = 1_793_466_000_000
CARD_2026_11_MS = 1_793_462_400_000
# test plans with boundaries the simulated volume crosses (TU), added to both cards,
# except "daily", only on the 2026.11 card (before it: unknown_plan)
LOW_TIERS = """\
  low:
    period: month
    tiers:
      - {from_tu: 2000000, discount_percent: 10}
      - {from_tu: 5000000.5, discount_percent: 25}
      - {from_tu: 9000000, discount_percent: 33.3333}
"""
DAILY = """\
  daily:
    period: day
    tiers:
      - {from_tu: 0, discount_percent: 1}
      - {from_tu: 1000000, discount_percent: 7.5}
      - {from_tu: 3000000, discount_percent: 12.3456}
"""


def _table(records: list[dict[str, Any]]) -> pa.Table:
    return pa.table(
        {
            name: pa.array([r[name] for r in records], pa.int64() if "_t" in name else None)
            for name in COLUMNS
        }
    )


Row = tuple[Decimal, Decimal, Decimal, bool, str, str, str, str, Decimal] | Unpriced


def _reference(
    book: PriceBook,
    plans: TenantPlans,
    usage: dict[tuple[str, str], Decimal],
    records: list[dict[str, Any]],
) -> tuple[list[Row], dict[tuple[str, str], Decimal]]:
    """The Decimal path: RateStage.rate over the records, one row view per record."""
    stage = RateStage(book, plans)
    stage.usage = dict(usage)
    accepted = [Accepted(rec, 0, "usage", 0, i) for i, rec in enumerate(records)]
    rated, unpriced = stage.rate(accepted)
    rows: list[Row | None] = [None] * len(records)
    for r in rated:
        x = r.rating
        rows[r.accepted.offset] = (
            x.token_units,
            x.amount,
            x.list_amount,
            x.billable,
            x.price_card_version,
            x.price_line,
            r.plan or "",
            r.period,
            x.tier_usage_tu,
        )
    for acc, why in unpriced:
        rows[acc.offset] = why
    assert all(row is not None for row in rows)
    return [row for row in rows if row is not None], stage.usage


def _views(out: RatedColumns) -> list[Row]:
    """The columnar result as the same row views (micro-units back to Decimal)."""
    unpriced = dict(out.unpriced_detail)
    wide = dict(out.out_of_range)
    strings = [
        col.to_pylist()
        for col in (out.price_card_version, out.price_line, out.tenant_plan, out.plan_period)
    ]
    names = ("token_units", "amount", "list_amount", "tier_usage_tu")
    micro = (out.token_units_micro, out.amount_micro, out.list_amount_micro, out.tier_usage_micro)
    decimals = [out.decimals(name).to_pylist() for name in names]
    rows: list[Row] = []
    for i in range(len(out.unpriced)):
        if out.unpriced[i]:
            rows.append(unpriced[i])
            assert [int(col[i]) for col in micro] == [0, 0, 0, 0]
            assert [s[i] for s in strings] == ["", "", "", ""] and not out.billable[i]
            continue
        assert i not in unpriced
        numbers = [col[i] for col in decimals]
        if i in wide:
            assert numbers == [getattr(wide[i], name) for name in names]
        else:  # the decimal128 columns hold the int64 micro-units
            assert numbers == [Decimal(int(col[i])).scaleb(-6) for col in micro]
        version, line, plan, period = (s[i] for s in strings)
        tu, amount, list_amount, tier = numbers
        rows.append(
            (tu, amount, list_amount, bool(out.billable[i]), version, line, plan, period, tier)
        )
    return rows


def _check(
    book: PriceBook,
    plans: TenantPlans,
    records: list[dict[str, Any]],
    usage: dict[tuple[str, str], Decimal] | None = None,
) -> tuple[list[Row], RatedColumns]:
    """Rate both ways and assert identical rows and counters; returns the rows."""
    usage = usage or {}
    expected, expected_usage = _reference(book, plans, usage, records)
    counters = dict(usage)
    out = rate_columns(book, plans, counters, _table(records))
    got = _views(out)
    assert len(got) == len(expected)
    mismatched = [(i, g, e) for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e]
    assert mismatched[:3] == []
    assert counters == expected_usage
    assert {k: str(v) for k, v in counters.items()} == {
        k: str(v) for k, v in expected_usage.items()
    }
    return expected, out


# ---- 100k simulated events --------------------------------------------------------


@pytest.fixture(scope="module")
def test_book(tmp_path_factory: pytest.TempPathFactory) -> PriceBook:
    folder = tmp_path_factory.mktemp("cards")
    for card in sorted(CARDS.glob("*.yaml")):
        text = card.read_text(encoding="utf-8")
        extra = LOW_TIERS + (DAILY if "2026.11" in text else "")
        assert text.count("\nplans:\n") == 1
        (folder / card.name).write_text(text.replace("\nplans:\n", "\nplans:\n" + extra))
    return load_cards(folder)


def _simulated(n: int) -> list[dict[str, Any]]:
    sim = Simulation(20261101, NOW)
    records = [m.record for m in sim.messages(n, dup_rate=0.0, bad_rate=0.0)]
    assert all(r is not None for r in records)
    return [r for r in records if r is not None]


def test_100k_simulated_events_equal_the_decimal_reference(test_book: PriceBook) -> None:
    records = _simulated(100_000)
    assert len(records) == 100_000
    by_volume = [t for t, _ in Counter(r["tenant_id"] for r in records).most_common()]
    plans = TenantPlans(
        default=None,
        tenants={
            by_volume[0]: "low",
            by_volume[1]: "daily",
            by_volume[2]: "enterprise",
            by_volume[3]: "strategic",
            by_volume[4]: "standard",
            by_volume[5]: "platinum",  # on no card: unknown_plan
            by_volume[6]: "low",
        },
    )
    # unpriced rows of every kind, spread over the batch
    for i in range(0, len(records), 997):
        records[i] = {**records[i], "model_id": "gpt-unknown"}  # no */* line: no_price_line
    for i in range(5, len(records), 1499):
        rec = records[i]
        records[i] = {**rec, "cached_tokens": rec["input_tokens"] + 1}
    for i in range(11, len(records), 2003):
        records[i] = {**records[i], "event_time": 1_700_000_000_000}  # before the first card
    for i in range(17, len(records), 3001):
        records[i] = {**records[i], "status": "maybe"}  # no billable policy
    for i in range(23, len(records), 401):  # zero-token events
        records[i] = {**records[i], **dict.fromkeys(COLUMNS[5:], 0)}
    # stored counters: on a boundary, just below one, and one with finer digits (a
    # counter this exact path cannot prove; its tenant takes the scalar path)
    usage = {
        (by_volume[0], "2026-10"): Decimal("1999999.000000"),
        (by_volume[6], "2026-11"): Decimal("5000000.500000"),
        (by_volume[2], "2026-11"): Decimal("99999999.9999995"),
        (by_volume[3], "2026-10"): Decimal("49990000"),
        ("tn-nobody", "2026-11"): Decimal("7.000000"),
    }
    expected, out = _check(test_book, plans, records, usage)

    reasons = Counter(row.reason for row in expected if isinstance(row, Unpriced))
    assert set(reasons) == {
        "no_price_card",
        "no_price_line",
        "unknown_status",
        "unknown_plan",
        "cached_exceeds_input",
    }
    rated = [row for row in expected if not isinstance(row, Unpriced)]
    assert {row[4] for row in rated} == {"2026.01", "2026.11"}  # the card changed
    assert {row[3] for row in rated} == {True, False}  # non-billable statuses present
    assert {row[7] for row in rated if row[6] == "daily"} == {"2026-11-01"}
    assert {row[7] for row in rated if row[6] == "low"} == {"2026-10", "2026-11"}
    # tiers were crossed: discounted rows whose amount is not one tier's share of list
    keeps = {Decimal(1), Decimal("0.9"), Decimal("0.75"), Decimal("0.666667")}
    straddled = [
        row
        for row in rated
        if row[6] == "low"
        and row[2]
        and (row[1] / row[2]).quantize(Decimal("0.000001")) not in keeps
    ]
    assert len(straddled) >= 4
    assert out.unpriced.sum() == sum(reasons.values())


# ---- targeted cases ----------------------------------------------------------------

SMALL = """\
version: "v1"
effective_from: 2026-01-01T00:00:00+08:00
class_weights: {input: 1, cached_input: 0.25, output: 4}
models:
  big:
    token_unit_factor: 999.999999
    class_weights: {input: 50.123457, output: 50.5, cached_input: 49.999999, reasoning: 50.000001}
  huge:
    token_unit_factor: 999999.999999
    class_weights: {input: 999999.999999, output: 999999.999999}
  "*": {token_unit_factor: 1}
lines:
  - {serving_carrier: "*", model_id: "*", prices: {input: 4, output: 8}}
  - serving_carrier: "*"
    model_id: big
    prices: {input: 100000.000001, output: 99999.999999, cached_input: 12345.678901,
             reasoning: 0.000001}
  - serving_carrier: "*"
    model_id: huge
    prices: {input: 999999999999.999999, output: 999999999999.999999}
plans:
  ladder:
    tiers:
      - {from_tu: 10, discount_percent: 10}
      - {from_tu: 20, discount_percent: 50}
      - {from_tu: 30.000001, discount_percent: 66.6667}
  top:
    tiers:
      - {from_tu: 1000000000000, discount_percent: 0.0001}
      - {from_tu: 999999999999999999.999999, discount_percent: 100}
"""


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> PriceBook:
    path = tmp_path_factory.mktemp("small") / "small.yaml"
    path.write_text(SMALL, encoding="utf-8")
    return load_cards(path)


T = 1_780_000_000_000


def _rec(**over: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "event_time": T,
        "serving_carrier": "CTCC",
        "model_id": "zz",
        "status": "ok",
        "tenant_id": "t1",
        "input_tokens": 0,
        "output_tokens": 0,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
    }
    rec.update(over)
    return rec


LADDER = TenantPlans(tenants={"t1": "ladder", "t2": "top"})


def test_events_straddling_two_and_three_boundaries(small: PriceBook) -> None:
    records = [
        _rec(input_tokens=5),  # 5 TU at list price
        _rec(input_tokens=17),  # 5..22: across 10 and 20
        _rec(input_tokens=1),  # inside 50 % off
        _rec(tenant_id="t3", input_tokens=40),  # list price (no plan)
        _rec(input_tokens=3, status="error"),  # not billable: no tier usage
        _rec(input_tokens=9),  # 23..32: across 30.000001
    ]
    expected, _ = _check(small, LADDER, records)
    rows = [row for row in expected if isinstance(row, tuple)]
    # hand-computed (*/*: 4 CNY/M, 1 TU per input token): 17 TU from 5 = 5 at list price,
    # 10 at 90 %, 2 at 50 % of 0.000068 CNY
    assert rows[1][2] == Decimal("0.000068")
    assert rows[1][1] == Decimal("0.000068") * (5 + 9 + 1) / 17 == Decimal("0.00006")
    three, _ = _check(small, LADDER, [_rec(input_tokens=35)], {("t1", "2026-05"): Decimal("5")})
    assert isinstance(three[0], tuple)
    # 5 at list, 10 at 90 %, 10.000001 at 50 %, 9.999999 at 33.3333 % of 0.00014 CNY:
    # 0.00014 * 22.3333301666... / 35 = 0.0000893333...
    assert three[0][2] == Decimal("0.000140")
    assert three[0][1] == Decimal("0.000089")


def test_zero_token_events(small: PriceBook) -> None:
    records = [_rec(), _rec(tenant_id="t2"), _rec(status="timeout"), _rec(tenant_id="t9")]
    expected, out = _check(small, LADDER, records)
    assert [row[:4] for row in expected if isinstance(row, tuple)] == [
        (0, 0, 0, True),
        (0, 0, 0, True),
        (0, 0, 0, False),
        (0, 0, 0, True),
    ]
    assert out.token_units_micro.tolist() == [0, 0, 0, 0]


def test_maximum_counts_with_large_weights_and_prices(small: PriceBook) -> None:
    """10,000,000 tokens in every class. ``big``: ~2.0e12 TU (2.0e18 micro-TU, near the
    int64 limit) and ~2.2e6 CNY, computed in int64; ``huge`` (the largest factor, weights
    and prices a card allows): ~2e19 TU, beyond int64 micro-units, so the exact Rating
    comes back in ``out_of_range``; the tenant's later events still see its usage."""
    full = dict.fromkeys(COLUMNS[5:], 10_000_000)
    full["input_tokens"] = 20_000_000  # 10M input + 10M cached
    records = [
        _rec(model_id="big", **full),
        _rec(model_id="big", tenant_id="t2", **full),  # "top": 1e12 TU boundary inside
        _rec(model_id="big", tenant_id="t2", **full),
        _rec(model_id="huge", tenant_id="t3", **full),
        _rec(model_id="huge", tenant_id="t3", status="error", **full),
        _rec(model_id="big", tenant_id="t3", **full),
        _rec(model_id="big", tenant_id="t1", **full),
    ]
    expected, out = _check(small, LADDER, records)
    assert [i for i, _ in out.out_of_range] == [3, 4]
    big = expected[0]
    assert isinstance(big, tuple)
    assert big[0] == Decimal("999.999999") * 10_000_000 * (
        Decimal("50.123457") + Decimal("50.5") + Decimal("49.999999") + Decimal("50.000001")
    )
    assert (
        big[2]
        == (
            Decimal("100000.000001")
            + Decimal("99999.999999")
            + Decimal("12345.678901")
            + Decimal("0.000001")
        )
        * 10
    )
    assert out.token_units_micro[0] > 2**60


def test_dictionary_columns_and_chunks_give_the_same_result(small: PriceBook) -> None:
    records = [_rec(input_tokens=7 * i, tenant_id=f"t{i % 3 + 1}") for i in range(30)]
    plain = rate_columns(small, LADDER, {}, _table(records))
    chunked = pa.concat_tables([_table(records[:11]), _table(records[11:])])
    encoded = chunked.set_column(
        4,
        "tenant_id",
        pa.chunked_array([c.dictionary_encode() for c in chunked["tenant_id"].chunks]),
    )
    for other in (chunked, encoded):
        out = rate_columns(small, LADDER, {}, other)
        assert _views(out) == _views(plain)


def test_empty_batch_and_missing_values(small: PriceBook) -> None:
    usage: dict[tuple[str, str], Decimal] = {}
    out = rate_columns(small, LADDER, usage, _table([]))
    assert len(out.unpriced) == 0 and usage == {}
    table = _table([_rec()]).set_column(1, "serving_carrier", pa.array([None], pa.string()))
    with pytest.raises(ValueError, match="serving_carrier"):
        rate_columns(small, LADDER, usage, table)


def test_rate_stage_rate_columns_uses_its_counters(small: PriceBook) -> None:
    stage = RateStage(small, LADDER)
    stage.set_usage("t1", "2026-05", Decimal("9.000000"))
    out = stage.rate_columns(_table([_rec(input_tokens=2), _rec(input_tokens=1)]))
    # 4 micro-CNY per TU: 1 TU at list + 1 at 90 % = 7.6 -> 8; then 1 at 90 % = 3.6 -> 4
    assert out.amount_micro.tolist() == [8, 4]
    assert stage.usage == {("t1", "2026-05"): Decimal("12.000000")}


def test_events_months_apart_keep_their_own_periods(small: PriceBook) -> None:
    """Hours spanning more than a year (periods grouped by sorting, not by a table)."""
    day = 86_400_000
    records = [
        _rec(event_time=T + k * 37 * day + (k % 5) * 3_600_000, input_tokens=4 + k)
        for k in range(12)
    ]
    records += [_rec(event_time=T + 400 * day, input_tokens=30), _rec(input_tokens=11)]
    expected, _ = _check(small, LADDER, records, {("t1", "2027-03"): Decimal("19.5")})
    periods = [row[7] for row in expected if isinstance(row, tuple)]
    assert periods[0] == periods[-1] == "2026-05" and "2027-07" in periods
