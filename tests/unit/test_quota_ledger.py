"""The quota ledger (pipeline/metering/quota.py): pure logic, no processes.

The central property: a hard quota never grants past its limit, whatever the
interleaving of reserve, commit, release, expiry and stored usage events."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.metering.quota import (
    BadAmountError,
    NoQuotaError,
    QuotaDefinition,
    QuotaKey,
    QuotaLedger,
    ReservationNotFoundError,
    ReservationSettledError,
    Usage,
    crossing_id,
    parse_thresholds,
    period_start_ms,
    to_tu,
)

D = Decimal
# 2026-11-28 10:00 Beijing time (02:00 UTC)
NOW = int(datetime(2026, 11, 28, 2, 0, tzinfo=UTC).timestamp() * 1000)
KEY = QuotaKey("tn-1")


def ledger(limit: int = 1000, hard: bool = True, period: str = "day", **kw: object) -> QuotaLedger:
    d = QuotaDefinition(tenant_id="tn-1", period=period, limit_tu=D(limit), hard=hard, **kw)  # type: ignore[arg-type]
    return QuotaLedger(KEY, d)


def test_hard_grants_all_part_or_none() -> None:
    q = ledger(1000)
    assert q.reserve("a", D(600), 30_000, NOW).granted == 600
    part = q.reserve("b", D(600), 30_000, NOW)
    assert part.granted == 400 and part.reservation_id == "b"
    none = q.reserve("c", D(1), 30_000, NOW)
    assert none.granted == 0 and none.reservation_id is None
    st_ = q.status(NOW)
    assert (st_.reserved, st_.remaining, st_.state) == (1000, 0, "exhausted")


def test_soft_grants_everything_and_flags() -> None:
    q = ledger(1000, hard=False)
    first = q.reserve("a", D(900), 30_000, NOW)
    assert (first.granted, first.over_limit) == (900, False)
    second = q.reserve("b", D(200), 30_000, NOW)
    assert (second.granted, second.over_limit) == (200, True)
    assert q.status(NOW).remaining == 0


def test_commit_holds_until_the_usage_event_lands() -> None:
    q = ledger(1000)
    q.reserve("a", D(500), 30_000, NOW)
    s = q.commit("a", D(300), NOW + 10, event_id="ev-1")
    assert (s.committed, s.released, s.over_grant) == (300, 200, False)
    assert (q.reserved, q.pending) == (0, 300)
    assert q.available(NOW + 10) == 700
    q.add_usage(NOW, D(300), event_id="ev-1", now_ms=NOW + 20)
    assert (q.pending, q.used(NOW).tu) == (0, 300)
    assert q.available(NOW + 20) == 700  # counted once, not twice


def test_usage_landing_before_its_commit_is_not_held_again() -> None:
    q = ledger(1000)
    q.reserve("a", D(500), 30_000, NOW)
    q.add_usage(NOW, D(200), event_id="ev-1", now_ms=NOW)
    q.commit("a", D(200), NOW + 1, event_id="ev-1")
    assert q.pending == 0 and q.used(NOW).tu == 200
    assert q.available(NOW + 1) == 800


def test_commit_without_event_id_is_conservative_until_pending_ttl() -> None:
    q = ledger(1000)
    q.pending_ttl_ms = 5_000
    q.reserve("a", D(500), 30_000, NOW)
    q.commit("a", D(500), NOW)
    q.add_usage(NOW, D(500), now_ms=NOW)
    assert q.available(NOW) == 0  # held and used: looks fuller, never emptier
    assert q.available(NOW + 5_000) == 500


def test_release_ttl_expiry_and_idempotent_retries() -> None:
    q = ledger(1000)
    q.reserve("a", D(100), 1_000, NOW)
    q.reserve("b", D(100), 1_000, NOW)
    q.reserve("c", D(100), 60_000, NOW)
    assert q.release("a", NOW).released == 100
    assert q.release("a", NOW).outcome == "released"  # retry: same answer
    expired = q.expire(NOW + 1_000)
    assert [e.reservation_id for e in expired] == ["b"]
    with pytest.raises(ReservationSettledError, match="expired"):
        q.commit("b", D(1), NOW + 1_001)
    with pytest.raises(ReservationNotFoundError):
        q.commit("nope", D(1), NOW)
    first = q.commit("c", D(50), NOW + 2_000, event_id="e")
    assert q.commit("c", D(50), NOW + 2_001, event_id="e") == first  # retry: same answer
    with pytest.raises(ReservationSettledError, match="committed"):
        q.commit("c", D(60), NOW + 2_002)
    with pytest.raises(ReservationSettledError):
        q.release("c", NOW + 2_003)
    assert q.reserved == 0 and q.pending == 50


def test_commit_above_the_grant_is_accepted_and_flagged() -> None:
    q = ledger(1000)
    q.reserve("a", D(100), 30_000, NOW)
    s = q.commit("a", D(150), NOW, event_id="e")
    assert s.over_grant and s.released == 0 and q.pending == 150


def test_no_definition_refuses() -> None:
    q = QuotaLedger(KEY)
    with pytest.raises(NoQuotaError):
        q.reserve("a", D(1), 1000, NOW)
    q.add_usage(NOW, D(5))  # usage is still counted, for a later definition
    q.definition = QuotaDefinition(tenant_id="tn-1", period="month", limit_tu=D(10))
    assert q.used(NOW).tu == 5


def test_thresholds_once_per_period_and_roll_over() -> None:
    q = ledger(1000, hard=False)
    q.add_usage(NOW, D(499))
    assert q.crossings(NOW) == []
    q.add_usage(NOW, D(1), event_id="ev-x")
    [c] = q.crossings(NOW, trigger_event_id="ev-x")
    assert (c.threshold, c.kind, c.period, c.trigger_event_id) == (
        50,
        "threshold",
        "2026-11-28",
        "ev-x",
    )
    assert q.crossings(NOW) == []
    q.add_usage(NOW, D(600))  # 1100: crosses 80 and 100 at once
    crossed = q.crossings(NOW)
    assert [(x.threshold, x.kind) for x in crossed] == [(80, "threshold"), (100, "exhausted")]
    assert q.status(NOW).state == "exhausted"
    # next Beijing day: a new period, nothing used, thresholds armed again
    tomorrow = period_start_ms(NOW, "day") + 86_400_000
    assert q.used(tomorrow).tu == 0 and q.status(tomorrow).state == "ok"
    assert q.crossings(tomorrow) == []
    q.add_usage(tomorrow, D(500))
    assert [x.period for x in q.crossings(tomorrow)] == ["2026-11-29"]
    assert c.event_id == crossing_id(KEY, "2026-11-28", D(50))
    assert c.event_id != crossing_id(KEY, "2026-11-29", D(50))


def test_emitted_thresholds_restore() -> None:
    q = ledger(1000)
    q.set_usage({"2026-11-28": Usage(D(900))})
    q.mark_emitted("2026-11-28", D(50))
    assert [c.threshold for c in q.crossings(NOW)] == [80]


def test_month_period_and_beijing_midnight() -> None:
    q = ledger(100, period="month")
    # 2026-11-30 16:30 UTC is 2026-12-01 00:30 in Beijing: December's usage
    dec = int(datetime(2026, 11, 30, 16, 30, tzinfo=UTC).timestamp() * 1000)
    q.add_usage(dec, D(70))
    assert q.used(NOW).tu == 0
    assert q.used(dec).tu == 70
    assert period_start_ms(dec, "month") == int(
        datetime(2026, 11, 30, 16, 0, tzinfo=UTC).timestamp() * 1000
    )


def test_limit_cny_counts_for_thresholds_and_hard_grants() -> None:
    q = ledger(1_000_000, limit_cny=D(10))
    q.add_usage(NOW, D(10), cny=D(8))
    assert [c.threshold for c in q.crossings(NOW)] == [50, 80]
    q.add_usage(NOW, D(10), cny=D(2))
    assert q.reserve("a", D(5), 1000, NOW).granted == 0
    assert q.status(NOW).state == "exhausted"


def test_prune_forgets_old_periods() -> None:
    q = ledger(100)
    old = NOW - 70 * 86_400_000  # September: before the previous month
    q.add_usage(old, D(1))
    q.add_usage(NOW, D(1))
    q.prune(NOW)
    assert sorted(q.usage) == ["2026-11", "2026-11-28"]


def test_amounts_and_definitions_are_validated() -> None:
    assert to_tu(5) == D("5.000000")
    assert to_tu("2.5") == D("2.5")
    for bad in (-1, "x", True, float("nan"), "1.0000001", None, "1e19"):
        with pytest.raises(BadAmountError):
            to_tu(bad)
    assert parse_thresholds("80, 50,100%") == (50, 80, 100)
    with pytest.raises(ValueError):
        parse_thresholds("0,50")
    with pytest.raises(ValidationError):
        QuotaDefinition(tenant_id="t", period="week", limit_tu=D(1))  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="pseudonym"):
        QuotaDefinition(tenant_id="t", subscriber_id="13800138000", period="day", limit_tu=D(1))
    d = QuotaDefinition(tenant_id="t", subscriber_id="sub_" + "a" * 32, period="day", limit_tu=D(1))
    assert d.topic_key == "t/sub_" + "a" * 32


# ---- randomized interleavings --------------------------------------------------

_op = st.one_of(
    st.tuples(st.just("reserve"), st.integers(0, 400), st.integers(1, 5_000)),
    st.tuples(st.just("commit"), st.integers(0, 30), st.floats(0, 1)),
    st.tuples(st.just("release"), st.integers(0, 30), st.just(0.0)),
    st.tuples(st.just("land"), st.integers(0, 30), st.just(0.0)),
    st.tuples(st.just("tick"), st.integers(0, 3_000), st.just(0.0)),
)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(_op, max_size=120), limit=st.integers(1, 2_000))
def test_hard_quota_never_grants_past_the_limit(
    ops: list[tuple[str, int, float]], limit: int
) -> None:
    """Every use goes through a reservation and commits at most its grant; a usage
    event lands while its commit is held, or never (the gateway died). At every step
    used + held <= limit: granted + used never exceeds the limit."""
    q = ledger(limit)
    q.pending_ttl_ms = 2_000
    now = NOW
    ids: list[str] = []
    committed: dict[str, tuple[Decimal, str]] = {}  # res id -> (amount, event id)
    for n, (op, a, b) in enumerate(ops):
        if op == "reserve":
            before = q.used(NOW).tu + q.held
            grant = q.reserve(f"r{n}", D(a), b, now)
            assert grant.granted <= a
            assert grant.granted == 0 or before + grant.granted <= limit
            if grant.reservation_id:
                ids.append(grant.reservation_id)
        elif op == "commit" and ids:
            rid = ids[a % len(ids)]
            hold = q.holds.get(rid)
            if hold is not None and not hold.pending:
                amount = (hold.granted * D(str(round(b, 3)))).quantize(D("1"))
                q.commit(rid, amount, now, event_id=f"ev-{rid}")
                committed[rid] = (amount, f"ev-{rid}")
        elif op == "release" and ids:
            rid = ids[a % len(ids)]
            hold = q.holds.get(rid)
            if hold is not None and not hold.pending:
                q.release(rid, now)
        elif op == "land" and committed:
            rid = sorted(committed)[a % len(committed)]
            amount, event_id = committed.pop(rid)
            if rid in q.holds:  # else its hold timed out: this event never comes
                q.add_usage(NOW, amount, event_id=event_id, now_ms=now)
        elif op == "tick":
            now += a
            q.expire(now)
        assert q.used(NOW).tu + q.held <= limit
        assert q.reserved >= 0 and q.pending >= 0
        assert q.reserved == sum(h.amount for h in q.holds.values() if not h.pending)
        assert q.pending == sum(h.amount for h in q.holds.values() if h.pending)


@settings(max_examples=100, deadline=None)
@given(amounts=st.lists(st.integers(0, 300), max_size=60), limit=st.integers(1, 3_000))
def test_each_threshold_fires_once_whatever_the_steps(amounts: list[int], limit: int) -> None:
    q = ledger(limit, hard=False, thresholds=(D(50), D(80), D(100), D(120)))
    fired: list[Decimal] = []
    for amount in amounts:
        q.add_usage(NOW, D(amount))
        fired.extend(c.threshold for c in q.crossings(NOW))
    used = sum(amounts)
    expected = [t for t in (50, 80, 100, 120) if used * 100 >= t * limit]
    assert fired == expected
