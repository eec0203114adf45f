"""Pure parts of reconciliation and settlement: periods, classification, rounding,
revenue splits and netting. No warehouse."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.reconcile import (
    CARRIERS,
    Period,
    ReconError,
    ReconParams,
    check_run_id,
    classify,
    parse_carriers,
)
from jobs.settle import (
    Position,
    bilateral_transfers,
    multilateral_transfers,
    net_positions,
    split_amount,
    wholesale_amount,
)

D = Decimal


# ---- periods ------------------------------------------------------------------------


def test_period_is_a_beijing_calendar_month() -> None:
    p = Period.parse("2026-11")
    assert p.start.astimezone(UTC) == datetime(2026, 10, 31, 16, 0, tzinfo=UTC)
    assert p.end.astimezone(UTC) == datetime(2026, 11, 30, 16, 0, tzinfo=UTC)
    assert p.end_ms - p.start_ms == 30 * 86_400_000
    assert p.next().label == "2026-12"
    assert p.previous().label == "2026-10"


def test_period_wraps_the_year() -> None:
    assert Period.parse("2026-12").next().label == "2027-01"
    assert Period.parse("2027-01").previous().label == "2026-12"
    assert Period.parse("2024-02").end_ms - Period.parse("2024-02").start_ms == 29 * 86_400_000


def test_period_containing_uses_beijing_time() -> None:
    # 2026-11-30T16:00:00Z is 2026-12-01 00:00 in Beijing
    edge = Period.parse("2026-12").start_ms
    assert Period.containing(edge).label == "2026-12"
    assert Period.containing(edge - 1).label == "2026-11"


@pytest.mark.parametrize("text", ["2026-13", "2026-1", "26-11", "2026/11", "", "2026-00"])
def test_bad_periods_are_refused(text: str) -> None:
    with pytest.raises(ReconError, match="YYYY-MM"):
        Period.parse(text)


def test_carriers_are_checked_and_sorted() -> None:
    assert parse_carriers(None) == CARRIERS
    assert parse_carriers("cucc, CMCC") == ("CMCC", "CUCC")
    with pytest.raises(ReconError, match="unknown"):
        parse_carriers("CMCC,CBN")
    with pytest.raises(ReconError, match="at least two"):
        parse_carriers("CMCC")


def test_run_ids_are_checked() -> None:
    assert check_run_id(" ABCDEF0123456789 ") == "abcdef0123456789"
    with pytest.raises(ReconError):
        check_run_id("abc")


def test_params_are_checked() -> None:
    period = Period.parse("2026-11")
    with pytest.raises(ReconError, match="token"):
        ReconParams(period, token_tolerance=-1)
    with pytest.raises(ReconError, match="amount"):
        ReconParams(period, amount_tolerance=D("1.5"))
    with pytest.raises(ReconError, match="9 decimal"):
        ReconParams(period, amount_tolerance=D("0.0000000001"))
    with pytest.raises(ReconError, match="boundary"):
        ReconParams(period, boundary_window_s=100_000)
    assert ReconParams(period, amount_tolerance=D("0.0015")).tolerance_ppb == 1_500_000


# ---- classification -------------------------------------------------------------------


PARAMS = ReconParams(Period.parse("2026-11"), token_tolerance=2, amount_tolerance=D("0.01"))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((1, 1, False, 0, D("1.00"), D("1.00")), "matched"),
        ((1, 1, False, 2, D("1.00"), D("1.00")), "matched"),  # within the token tolerance
        ((1, 1, False, 3, D("1.00"), D("1.00")), "token_mismatch"),
        ((1, 1, False, 0, D("1.00"), D("0.99")), "matched"),  # exactly 1 %: not more
        ((1, 1, False, 0, D("1.00"), D("0.989")), "amount_mismatch"),
        ((1, 1, False, 0, D("0"), D("0")), "matched"),
        ((1, 0, False, 0, D("1"), D("0")), "missing_at_home"),
        ((0, 1, False, 0, D("0"), D("1")), "missing_at_serving"),
        ((2, 1, False, 0, D("2"), D("1")), "duplicate"),
        ((1, 2, False, 0, D("1"), D("2")), "duplicate"),
        ((2, 0, False, 0, D("2"), D("0")), "duplicate"),  # duplicate before missing
        ((1, 1, True, 99, D("9"), D("1")), "period_boundary"),  # boundary before all
        ((1, 1, False, 99, D("9"), D("1")), "token_mismatch"),  # tokens before amount
    ],
)
def test_classify_precedence(
    args: tuple[int, int, bool, int, Decimal, Decimal], expected: str
) -> None:
    assert classify(*args, PARAMS) == expected


# ---- rounding and splits ----------------------------------------------------------------


def test_wholesale_amount_rounds_half_even_to_the_cent() -> None:
    assert wholesale_amount(D("0.025000"), D("100")) == D("0.02")
    assert wholesale_amount(D("0.035000"), D("100")) == D("0.04")
    assert wholesale_amount(D("10.000000"), D("70")) == D("7.00")
    assert wholesale_amount(D("0.123456"), D("65.5")) == D("0.08")  # 0.08086368


def test_split_amount_adds_up_exactly() -> None:
    parts = split_amount(D("0.10"), [D("30"), D("60"), D("10")])
    assert parts == [D("0.03"), D("0.06"), D("0.01")]
    parts = split_amount(D("0.01"), [D("30"), D("60"), D("10")])
    assert parts == [D("0.00"), D("0.01"), D("0.00")]  # largest remainder: 0.006
    parts = split_amount(D("0.02"), [D("35"), D("62.5"), D("2.5")])
    assert sum(parts) == D("0.02")
    with pytest.raises(ValueError, match="100"):
        split_amount(D("1.00"), [D("50"), D("40")])
    with pytest.raises(ValueError, match="cents"):
        split_amount(D("1.005"), [D("50"), D("50")])


@settings(max_examples=300, deadline=None)
@given(
    cents=st.integers(min_value=0, max_value=10**12),
    a=st.integers(min_value=0, max_value=1_000_000),
    b=st.integers(min_value=0, max_value=1_000_000),
)
def test_split_amount_property(cents: int, a: int, b: int) -> None:
    total = 1_000_000
    a, b = min(a, b), max(a, b)
    percents = [D(a) / 10_000, D(b - a) / 10_000, D(total - b) / 10_000]
    amount = D(cents) / 100
    parts = split_amount(amount, percents)
    assert sum(parts) == amount
    for part, pct in zip(parts, percents, strict=True):
        assert abs(part - amount * pct / 100) < D("0.01")
        assert part >= 0


# ---- netting ---------------------------------------------------------------------------------


def test_positions_and_transfers_of_a_small_example() -> None:
    bills = {
        ("CMCC", "CTCC"): D("100.00"),
        ("CTCC", "CMCC"): D("40.00"),
        ("CTCC", "CUCC"): D("30.00"),
        ("CUCC", "CMCC"): D("50.00"),
    }
    pos = net_positions(bills)
    assert {c: p.net for c, p in pos.items()} == {
        "CMCC": D("10.00"),  # 100 - 40 - 50
        "CTCC": D("-30.00"),  # 40 + 30 - 100
        "CUCC": D("20.00"),  # 50 - 30
    }
    bilateral = bilateral_transfers(bills)
    assert [(t.payer, t.payee, t.amount) for t in bilateral] == [
        ("CTCC", "CMCC", D("60.00")),
        ("CMCC", "CUCC", D("50.00")),
        ("CUCC", "CTCC", D("30.00")),
    ]
    multi = multilateral_transfers(pos)
    assert [(t.payer, t.payee, t.amount) for t in multi] == [
        ("CTCC", "CUCC", D("20.00")),
        ("CTCC", "CMCC", D("10.00")),
    ]


def _apply(transfers: list, carriers: tuple[str, ...]) -> dict[str, Decimal]:
    got = dict.fromkeys(carriers, D("0.00"))
    for t in transfers:
        got[t.payee] += t.amount
        got[t.payer] -= t.amount
    return got


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([(s, h) for s in CARRIERS for h in CARRIERS if s != h]),
        st.integers(min_value=0, max_value=10**12).map(lambda c: D(c) / 100),
    )
)
def test_netting_reproduces_the_net_positions(bills: dict[tuple[str, str], Decimal]) -> None:
    pos = net_positions(bills)
    nets = {c: p.net for c, p in pos.items()}
    assert sum(nets.values()) == 0
    multi = multilateral_transfers(pos)
    assert len(multi) <= len(CARRIERS) - 1
    assert all(t.amount > 0 for t in multi)
    assert _apply(multi, CARRIERS) == nets
    # the least money any settlement can move: the sum of what creditors are owed
    assert sum(t.amount for t in multi) == sum(v for v in nets.values() if v > 0)
    bilateral = bilateral_transfers(bills)
    assert _apply(bilateral, CARRIERS) == nets
    assert len(bilateral) <= 3


def test_multilateral_refuses_unbalanced_positions() -> None:
    with pytest.raises(ValueError, match="zero"):
        multilateral_transfers({"CMCC": Position("CMCC", D("1.00"), D("0.00"))})
