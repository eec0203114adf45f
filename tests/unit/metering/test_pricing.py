"""Price cards and rating: real YAML files (the shipped ones and small ones written per
test), hand-computed Decimal amounts, and the ``prices`` CLI through typer's runner."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from pathlib import Path
from typing import Any

import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pipeline.cli_prices import prices_app
from pipeline.events import Reason, Stage
from pipeline.metering.pricing import (
    PriceBook,
    PriceCardError,
    Rating,
    Tier,
    Unpriced,
    load_card_file,
    load_cards,
    price_lines_rows,
    split_across_tiers,
)

REPO = Path(__file__).resolve().parents[3]
CARDS = REPO / "config" / "price_cards"
MODELS = (
    "deepseek-v3",
    "deepseek-r1",
    "qwen-max",
    "doubao-pro",
    "kimi-k2",
    "glm-4.6",
    "jiutian-13b",
    "hunyuan-turbo",
    "ernie-4.5",
)
T0 = datetime(2026, 3, 1, tzinfo=UTC)


def _ms(when: datetime) -> int:
    return (when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def _rec(**over: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "event_id": "e1",
        "event_time": _ms(T0),
        "source": "gateway",
        "source_id": "gw-1",
        "reporting_carrier": "CMCC",
        "home_carrier": "CMCC",
        "serving_carrier": "CMCC",
        "transaction_id": None,
        "tenant_id": "t1",
        "subscriber_id": "sub_" + "0" * 32,
        "channel": "app",
        "model_id": "m1",
        "provider": "p",
        "input_tokens": 0,
        "output_tokens": 0,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "status": "ok",
        "routing_policy": None,
        "latency_ms": 10,
        "region": None,
        "attributes": {},
    }
    rec.update(over)
    return rec


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


SMALL = """\
version: "v1"
effective_from: 2026-01-01T00:00:00+08:00
class_weights: {input: 1, cached_input: 0.25, output: 4}
models:
  m1: {token_unit_factor: 1.5}
  m2: {token_unit_factor: 2, class_weights: {input: 3}}
  "*": {token_unit_factor: 1}
lines:
  - serving_carrier: CMCC
    model_id: m1
    prices: {input: 2.5, cached_input: 0.5, output: 10, reasoning: 12}
  - {serving_carrier: CMCC, model_id: "*", prices: {input: 1, output: 2}}
  - {serving_carrier: "*", model_id: m1, prices: {input: 3, output: 6}}
  - {serving_carrier: "*", model_id: "*", prices: {input: 4, output: 8}}
  - {serving_carrier: CUCC, model_id: cheap, prices: {input: 0.5, output: 0.5}}
plans:
  enterprise:
    tiers:
      - {from_tu: 100000000, discount_percent: 10}
  ladder:
    tiers:
      - {from_tu: 1000, discount_percent: 10}
      - {from_tu: 2000, discount_percent: 50}
  flat: {tiers: []}
"""


CATCH_ALL = '  - {serving_carrier: "*", model_id: "*", prices: {input: 4, output: 8}}\n'


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> PriceBook:
    return load_cards(_write(tmp_path_factory.mktemp("cards"), "small.yaml", SMALL))


def _rating(result: Rating | Unpriced) -> Rating:
    assert isinstance(result, Rating), result
    return result


# ---- the shipped cards -----------------------------------------------------------


def test_shipped_cards_price_every_model_on_every_carrier() -> None:
    book = load_cards(CARDS)
    assert book.versions == ["2026.01", "2026.11"]
    for card in book.cards:
        for carrier in ("CMCC", "CTCC", "CUCC"):
            for model in MODELS:
                rec = _rec(
                    event_time=card.effective_from_ms,
                    serving_carrier=carrier,
                    model_id=model,
                    input_tokens=1000,
                    output_tokens=1000,
                )
                rating = _rating(book.rate(rec, None, Decimal(0)))
                assert rating.price_card_version == card.version
                assert rating.amount > 0
                assert rating.currency == "CNY"


def test_version_in_force_at_the_boundary() -> None:
    book = load_cards(CARDS)
    switch = datetime(2026, 11, 1, tzinfo=UTC) - timedelta(hours=8)  # 00:00 Beijing
    ms = _ms(switch)
    assert book.card_at(ms - 1).version == "2026.01"  # type: ignore[union-attr]
    assert book.card_at(ms).version == "2026.11"  # type: ignore[union-attr]
    rec = _rec(serving_carrier="CUCC", model_id="deepseek-v3", output_tokens=1_000_000)
    # the same key rated in both versions: the lookup cache must not mix them
    before = _rating(book.rate({**rec, "event_time": ms - 1}))
    after = _rating(book.rate({**rec, "event_time": ms}))
    assert (before.price_card_version, before.amount) == ("2026.01", Decimal("8.000000"))
    assert (after.price_card_version, after.amount) == ("2026.11", Decimal("3.000000"))
    assert _rating(book.rate({**rec, "event_time": ms - 1})).amount == Decimal("8")


def test_event_before_the_first_card_is_unpriced() -> None:
    book = load_cards(CARDS)
    first = book.cards[0].effective_from_ms
    assert book.card_at(first - 1) is None
    result = book.rate(_rec(event_time=first - 1, model_id="qwen-max", input_tokens=5))
    assert isinstance(result, Unpriced)
    assert result.reason == "no_price_card"


def test_carrier_specific_line_beats_list_price_in_shipped_card() -> None:
    book = load_cards(CARDS)
    rec = _rec(model_id="jiutian-13b", input_tokens=1_000_000)
    cmcc = _rating(book.rate(rec))
    ctcc = _rating(book.rate({**rec, "serving_carrier": "CTCC"}))
    assert (cmcc.price_line, cmcc.amount) == ("CMCC/jiutian-13b", Decimal("0.4"))
    assert (ctcc.price_line, ctcc.amount) == ("*/jiutian-13b", Decimal("0.6"))


# ---- matching ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("carrier", "model", "line", "input_price"),
    [
        ("CMCC", "m1", "CMCC/m1", "2.5"),  # exact
        ("CMCC", "zz", "CMCC/*", "1"),  # carrier default beats model default
        ("CTCC", "m1", "*/m1", "3"),  # model on any carrier
        ("CTCC", "zz", "*/*", "4"),  # card default
    ],
)
def test_wildcard_precedence(
    small: PriceBook, carrier: str, model: str, line: str, input_price: str
) -> None:
    rating = _rating(small.rate(_rec(serving_carrier=carrier, model_id=model, input_tokens=10**6)))
    assert rating.price_line == line
    assert rating.amount == Decimal(input_price)


def test_no_matching_line_is_unpriced_not_zero(tmp_path: Path) -> None:
    text = SMALL.replace(CATCH_ALL, "")
    book = load_cards(_write(tmp_path, "nodefault.yaml", text))
    result = book.rate(_rec(serving_carrier="CTCC", model_id="mystery", input_tokens=7))
    assert isinstance(result, Unpriced)
    assert result.reason == "no_price_line"
    assert "mystery" in result.detail and "CTCC" in result.detail
    assert result.price_card_version == "v1"
    rejection = result.to_rejection()
    assert (rejection.reason, rejection.stage) == (Reason.UNPRICED, Stage.RATE)
    # a model with a line is still priced
    assert isinstance(book.rate(_rec(serving_carrier="CUCC", model_id="cheap")), Rating)


def test_shipped_card_has_no_catch_all_line() -> None:
    result = load_cards(CARDS).rate(_rec(model_id="gpt-x", input_tokens=1))
    assert isinstance(result, Unpriced)


# ---- arithmetic ------------------------------------------------------------------


def test_per_class_prices(small: PriceBook) -> None:
    rec = _rec(input_tokens=1234, output_tokens=567, cached_tokens=89, reasoning_tokens=4321)
    rating = _rating(small.rate(rec))
    # CMCC/m1, input_tokens includes the 89 cached ones:
    # (1234 - 89) * 2.5 + 567 * 10 + 89 * 0.5 + 4321 * 12 = 60429 CNY per million tokens
    assert rating.amount == Decimal("0.060429")
    assert rating.list_amount == rating.amount
    assert str(rating.amount) == "0.060429"
    rec = _rec(input_tokens=3, cached_tokens=0, output_tokens=0)  # 7.5e-6, a tie: to even 8
    assert _rating(small.rate(rec)).amount == Decimal("0.000008")
    rec = _rec(input_tokens=0, output_tokens=0, reasoning_tokens=0, cached_tokens=0)
    assert _rating(small.rate(rec)).amount == 0


def test_cached_tokens_above_input_are_unpriced(small: PriceBook) -> None:
    result = small.rate(_rec(input_tokens=10, cached_tokens=11))
    assert isinstance(result, Unpriced) and result.reason == "cached_exceeds_input"
    assert _rating(small.rate(_rec(input_tokens=11, cached_tokens=11))).amount == Decimal(
        "0.0000055"
    ).quantize(Decimal("0.000001"), ROUND_HALF_EVEN)


def test_unset_classes_follow_input_and_output_prices(small: PriceBook) -> None:
    rec = _rec(
        serving_carrier="CTCC",
        input_tokens=1100,
        output_tokens=10,
        cached_tokens=1000,
        reasoning_tokens=10000,
    )
    # */m1: input 3, output 6; cached -> 3, reasoning -> 6
    expected = (100 * 3 + 10 * 6 + 1000 * 3 + 10000 * 6) / Decimal(10**6)
    assert _rating(small.rate(rec)).amount == expected == Decimal("0.06336")


def test_token_units_use_model_factor_and_class_weights(small: PriceBook) -> None:
    rec = _rec(input_tokens=1234, output_tokens=567, cached_tokens=89, reasoning_tokens=4321)
    # m1: factor 1.5; weights input 1, output 4, cached 0.25, reasoning follows output (4)
    expected = Decimal("1.5") * ((1234 - 89) + 567 * 4 + 89 * Decimal("0.25") + 4321 * 4)
    rating = _rating(small.rate(rec))
    assert rating.token_units == expected == Decimal("31078.875")
    assert str(rating.token_units) == "31078.875000"


def test_token_units_model_weight_override_and_default_factor(small: PriceBook) -> None:
    # m2: factor 2, own input weight 3; cached follows the card's 0.25; output the card's 4
    rec = _rec(model_id="m2", input_tokens=10, cached_tokens=4, output_tokens=1)
    assert _rating(small.rate(rec)).token_units == 2 * (6 * 3 + 4 * Decimal("0.25") + 1 * 4)
    # an unlisted model uses the "*" factor 1
    rec = _rec(model_id="other", input_tokens=10, output_tokens=1, reasoning_tokens=1)
    assert _rating(small.rate(rec)).token_units == Decimal(10 + 4 + 4)


def test_token_units_are_carrier_independent(small: PriceBook) -> None:
    rec = _rec(input_tokens=1000, output_tokens=100)
    ratings = [_rating(small.rate({**rec, "serving_carrier": c})) for c in ("CMCC", "CTCC")]
    assert ratings[0].amount != ratings[1].amount
    assert ratings[0].token_units == ratings[1].token_units


@pytest.mark.parametrize(
    ("tokens", "amount"),
    [(1, "0.000000"), (3, "0.000002"), (5, "0.000002"), (7, "0.000004"), (6, "0.000003")],
)
def test_amount_rounds_half_even_to_micro_cny(tmp_path: Path, tokens: int, amount: str) -> None:
    card = """\
version: r
effective_from: 2026-01-01T00:00:00Z
models: {"*": {token_unit_factor: 0.000001}}
class_weights: {input: 0.5}
lines: [{serving_carrier: "*", model_id: "*", prices: {input: 0.5, output: 1}}]
"""
    book = load_cards(_write(tmp_path, "round.yaml", card))
    rating = _rating(book.rate(_rec(input_tokens=tokens)))
    # tokens * 0.5 / 1e6 CNY: 0.0000005, 0.0000015, 0.0000025 ... ties go to the even digit
    assert str(rating.amount) == amount
    # tokens * 0.0000005 TU: the same ties
    assert str(rating.token_units) == amount


# ---- tiers -----------------------------------------------------------------------


def test_graduated_tier_boundary_inside_one_event(small: PriceBook) -> None:
    rec = _rec(serving_carrier="CTCC", model_id="zz", input_tokens=3000)  # */*: 4 CNY/M, 1 TU
    rating = _rating(small.rate(rec, "enterprise", Decimal(99_999_000)))
    assert rating.token_units == 3000
    assert rating.list_amount == Decimal("0.012")
    # 1000 TU at list price, 2000 TU at 10 % off
    assert rating.amount == Decimal("0.012") * (1000 + 2000 * Decimal("0.9")) / 3000
    assert rating.amount == Decimal("0.0112")


def test_graduated_tiers_edges(small: PriceBook) -> None:
    rec = _rec(serving_carrier="CTCC", model_id="zz", input_tokens=1000)  # 0.004 CNY, 1000 TU
    below = _rating(small.rate(rec, "enterprise", 99_999_000))  # ends exactly at the boundary
    at = _rating(small.rate(rec, "enterprise", 100_000_000))  # starts at the boundary
    assert below.amount == Decimal("0.004")
    assert at.amount == Decimal("0.0036")
    assert _rating(small.rate(rec, "flat", 10**12)).amount == Decimal("0.004")
    assert _rating(small.rate(rec, None, 10**12)).amount == Decimal("0.004")


def test_graduated_tiers_across_two_boundaries(small: PriceBook) -> None:
    rec = _rec(serving_carrier="CTCC", model_id="zz", input_tokens=3000)
    rating = _rating(small.rate(rec, "ladder", Decimal("500")))
    # 500 TU at 0 %, 1000 at 10 %, 1500 at 50 %, of a 0.012 CNY list amount
    assert rating.amount == Decimal("0.012") * (500 + 900 + 750) / 3000 == Decimal("0.0086")
    parts = split_across_tiers(Decimal(500), Decimal(3000), small.cards[0].plans["ladder"].tiers)
    assert parts == [(500, 0), (1000, 10), (1500, 50)]


def test_split_across_tiers_pure() -> None:
    tiers = [Tier(from_tu=Decimal(100), discount_percent=Decimal("12.5"))]
    assert split_across_tiers(Decimal(0), Decimal(50), tiers) == [(Decimal(50), Decimal(0))]
    assert split_across_tiers(Decimal(90), Decimal("20.5"), tiers) == [
        (Decimal(10), Decimal(0)),
        (Decimal("10.5"), Decimal("12.5")),
    ]
    assert split_across_tiers(Decimal(200), Decimal(1), tiers) == [(Decimal(1), Decimal("12.5"))]
    with pytest.raises(ValueError, match=">= 0"):
        split_across_tiers(Decimal(-1), Decimal(1), tiers)


def test_unknown_plan_is_unpriced(small: PriceBook) -> None:
    result = small.rate(_rec(input_tokens=1), "gold", 0)
    assert isinstance(result, Unpriced)
    assert result.reason == "unknown_plan" and "gold" in result.detail


# ---- billable policy -------------------------------------------------------------


def test_billable_policy_per_status() -> None:
    book = load_cards(CARDS)
    rec = _rec(model_id="deepseek-r1", input_tokens=100, reasoning_tokens=900, output_tokens=50)
    ok = _rating(book.rate(rec))
    assert ok.billable and ok.amount > 0 and ok.tier_usage_tu == ok.token_units
    failover = _rating(book.rate({**rec, "status": "failover"}))
    assert failover.billable and failover.amount == ok.amount
    assert failover.price_line == "*/deepseek-r1"  # billed to the model that answered
    for status in ("error", "timeout", "rate_limited"):
        failed = _rating(book.rate({**rec, "status": status}, "enterprise", 0))
        assert not failed.billable
        assert failed.amount == failed.list_amount == 0
        assert failed.token_units == ok.token_units  # consumption is still measured
        assert failed.tier_usage_tu == 0


def test_billable_policy_is_configurable(tmp_path: Path) -> None:
    book = load_cards(_write(tmp_path, "b.yaml", SMALL + "billable: {timeout: true}\n"))
    assert _rating(book.rate(_rec(input_tokens=10, status="timeout"))).billable
    assert not _rating(book.rate(_rec(input_tokens=10, status="error"))).billable


# ---- exactness against an unbounded-precision Decimal reference ------------------


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.tuples(*[st.integers(0, 10_000_000)] * 4).filter(lambda t: t[2] <= t[0]),
    usage=st.integers(0, 4_000_000_000).map(lambda micro: Decimal(micro).scaleb(-6)),
    carrier=st.sampled_from(["CMCC", "CTCC", "CUCC"]),
    model=st.sampled_from(["m1", "m2", "zz"]),
)
def test_matches_decimal_reference(
    small: PriceBook, tokens: tuple[int, int, int, int], usage: Decimal, carrier: str, model: str
) -> None:
    card = small.cards[0]
    line = card.line_for(carrier, model)
    tu = card.tu_per_token(model)
    assert line is not None and tu is not None
    classes = ("input", "output", "cached_input", "reasoning")
    by_class = (tokens[0] - tokens[2], tokens[1], tokens[2], tokens[3])
    q = Decimal("0.000001")
    with localcontext() as ctx:
        ctx.prec = 200
        list_exact = sum(
            (n * line.prices.price(c) / 10**6 for n, c in zip(by_class, classes, strict=True)),
            Decimal(0),
        )
        units = sum((n * tu[c] for n, c in zip(by_class, classes, strict=True)), Decimal(0))
        units_q = units.quantize(q, ROUND_HALF_EVEN)
        tiers = card.plans["ladder"].tiers
        if units_q:
            parts = split_across_tiers(usage, units_q, tiers)
            kept = sum((part * (100 - pct) / 100 for part, pct in parts), Decimal(0))
            amount = list_exact * kept / units_q
        else:
            amount = list_exact
        expected = amount.quantize(q, ROUND_HALF_EVEN)
    rec = _rec(
        serving_carrier=carrier,
        model_id=model,
        input_tokens=tokens[0],
        output_tokens=tokens[1],
        cached_tokens=tokens[2],
        reasoning_tokens=tokens[3],
    )
    rating = _rating(small.rate(rec, "ladder", usage))
    assert rating.token_units == units_q
    assert rating.list_amount == list_exact.quantize(q, ROUND_HALF_EVEN)
    assert rating.amount == expected


# ---- loading and errors ----------------------------------------------------------


def _errors(tmp_path: Path, text: str, name: str = "bad.yaml") -> list[str]:
    with pytest.raises(PriceCardError) as info:
        load_cards(_write(tmp_path, name, text))
    return info.value.errors


def test_numbers_are_exact_decimals(tmp_path: Path) -> None:
    card = load_card_file(_write(tmp_path, "ok.yaml", SMALL.replace("input: 2.5", "input: 2.4")))
    price = card.lines[0].prices.input
    assert isinstance(price, Decimal) and price == Decimal("2.4")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("output: 2}}", "output: -2}}", "bad.yaml: lines[1].prices.output: must be >= 0"),
        (
            "2026-01-01T00:00:00+08:00",
            "2026-01-01T00:00:00",
            "bad.yaml: effective_from: must be a date-time with a UTC offset",
        ),
        (
            "2026-01-01T00:00:00+08:00",
            "2026-01-01",
            "bad.yaml: effective_from: must be a date-time",
        ),
        (
            "serving_carrier: CUCC",
            "serving_carrier: CMCX",
            "bad.yaml: lines[4].serving_carrier: must be one of 'CMCC', 'CTCC', 'CUCC' or '*'",
        ),
        (
            "{input: 1, output: 2}",
            "{input: 1, outptu: 2}",
            "bad.yaml: lines[1].prices.outptu: unknown setting",
        ),
        (
            "{input: 1, output: 2}",
            "{input: 1}",
            "bad.yaml: lines[1].prices.output: required setting is missing",
        ),
        (
            "m2: {token_unit_factor: 2,",
            "m2: {token_unit_factor: 0,",
            "bad.yaml: models.m2.token_unit_factor: must be > 0",
        ),
        (
            '"*": {token_unit_factor: 1}',
            '"*": {token_unit_factor: yes}',
            'bad.yaml: models["*"].token_unit_factor: must be a number',
        ),
        (
            "input: 2.5,",
            "input: 2.1234567,",
            "bad.yaml: lines[0].prices.input: at most 6 decimal places",
        ),
        (
            "discount_percent: 50",
            "discount_percent: 150",
            "bad.yaml: plans.ladder.tiers[1].discount_percent: must be <= 100",
        ),
        (
            "{from_tu: 2000,",
            "{from_tu: 1000,",
            "bad.yaml: plans.ladder.tiers[1].from_tu: must be greater than the previous tier's",
        ),
        ('version: "v1"', 'version: "v 1"', "bad.yaml: version: must be 1-64 letters"),
        ('version: "v1"\n', "", "bad.yaml: version: required setting is missing"),
        (
            "  flat: {tiers: []}\n",
            "  flat: {tiers: []}\nbillable: {ok: maybe}\n",
            "bad.yaml: billable.ok: must be true or false",
        ),
        ("  flat: {tiers: []}\n", "  flat: {tiers: []}\nlines: []\n", "duplicate key 'lines'"),
        (
            "model_id: cheap,",
            "model_id: m1, prices: {input: 1, output: 1}}\n"
            "  - {serving_carrier: CMCC, model_id: m1,",
            "bad.yaml: lines[5]: duplicate line for serving_carrier CMCC, model_id m1 "
            "(first at lines[0])",
        ),
        ("lines:\n", "lines: [\n", "bad.yaml: line "),
    ],
)
def test_bad_setting_is_named(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in SMALL
    errors = _errors(tmp_path, SMALL.replace(old, new, 1))
    assert any(message in e for e in errors), errors
    assert all(e.startswith("bad.yaml: ") for e in errors)


def test_every_line_needs_a_token_unit_factor(tmp_path: Path) -> None:
    text = (
        SMALL.replace('  "*": {token_unit_factor: 1}\n', "")
        .replace(CATCH_ALL, "")
        .replace("model_id: cheap,", "model_id: new,")
    )
    assert _errors(tmp_path, text) == [
        "bad.yaml: lines[1].model_id: no token_unit_factor for '*'; add a models[\"*\"] default",
        "bad.yaml: lines[3].model_id: no token_unit_factor for 'new'; "
        'add models.new or a models["*"] default',
    ]


def test_all_errors_reported_together(tmp_path: Path) -> None:
    text = SMALL.replace("output: 2}}", "output: -2}}").replace("input: 4,", "input: -4,")
    errors = _errors(tmp_path, text)
    assert errors == [
        "bad.yaml: lines[1].prices.output: must be >= 0",
        "bad.yaml: lines[3].prices.input: must be >= 0",
    ]


def test_not_a_mapping_and_missing_paths(tmp_path: Path) -> None:
    not_a_mapping = ["bad.yaml: (top level): must be a mapping of settings"]
    assert _errors(tmp_path, "- 1\n- 2\n") == not_a_mapping
    assert _errors(tmp_path, "") == not_a_mapping
    with pytest.raises(PriceCardError, match="no such file"):
        load_cards(tmp_path / "absent.yaml")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PriceCardError, match="no price card files"):
        load_cards(empty)


def test_versions_must_be_unique_in_name_and_instant(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", SMALL)
    _write(tmp_path, "b.yaml", SMALL.replace("2026-01-01T", "2026-02-01T"))
    with pytest.raises(PriceCardError, match=r"b\.yaml: version: 'v1' is already used by a\.yaml"):
        load_cards(tmp_path)
    _write(
        tmp_path,
        "b.yaml",
        SMALL.replace('"v1"', '"v2"')
        .replace("+08:00", "+09:00")
        .replace("2026-01-01T00:00:00", "2026-01-01T01:00:00"),
    )
    with pytest.raises(PriceCardError, match="effective_from: same instant as"):
        load_cards(tmp_path)


def test_load_from_list_of_files_sorts_by_effective_from(tmp_path: Path) -> None:
    earlier = SMALL.replace('"v1"', '"v0"').replace("2026-01-01", "2025-06-01")
    later = _write(tmp_path, "z.yaml", earlier)
    book = load_cards([_write(tmp_path, "a.yaml", SMALL), later])
    assert book.versions == ["v0", "v1"]
    assert book.sources["v0"] == later


# ---- warehouse rows --------------------------------------------------------------


def test_price_lines_rows() -> None:
    book = load_cards(CARDS)
    rows = price_lines_rows(book)
    assert len(rows) == sum(len(card.lines) for card in book.cards) * 4
    row = next(
        r
        for r in rows
        if (r["price_card_version"], r["serving_carrier"], r["model_id"], r["token_class"])
        == ("2026.01", "*", "deepseek-r1", "reasoning")
    )
    assert row == {
        "price_card_version": "2026.01",
        "effective_from": datetime(2025, 12, 31, 16, tzinfo=UTC),  # 2026-01-01 Beijing
        "serving_carrier": "*",
        "model_id": "deepseek-r1",
        "token_class": "reasoning",
        "unit_price_per_million": Decimal("16"),  # follows output
        "token_unit_factor": Decimal("8"),  # factor 2 x reasoning weight 4
    }
    assert row["effective_from"].utcoffset() == timedelta(hours=8)


# ---- CLI -------------------------------------------------------------------------


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(prices_app, name="prices")
    return app


def test_cli_check_good_file() -> None:
    result = CliRunner().invoke(_cli(), ["prices", "check", str(CARDS / "default.yaml")])
    assert result.exit_code == 0, result.output
    expected = "OK: 14 lines, versions 2026.01 (from 2026-01-01T00:00:00+08:00)"
    assert result.output.startswith(expected)


def test_cli_check_bad_file(tmp_path: Path) -> None:
    text = (CARDS / "default.yaml").read_text().replace("output: 16.00}}", "output: -16.00}}", 1)
    bad = _write(tmp_path, "default.yaml", text)
    result = CliRunner().invoke(_cli(), ["prices", "check", str(bad)])
    assert result.exit_code == 1
    assert "default.yaml: lines[1].prices.output: must be >= 0" in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_cli_check_syntax_error_has_no_traceback(tmp_path: Path) -> None:
    bad = _write(tmp_path, "broken.yaml", "version: [\n")
    result = CliRunner().invoke(_cli(), ["prices", "check", str(bad)])
    assert result.exit_code == 1
    assert result.output.startswith("broken.yaml: line ")
    assert "Traceback" not in result.output


def test_cli_show_default_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(_cli(), ["prices", "show"])
    assert result.exit_code == 0, result.output
    for text in (
        "Price card 2026.01",
        "Price card 2026.11",
        "hunyuan-turbo",
        "Reasoning",
        "plan enterprise",
        "3.00 ↓",
    ):
        assert text in result.output
