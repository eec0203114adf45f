"""jobs/rerate.py on the embedded engine: exact new totals, rollups that keep agreeing
with rated_usage, graduated tiers across the range boundary, idempotency, and
recovery of a run interrupted at each step.

Expected amounts come from running ``RateStage`` over the whole log with the fixed
cards (for price-only fixes the tier positions do not move, so that is exactly what a
correct re-rating must store), not from the job's own code path.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import jobs.rerate as job
from jobs.rerate import (
    RerateError,
    UnpricedEventsError,
    period_span_ms,
    plan_rerate,
    rerate,
    run_id_for,
)
from pipeline.metering.plans import TenantPlans, load_plans
from pipeline.metering.pricing import PriceBook, load_cards
from pipeline.stages.rate import RateStage
from pipeline.warehouse import Warehouse
from tests.unit.warehouse_fill import CARDS, NOW_MS, fill, sums

HOUR = 3_600_000
START, END = NOW_MS - 3 * HOUR, NOW_MS  # covers all simulated events
GRAINS = ("usage_minute", "usage_hour", "usage_day")
TIERED = TenantPlans(default="enterprise")


def cards(tmp: Path, *edits: tuple[str, str], low_tiers: bool = False) -> Path:
    """The shipped cards with text edits on 2026-11.yaml (and tiers a test run reaches)."""
    tmp.mkdir(parents=True, exist_ok=True)
    for card in CARDS.glob("*.yaml"):
        text = card.read_text()
        if low_tiers:
            text = text.replace("from_tu: 100000000,", "from_tu: 200000,").replace(
                "from_tu: 1000000000,", "from_tu: 2000000,"
            )
        if card.name == "2026-11.yaml":
            for old, new in edits:
                assert old in text, old
                text = text.replace(old, new)
        (tmp / card.name).write_text(text)
    return tmp


V3_INPUT = ("deepseek-v3,   prices: {input: 2.00,", "deepseek-v3,   prices: {input: 2.35,")
V3_FACTOR = ("deepseek-v3:   {token_unit_factor: 1.0}", "deepseek-v3:   {token_unit_factor: 1.5}")


def stored(wh: Warehouse) -> dict[tuple[str, str], dict[str, Any]]:
    rows = wh.query_arrow(
        "SELECT reporting_carrier, event_id, toUnixTimestamp64Milli(event_time) AS ms, amount, "
        "token_units, list_amount, tier_usage_tu, price_card_version, rating_run "
        "FROM usage_events"
    ).to_pylist()
    return {(r["reporting_carrier"], r["event_id"]): r for r in rows}


def expected(filled_rated: list[Any], book: PriceBook, plans: TenantPlans) -> dict[Any, Any]:
    """Every event rated afresh, in log order, with ``book``."""
    accepted = sorted((r.accepted for r in filled_rated), key=lambda a: (a.partition, a.offset))
    rated, unpriced = RateStage(book, plans).rate(accepted)
    assert unpriced == []
    return {
        (r.accepted.record["reporting_carrier"], r.accepted.record["event_id"]): r.rating
        for r in rated
    }


def assert_rollups_agree(wh: Warehouse) -> None:
    truth = sums(wh, "rated_usage")
    for grain in GRAINS:
        assert sums(wh, grain) == truth, grain


def count(wh: Warehouse, sql: str) -> int:
    return int(wh.query_arrow(sql).column(0)[0].as_py())


@pytest.fixture(scope="module")
def low_cards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped cards with tiers from 200,000 and 2,000,000 TU (reached here)."""
    return cards(tmp_path_factory.mktemp("cards-low"), low_tiers=True)


@pytest.fixture
def filled(clean_warehouse: Warehouse, low_cards: Path) -> Any:
    return fill(clean_warehouse, events=3000, seed=21, tenants=20, plans=TIERED,
                book=load_cards(low_cards))  # fmt: skip


def test_same_cards_change_nothing_and_write_nothing(
    clean_warehouse: Warehouse, filled: Any, low_cards: Path
) -> None:
    wh = clean_warehouse
    before = stored(wh)
    price_cards = count(wh, "SELECT count() FROM price_cards")
    report = rerate(wh, load_cards(low_cards), TIERED, START, END)
    assert report.changed == 0 and report.run_id is None
    assert report.old == report.new and report.old.events == len(filled.rated)
    assert stored(wh) == before
    assert count(wh, "SELECT count() FROM rerate_runs") == 0
    assert count(wh, "SELECT count() FROM usage_day WHERE kind = 'rerate'") == 0
    assert report.price_cards_stored == []
    assert count(wh, "SELECT count() FROM price_cards") == price_cards > 0


def test_price_fix_gives_exact_new_totals_and_runs_once(
    clean_warehouse: Warehouse, filled: Any, tmp_path: Path
) -> None:
    wh = clean_warehouse
    tiers_reached = count(wh, "SELECT countIf(amount < list_amount) FROM usage_events")
    assert tiers_reached > 0, "the fixture must exercise graduated tiers"
    book = load_cards(cards(tmp_path / "fixed", V3_INPUT, low_tiers=True))
    report = rerate(wh, book, TIERED, START, END)
    want = expected(filled.rated, book, TIERED)
    got = stored(wh)
    assert {k: (v["amount"], v["token_units"]) for k, v in got.items()} == {
        k: (r.amount, r.token_units) for k, r in want.items()
    }
    assert report.new.amount == sum(r.amount for r in want.values())
    assert report.old.amount != report.new.amount
    assert_rollups_agree(wh)
    changed = {k for k, v in got.items() if v["rating_run"] == report.run_id}
    assert len(changed) == report.changed == count(wh, "SELECT count() FROM rerate_changes")
    assert count(wh, "SELECT count() FROM usage_events") == len(filled.rated)
    runs = wh.query_arrow("SELECT * FROM rerate_runs FINAL").to_pylist()
    assert [(r["run_id"], r["status"], r["new_amount"]) for r in runs] == [
        (report.run_id, "done", report.new.amount)
    ]
    assert count(wh, "SELECT count() FROM system.tables WHERE name LIKE 'rerate_join_%'") == 0
    price = wh.query_arrow(
        "SELECT unit_price_per_million AS p FROM price_cards FINAL WHERE price_card_version = "
        "'2026.11' AND serving_carrier = '*' AND model_id = 'deepseek-v3' AND token_class = 'input'"
    ).to_pylist()
    assert price == [{"p": Decimal("2.35")}]
    # late events: corrections keep the rating they arrived with; rollup 'late' rows too
    late_rollup = wh.query_arrow(
        "SELECT sum(amount) AS a, sum(events) AS n FROM usage_minute WHERE kind = 'late'"
    ).to_pylist()[0]
    corrections = wh.query_arrow(
        "SELECT sum(amount) AS a, count() AS n FROM usage_corrections"
    ).to_pylist()[0]
    assert late_rollup == corrections and corrections["n"] == filled.late

    tables = ("rerate_runs", "rerate_changes", "price_cards", *GRAINS)
    rows_before = {t: count(wh, f"SELECT count() FROM {t}") for t in tables}
    again = rerate(wh, book, TIERED, START, END)
    assert again.changed == 0 and again.run_id is None and again.price_cards_stored == []
    assert stored(wh) == got
    assert {t: count(wh, f"SELECT count() FROM {t}") for t in tables} == rows_before
    assert_rollups_agree(wh)


def test_sub_range_uses_stored_usage_around_it(
    clean_warehouse: Warehouse, filled: Any, tmp_path: Path
) -> None:
    wh = clean_warehouse
    before = stored(wh)
    book = load_cards(cards(tmp_path / "fixed", V3_INPUT, low_tiers=True))
    lo, hi = NOW_MS - 90 * 60_000, NOW_MS - 30 * 60_000
    report = rerate(wh, book, TIERED, lo, hi)
    want = expected(filled.rated, book, TIERED)  # price-only fix: tier positions unchanged
    after = stored(wh)
    inside = {k for k, v in before.items() if lo <= v["ms"] < hi}
    assert 0 < len(inside) < len(before)
    for key, row in after.items():
        if key in inside:
            assert row["amount"] == want[key].amount, key
        else:
            assert row == before[key], key
    assert report.old.events == len(inside)
    assert_rollups_agree(wh)


def test_token_unit_change_moves_tiers_inside_the_range_only(
    clean_warehouse: Warehouse, filled: Any, tmp_path: Path
) -> None:
    wh = clean_warehouse
    before = stored(wh)
    book = load_cards(cards(tmp_path / "fixed", V3_FACTOR, low_tiers=True))
    lo, hi = NOW_MS - 2 * HOUR, NOW_MS - 60 * 60_000
    report = rerate(wh, book, TIERED, lo, hi)
    after = stored(wh)
    assert report.new.token_units > report.old.token_units
    for key, row in after.items():
        if not lo <= before[key]["ms"] < hi:
            assert row == before[key], "events outside the range keep their rating"
    # what the tenants' tier counters will be loaded from next time
    assert sum(r["tier_usage_tu"] for r in after.values()) > sum(
        r["tier_usage_tu"] for r in before.values()
    )
    assert_rollups_agree(wh)
    assert rerate(wh, book, TIERED, lo, hi).changed == 0


def test_unpriceable_events_stop_the_run_before_any_write(
    clean_warehouse: Warehouse, filled: Any, tmp_path: Path
) -> None:
    wh = clean_warehouse
    before = stored(wh)
    no_kimi = cards(
        tmp_path / "bad",
        (
            '  - {serving_carrier: "*", model_id: kimi-k2,       prices: {input: 4.00, '
            "cached_input: 1.00, output: 12.00}}  # changed\n",
            "",
        ),
        low_tiers=True,
    )
    with pytest.raises(UnpricedEventsError) as err:
        rerate(wh, load_cards(no_kimi), TIERED, START, END)
    assert "kimi-k2" in str(err.value) and "nothing was changed" in str(err.value)
    assert stored(wh) == before
    assert count(wh, "SELECT count() FROM rerate_runs") == 0


def test_interrupted_before_usage_events_is_finished_by_the_next_run(
    clean_warehouse: Warehouse, filled: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wh = clean_warehouse
    book = load_cards(cards(tmp_path / "fixed", V3_INPUT, low_tiers=True))

    def crash(*_: Any) -> None:
        raise RuntimeError("power cut")

    monkeypatch.setattr(job, "_update_usage_events", crash)
    with pytest.raises(RuntimeError):
        rerate(wh, book, TIERED, START, END)
    planned = plan_rerate(wh, book, TIERED, START, END)
    assert count(wh, "SELECT count() FROM usage_day WHERE kind = 'rerate'") > 0
    monkeypatch.undo()

    report = rerate(wh, book, TIERED, START, END)
    assert report.recovered == [(planned.run_id, "finished")]
    assert report.changed == 0  # the recovery applied everything
    want = expected(filled.rated, book, TIERED)
    assert {k: v["amount"] for k, v in stored(wh).items()} == {k: r.amount for k, r in want.items()}
    assert_rollups_agree(wh)  # the rollup deltas were not written twice
    runs = wh.query_arrow("SELECT run_id, status FROM rerate_runs FINAL").to_pylist()
    assert runs == [{"run_id": planned.run_id, "status": "done"}]


def test_interrupted_before_the_journal_is_abandoned_then_redone(
    clean_warehouse: Warehouse, filled: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wh = clean_warehouse
    book = load_cards(cards(tmp_path / "fixed", V3_INPUT, low_tiers=True))
    real_insert = wh.insert_arrow

    def no_journal(table: str, data: Any, dedup_token: str | None = None) -> int:
        if table == "rerate_changes":
            raise RuntimeError("disk full")
        return real_insert(table, data, dedup_token=dedup_token)

    monkeypatch.setattr(wh, "insert_arrow", no_journal)
    with pytest.raises(RuntimeError):
        rerate(wh, book, TIERED, START, END)
    monkeypatch.undo()
    report = rerate(wh, book, TIERED, START, END)
    assert [outcome for _, outcome in report.recovered] == ["abandoned"]
    assert report.recovered[0][0] == report.run_id  # same state, same cards: same id
    assert report.applied
    assert_rollups_agree(wh)
    status = wh.query_arrow("SELECT status FROM rerate_runs FINAL").to_pylist()
    assert status == [{"status": "done"}]


def test_run_id_depends_on_the_exact_changes_only() -> None:
    a = ("CMCC", "e1", (Decimal("1.000000"), "stream"), (Decimal("2.000000"),))
    b = ("CTCC", "e2", (Decimal("1.000000"), "stream"), (Decimal("3.000000"),))
    assert run_id_for([a, b]) == run_id_for([b, a])
    assert run_id_for([a, b]) != run_id_for([a])
    c = ("CMCC", "e1", (Decimal("1.000000"), "rr_x"), (Decimal("2.000000"),))
    assert run_id_for([c, b]) != run_id_for([a, b]), "the old rating_run is part of it"
    assert run_id_for([a]).startswith("rr_")


def test_period_span_covers_the_beijing_months_of_the_range() -> None:
    def at(year: int, month: int, day: int, hour: int = 0) -> int:
        return int(datetime(year, month, day, hour, tzinfo=UTC).timestamp() * 1000)

    # 30 Nov 23:00 .. 1 Dec 01:00 Beijing time
    span = period_span_ms(at(2026, 11, 30, 15), at(2026, 11, 30, 17))
    assert span == (at(2026, 10, 31, 16), at(2026, 12, 31, 16))  # 1 Nov .. 1 Jan Beijing
    # a range ending exactly at a Beijing month start does not touch the next month
    assert period_span_ms(at(2026, 11, 5), at(2026, 11, 30, 16)) == (
        at(2026, 10, 31, 16),
        at(2026, 11, 30, 16),
    )


def test_to_must_be_after_from(clean_warehouse: Warehouse) -> None:
    with pytest.raises(RerateError):
        plan_rerate(clean_warehouse, load_cards(CARDS), load_plans(None), END, START)
