"""Rating a whole batch at once, in integer micro-units: the same numbers as calling
``PriceBook.rate`` event by event in log order (pricing.py's docstring has the rules).

``rate_columns(book, plans, usage, table)`` takes the batch as Arrow columns and returns
``RatedColumns``: int64 micro-units (TU and CNY x 10^6) and string columns per row, the
unpriced rows with the very ``Unpriced`` the scalar path gives, and ``usage`` (the
per-(tenant, period) billable TU counters) advanced exactly as the sequential loop in
``RateStage.rate`` advances it.

How it stays exact
------------------
* Lookups (card by ``event_time``, line, weights, prices, billable policy, plan tiers,
  period kind) run once per distinct (card, carrier, model), status and tenant, then are
  gathered per row.
* TU and list amount: ``sum(count * weight)`` in 1e-12 units, then one half-even division
  by 10^6. A weight or price ``x`` (up to ~10^24 in 1e-12 units for the largest values
  cards allow) is split as ``x = hi * 10^6 + lo`` with ``lo < 10^6``, so
  ``sum(count * x) = 10^6 * H + L`` with ``H = sum(count * hi)``, ``L = sum(count * lo)``
  and the result is ``H + round(L / 10^6)``. ``L < 4 * 2^40 * 10^6 < 2^63`` whenever every
  count is below 2^40 (validated events have at most 10^7); ``H`` is below 2^62 whenever a
  float64 estimate of the result is below 2^61 (a float64 estimate is within a relative
  10^-15 of the truth). Rows failing either test are not computed here (see below).
* Tier discount inside one tier: ``round(list_pico * keep / 10^12)`` with ``keep <= 10^6``,
  computed as ``A = H' * keep`` (``H' = list_pico // 10^6``, below 2^62 / 10^6 when the
  list amount estimate is) plus the low part, again in int64 only.
* Tier usage before each event: per (tenant, period) key, the stored counter plus a
  cumulative sum of the billable TU of the earlier rows of the batch (row order). Key
  totals are checked to stay below 2^61. A row whose TU lie in one tier is computed
  here; a row that straddles a boundary is rated by ``PriceBook.rate`` with that usage.
* Anything not proven in range, and a key whose stored counter is not a non-negative
  whole number of micro-TU, takes the scalar path for all rows of that key, in row
  order: ``PriceBook.rate`` with the running Decimal counter, exactly like ``RateStage``.
  A scalar result beyond int64 micro-units (over 9.2e12 TU or CNY for one event) is
  listed in ``out_of_range`` with its Decimal ``Rating``; its int64 columns hold 0.

Pure: numpy and pyarrow, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from pipeline.metering.plans import TenantPlans, period_key
from pipeline.metering.pricing import (
    _NO_TIERS,
    TOKEN_CLASSES,
    PriceBook,
    Rating,
    Unpriced,
    _Resolved,
    _Tiers,
)

I64 = npt.NDArray[np.int64]
_E6 = 10**6
_E12 = 10**12
_SAFE = 2**61  # bound for results and key totals: int64 sums of them cannot wrap
_MAX_COUNT = 2**40  # bound for token counts: L = sum(count * lo) stays below 2^63
_MAX_LIST_MICRO = 2**62 // _E6  # bound for H' so that H' * keep stays below 2^62
_TIER_CAP = 2**62  # tier starts above this are never reached by usage below _SAFE
_INT64_MAX = 2**63 - 1
_HOUR_MS = 3_600_000
_COUNT_FIELDS = ("input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens")
# the columns rate_columns reads (others in the table are ignored)
INPUT_COLUMNS: tuple[str, ...] = (
    "event_time",
    "serving_carrier",
    "model_id",
    "status",
    "tenant_id",
    *_COUNT_FIELDS,
)
DECIMAL = pa.decimal128(38, 6)  # the warehouse's type for TU and CNY (usage_events)
_ZERO6 = Decimal("0.000000")  # the counters' start value, as in RateStage


@dataclass(frozen=True)
class RatedColumns:
    """A rated batch, one entry per input row, in row order.

    Integer columns are exact micro-units (``Decimal`` value x 10^6): ``token_units_micro``
    (TU), ``amount_micro`` and ``list_amount_micro`` (CNY), ``tier_usage_micro`` (TU counted
    towards the tier usage: ``token_units`` if billable, else 0). ``tenant_plan`` is ""
    for list price, ``plan_period`` is ``2026-11`` or ``2026-11-28``. For an ``unpriced``
    row every other column is 0, False or ""; ``unpriced_detail`` gives its reason (the
    ``Unpriced`` ``PriceBook.rate`` returns), by row index, ascending. ``out_of_range``
    lists the rows whose numbers do not fit int64 micro-units, with their exact Rating
    (their int64 columns hold 0; their string columns and ``billable`` are set).
    """

    token_units_micro: I64
    amount_micro: I64
    list_amount_micro: I64
    billable: npt.NDArray[np.bool_]
    price_card_version: pa.Array
    price_line: pa.Array
    tenant_plan: pa.Array
    plan_period: pa.Array
    tier_usage_micro: I64
    unpriced: npt.NDArray[np.bool_]
    unpriced_detail: list[tuple[int, Unpriced]]
    out_of_range: list[tuple[int, Rating]]

    def take(self, rows: npt.NDArray[np.int64]) -> RatedColumns:
        """The rated rows ``rows`` (ascending indices), in that order."""
        index = {int(r): i for i, r in enumerate(rows)}
        return RatedColumns(
            self.token_units_micro[rows],
            self.amount_micro[rows],
            self.list_amount_micro[rows],
            self.billable[rows],
            self.price_card_version.take(rows),
            self.price_line.take(rows),
            self.tenant_plan.take(rows),
            self.plan_period.take(rows),
            self.tier_usage_micro[rows],
            self.unpriced[rows],
            [(index[i], u) for i, u in self.unpriced_detail if i in index],
            [(index[i], r) for i, r in self.out_of_range if i in index],
        )

    def decimals(self, name: str) -> pa.Array:
        """One number column as decimal128(38, 6) values (``usage_events``' type), exact
        for every row, ``out_of_range`` ones included. ``name``: ``token_units``,
        ``amount``, ``list_amount`` or ``tier_usage_tu``."""
        micro = {
            "token_units": self.token_units_micro,
            "amount": self.amount_micro,
            "list_amount": self.list_amount_micro,
            "tier_usage_tu": self.tier_usage_micro,
        }[name]
        # decimal128 is the unscaled integer in 16 bytes, little-endian two's complement
        words = np.empty((len(micro), 2), np.int64)
        words[:, 0] = micro
        words[:, 1] = micro >> 63
        column = pa.Array.from_buffers(DECIMAL, len(micro), [None, pa.py_buffer(words)])
        if not self.out_of_range:
            return column
        values = column.to_pylist()
        for i, rating in self.out_of_range:
            values[i] = getattr(rating, name)
        return pa.array(values, DECIMAL)


def _ints(table: pa.Table, name: str) -> I64:
    col = table.column(name)
    if col.null_count:
        raise ValueError(f"{name}: {col.null_count} rows have no value; rating needs all")
    out: I64 = np.asarray(col.to_numpy(), dtype=np.int64)
    return out


def _codes(table: pa.Table, name: str) -> tuple[I64, list[str]]:
    """Per-row codes into the list of distinct values of a string column."""
    col = table.column(name)
    if col.null_count:
        raise ValueError(f"{name}: {col.null_count} rows have no value; rating needs all")
    arr = col.combine_chunks()
    if pa.types.is_dictionary(arr.type):  # its dictionary may repeat values: re-encode it
        enc = arr.dictionary.dictionary_encode()
        inner = np.asarray(enc.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
        outer = np.asarray(arr.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
        return inner[outer], enc.dictionary.to_pylist()
    enc = arr.dictionary_encode()
    codes: I64 = np.asarray(enc.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
    return codes, enc.dictionary.to_pylist()


def _groups(codes: I64) -> tuple[I64, I64]:
    """``np.unique(codes, return_inverse=True)``; without a sort when the codes span a
    small range (the usual case: few cards, carriers, models, hours, tenants)."""
    if not len(codes):
        return codes, codes
    low, high = int(codes.min()), int(codes.max())
    if high - low > 4 * len(codes) + 4096:
        unique, inverse = np.unique(codes, return_inverse=True)
        return unique, inverse.reshape(-1)
    present = np.zeros(high - low + 1, bool)
    present[codes - low] = True
    rank = np.cumsum(present) - 1
    return np.flatnonzero(present) + low, rank[codes - low]


def _strings(labels: Sequence[str], codes: I64) -> pa.Array:
    """A dictionary-encoded string column: row i is ``labels[codes[i]]`` (labels may
    repeat; the dictionary does not)."""
    unique: dict[str, int] = {}
    remap = np.array([unique.setdefault(label, len(unique)) for label in labels], np.int32)
    return pa.DictionaryArray.from_arrays(
        pa.array(remap[codes] if len(codes) else np.zeros(0, np.int32), pa.int32()),
        pa.array(list(unique), pa.string()),
    )


def _half_even(hi: I64, lo: I64) -> I64:
    """``round((hi * 10^6 + lo) / 10^6)`` half-even, for ``hi, lo >= 0`` (no overflow:
    the caller keeps ``hi + lo // 10^6`` below 2^62)."""
    q = hi + lo // _E6
    twice = 2 * (lo % _E6)
    up = (twice > _E6) | ((twice == _E6) & ((q & 1) == 1))
    out: I64 = q + up
    return out


def _discounted(list_hi: I64, list_lo: I64, keep: I64) -> I64:
    """``round(list_pico * keep / 10^12)`` half-even, ``list_pico = list_hi * 10^6 +
    list_lo`` (``list_hi < 2^62 / 10^6``, ``0 <= keep <= 10^6``), as pricing's ``_tiered``
    does for an event inside one tier."""
    hi = list_hi + list_lo // _E6
    lo = list_lo % _E6
    a = hi * keep
    num = (a % _E6) * _E6 + lo * keep  # below 2 * 10^12
    q = a // _E6 + num // _E12
    twice = 2 * (num % _E12)
    up = (twice > _E12) | ((twice == _E12) & ((q & 1) == 1))
    out: I64 = q + up
    return out


def _records(table: pa.Table, rows: list[int]) -> list[dict[str, Any]]:
    """The rows as the record dicts ``PriceBook.rate`` reads (for the few rows that take
    the scalar path)."""
    if not rows:
        return []
    records: list[dict[str, Any]] = table.select(INPUT_COLUMNS).take(rows).to_pylist()
    return records


def _micro(value: Decimal) -> int:
    """A rating number (at most 6 decimal places) as an integer of micro-units."""
    return int(value.scaleb(6))


class _Combos:
    """The distinct (card, serving_carrier, model_id) of a batch, resolved once each:
    split integer weights and prices, their float estimates, policy and plan tables."""

    def __init__(
        self,
        book: PriceBook,
        codes: I64,
        n_carriers: int,
        n_models: int,
        carriers: list[str],
        models: list[str],
    ) -> None:
        k = len(codes)
        self.terms: list[_Resolved | None] = []
        self.unpriced = np.zeros(k, bool)
        self.card = np.zeros(k, np.int64)
        self.w_hi = np.zeros((4, k), np.int64)
        self.w_lo = np.zeros((4, k), np.int64)
        self.w_f = np.zeros((4, k), np.float64)
        self.p_hi = np.zeros((4, k), np.int64)
        self.p_lo = np.zeros((4, k), np.int64)
        self.p_f = np.zeros((4, k), np.float64)
        for j, code in enumerate(codes.tolist()):
            card, rest = divmod(code, n_carriers * n_models)
            carrier, model = divmod(rest, n_models)
            self.card[j] = card - 1
            res = book.resolved(card - 1, carriers[carrier], models[model]) if card else None
            if not isinstance(res, _Resolved):
                self.unpriced[j] = True
                self.terms.append(None)
                continue
            self.terms.append(res)
            weights = (res.w_in, res.w_out, res.w_cached, res.w_reason)
            prices = (res.p_in, res.p_out, res.p_cached, res.p_reason)
            for c in range(len(TOKEN_CLASSES)):
                # weights reach ~10^24: split before they meet int64
                self.w_hi[c, j], self.w_lo[c, j] = divmod(weights[c], _E6)
                self.w_f[c, j] = float(weights[c])
                self.p_hi[c, j], self.p_lo[c, j] = divmod(prices[c], _E6)
                self.p_f[c, j] = float(prices[c])


def rate_columns(
    book: PriceBook,
    plans: TenantPlans,
    usage: dict[tuple[str, str], Decimal],
    table: pa.Table,
) -> RatedColumns:
    """Rate ``table`` (columns ``event_time`` int64 epoch ms, ``serving_carrier``,
    ``model_id``, ``status``, ``tenant_id`` strings, the four token counts int64; rows in
    log order) with the tenants' ``plans`` and the tier ``usage`` counters
    ((tenant_id, plan period) -> billable TU so far, as ``RateStage.usage``). Updates
    ``usage`` as ``RateStage.rate`` would over the same rows. Raises ``ValueError`` naming
    the column if a needed column has nulls."""
    n = table.num_rows
    event_ms = _ints(table, "event_time")
    n_total, n_out, n_cached, n_reason = (_ints(table, f) for f in _COUNT_FIELDS)
    carrier_ix, carriers = _codes(table, "serving_carrier")
    model_ix, models = _codes(table, "model_id")
    status_ix, statuses = _codes(table, "status")
    tenant_ix, tenants = _codes(table, "tenant_id")

    # ---- resolve per distinct (card, carrier, model), status and plan ----------------
    starts = np.array(book.starts_ms, np.int64)
    card_plus1 = np.searchsorted(starts, event_ms, side="right")  # 0: before the first card
    nc, nm = max(len(carriers), 1), max(len(models), 1)
    combo_codes, combo_ix = _groups((card_plus1 * nc + carrier_ix) * nm + model_ix)
    combos = _Combos(book, combo_codes, nc, nm, carriers, models)
    n_combos = len(combo_codes)

    plan_of: dict[str | None, int] = {}  # the tenants' plans, None = list price
    tenant_plan = np.array(
        [plan_of.setdefault(p, len(plan_of)) for p in map(plans.plan_for, tenants)], np.int64
    )
    plan_names = list(plan_of)
    billable_of = np.full((max(n_combos, 1), max(len(statuses), 1)), -1, np.int8)
    tiers_of = np.full((max(n_combos, 1), max(len(plan_names), 1)), -1, np.int64)
    day_of = np.zeros((max(n_combos, 1), max(len(plan_names), 1)), bool)
    tier_list: list[_Tiers] = []
    tier_id: dict[int, int] = {}
    for j, res in enumerate(combos.terms):
        if res is None:
            continue
        for s, status in enumerate(statuses):
            policy = res.billable.get(status)
            if policy is not None:
                billable_of[j, s] = int(policy)
        card = book.cards[int(combos.card[j])]
        for p, name in enumerate(plan_names):
            tiers = _NO_TIERS if name is None else res.plans.get(name)
            if tiers is not None:
                tiers_of[j, p] = tier_id.setdefault(id(tiers), len(tier_list))
                if tiers_of[j, p] == len(tier_list):
                    tier_list.append(tiers)
            found = card.plans.get(name) if name is not None else None
            day_of[j, p] = found is not None and found.period == "day"

    row_plan = tenant_plan[tenant_ix] if n else np.zeros(0, np.int64)
    row_bill = billable_of[combo_ix, status_ix] if n else np.zeros(0, np.int8)
    row_tiers = tiers_of[combo_ix, row_plan] if n else np.zeros(0, np.int64)
    n_in = n_total - n_cached  # input_tokens includes the cached part
    unpriced = combos.unpriced[combo_ix] | (row_bill < 0) | (row_tiers < 0) | (n_in < 0)
    priced = np.flatnonzero(~unpriced)

    unpriced_detail: list[tuple[int, Unpriced]] = []
    unpriced_rows = np.flatnonzero(unpriced).tolist()
    for i, rec in zip(unpriced_rows, _records(table, unpriced_rows), strict=True):
        result = book.rate(rec, plan_names[row_plan[i]], 0)
        if not isinstance(result, Unpriced):  # the masks above mirror rate's checks
            raise AssertionError(f"row {i}: expected unpriced, scalar rating gave {result}")
        unpriced_detail.append((i, result))

    # ---- periods and (tenant, period) keys of the priced rows ------------------------
    cx = combo_ix[priced]
    day = day_of[cx, row_plan[priced]]
    period_codes, period_ix = _groups((event_ms[priced] // _HOUR_MS) * 2 + day)
    period_text: dict[str, int] = {}
    period_id = np.array(
        [
            period_text.setdefault(
                period_key((c >> 1) * _HOUR_MS, "day" if c & 1 else "month"), len(period_text)
            )
            for c in period_codes.tolist()
        ],
        np.int64,
    )
    periods = list(period_text)
    row_period = period_id[period_ix] if len(priced) else np.zeros(0, np.int64)
    key_codes, key_ix = _groups(tenant_ix[priced] * max(len(periods), 1) + row_period)
    n_keys = len(key_codes)
    keys = [
        (tenants[c // max(len(periods), 1)], periods[c % max(len(periods), 1)])
        for c in key_codes.tolist()
    ]

    # ---- TU and list amount, int64, with the range checks ----------------------------
    cls_counts = [n_in[priced], n_out[priced], n_cached[priced], n_reason[priced]]
    bad = np.zeros(len(priced), bool)
    if len(priced):
        # float64 estimates of the results in micro-units, against the int64 bounds: for
        # the batch's largest count and each card line first, per row only if that fails
        low = min(int(c.min()) for c in cls_counts)
        high = max(int(c.max()) for c in cls_counts)
        if not (
            0 <= low
            and high <= _MAX_COUNT
            and (high * combos.w_f.sum(axis=0) / _E6 <= _SAFE).all()
            and (high * combos.p_f.sum(axis=0) / _E6 <= _MAX_LIST_MICRO).all()
        ):
            for c in cls_counts:
                bad |= (c < 0) | (c > _MAX_COUNT)
            tu_est = sum(c * combos.w_f[k, cx] for k, c in enumerate(cls_counts)) / _E6
            list_est = sum(c * combos.p_f[k, cx] for k, c in enumerate(cls_counts)) / _E6
            bad |= (tu_est > _SAFE) | (list_est > _MAX_LIST_MICRO)
            cls_counts = [np.where(bad, 0, c) for c in cls_counts]
    tu_hi = sum(c * combos.w_hi[k, cx] for k, c in enumerate(cls_counts))
    tu_lo = sum(c * combos.w_lo[k, cx] for k, c in enumerate(cls_counts))
    list_hi = sum(c * combos.p_hi[k, cx] for k, c in enumerate(cls_counts))
    list_lo = sum(c * combos.p_lo[k, cx] for k, c in enumerate(cls_counts))
    tu = _half_even(np.asarray(tu_hi, np.int64), np.asarray(tu_lo, np.int64))
    list_micro = _half_even(np.asarray(list_hi, np.int64), np.asarray(list_lo, np.int64))
    billable = row_bill[priced] == 1
    tier_tu = np.where(billable, tu, 0)

    # ---- keys that go the scalar way ----------------------------------------------
    start = np.zeros(n_keys, np.int64)
    scalar_key = np.zeros(n_keys, bool)
    for k, key in enumerate(keys):
        before = usage.get(key)
        if before is None:
            continue
        scaled = before.scaleb(6)
        if scaled.is_finite() and scaled == scaled.to_integral_value() and 0 <= scaled < _SAFE:
            start[k] = int(scaled)
        else:
            scalar_key[k] = True
    if n_keys:
        scalar_key |= np.bincount(key_ix, weights=bad, minlength=n_keys) > 0
        est_total = np.bincount(key_ix, weights=tier_tu, minlength=n_keys)  # each < 2^61
        scalar_key |= est_total + start > _SAFE
    scalar_row = scalar_key[key_ix] if n_keys else np.zeros(0, bool)

    # ---- usage before each row: stored counter + billable TU of earlier rows ----------
    counted = np.where(scalar_row, 0, tier_tu)
    key_added = np.zeros(n_keys, np.int64)
    np.add.at(key_added, key_ix, counted)
    row_tier = row_tiers[priced]
    discounting = [t for t, tiers in enumerate(tier_list) if tiers is not _NO_TIERS]
    is_discounting = np.zeros(len(tier_list) + 1, bool)
    is_discounting[discounting] = True
    tiered = is_discounting[row_tier] & billable & ~scalar_row
    # only the keys with a discounting tier need the usage before each of their rows
    sub = np.flatnonzero((np.bincount(key_ix[tiered], minlength=n_keys) > 0)[key_ix])
    before_micro = np.zeros(len(priced), np.int64)
    if len(sub):
        sub_keys = key_ix[sub]
        # by key, row order within a key; 16-bit keys sort by radix, ~25x faster
        order = np.argsort(sub_keys.astype(np.int16) if n_keys < 2**15 else sub_keys, kind="stable")
        sorted_keys = sub_keys[order]
        step = counted[sub][order]
        excl = np.cumsum(step) - step
        first = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
        group_start = np.maximum.accumulate(np.where(first, np.arange(len(sub)), 0))
        before_micro[sub[order]] = excl - excl[group_start] + start[sorted_keys]

    # ---- tiers: keep fraction of the tier each row lies in, or straddling ------------
    keep = np.full(len(priced), _E6, np.int64)
    straddle = np.zeros(len(priced), bool)
    for t in discounting:
        tiers = tier_list[t]
        rows = np.flatnonzero((row_tier == t) & tiered)
        if not len(rows):
            continue
        bounds = np.array([min(b, _TIER_CAP) for b, _, _ in tiers] + [_TIER_CAP], np.int64)
        keeps = np.array([kp for _, kp, _ in tiers], np.int64)
        at = np.searchsorted(bounds[:-1], before_micro[rows], side="right") - 1
        keep[rows] = keeps[at]
        # as _tiered: all in one tier when usage + TU <= the next tier's start
        straddle[rows] = before_micro[rows] + tu[rows] > bounds[at + 1]
    amount = list_micro.copy()
    cut = np.flatnonzero(keep != _E6)
    amount[cut] = _discounted(
        np.asarray(list_hi, np.int64)[cut], np.asarray(list_lo, np.int64)[cut], keep[cut]
    )

    # ---- assemble --------------------------------------------------------------------
    tu_out = np.zeros(n, np.int64)
    amount_out = np.zeros(n, np.int64)
    list_out = np.zeros(n, np.int64)
    billable_out = np.zeros(n, bool)
    tier_out = np.zeros(n, np.int64)
    vec = ~scalar_row
    rows_vec = priced[vec]
    tu_out[rows_vec] = tu[vec]
    billable_out[priced] = billable
    paid = vec & billable
    list_out[priced[paid]] = list_micro[paid]
    amount_out[priced[paid]] = amount[paid]
    tier_out[priced[paid]] = tu[paid]

    out_of_range: list[tuple[int, Rating]] = []

    def put(i: int, rating: Rating) -> None:
        numbers = (rating.token_units, rating.amount, rating.list_amount, rating.tier_usage_tu)
        micro = [_micro(x) for x in numbers]
        billable_out[i] = rating.billable
        if max(micro) > _INT64_MAX or min(micro) < -_INT64_MAX - 1:
            out_of_range.append((i, rating))
            tu_out[i] = amount_out[i] = list_out[i] = tier_out[i] = 0
            return
        tu_out[i], amount_out[i], list_out[i], tier_out[i] = micro

    straddling = np.flatnonzero(straddle).tolist()
    for p, rec in zip(straddling, _records(table, priced[straddling].tolist()), strict=True):
        i = int(priced[p])
        used = Decimal(int(before_micro[p])).scaleb(-6)
        result = book.rate(rec, plan_names[row_plan[i]], used)
        if not isinstance(result, Rating):
            raise AssertionError(f"row {i}: expected a rating, scalar rating gave {result}")
        put(i, result)

    n_billed = np.bincount(key_ix[vec & billable], minlength=n_keys)
    for k in np.flatnonzero(n_billed > 0).tolist():
        usage[keys[k]] = usage.get(keys[k], _ZERO6) + Decimal(int(key_added[k])).scaleb(-6)

    # the scalar keys: RateStage.rate's own loop over their rows (priced is ascending)
    scalar = np.flatnonzero(scalar_row).tolist()
    for p, rec in zip(scalar, _records(table, priced[scalar].tolist()), strict=True):
        i = int(priced[p])
        key = keys[int(key_ix[p])]
        used = usage.get(key, _ZERO6)
        result = book.rate(rec, plan_names[row_plan[i]], used)
        if not isinstance(result, Rating):
            raise AssertionError(f"row {i}: expected a rating, scalar rating gave {result}")
        if result.billable:
            usage[key] = used + result.tier_usage_tu
        put(i, result)

    versions = [*book.versions, ""]
    version_ix = np.full(n, len(versions) - 1, np.int64)
    version_ix[priced] = combos.card[cx]
    labels = [res.label if res is not None else "" for res in combos.terms] + [""]
    label_ix = np.full(n, len(labels) - 1, np.int64)
    label_ix[priced] = cx
    plan_labels = [name or "" for name in plan_names] + [""]
    plan_ix = np.full(n, len(plan_labels) - 1, np.int64)
    plan_ix[priced] = row_plan[priced]
    period_ix_out = np.full(n, len(periods), np.int64)
    period_ix_out[priced] = row_period
    return RatedColumns(
        token_units_micro=tu_out,
        amount_micro=amount_out,
        list_amount_micro=list_out,
        billable=billable_out,
        price_card_version=_strings(versions, version_ix),
        price_line=_strings(labels, label_ix),
        tenant_plan=_strings(plan_labels, plan_ix),
        plan_period=_strings([*periods, ""], period_ix_out),
        tier_usage_micro=tier_out,
        unpriced=unpriced,
        unpriced_detail=unpriced_detail,
        out_of_range=out_of_range,
    )
