"""RateStage (tier counters, unpriced events), window rollups (exact sums, the late
boundary, Beijing-time days), tenant plans (errors name the setting) and period keys.

Amounts are computed by hand with Decimal from the small card below.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from pipeline.metering.plans import (
    PlansError,
    TenantPlans,
    day_start_s,
    hour_start_s,
    load_plans,
    minute_start_s,
    period_key,
)
from pipeline.metering.pricing import PriceBook, Unpriced, load_cards
from pipeline.simulate import Simulation
from pipeline.stages.ingest import Accepted
from pipeline.stages.rate import Rated, RateStage
from pipeline.stages.window import GRAINS, corrections_table, rollup_table
from pipeline.warehouse import Warehouse
from pipeline.warehouse.arrow_rows import usage_events_table
from tests.unit.warehouse_fill import CARDS, PLANS, partition_of

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
GRACE_MS = 300_000
NOW = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)

CARD = """
version: "t1"
effective_from: 2026-01-01T00:00:00+08:00
models:
  m1: {token_unit_factor: 1}
lines:
  - {serving_carrier: "*", model_id: m1, prices: {input: 2.00, output: 8.00}}
plans:
  tiered:
    tiers:
      - {from_tu: 1000, discount_percent: 10}
      - {from_tu: 5000, discount_percent: 50}
  daily:
    period: day
    tiers:
      - {from_tu: 100, discount_percent: 20}
"""


def ms(when: datetime) -> int:
    return (when - EPOCH) // timedelta(milliseconds=1)


@pytest.fixture
def book(tmp_path: Path) -> PriceBook:
    (tmp_path / "t1.yaml").write_text(CARD)
    return load_cards(tmp_path)


_SEQ = Counter[int]()


def acc(
    tenant: str = "t-1",
    when: datetime = NOW,
    input_tokens: int = 0,
    output_tokens: int = 0,
    status: str = "ok",
    model: str = "m1",
    arrived_ms: int | None = None,
    event_id: str | None = None,
    **over: Any,
) -> Accepted:
    part = partition_of(tenant)
    _SEQ[part] += 1
    rec: dict[str, Any] = {
        "event_id": event_id or f"e-{part}-{_SEQ[part]}",
        "event_time": ms(when),
        "source": "gateway",
        "source_id": "gw-1",
        "reporting_carrier": "CMCC",
        "home_carrier": "CMCC",
        "serving_carrier": "CMCC",
        "transaction_id": None,
        "tenant_id": tenant,
        "subscriber_id": "sub_" + "0" * 32,
        "channel": "app",
        "model_id": model,
        "provider": "p",
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "status": status,
        "routing_policy": None,
        "latency_ms": 10,
        "region": None,
        "attributes": {},
    }
    rec.update(over)
    arrived = ms(when) + 1000 if arrived_ms is None else arrived_ms
    return Accepted(rec, 0, "usage-events", part, _SEQ[part], arrived)


def batch(rated: list[Rated]) -> pa.Table:
    """A usage_events batch with arrival times, as Pipeline.process_usage builds it."""
    events = usage_events_table(rated, NOW)
    return events.append_column(
        "arrived_ms", pa.array([r.accepted.arrived_ms for r in rated], pa.int64())
    )


# ---- RateStage ------------------------------------------------------------------------


def test_tier_counter_counts_billable_token_units_only(book: PriceBook) -> None:
    rater = RateStage(book, TenantPlans(tenants={"t-1": "tiered"}))
    rated, unpriced = rater.rate(
        [
            acc(input_tokens=800),  # 800 TU, list price
            acc(input_tokens=5000, status="error"),  # not billable: TU, no amount, no tier
            acc(input_tokens=400),  # 200 TU at list, 200 TU 10 % off
        ]
    )
    assert unpriced == []
    first, failed, crossing = (r.rating for r in rated)
    assert first.amount == Decimal("0.001600") and first.tier_usage_tu == Decimal("800")
    assert failed.billable is False and failed.amount == 0 and failed.tier_usage_tu == 0
    assert failed.token_units == Decimal("5000")
    # 400 input tokens at 2 CNY/M = 0.0008 list; half of it 10 % off
    expected = Decimal("0.0004") + Decimal("0.0004") * Decimal("0.9")
    assert crossing.list_amount == Decimal("0.000800")
    assert crossing.amount == expected.quantize(Decimal("0.000001"))
    assert rater.usage[("t-1", "2026-11")] == Decimal("1200")


def test_counters_are_per_tenant_and_per_beijing_period(book: PriceBook) -> None:
    plans = TenantPlans(tenants={"a": "tiered", "b": "tiered", "d": "daily"})
    rater = RateStage(book, plans)
    nov_last = datetime(2026, 11, 30, 15, 59, 59, 999000, tzinfo=UTC)  # 23:59:59.999 Beijing
    dec_first = datetime(2026, 11, 30, 16, 0, tzinfo=UTC)  # 1 December 00:00 Beijing
    rated, _ = rater.rate(
        [
            acc("a", nov_last, input_tokens=1500),
            acc("b", nov_last, input_tokens=10),
            acc("a", dec_first, input_tokens=10),  # a new month: list price again
            acc("d", nov_last, input_tokens=150),
            acc("d", dec_first, input_tokens=150),  # a new day for a daily plan
        ]
    )
    assert [r.period for r in rated] == [
        "2026-11",
        "2026-11",
        "2026-12",
        "2026-11-30",
        "2026-12-01",
    ]
    a_nov, b_nov, a_dec, d_30, d_01 = (r.rating for r in rated)
    assert a_nov.amount < a_nov.list_amount  # 500 of 1500 TU above 1000
    assert b_nov.amount == b_nov.list_amount  # b has its own counter
    assert a_dec.amount == a_dec.list_amount
    assert d_30.amount == d_01.amount < d_30.list_amount  # both days start at 0
    assert rater.usage == {
        ("a", "2026-11"): Decimal("1500"),
        ("b", "2026-11"): Decimal("10"),
        ("a", "2026-12"): Decimal("10"),
        ("d", "2026-11-30"): Decimal("150"),
        ("d", "2026-12-01"): Decimal("150"),
    }


def test_stored_usage_places_the_next_event_on_the_scale(book: PriceBook) -> None:
    rater = RateStage(book, TenantPlans(default="tiered"))
    rater.add_usage("t-1", "2026-11", Decimal("4999.5"))
    rater.add_usage("t-1", "2026-11", Decimal("0.5"))  # loading adds up
    (r,), _ = rater.rate([acc(input_tokens=1000)])
    # all 1000 TU past 5000: 50 % off
    assert r.rating.amount == Decimal("0.001000")
    assert rater.usage[("t-1", "2026-11")] == Decimal("6000")


def test_set_usage_replaces_a_counter_for_a_retaken_partition(book: PriceBook) -> None:
    rater = RateStage(book, TenantPlans(default="tiered"))
    rater.add_usage("t-1", "2026-11", Decimal("600"))
    rater.rate([acc(input_tokens=400)])  # counted here, then stored
    rater.set_usage("t-1", "2026-11", Decimal("1000"))  # the partition comes back
    assert rater.usage == {("t-1", "2026-11"): Decimal("1000")}


def test_list_price_tenants_ignore_usage(book: PriceBook) -> None:
    rater = RateStage(book, TenantPlans())
    rater.add_usage("t-1", "2026-11", Decimal("1000000"))
    (r,), _ = rater.rate([acc(input_tokens=1000)])
    assert r.plan is None and r.rating.amount == r.rating.list_amount == Decimal("0.002000")


def test_unpriced_events_are_returned_in_order_and_do_not_count(book: PriceBook) -> None:
    rater = RateStage(book, TenantPlans(tenants={"t-1": "tiered", "t-x": "no-such-plan"}))
    batch_ = [
        acc(input_tokens=10),
        acc(input_tokens=10, model="unknown-model"),
        acc("t-x", input_tokens=10),
        acc(input_tokens=10, cached_tokens=20),
        acc(input_tokens=10),
    ]
    rated, unpriced = rater.rate(batch_)
    assert [r.accepted for r in rated] == [batch_[0], batch_[4]]
    assert [(a, u.reason) for a, u in unpriced] == [
        (batch_[1], "no_price_line"),
        (batch_[2], "unknown_plan"),
        (batch_[3], "cached_exceeds_input"),
    ]
    assert all(isinstance(u, Unpriced) for _, u in unpriced)
    assert rater.usage == {("t-1", "2026-11"): Decimal("20")}
    assert "t-x" not in {t for t, _ in rater.usage}


def test_shipped_cards_and_plans_rate_a_simulated_stream_deterministically() -> None:
    sim = Simulation(seed=5, now_ms=ms(NOW), tenants=30)
    records = [m.record for m in sim.messages(2000) if m.record is not None]
    book, plans = load_cards(CARDS), load_plans(PLANS)

    def run() -> list[tuple[Decimal, Decimal]]:
        accepted = [
            Accepted(r, 0, "usage-events", partition_of(r["tenant_id"]), i, r["event_time"])
            for i, r in enumerate(records)
        ]
        rated, unpriced = RateStage(book, plans).rate(accepted)
        assert unpriced == []
        return [(x.rating.amount, x.rating.token_units) for x in rated]

    assert run() == run()


# ---- window ---------------------------------------------------------------------------


def _simulated_rated(n: int = 3000) -> list[Rated]:
    sim = Simulation(seed=9, now_ms=ms(NOW), tenants=25)
    records = [m.record for m in sim.messages(n) if m.record is not None]
    offsets: Counter[int] = Counter()
    accepted = []
    for i, r in enumerate(records):
        part = partition_of(r["tenant_id"])
        offsets[part] += 1
        # every 7th arrives 10 minutes late
        arrived = r["event_time"] + (600_000 if i % 7 == 0 else 500)
        accepted.append(Accepted(r, 0, "usage-events", part, offsets[part], arrived))
    rated, unpriced = RateStage(load_cards(CARDS), load_plans(PLANS)).rate(accepted)
    assert unpriced == []
    return rated


@pytest.mark.parametrize("grain", list(GRAINS))
def test_rollup_sums_equal_the_inputs_exactly(grain: str) -> None:
    rated = _simulated_rated()
    table = rollup_table(batch(rated), grain, GRACE_MS, NOW)
    rows = table.to_pylist()
    assert sum(r["events"] for r in rows) == len(rated)
    assert sum(r["billable_events"] for r in rows) == sum(r.rating.billable for r in rated)
    for name in ("input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens"):
        assert sum(r[name] for r in rows) == sum(x.accepted.record[name] for x in rated)
    assert sum(r["token_units"] for r in rows) == sum(x.rating.token_units for x in rated)
    assert sum(r["amount"] for r in rows) == sum(x.rating.amount for x in rated)
    assert isinstance(rows[0]["amount"], Decimal)
    keys = [
        (r["period_start"], r["tenant_id"], r["reporting_carrier"], r["home_carrier"],
         r["serving_carrier"], r["model_id"], r["channel"], r["kind"], r["topic"], r["partition"])
        for r in rows
    ]  # fmt: skip
    assert len(keys) == len(set(keys)), "one row per window, dimensions, kind and partition"
    # a row's offset is the highest offset it folds in (the sink's marks rely on it)
    per_part_max = Counter[int]()
    for x in rated:
        p = x.accepted.partition
        per_part_max[p] = max(per_part_max[p], x.accepted.offset)
    for p, top in per_part_max.items():
        assert max(r["offset"] for r in rows if r["partition"] == p) == top
    late = sum(r["events"] for r in rows if r["kind"] == "late")
    assert late == len(corrections_table(batch(rated), GRACE_MS, NOW)) > 0


def test_late_is_decided_at_the_exact_boundary() -> None:
    when = datetime(2026, 11, 28, 1, 30, 30, tzinfo=UTC)
    closes = ms(datetime(2026, 11, 28, 1, 31, tzinfo=UTC)) + GRACE_MS  # window end + grace
    rater = RateStage(load_cards(CARDS), TenantPlans())
    just_in = acc(when=when, input_tokens=100, model="qwen-max", arrived_ms=closes - 1)
    just_late = acc(when=when, input_tokens=100, model="qwen-max", arrived_ms=closes)
    rated, _ = rater.rate([just_in, just_late])
    rows = rollup_table(batch(rated), "usage_minute", GRACE_MS, NOW).to_pylist()
    assert sorted((r["kind"], r["events"]) for r in rows) == [("late", 1), ("stream", 1)]
    corrections = corrections_table(batch(rated), GRACE_MS, NOW).to_pylist()
    assert [c["event_id"] for c in corrections] == [just_late.record["event_id"]]
    assert corrections[0]["lateness_s"] == 0.0
    assert corrections[0]["window_start"] == datetime(2026, 11, 28, 1, 30, tzinfo=UTC)
    assert corrections[0]["amount"] == rated[1].rating.amount


def test_days_are_beijing_days() -> None:
    before = datetime(2026, 11, 30, 15, 59, 59, 999000, tzinfo=UTC)  # 23:59:59.999 Beijing
    after = datetime(2026, 11, 30, 16, 0, tzinfo=UTC)  # 1 December 00:00 Beijing
    rated, _ = RateStage(load_cards(CARDS), TenantPlans()).rate(
        [
            acc(when=before, input_tokens=10, model="qwen-max"),
            acc(when=after, input_tokens=10, model="qwen-max"),
        ]
    )
    starts = {
        grain: sorted(
            r["period_start"] for r in rollup_table(batch(rated), grain, GRACE_MS, NOW).to_pylist()
        )
        for grain in GRAINS
    }
    assert starts["usage_day"] == [
        datetime(2026, 11, 29, 16, 0, tzinfo=UTC),  # 30 November 00:00 Beijing
        datetime(2026, 11, 30, 16, 0, tzinfo=UTC),  # 1 December 00:00 Beijing
    ]
    assert starts["usage_hour"] == [
        datetime(2026, 11, 30, 15, 0, tzinfo=UTC),
        datetime(2026, 11, 30, 16, 0, tzinfo=UTC),
    ]
    assert starts["usage_minute"] == [
        datetime(2026, 11, 30, 15, 59, tzinfo=UTC),
        datetime(2026, 11, 30, 16, 0, tzinfo=UTC),
    ]


def test_rollup_rows_read_back_as_beijing_days(clean_warehouse: Warehouse) -> None:
    after = datetime(2026, 11, 30, 16, 0, tzinfo=UTC)
    rated, _ = RateStage(load_cards(CARDS), TenantPlans()).rate(
        [acc(when=after, input_tokens=10, model="qwen-max")]
    )
    clean_warehouse.insert_arrow(
        "usage_day", rollup_table(batch(rated), "usage_day", GRACE_MS, NOW)
    )
    row = clean_warehouse.query_arrow(
        "SELECT toString(period_start) AS s, toDate(period_start) AS d, sum(amount) AS a "
        "FROM usage_day GROUP BY period_start"
    ).to_pylist()
    assert row == [
        {
            "s": "2026-12-01 00:00:00",
            "d": after.date() + timedelta(days=1),
            "a": rated[0].rating.amount,
        }
    ]


# ---- plans and periods ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text,message",
    [
        ("default: null\ntenant:\n  a: enterprise\n", "plans.yaml: tenant: unknown setting"),
        ("default: 5\n", "plans.yaml: default: must be a plan name or null"),
        ('default: ""\n', "plans.yaml: default: must be a plan name or null"),
        ("tenants: [a, b]\n", "plans.yaml: tenants: must map tenant ids to plan names"),
        ("tenants:\n  tn-1: 5\n", "plans.yaml: tenants.tn-1: must be a plan name or null"),
        ("tenants:\n  12345: enterprise\n", "plans.yaml: tenants: 12345: a tenant id must be text"),
        ("- a\n- b\n", "plans.yaml: expected a mapping with `default` and `tenants`"),
        ("tenants: {a: [\n", "plans.yaml: not valid YAML"),
    ],
)
def test_plan_file_errors_name_the_setting(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "plans.yaml"
    path.write_text(text)
    with pytest.raises(PlansError) as err:
        load_plans(path)
    assert str(err.value).startswith(message)


def test_plan_files_that_work(tmp_path: Path) -> None:
    assert load_plans(None) == TenantPlans()
    with pytest.raises(PlansError, match="TOKENMETER_TENANT_PLANS: .*absent.yaml does not exist"):
        load_plans(tmp_path / "absent.yaml")  # a mistyped path must not mean "list price"
    path = tmp_path / "plans.yaml"
    path.write_text("default: standard\ntenants:\n  vip: enterprise\n  free: null\n")
    plans = load_plans(path)
    assert [plans.plan_for(t) for t in ("vip", "free", "other")] == ["enterprise", None, "standard"]
    assert load_plans(PLANS).plan_for("tn-cmcc-0001") == "enterprise"


@pytest.mark.parametrize(
    "when,month,day",
    [
        (datetime(2026, 11, 30, 15, 59, 59, 999000, tzinfo=UTC), "2026-11", "2026-11-30"),
        (datetime(2026, 11, 30, 16, 0, tzinfo=UTC), "2026-12", "2026-12-01"),
        (datetime(2026, 12, 31, 16, 0, tzinfo=UTC), "2027-01", "2027-01-01"),
        (datetime(2026, 2, 28, 15, 59, 59, 999000, tzinfo=UTC), "2026-02", "2026-02-28"),
    ],
)
def test_period_key_is_beijing_time(when: datetime, month: str, day: str) -> None:
    assert period_key(ms(when), "month") == month
    assert period_key(ms(when), "day") == day


def test_window_starts() -> None:
    t = ms(datetime(2026, 11, 30, 16, 59, 59, 999000, tzinfo=UTC))
    assert minute_start_s(t) * 1000 == ms(datetime(2026, 11, 30, 16, 59, tzinfo=UTC))
    assert hour_start_s(t) * 1000 == ms(datetime(2026, 11, 30, 16, 0, tzinfo=UTC))
    assert day_start_s(t) * 1000 == ms(datetime(2026, 11, 30, 16, 0, tzinfo=UTC))
    assert day_start_s(t - 3_600_000) * 1000 == ms(datetime(2026, 11, 29, 16, 0, tzinfo=UTC))
