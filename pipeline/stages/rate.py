"""Rate: price each accepted event with the card in force at its own event_time.

Keeps each tenant's billable Token Units per plan period (the input of graduated
tiers). The counts are loaded from ``usage_events`` when a partition is taken, and an
event is rated only once it is above the stored marks, so a replay reproduces exactly
the amounts of the first run (all of a tenant's events are in one partition, in order).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import pyarrow as pa

from pipeline.metering.plans import TenantPlans, period_key
from pipeline.metering.pricing import PriceBook, Rating, Unpriced
from pipeline.metering.rating_columns import RatedColumns, rate_columns
from pipeline.stages.ingest import Accepted

ZERO = Decimal("0.000000")


@dataclass(slots=True)
class Rated:
    """An accepted event with its rating."""

    accepted: Accepted
    rating: Rating
    plan: str | None
    period: str


class RateStage:
    """Prices batches of accepted events; owns the tier usage counters."""

    def __init__(self, book: PriceBook, plans: TenantPlans) -> None:
        self.book = book
        self.plans = plans
        self.usage: dict[tuple[str, str], Decimal] = {}
        self._periods: dict[tuple[int, str], str] = {}

    def add_usage(self, tenant_id: str, period: str, token_units: Decimal) -> None:
        """Count stored usage (used when loading from the warehouse)."""
        key = (tenant_id, period)
        self.usage[key] = self.usage.get(key, ZERO) + token_units

    def set_usage(self, tenant_id: str, period: str, token_units: Decimal) -> None:
        """Replace a counter with the stored usage. For a partition (re)taken after a
        rebalance: its tenants' stored sums are complete, and adding them to what this
        process counted before it lost the partition would count that usage twice."""
        self.usage[(tenant_id, period)] = token_units

    def _period(self, event_ms: int, plan: str | None) -> str:
        card = self.book.card_at(event_ms)
        found = card.plans.get(plan) if (card is not None and plan is not None) else None
        kind = found.period if found is not None else "month"
        # Beijing time is a whole-hour offset: one answer per UTC hour and period kind.
        key = (event_ms // 3_600_000, kind)
        period = self._periods.get(key)
        if period is None:
            if len(self._periods) > 100_000:
                self._periods.clear()
            period = self._periods[key] = period_key(event_ms, kind)
        return period

    def rate(self, accepted: list[Accepted]) -> tuple[list[Rated], list[tuple[Accepted, Unpriced]]]:
        """Rate a batch in log order. Returns the rated events and the unpriced ones."""
        rated: list[Rated] = []
        unpriced: list[tuple[Accepted, Unpriced]] = []
        plan_for = self.plans.plan_for
        usage = self.usage
        for acc in accepted:
            rec = acc.record
            plan = plan_for(rec["tenant_id"])
            period = self._period(rec["event_time"], plan)
            key = (rec["tenant_id"], period)
            result = self.book.rate(rec, plan, usage.get(key, ZERO))
            if isinstance(result, Unpriced):
                unpriced.append((acc, result))
                continue
            if result.billable:
                usage[key] = usage.get(key, ZERO) + result.tier_usage_tu
            rated.append(Rated(acc, result, plan, period))
        return rated, unpriced

    def rate_columns(self, table: pa.Table) -> RatedColumns:
        """Rate a batch given as Arrow columns (``event_time`` epoch ms, ``serving_carrier``,
        ``model_id``, ``status``, ``tenant_id``, the four token counts), rows in log order:
        the same numbers as ``rate`` on the same events, in int64 micro-units, and the
        same updates of ``usage``. See ``pipeline.metering.rating_columns``."""
        return rate_columns(self.book, self.plans, self.usage, table)
