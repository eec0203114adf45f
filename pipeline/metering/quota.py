"""Quota math: definitions, reservations and threshold crossings. Pure logic, no I/O.

Online charging systems enforce a quota by *reserve, then commit or release*: before a
model call the gateway reserves an estimate; afterwards it commits what the call really
used (the rest is released) or releases everything. This module holds the rules; the
service around it (``pipeline/quota/``) adds HTTP, Kafka and the warehouse.

The ledger of one quota (a tenant, or one subscriber of a tenant)
------------------------------------------------------------------
Three amounts, all in Token Units (TU), for the quota's current period:

* ``used``: billable TU of the rated, deduplicated usage events the pipeline stored
  (``Rating.tier_usage_tu``: a non-billable call does not use quota). This is the
  truth; it is restored from ``usage_events`` after a restart.
* ``reserved``: open reservations, each with an expiry (its TTL).
* ``pending``: committed reservations whose usage event has not been stored yet. A
  commit turns the reservation into a pending hold of the committed amount; the hold
  disappears when the usage event with the commit's ``event_id`` is stored (its rated
  TU then count in ``used``), or after ``pending_ttl`` if that event never comes.
  Without that step the committed amount would count twice (hold + used) or not at
  all (between the commit and the stored event).

``held = reserved + pending``. A hard quota grants ``min(n, limit - used - held)``
(never negative), so **granted + used never exceeds the limit** as long as every use
of the quota goes through a reservation and commits at most what was granted (a
commit above its grant is accepted and flagged ``over_grant``: the call has happened).
Usage sent without a reservation is counted when stored but cannot be refused. A soft
quota grants everything and flags grants that go past the limit (``over_limit``).

A commit without ``event_id`` cannot be matched to its event: its hold stays for the
full ``pending_ttl`` while the event also counts in ``used`` (conservative: the quota
looks fuller for a while, never emptier). The SDK (``pipeline/meter.py``) always sends
the event id.

Periods are calendar days or months in Beijing time (``plans.period_key``). Usage is
kept per event-time period, so an event is counted in the period it happened in and a
new period starts from what has been stored for it (normally nothing: roll-over resets
``used``). Holds are not tied to a period: one open across midnight still counts.

Thresholds (percent of the limit, default 50/80/100) are crossed by ``used``: each one
at most once per period (``crossings`` marks what it returns; ``mark_emitted`` restores
what was emitted before a restart). With ``limit_cny`` the CNY ratio counts too.
"""

from __future__ import annotations

import hashlib
import heapq
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from pipeline.metering.plans import BEIJING, period_key

Period = Literal["day", "month"]
State = Literal["ok", "warning", "exhausted"]

ZERO = Decimal("0")
_MICRO = Decimal("0.000001")
MAX_TU = Decimal("1e18")
DEFAULT_THRESHOLDS: tuple[Decimal, ...] = (Decimal(50), Decimal(80), Decimal(100))
DEFAULT_PENDING_TTL_MS = 300_000
SETTLED_MEMORY_MS = 60_000  # how long a settled id answers a retried commit/release
MAX_TTL_S = 3600

_PSEUDONYM = re.compile(r"^sub_[0-9a-f]{32}$")


class QuotaError(Exception):
    """Base of the ledger's refusals; ``str()`` is a message for the client."""


class NoQuotaError(QuotaError):
    """No quota is defined for this tenant (or subscriber)."""


class ReservationNotFoundError(QuotaError):
    """No such reservation (never existed, or expired and forgotten)."""


class ReservationSettledError(QuotaError):
    """The reservation was already committed, released or expired."""

    def __init__(self, message: str, settlement: Settlement) -> None:
        super().__init__(message)
        self.settlement = settlement


class BadAmountError(QuotaError, ValueError):
    """A TU amount is not a finite, non-negative number with at most 6 decimals."""


def to_tu(value: Any, name: str = "token_units") -> Decimal:
    """A TU amount from JSON (int, decimal string or float), exact to 6 decimals.

    Raises ``BadAmountError`` naming ``name`` for anything else (bool, NaN, negative,
    more than 6 decimals, above 1e18)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise BadAmountError(f"{name}: must be a number")
    try:
        amount = Decimal(str(value)) if not isinstance(value, Decimal) else value
    except InvalidOperation:
        raise BadAmountError(f"{name}: must be a number, got {value!r}") from None
    if not amount.is_finite():
        raise BadAmountError(f"{name}: must be finite")
    if amount < 0:
        raise BadAmountError(f"{name}: must be >= 0")
    if amount > MAX_TU:
        raise BadAmountError(f"{name}: must be <= 1e18")
    if amount != amount.quantize(_MICRO):
        raise BadAmountError(f"{name}: at most 6 decimal places")
    return amount.quantize(_MICRO)


def fmt(value: Decimal) -> str:
    """A TU/CNY amount as an exact string without trailing zeros (``"1500"``, ``"2.5"``)."""
    return format(value.normalize(), "f")


# ---- definitions -------------------------------------------------------------

_Percent = Annotated[Decimal, Field(gt=0, le=1000, decimal_places=2)]


class QuotaDefinition(BaseModel):
    """One quota: per tenant, or per subscriber of a tenant (pseudonymised id).

    ``thresholds`` are percentages of the limit, sorted and unique; ``hard`` refuses
    grants past the limit, soft grants and flags them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant_id: str = Field(min_length=1, max_length=256)
    subscriber_id: str | None = None
    period: Period
    limit_tu: Decimal = Field(gt=0, le=MAX_TU, decimal_places=6)
    limit_cny: Decimal | None = Field(default=None, gt=0, le=MAX_TU, decimal_places=6)
    thresholds: tuple[_Percent, ...] = DEFAULT_THRESHOLDS
    hard: bool = False
    updated_at: AwareDatetime | None = None

    @field_validator("subscriber_id")
    @classmethod
    def _pseudonym(cls, v: str | None) -> str | None:
        if v is not None and not _PSEUDONYM.match(v):
            raise ValueError("must be a pseudonym (sub_<32 hex>); raw ids are never stored")
        return v

    @field_validator("thresholds")
    @classmethod
    def _sorted(cls, v: tuple[Decimal, ...]) -> tuple[Decimal, ...]:
        if not v:
            raise ValueError("at least one threshold")
        return tuple(sorted(set(v)))

    @property
    def key(self) -> QuotaKey:
        return QuotaKey(self.tenant_id, self.subscriber_id or "")

    @property
    def topic_key(self) -> str:
        """The compacted topic's key: ``tenant`` or ``tenant/subscriber``."""
        return self.key.topic_key

    def period_at(self, ms: int) -> str:
        """This quota's period key at ``ms`` (Beijing time)."""
        return cached_period_key(ms, self.period)


@dataclass(frozen=True, slots=True, order=True)
class QuotaKey:
    """Whose quota: a tenant (``subscriber_id == ""``) or one of its subscribers."""

    tenant_id: str
    subscriber_id: str = ""

    @property
    def topic_key(self) -> str:
        if self.subscriber_id:
            return f"{self.tenant_id}/{self.subscriber_id}"
        return self.tenant_id

    def __str__(self) -> str:
        return self.topic_key


def parse_thresholds(text: str) -> tuple[Decimal, ...]:
    """``"50,80,100"`` -> thresholds; raises ``ValueError`` with a readable message."""
    out = []
    for raw in text.split(","):
        part = raw.strip().rstrip("%")
        if not part:
            continue
        try:
            value = Decimal(part)
        except InvalidOperation:
            raise ValueError(f"not a number: {part!r}") from None
        if not value.is_finite() or value <= 0 or value > 1000:
            raise ValueError(f"thresholds are percentages in (0, 1000], got {part}")
        out.append(value)
    if not out:
        raise ValueError("at least one threshold")
    return tuple(sorted(set(out)))


# ---- the ledger --------------------------------------------------------------


@dataclass(slots=True)
class Usage:
    """Billable TU and CNY counted for one period."""

    tu: Decimal = ZERO
    cny: Decimal = ZERO


@dataclass(slots=True)
class Hold:
    """An open reservation (``pending`` False) or a committed one awaiting its event."""

    id: str
    amount: Decimal
    expires_ms: int
    granted: Decimal
    pending: bool = False
    event_id: str | None = None


@dataclass(frozen=True, slots=True)
class Grant:
    """The answer to a reservation request."""

    reservation_id: str | None  # None when nothing was granted
    requested: Decimal
    granted: Decimal
    expires_ms: int
    over_limit: bool  # soft quota: this grant goes past the limit


@dataclass(frozen=True, slots=True)
class Settlement:
    """How a reservation ended: ``committed``, ``released`` or ``expired``."""

    reservation_id: str
    outcome: Literal["committed", "released", "expired"]
    granted: Decimal
    committed: Decimal  # 0 unless committed
    released: Decimal  # granted - committed, never negative
    over_grant: bool = False
    event_id: str | None = None
    at_ms: int = 0


@dataclass(frozen=True, slots=True)
class Crossing:
    """A threshold crossed by ``used`` in a period (emitted once per period)."""

    key: QuotaKey
    period_type: Period
    period: str
    threshold: Decimal
    used_tu: Decimal
    limit_tu: Decimal
    used_cny: Decimal
    limit_cny: Decimal | None
    hard: bool
    crossed_ms: int
    trigger_event_id: str | None = None

    @property
    def kind(self) -> str:
        """``exhausted`` for thresholds at or above 100 %, else ``threshold``."""
        return "exhausted" if self.threshold >= 100 else "threshold"

    @property
    def event_id(self) -> str:
        """Deterministic: the same crossing always has the same id."""
        return crossing_id(self.key, self.period, self.threshold)


def crossing_id(key: QuotaKey, period: str, threshold: Decimal) -> str:
    """``qe_`` + 24 hex of SHA-256 over (tenant, subscriber, period, threshold)."""
    text = "\x1f".join((key.tenant_id, key.subscriber_id, period, fmt(threshold)))
    return "qe_" + hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class QuotaStatus:
    """What ``GET /v1/quotas/{tenant}`` reports."""

    key: QuotaKey
    definition: QuotaDefinition
    period: str
    used: Usage
    reserved: Decimal  # open reservations
    pending: Decimal  # committed, usage event not stored yet
    remaining: Decimal
    state: State
    crossed: tuple[Decimal, ...]
    open_reservations: int


@dataclass(slots=True)
class QuotaLedger:
    """Usage, holds and emitted thresholds of one quota key. Not thread-safe: one
    owner (the worker's event loop) calls it; every call is atomic by construction."""

    key: QuotaKey
    definition: QuotaDefinition | None = None
    pending_ttl_ms: int = DEFAULT_PENDING_TTL_MS
    usage: dict[str, Usage] = field(default_factory=dict)
    holds: dict[str, Hold] = field(default_factory=dict)
    emitted: dict[str, set[Decimal]] = field(default_factory=dict)
    partition: int | None = None
    _reserved: Decimal = ZERO
    _pending: Decimal = ZERO
    _by_event: dict[str, str] = field(default_factory=dict)
    _landed: dict[str, int] = field(default_factory=dict)
    _settled: dict[str, Settlement] = field(default_factory=dict)
    _expiry: list[tuple[int, str]] = field(default_factory=list)

    # ---- amounts ----------------------------------------------------------
    @property
    def reserved(self) -> Decimal:
        return self._reserved

    @property
    def pending(self) -> Decimal:
        return self._pending

    @property
    def held(self) -> Decimal:
        return self._reserved + self._pending

    def period_at(self, now_ms: int) -> str:
        if self.definition is None:
            raise NoQuotaError(f"no quota defined for {self.key}")
        return self.definition.period_at(now_ms)

    def used(self, now_ms: int) -> Usage:
        """Usage of the current period (a copy)."""
        found = self.usage.get(self.period_at(now_ms))
        return Usage(found.tu, found.cny) if found is not None else Usage()

    def _definition(self) -> QuotaDefinition:
        if self.definition is None:
            raise NoQuotaError(f"no quota defined for {self.key}")
        return self.definition

    def available(self, now_ms: int) -> Decimal:
        """What a hard quota could grant now (never negative)."""
        d = self._definition()
        self.expire(now_ms)
        used = self.used(now_ms)
        if d.limit_cny is not None and used.cny >= d.limit_cny:
            return ZERO
        return max(ZERO, d.limit_tu - used.tu - self.held)

    # ---- reserve / commit / release ------------------------------------------
    def reserve(self, res_id: str, n: Decimal, ttl_ms: int, now_ms: int) -> Grant:
        """Grant up to ``n`` TU for ``ttl_ms``. Hard: ``min(n, available)``; soft: all of
        it, with ``over_limit`` when it goes past the limit. ``res_id`` must be new."""
        d = self._definition()
        if n < 0:
            raise BadAmountError("token_units: must be >= 0")
        self.expire(now_ms)
        if res_id in self.holds or res_id in self._settled:
            raise QuotaError(f"reservation id {res_id} already used")
        expires = now_ms + ttl_ms
        if d.hard:
            granted = min(n, self.available(now_ms))
            over = False
        else:
            granted = n
            used = self.used(now_ms)
            over = used.tu + self.held + n > d.limit_tu or (
                d.limit_cny is not None and used.cny >= d.limit_cny
            )
        if granted <= 0:
            return Grant(None, n, ZERO, expires, over)
        self.holds[res_id] = Hold(res_id, granted, expires, granted)
        self._reserved += granted
        heapq.heappush(self._expiry, (expires, res_id))
        return Grant(res_id, n, granted, expires, over)

    def _take_open(self, res_id: str, now_ms: int) -> Hold:
        self.expire(now_ms)
        hold = self.holds.get(res_id)
        if hold is not None and not hold.pending:
            return hold
        settled = self._settled.get(res_id) or self._committed_from_hold(res_id)
        if settled is not None:
            raise ReservationSettledError(
                f"reservation {res_id} is already {settled.outcome}", settled
            )
        raise ReservationNotFoundError(f"no open reservation {res_id} (unknown or expired)")

    def commit(
        self, res_id: str, used_tu: Decimal, now_ms: int, event_id: str | None = None
    ) -> Settlement:
        """Settle an open reservation with what the call used; the rest is released.

        The committed amount stays held (pending) until the usage event ``event_id`` is
        stored (``add_usage``) or ``pending_ttl_ms`` passes. Retrying the same commit
        returns the same settlement; a different one raises ``ReservationSettledError``.
        """
        if used_tu < 0:
            raise BadAmountError("token_units: must be >= 0")
        settled = self._settled.get(res_id) or self._committed_from_hold(res_id)
        if settled is not None:
            if settled.outcome == "committed" and settled.committed == used_tu:
                return settled
            raise ReservationSettledError(
                f"reservation {res_id} is already {settled.outcome}"
                + (f" ({fmt(settled.committed)} TU)" if settled.outcome == "committed" else ""),
                settled,
            )
        hold = self._take_open(res_id, now_ms)
        self._reserved -= hold.amount
        outcome = Settlement(
            res_id,
            "committed",
            hold.granted,
            used_tu,
            max(ZERO, hold.granted - used_tu),
            over_grant=used_tu > hold.granted,
            event_id=event_id,
            at_ms=now_ms,
        )
        self._remember(outcome, now_ms)
        landed = event_id is not None and event_id in self._landed
        if used_tu == 0 or landed:
            del self.holds[res_id]
            if landed and event_id is not None:
                del self._landed[event_id]
            return outcome
        hold.pending = True
        hold.amount = used_tu
        hold.event_id = event_id
        hold.expires_ms = now_ms + self.pending_ttl_ms
        self._pending += used_tu
        if event_id is not None:
            self._by_event[event_id] = res_id
        heapq.heappush(self._expiry, (hold.expires_ms, res_id))
        return outcome

    def _committed_from_hold(self, res_id: str) -> Settlement | None:
        """A pending hold restored from the journal stands for its commit."""
        hold = self.holds.get(res_id)
        if hold is None or not hold.pending:
            return None
        return Settlement(
            res_id,
            "committed",
            hold.granted,
            hold.amount,
            max(ZERO, hold.granted - hold.amount),
            over_grant=hold.amount > hold.granted,
            event_id=hold.event_id,
        )

    def release(self, res_id: str, now_ms: int) -> Settlement:
        """Give an open reservation back. Releasing twice returns the same answer."""
        settled = self._settled.get(res_id)
        if settled is not None and settled.outcome == "released":
            return settled
        hold = self._take_open(res_id, now_ms)
        del self.holds[res_id]
        self._reserved -= hold.amount
        outcome = Settlement(res_id, "released", hold.granted, ZERO, hold.granted, at_ms=now_ms)
        self._remember(outcome, now_ms)
        return outcome

    def _remember(self, outcome: Settlement, now_ms: int) -> None:
        self._settled[outcome.reservation_id] = outcome
        heapq.heappush(self._expiry, (now_ms + SETTLED_MEMORY_MS, "\x00" + outcome.reservation_id))

    def expire(self, now_ms: int) -> list[Settlement]:
        """Release open reservations past their TTL and drop pending holds past
        ``pending_ttl``. Returns the reservations that expired."""
        out: list[Settlement] = []
        heap = self._expiry
        while heap and heap[0][0] <= now_ms:
            when, res_id = heapq.heappop(heap)
            if res_id.startswith("\x00"):
                real = res_id[1:]
                s = self._settled.get(real)
                if s is not None and s.at_ms + SETTLED_MEMORY_MS <= when:
                    del self._settled[real]
                continue
            if res_id.startswith("\x01"):
                self._landed.pop(res_id[1:], None)
                continue
            hold = self.holds.get(res_id)
            if hold is None or hold.expires_ms != when:
                continue  # settled meanwhile, or re-armed by a commit
            del self.holds[res_id]
            if hold.pending:
                self._pending -= hold.amount
                if hold.event_id is not None:
                    self._by_event.pop(hold.event_id, None)
            else:
                self._reserved -= hold.amount
                outcome = Settlement(
                    res_id, "expired", hold.granted, ZERO, hold.granted, at_ms=now_ms
                )
                self._remember(outcome, now_ms)
                out.append(outcome)
        return out

    # ---- usage from the pipeline ---------------------------------------------
    def add_usage(
        self,
        event_ms: int,
        tu: Decimal,
        cny: Decimal = ZERO,
        event_id: str | None = None,
        now_ms: int | None = None,
    ) -> None:
        """Count one stored, rated event (billable TU and CNY) in its day and month, and
        settle the pending hold committed for it."""
        for key in (cached_period_key(event_ms, "day"), cached_period_key(event_ms, "month")):
            bucket = self.usage.get(key)
            if bucket is None:
                self.usage[key] = Usage(tu, cny)
            else:
                bucket.tu += tu
                bucket.cny += cny
        if event_id is None:
            return
        res_id = self._by_event.pop(event_id, None)
        if res_id is not None:
            hold = self.holds.pop(res_id, None)
            if hold is not None:
                self._pending -= hold.amount
        elif self._reserved > 0 and now_ms is not None:
            # A commit may still come for this event (sent before its commit): remember
            # it for a while so that commit does not hold the amount again.
            self._landed[event_id] = now_ms
            heapq.heappush(self._expiry, (now_ms + SETTLED_MEMORY_MS, "\x01" + event_id))

    def add_period_usage(
        self, day: str, tu: Decimal, cny: Decimal, event_ids: list[str] | None = None
    ) -> None:
        """Count a batch's usage already summed per Beijing day (``"2026-11-28"``), in
        that day and its month; ``event_ids`` settle pending holds like ``add_usage``."""
        for key in (day, day[:7]):
            bucket = self.usage.get(key)
            if bucket is None:
                self.usage[key] = Usage(tu, cny)
            else:
                bucket.tu += tu
                bucket.cny += cny
        if event_ids and self.holds:
            self.settle_landed(set(event_ids))

    def set_usage(self, usage: dict[str, Usage]) -> None:
        """Replace the counted usage (restore from the warehouse): absolute, not added."""
        self.usage = {k: Usage(v.tu, v.cny) for k, v in usage.items()}

    def settle_landed(self, event_ids: set[str]) -> None:
        """Drop pending holds whose events are already stored (after a restart)."""
        for event_id in event_ids:
            res_id = self._by_event.pop(event_id, None)
            hold = self.holds.pop(res_id, None) if res_id is not None else None
            if hold is not None:
                self._pending -= hold.amount

    @property
    def idle(self) -> bool:
        """No definition, no holds, no usage: nothing worth keeping in memory."""
        return self.definition is None and not self.holds and not self.usage

    def pending_event_ids(self) -> set[str]:
        return set(self._by_event)

    def restore_hold(self, hold: Hold, now_ms: int) -> None:
        """Re-open a hold from the journal (expired ones are ignored)."""
        if hold.expires_ms <= now_ms or hold.id in self.holds:
            return
        self.holds[hold.id] = hold
        if hold.pending:
            self._pending += hold.amount
            if hold.event_id is not None:
                self._by_event[hold.event_id] = hold.id
        else:
            self._reserved += hold.amount
        heapq.heappush(self._expiry, (hold.expires_ms, hold.id))

    def prune(self, now_ms: int) -> None:
        """Forget usage and emitted thresholds of periods before the previous one."""
        keep_day = period_key(now_ms - 86_400_000, "day")
        keep_month = _previous_month(period_key(now_ms, "month"))
        for store in (self.usage, self.emitted):
            for key in list(store):
                floor = keep_day if len(key) == 10 else keep_month
                if key < floor:
                    del store[key]

    # ---- thresholds -----------------------------------------------------------
    def _ratio_reached(self, used: Usage, threshold: Decimal) -> bool:
        d = self._definition()
        if used.tu * 100 >= threshold * d.limit_tu:
            return True
        return d.limit_cny is not None and used.cny * 100 >= threshold * d.limit_cny

    def crossings(self, now_ms: int, trigger_event_id: str | None = None) -> list[Crossing]:
        """Thresholds of the current period reached by ``used`` and not emitted yet;
        they are marked emitted (each threshold at most once per period)."""
        d = self.definition
        if d is None:
            return []
        period = d.period_at(now_ms)
        used = self.used(now_ms)
        done = self.emitted.setdefault(period, set())
        out = []
        for threshold in d.thresholds:
            if threshold in done or not self._ratio_reached(used, threshold):
                continue
            done.add(threshold)
            out.append(
                Crossing(
                    self.key,
                    d.period,
                    period,
                    threshold,
                    used.tu,
                    d.limit_tu,
                    used.cny,
                    d.limit_cny,
                    d.hard,
                    now_ms,
                    trigger_event_id,
                )
            )
        return out

    def mark_emitted(self, period: str, threshold: Decimal) -> None:
        self.emitted.setdefault(period, set()).add(threshold)

    def status(self, now_ms: int) -> QuotaStatus:
        """The current period's figures and state."""
        d = self._definition()
        self.expire(now_ms)
        period = d.period_at(now_ms)
        used = self.used(now_ms)
        remaining = (
            self.available(now_ms) if d.hard else max(ZERO, d.limit_tu - used.tu - self.held)
        )
        crossed = tuple(t for t in d.thresholds if self._ratio_reached(used, t))
        state: State
        cny_out = d.limit_cny is not None and used.cny >= d.limit_cny
        if used.tu >= d.limit_tu or cny_out or remaining <= 0:
            state = "exhausted"
        elif crossed:
            state = "warning"
        else:
            state = "ok"
        return QuotaStatus(
            self.key,
            d,
            period,
            used,
            self._reserved,
            self._pending,
            remaining,
            state,
            crossed,
            sum(1 for h in self.holds.values() if not h.pending),
        )


_PERIOD_CACHE: dict[tuple[int, str], str] = {}


def cached_period_key(ms: int, period: str) -> str:
    """``period_key`` memoised per minute (Beijing days start on a UTC minute, so every
    millisecond of a minute has the same key): the ledger asks on every call."""
    slot = (ms // 60_000, period)
    found = _PERIOD_CACHE.get(slot)
    if found is None:
        if len(_PERIOD_CACHE) > 10_000:
            _PERIOD_CACHE.clear()
        found = _PERIOD_CACHE[slot] = period_key(ms, period)
    return found


def _previous_month(month: str) -> str:
    year, mon = int(month[:4]), int(month[5:7])
    year, mon = (year - 1, 12) if mon == 1 else (year, mon - 1)
    return f"{year:04d}-{mon:02d}"


def period_start_ms(now_ms: int, period: Period) -> int:
    """Epoch ms of the start of the Beijing-time day or month containing ``now_ms``."""
    local = datetime.fromtimestamp(now_ms / 1000, tz=UTC) + BEIJING
    start = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        start = start.replace(day=1)
    return int((start - BEIJING).timestamp() * 1000)
