"""Cross-carrier reconciliation: pair both carriers' records of each call and classify it.

When a subscriber of one carrier (the *home* carrier) calls a model served on another
carrier's platform (the *serving* carrier), both carriers record the call, with one
shared ``transaction_id``. ``reconcile(wh, params, book)`` pairs those records for a
period and puts every transaction in exactly one category (contract section 5), in this
order of precedence:

1. ``period_boundary``: the call has records on both sides of the period's end (a
   month-end midnight, Beijing time), within ``boundary_window_s`` of it. Such a call
   belongs to the period it started in and is never ``missing`` in either.
2. ``duplicate``: one carrier reported the transaction more than once (different
   event ids; the dedup key is (reporting_carrier, event_id)).
3. ``missing_at_home`` / ``missing_at_serving``: only the other carrier reported it.
4. ``token_mismatch``: the sum over the four token counts of |serving - home| exceeds
   ``token_tolerance`` (default 0).
5. ``amount_mismatch``: the list amounts differ by more than ``amount_tolerance`` times
   the larger of the two (relative; default 0.001 = 0.1 %): e.g. the two records name
   different models, or statuses of different billability.
6. ``matched``: everything agrees.

Periods
-------
A period ``YYYY-MM`` is a calendar month in Beijing time (UTC+08:00; China has one time
zone and no daylight saving time since 1991), the time Chinese carriers bill in. A
transaction belongs to the period that holds its records; one whose records straddle a
month start belongs to the earlier month (``period_boundary`` there) and is left out of
the later one. "Straddle" means: at least one record in [B - w, B) and one in
[B, B + w) for the month boundary B and the window w. Records further apart are not
paired across periods: each period then reports the side it holds as missing.

Amounts
-------
Each record is priced in SQL from the price cards (``recon_prices``, resolved from
``pipeline.metering.pricing``): the version in force at the record's event_time, the
line for (serving_carrier, model_id) by the card's precedence, each token class at its
price, list price (no plan discounts), 0 for a non-billable status. The arithmetic is
on integers (pico-CNY) and rounded once per record to 0.000001 CNY, half to even: the
same number ``PriceBook.rate(record).list_amount`` gives. (ClickHouse's own ``round``
on Decimal rounds half away from zero, ``roundBankers`` half to even, and a Decimal
conversion truncates; none of them is used here.) A record the card cannot price
(no line, cached > input) gets amount 0 and ``*_priced = 0``.

When a side has several records (``duplicate``), its *canonical* record is the earliest
(ties: the smaller 32-bit cityHash64 of the event id); the row shows that record's
tokens and amount and all of the side's event ids.

Runs
----
A run is identified by a hash (``run_id``) of its inputs: period, carriers, tolerances,
boundary window, the price cards, and a fingerprint of the records that can take part
(the cross-carrier records from the boundary window before the period's start to the
boundary window after its end: their count and the sum of
``cityHash64(reporting_carrier, event_id, payload_hash)``). Its rows are
written once: a re-run on the same inputs finds the run and writes nothing (if the run
is not the current one for its period any more, it becomes current again). Results go
to ``recon_results`` (one row per transaction) and ``recon_summary`` (per category per
carrier pair); ``recon_runs`` is written last, so a run without it is incomplete and is
redone.

Decisions
---------
``record_decision`` stores a clerk's ``accept`` or ``dispute`` for a whole category of a
run or for one transaction; the latest decision wins, a transaction's own decision wins
over its category's. Settlement (jobs/settle.py) uses matched and accepted
transactions; disputed ones are listed in the next periods' reports until accepted.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pyarrow as pa

from pipeline.metering.pricing import TOKEN_CLASSES, PriceBook
from pipeline.warehouse import Warehouse, rows, scalar
from pipeline.warehouse.base import quote_literal

BEIJING = timezone(timedelta(hours=8), "UTC+08:00")
CARRIERS: tuple[str, ...] = ("CMCC", "CTCC", "CUCC")
CATEGORIES: tuple[str, ...] = (
    "matched",
    "token_mismatch",
    "amount_mismatch",
    "missing_at_home",
    "missing_at_serving",
    "duplicate",
    "period_boundary",
)
DISCREPANCIES: tuple[str, ...] = CATEGORIES[1:]
DECISIONS: tuple[str, ...] = ("accept", "dispute")
DEFAULT_AMOUNT_TOLERANCE = Decimal("0.001")
DEFAULT_BOUNDARY_WINDOW_S = 3600
MAX_BOUNDARY_WINDOW_S = 86_400
SCHEMA_VERSION = 1  # bump when the classification changes: old run ids stop matching

_MICRO = Decimal("0.000001")
_PERIOD = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")
_RUN_ID = re.compile(r"^[0-9a-f]{16}$")
_U64_MAX = 2**64 - 1
_MAX_TOKENS_PER_RECORD = 4 * 10_000_000  # four classes, the contract's per-count limit


class ReconError(Exception):
    """A reconciliation request cannot be carried out; the message says why."""


# ---- periods ------------------------------------------------------------------------


@dataclass(frozen=True)
class Period:
    """A settlement period: one calendar month in Beijing time, [start, end)."""

    label: str
    start: datetime
    end: datetime

    @classmethod
    def of(cls, year: int, month: int) -> Period:
        start = datetime(year, month, 1, tzinfo=BEIJING)
        end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=BEIJING)
        return cls(f"{year:04d}-{month:02d}", start, end)

    @classmethod
    def parse(cls, text: str) -> Period:
        """``YYYY-MM``; raises ``ReconError`` otherwise."""
        match = _PERIOD.match(text.strip())
        if not match:
            raise ReconError(f"--period: expected YYYY-MM (a month), got {text!r}")
        return cls.of(int(match.group(1)), int(match.group(2)))

    @classmethod
    def containing(cls, ms: int) -> Period:
        """The period that holds a UTC epoch-ms instant."""
        local = datetime.fromtimestamp(ms / 1000, tz=BEIJING)
        return cls.of(local.year, local.month)

    @property
    def start_ms(self) -> int:
        return _ms(self.start)

    @property
    def end_ms(self) -> int:
        return _ms(self.end)

    def next(self) -> Period:
        return Period.of(self.end.year, self.end.month)

    def previous(self) -> Period:
        before = self.start - timedelta(days=1)
        return Period.of(before.year, before.month)


def _ms(moment: datetime) -> int:
    return int((moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1))


def parse_carriers(text: str | None) -> tuple[str, ...]:
    """``"CMCC,CTCC"`` -> ``("CMCC", "CTCC")`` (sorted, checked); ``None`` -> all three."""
    if text is None or not text.strip():
        return CARRIERS
    chosen = sorted({c.strip().upper() for c in text.split(",") if c.strip()})
    unknown = [c for c in chosen if c not in CARRIERS]
    if unknown:
        raise ReconError(
            f"--carriers: unknown carrier(s) {', '.join(unknown)}; use CMCC, CTCC, CUCC"
        )
    if len(chosen) < 2:
        raise ReconError("--carriers: name at least two carriers")
    return tuple(chosen)


def check_run_id(run_id: str) -> str:
    """A run id as printed by ``reconcile`` (16 hex digits); ``ReconError`` otherwise."""
    value = run_id.strip().lower()
    if not _RUN_ID.match(value):
        raise ReconError(f"--run: expected a run id of 16 hex digits, got {run_id!r}")
    return value


# ---- parameters ---------------------------------------------------------------------


@dataclass(frozen=True)
class ReconParams:
    """What a reconciliation run depends on, besides the data and the price cards."""

    period: Period
    carriers: tuple[str, ...] = CARRIERS
    token_tolerance: int = 0
    amount_tolerance: Decimal = DEFAULT_AMOUNT_TOLERANCE
    boundary_window_s: int = DEFAULT_BOUNDARY_WINDOW_S

    def __post_init__(self) -> None:
        if self.token_tolerance < 0:
            raise ReconError("--token-tolerance: must be >= 0")
        tol = self.amount_tolerance
        if not tol.is_finite() or tol < 0 or tol >= 1:
            raise ReconError("--amount-tolerance: must be >= 0 and < 1 (relative)")
        if tol != tol.quantize(Decimal("1e-9")):
            raise ReconError("--amount-tolerance: at most 9 decimal places")
        if not 0 <= self.boundary_window_s <= MAX_BOUNDARY_WINDOW_S:
            raise ReconError(f"--boundary-window: 0 to {MAX_BOUNDARY_WINDOW_S} seconds")

    @property
    def tolerance_ppb(self) -> int:
        """The relative amount tolerance in parts per billion (exact)."""
        return int(self.amount_tolerance.scaleb(9))


def classify(
    serving_records: int,
    home_records: int,
    straddles_end: bool,
    token_diff: int,
    serving_amount: Decimal,
    home_amount: Decimal,
    params: ReconParams,
) -> str:
    """The category of one transaction, by the documented precedence. The SQL in
    ``_results_sql`` implements the same rules; tests check one against the other."""
    if straddles_end:
        return "period_boundary"
    if serving_records > 1 or home_records > 1:
        return "duplicate"
    if home_records == 0:
        return "missing_at_home"
    if serving_records == 0:
        return "missing_at_serving"
    if token_diff > params.token_tolerance:
        return "token_mismatch"
    if abs(serving_amount - home_amount) > params.amount_tolerance * max(
        serving_amount, home_amount
    ):
        return "amount_mismatch"
    return "matched"


# ---- prices in the warehouse ----------------------------------------------------------


def price_rows(book: PriceBook, models: Iterable[str]) -> list[dict[str, Any]]:
    """One row per (card version, serving carrier, model) that the card prices: the
    line chosen by the card's precedence, prices in pico-CNY per token (exact: prices
    have at most 6 decimal places)."""
    out = []
    for card in book.cards:
        billable = sorted(k for k, v in card.billable.model_dump().items() if v)
        for carrier in CARRIERS:
            for model in sorted(set(models)):
                line = card.line_for(carrier, model)
                if line is None or card.tu_per_token(model) is None:
                    continue
                prices = {cls: int(line.prices.price(cls).scaleb(6)) for cls in TOKEN_CLASSES}
                if max(prices.values()) * _MAX_TOKENS_PER_RECORD > _U64_MAX:
                    raise ReconError(
                        f"price card {card.version}: line {line.label} is too expensive for "
                        "64-bit pricing in SQL"
                    )
                out.append(
                    {
                        "version": card.version,
                        "effective_from": card.effective_from_ms,
                        "serving_carrier": carrier,
                        "model_id": model,
                        "price_line": line.label,
                        "p_input": prices["input"],
                        "p_cached_input": prices["cached_input"],
                        "p_output": prices["output"],
                        "p_reasoning": prices["reasoning"],
                        "billable_statuses": billable,
                    }
                )
    return out


_PRICE_SCHEMA = pa.schema(
    [
        ("price_book_id", pa.string()),
        ("version", pa.string()),
        ("effective_from", pa.timestamp("ms", tz="UTC")),
        ("serving_carrier", pa.string()),
        ("model_id", pa.string()),
        ("price_line", pa.string()),
        ("p_input", pa.uint64()),
        ("p_cached_input", pa.uint64()),
        ("p_output", pa.uint64()),
        ("p_reasoning", pa.uint64()),
        ("billable_statuses", pa.list_(pa.string())),
    ]
)


def ensure_prices(wh: Warehouse, book: PriceBook, models: Iterable[str]) -> str:
    """Load the resolved prices into ``recon_prices`` (once per content); returns the
    ``price_book_id``."""
    table_rows = price_rows(book, models)
    blob = json.dumps(table_rows, sort_keys=True, default=str).encode()
    book_id = hashlib.sha256(blob).hexdigest()[:16]
    have = scalar(
        wh.query_arrow(
            f"SELECT count() FROM recon_prices WHERE price_book_id = {quote_literal(book_id)}"
        )
    )
    if have == len(table_rows):
        return book_id
    if have:
        wh.execute(f"DELETE FROM recon_prices WHERE price_book_id = {quote_literal(book_id)}")
    data = {name: [r[name] for r in table_rows] for name in _PRICE_SCHEMA.names[1:]}
    data["price_book_id"] = [book_id] * len(table_rows)
    wh.insert_arrow("recon_prices", pa.table(data, schema=_PRICE_SCHEMA))
    return book_id


def _ts(ms: int) -> str:
    return f"fromUnixTimestamp64Milli(toInt64({ms}), 'UTC')"


def _array(values: Sequence[str]) -> str:
    return "[" + ", ".join(quote_literal(v) for v in values) + "]"


def _ints(values: Iterable[int]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


# ---- the SQL ------------------------------------------------------------------------------

STATUSES: tuple[str, ...] = ("ok", "timeout", "rate_limited", "error", "failover")


def _base_filter(carriers: Sequence[str]) -> str:
    """Cross-carrier records of the chosen carriers, reported by one of the two."""
    where = (
        "transaction_id IS NOT NULL AND home_carrier != serving_carrier"
        " AND (reporting_carrier = serving_carrier OR reporting_carrier = home_carrier)"
    )
    if tuple(carriers) != CARRIERS:  # the contract's enum has no other carrier
        listed = _array(carriers)
        where += f" AND home_carrier IN {listed} AND serving_carrier IN {listed}"
    return where


def _straddling_sql(base: str, boundary_ms: int, window_ms: int) -> str:
    """Transactions with records on both sides of a boundary, within the window (a
    PREWHERE on the time keeps this to the few records near the boundary)."""
    return (
        "SELECT assumeNotNull(transaction_id) FROM usage_events"
        f" PREWHERE event_time >= {_ts(boundary_ms - window_ms)}"
        f" AND event_time < {_ts(boundary_ms + window_ms)}"
        f" WHERE {base}"
        f" GROUP BY transaction_id HAVING min(event_time) < {_ts(boundary_ms)}"
        f" AND max(event_time) >= {_ts(boundary_ms)}"
    )


def _records_filter(params: ReconParams) -> str:
    """The records a run reads: in the period, plus the later records of calls that
    straddle its end; without the calls that straddle its start (the earlier period's)."""
    base = _base_filter(params.carriers)
    start, end = params.period.start_ms, params.period.end_ms
    window = params.boundary_window_s * 1000
    where = f"{base} AND event_time >= {_ts(start)}"
    if window == 0:
        return f"{where} AND event_time < {_ts(end)}"
    # the set lookups only for records near a boundary (OR evaluates lazily)
    return (
        f"{where} AND event_time < {_ts(end + window)}"
        f" AND (event_time < {_ts(end)} OR assumeNotNull(transaction_id) IN"
        f" ({_straddling_sql(base, end, window)}))"
        f" AND (event_time >= {_ts(start + window)} OR assumeNotNull(transaction_id) NOT IN"
        f" ({_straddling_sql(base, start, window)}))"
    )


@dataclass(frozen=True)
class _Inputs:
    """What one pass over a run's records finds: their number, their fingerprint and
    the labels that occur (for small integer codes in the main query)."""

    records: int
    fingerprint: int
    models: tuple[str, ...]
    providers: tuple[str, ...]
    channels: tuple[str, ...]


def _scan_inputs(wh: Warehouse, params: ReconParams) -> _Inputs:
    """The fingerprint: the count and the sum of cityHash64(reporting_carrier, event_id,
    payload_hash) of the cross-carrier records in [start - w, end + w) (w: the boundary
    window), every record that can take part in the run: an added, removed or changed
    one changes it. The labels are those of the whole table (a superset is harmless;
    LowCardinality columns make this cheap)."""
    window = params.boundary_window_s * 1000
    found = rows(
        wh.query_arrow(
            "SELECT count() AS n, sum(cityHash64(reporting_carrier, event_id, payload_hash))"
            " AS h FROM usage_events"
            f" PREWHERE event_time >= {_ts(params.period.start_ms - window)}"
            f" AND event_time < {_ts(params.period.end_ms + window)}"
            f" WHERE {_base_filter(params.carriers)}"
        )
    )[0]
    labels = rows(
        wh.query_arrow(
            "SELECT"
            " (SELECT groupArray(toString(x)) FROM (SELECT DISTINCT model_id AS x"
            " FROM usage_events)) AS m,"
            " (SELECT groupArray(toString(x)) FROM (SELECT DISTINCT provider AS x"
            " FROM usage_events)) AS p,"
            " (SELECT groupArray(toString(x)) FROM (SELECT DISTINCT channel AS x"
            " FROM usage_events)) AS c"
        )
    )[0]
    return _Inputs(
        int(found["n"]),
        int(found["h"] or 0),
        tuple(sorted(labels["m"] or [])),
        tuple(sorted(labels["p"] or [])),
        tuple(sorted(labels["c"] or [])),
    )


_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF


def _price_arrays(book: PriceBook, models: Sequence[str]) -> dict[str, str]:
    """SQL array literals: per (card version, serving carrier, model), the price of each
    token class in pico-CNY per token and whether a line prices it; per (version,
    status), whether it is billed. Indexed as documented in ``_results_sql``."""
    rows_ = {
        (r["version"], r["serving_carrier"], r["model_id"]): r for r in price_rows(book, models)
    }
    cols: dict[str, list[int]] = {
        k: [] for k in ("p_in", "p_cached", "p_out", "p_reason", "priced")
    }
    billable: list[int] = []
    for card in book.cards:
        for carrier in CARRIERS:
            for model in models:
                r = rows_.get((card.version, carrier, model))
                cols["p_in"].append(r["p_input"] if r else 0)
                cols["p_cached"].append(r["p_cached_input"] if r else 0)
                cols["p_out"].append(r["p_output"] if r else 0)
                cols["p_reason"].append(r["p_reasoning"] if r else 0)
                cols["priced"].append(1 if r else 0)
        policy = card.billable.model_dump()
        billable.extend(1 if policy.get(status) else 0 for status in STATUSES)
    out = {k: f"CAST({_ints(v)}, 'Array(UInt64)')" for k, v in cols.items()}
    out["billable"] = f"CAST({_ints(billable)}, 'Array(UInt8)')"
    return out


def _codes(column: str, values: Sequence[str]) -> str:
    """SQL: a label as its 1-based position in ``values`` (0 if absent). ``transform``
    works on a LowCardinality column's dictionary, unlike ``indexOf`` (20x slower)."""
    if not values:
        return "toUInt64(0)"
    return f"toUInt64(transform({column}, {_array(values)}, {_ints(range(1, len(values) + 1))}, 0))"


def _results_sql(params: ReconParams, run_id: str, book: PriceBook, inputs: _Inputs) -> str:
    """INSERT ... SELECT of one run's ``recon_results``.

    Per record: labels as small integer codes, the price from array literals indexed by
    (card version, serving carrier, model) (no join), and 64-bit words: ``rk`` =
    (milliseconds since the period start) << 32 | (32-bit hash of the event id), which
    orders a side's records (the canonical record is the one with the smallest ``rk``),
    the amount, the input/output and the cached/reasoning tokens. Grouped by
    transaction_id with few, numeric aggregate states (a GROUP BY over ten million keys
    costs per state and row; 128-bit words and ``indexOf`` over strings proved several
    times slower); the labels come from the minimum of a 64-bit code in which the
    serving side sorts first.
    """
    origin = params.period.start_ms  # no record of a run is earlier than its period start
    end = params.period.end_ms
    models, providers, channels = inputs.models, inputs.providers, inputs.channels
    n_models = max(1, len(models))
    prices = _price_arrays(book, models)
    version = (
        "multiIf("
        + "".join(
            f"e.event_time >= {_ts(card.effective_from_ms)}, {i + 1}, "
            for i, card in reversed(list(enumerate(book.cards)))
        )
        + "0)"
    )
    n_status = len(STATUSES)
    records = f"""
        SELECT
            assumeNotNull(e.transaction_id) AS tx,
            e.reporting_carrier = e.serving_carrier AS s,
            e.event_time >= {_ts(end)} AS la,
            e.event_id AS event_id,
            e.tenant_id AS tenant_id,
            bitOr(
                bitShiftLeft(toUInt64(toUnixTimestamp64Milli(e.event_time) - {origin}), 32),
                bitAnd(cityHash64(e.event_id), {_MASK32})
            ) AS rk,
            toUInt64({version}) AS ver,
            {_codes("e.serving_carrier", CARRIERS)} AS sv,
            {_codes("e.home_carrier", CARRIERS)} AS hv,
            {_codes("e.model_id", models)} AS mi,
            {_codes("e.status", STATUSES)} AS st,
            if(ver > 0 AND sv > 0 AND mi > 0,
               toUInt64(((ver - 1) * 3 + sv - 1) * {n_models} + mi), toUInt64(0)) AS pk,
            pk > 0 AND arrayElement({prices["priced"]}, pk) = 1 AND st > 0
              AND e.cached_tokens <= e.input_tokens AS ok_price,
            if(ok_price,
               toUInt64(e.input_tokens - e.cached_tokens) * arrayElement({prices["p_in"]}, pk)
                 + e.cached_tokens * arrayElement({prices["p_cached"]}, pk)
                 + e.output_tokens * arrayElement({prices["p_out"]}, pk)
                 + e.reasoning_tokens * arrayElement({prices["p_reason"]}, pk),
               toUInt64(0)) AS pico,
            if(ok_price
                 AND arrayElement({prices["billable"]}, toUInt64((ver - 1) * {n_status} + st)) = 1,
               -- half to even: round half up, then back down on a tie whose quotient
               -- would be odd (pico % 2000000 = 500000: the tie after an even quotient)
               toUInt64(intDiv(pico + 500000, 1000000) - (pico % 2000000 = 500000)),
               toUInt64(0)) AS amount_micro,
            bitOr(bitShiftLeft(toUInt64(ok_price), 63), amount_micro) AS aw,
            bitOr(bitShiftLeft(e.input_tokens, 32), e.output_tokens) AS io,
            bitOr(bitShiftLeft(e.cached_tokens, 32), e.reasoning_tokens) AS cr,
            bitOr(bitShiftLeft(toUInt64(NOT s), 63),
              bitOr(bitShiftLeft(sv, 52),
                bitOr(bitShiftLeft(hv, 48),
                  bitOr(bitShiftLeft(mi, 32),
                    bitOr(bitShiftLeft({_codes("e.provider", providers)}, 16),
                          {_codes("e.channel", channels)}))))) AS code,
            bitOr(bitShiftLeft(toUInt64(NOT s), 63), bitShiftRight(rk, 1)) AS dk
        FROM usage_events AS e
        WHERE {_records_filter(params)}
    """
    grouped = f"""
        SELECT
            tx,
            sum(bitOr(toUInt64(s), bitOr(bitShiftLeft(toUInt64(NOT s), 16),
                                         bitShiftLeft(toUInt64(la), 32)))) AS meta,
            minIf(rk, s) AS s_rk, minIf(rk, NOT s) AS h_rk,
            argMinIf(aw, rk, s) AS s_aw, argMinIf(aw, rk, NOT s) AS h_aw,
            argMinIf(io, rk, s) AS s_io, argMinIf(io, rk, NOT s) AS h_io,
            argMinIf(cr, rk, s) AS s_cr, argMinIf(cr, rk, NOT s) AS h_cr,
            groupArrayIf(event_id, s) AS s_ids, groupArrayIf(event_id, NOT s) AS h_ids,
            min(code) AS code, argMin(tenant_id, dk) AS tenant
        FROM ({records})
        GROUP BY tx
    """

    def time_of(rk: str) -> str:
        return f"fromUnixTimestamp64Milli(toInt64(bitShiftRight({rk}, 32)) + {origin}, 'UTC')"

    def canonical(ids: str, rk: str) -> str:
        return (
            f"if(length({ids}) = 1, {ids}[1], arrayFirst(i -> bitAnd(cityHash64(i), {_MASK32})"
            f" = bitAnd({rk}, {_MASK32}), {ids}))"
        )

    def label(values: Sequence[str], shift: int, mask: int) -> str:
        listed = _array(values or ("",))  # an empty literal array has no type
        return f"arrayElement({listed}, bitAnd(bitShiftRight(code, {shift}), {mask}))"

    tokens = {
        "input": ("io", 32),
        "output": ("io", 0),
        "cached": ("cr", 32),
        "reasoning": ("cr", 0),
    }
    token_cols = []
    for side in ("s", "h"):
        for name, (word, shift) in tokens.items():
            value = f"bitAnd(bitShiftRight({side}_{word}, {shift}), {_MASK32})"
            token_cols.append(f"if({side}_n > 0, {value}, 0) AS {side}_{name}")
    diff = " + ".join(f"abs(toInt64(s_{n}) - toInt64(h_{n}))" for n in tokens)
    micro = "toDecimal64('0.000001', 6)"
    return f"""
    INSERT INTO recon_results
    SELECT
        {quote_literal(run_id)} AS run_id,
        {quote_literal(params.period.label)} AS period,
        tx AS transaction_id,
        {label(CARRIERS, 52, 7)} AS serving_carrier,
        {label(CARRIERS, 48, 7)} AS home_carrier,
        multiIf(
            la_n > 0, 'period_boundary',
            s_n > 1 OR h_n > 1, 'duplicate',
            h_n = 0, 'missing_at_home',
            s_n = 0, 'missing_at_serving',
            token_diff > {params.token_tolerance}, 'token_mismatch',
            toUInt128(greatest(s_amt, h_amt) - least(s_amt, h_amt)) * 1000000000
              > toUInt128({params.tolerance_ppb}) * greatest(s_amt, h_amt), 'amount_mismatch',
            'matched') AS category,
        tenant AS tenant_id,
        {label(models, 32, _MASK16)} AS model_id,
        {label(providers, 16, _MASK16)} AS provider,
        {label(channels, 0, _MASK16)} AS channel,
        s_n AS serving_records, h_n AS home_records,
        if(s_n > 0, {canonical("s_sorted", "s_rk")}, '') AS serving_event_id,
        if(h_n > 0, {canonical("h_sorted", "h_rk")}, '') AS home_event_id,
        s_sorted AS serving_event_ids, h_sorted AS home_event_ids,
        if(s_n > 0, {time_of("s_rk")}, NULL) AS serving_event_time,
        if(h_n > 0, {time_of("h_rk")}, NULL) AS home_event_time,
        s_input, s_output, s_cached, s_reasoning,
        h_input, h_output, h_cached, h_reasoning,
        if(s_n > 0 AND h_n > 0, toUInt64({diff}), 0) AS token_diff,
        toDecimal64(s_amt, 0) * {micro} AS serving_amount,
        toDecimal64(h_amt, 0) * {micro} AS home_amount,
        serving_amount - home_amount AS amount_diff,
        toUInt8(s_n > 0 AND bitTest(s_aw, 63)) AS serving_priced,
        toUInt8(h_n > 0 AND bitTest(h_aw, 63)) AS home_priced
    FROM (
        SELECT
            *,
            toUInt32(bitAnd(meta, 65535)) AS s_n,
            toUInt32(bitAnd(bitShiftRight(meta, 16), 65535)) AS h_n,
            bitShiftRight(meta, 32) AS la_n,
            if(length(s_ids) > 1, arraySort(s_ids), s_ids) AS s_sorted,
            if(length(h_ids) > 1, arraySort(h_ids), h_ids) AS h_sorted,
            if(s_n > 0, bitAnd(s_aw, 9223372036854775807), 0) AS s_amt,
            if(h_n > 0, bitAnd(h_aw, 9223372036854775807), 0) AS h_amt,
            {", ".join(token_cols)}
        FROM ({grouped})
    )
    """


# ---- runs ----------------------------------------------------------------------------------


@dataclass
class ReconRun:
    """The outcome of ``reconcile``: the run, whether it was computed now (``created``)
    or found (then ``reactivated`` if it became current again), and its summary."""

    run_id: str
    period: str
    carriers: tuple[str, ...]
    created: bool
    reactivated: bool
    input_records: int
    transactions: int
    duration_s: float
    summary: list[dict[str, Any]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Transactions per category (every category, zeros included)."""
        out = dict.fromkeys(CATEGORIES, 0)
        for row in self.summary:
            out[row["category"]] += int(row["transactions"])
        return out


def _now() -> datetime:
    return datetime.now(UTC)


def current_run(
    wh: Warehouse, period: Period | str, carriers: Sequence[str] = CARRIERS
) -> str | None:
    """The current run id of a period for these carriers, or ``None``."""
    label = period.label if isinstance(period, Period) else period
    table = wh.query_arrow(
        "SELECT argMax(run_id, activated_at) AS r, count() AS n FROM recon_activations"
        f" WHERE period = {quote_literal(label)} AND carriers = {_array(carriers)}"
    )
    found = rows(table)[0]
    return str(found["r"]) if found["n"] else None


def run_info(wh: Warehouse, run_id: str) -> dict[str, Any]:
    """The ``recon_runs`` row of a run; ``ReconError`` if there is none."""
    found = rows(
        wh.query_arrow(f"SELECT * FROM recon_runs WHERE run_id = {quote_literal(run_id)} LIMIT 1")
    )
    if not found:
        raise ReconError(f"no reconciliation run {run_id} (see `tokenmeter recon list`)")
    return found[0]


def summary(wh: Warehouse, run_id: str) -> list[dict[str, Any]]:
    """The ``recon_summary`` rows of a run, ordered by pair and category."""
    return rows(
        wh.query_arrow(
            "SELECT serving_carrier, home_carrier, category, transactions, serving_records,"
            " home_records, token_diff, serving_amount, home_amount, amount_diff"
            f" FROM recon_summary WHERE run_id = {quote_literal(run_id)}"
            " ORDER BY serving_carrier, home_carrier,"
            f" indexOf({_array(CATEGORIES)}, toString(category))"
        )
    )


def _activate(wh: Warehouse, period: str, carriers: Sequence[str], run_id: str) -> bool:
    if current_run(wh, period, carriers) == run_id:
        return False
    wh.insert_arrow(
        "recon_activations",
        pa.table(
            {
                "period": [period],
                "carriers": [list(carriers)],
                "run_id": [run_id],
                "activated_at": pa.array([_now()], pa.timestamp("us", tz="UTC")),
            }
        ),
    )
    return True


def reconcile(wh: Warehouse, params: ReconParams, book: PriceBook) -> ReconRun:
    """Reconcile one period (see the module docstring). Idempotent: the same inputs give
    the same run id, whose rows are written only once."""
    started = time.monotonic()
    inputs = _scan_inputs(wh, params)
    book_id = ensure_prices(wh, book, inputs.models)
    count, digest = inputs.records, inputs.fingerprint
    hashed = {
        "schema": SCHEMA_VERSION,
        "period": params.period.label,
        "carriers": list(params.carriers),
        "token_tolerance": params.token_tolerance,
        "amount_tolerance": str(params.amount_tolerance.normalize()),
        "boundary_window_s": params.boundary_window_s,
        "price_book_id": book_id,
        "input_records": count,
        "input_fingerprint": digest,
    }
    blob = json.dumps(hashed, sort_keys=True).encode()
    run_id = hashlib.sha256(blob).hexdigest()[:16]
    label = params.period.label
    existing = rows(
        wh.query_arrow(
            "SELECT transactions, duration_s FROM recon_runs"
            f" WHERE run_id = {quote_literal(run_id)} LIMIT 1"
        )
    )
    if existing:
        reactivated = _activate(wh, label, params.carriers, run_id)
        return ReconRun(
            run_id,
            label,
            params.carriers,
            created=False,
            reactivated=reactivated,
            input_records=count,
            transactions=int(existing[0]["transactions"]),
            duration_s=time.monotonic() - started,
            summary=summary(wh, run_id),
        )
    rid = quote_literal(run_id)
    for table in ("recon_results", "recon_summary"):  # leftovers of an interrupted run
        if scalar(wh.query_arrow(f"SELECT count() FROM {table} WHERE run_id = {rid}")):
            wh.execute(f"DELETE FROM {table} WHERE run_id = {rid}")
    wh.execute(_results_sql(params, run_id, book, inputs))
    wh.execute(
        "INSERT INTO recon_summary SELECT run_id, period, serving_carrier, home_carrier,"
        " category, count(), sum(serving_records), sum(home_records), sum(token_diff),"
        " sum(serving_amount), sum(home_amount), sum(amount_diff)"
        f" FROM recon_results WHERE run_id = {rid}"
        " GROUP BY run_id, period, serving_carrier, home_carrier, category"
    )
    stats = rows(
        wh.query_arrow(f"SELECT sum(transactions) AS t FROM recon_summary WHERE run_id = {rid}")
    )[0]
    unpriced = scalar(
        wh.query_arrow(
            "SELECT countIf(serving_records > 0 AND serving_priced = 0)"
            " + countIf(home_records > 0 AND home_priced = 0)"
            f" FROM recon_results WHERE run_id = {rid}"
        )
    )
    transactions = int(stats["t"] or 0)
    duration = time.monotonic() - started
    wh.insert_arrow(
        "recon_runs",
        pa.table(
            {
                "run_id": [run_id],
                "period": [label],
                "carriers": [list(params.carriers)],
                "period_start": pa.array([params.period.start_ms], pa.timestamp("ms", tz="UTC")),
                "period_end": pa.array([params.period.end_ms], pa.timestamp("ms", tz="UTC")),
                "token_tolerance": pa.array([params.token_tolerance], pa.uint64()),
                "amount_tolerance": pa.array([params.amount_tolerance], pa.decimal128(18, 9)),
                "boundary_window_s": pa.array([params.boundary_window_s], pa.uint32()),
                "price_book_id": [book_id],
                "input_records": pa.array([count], pa.uint64()),
                "input_fingerprint": pa.array([digest], pa.uint64()),
                "transactions": pa.array([transactions], pa.uint64()),
                "unpriced_records": pa.array([int(unpriced or 0)], pa.uint64()),
                "params": [blob.decode()],
                "created_at": pa.array([_now()], pa.timestamp("us", tz="UTC")),
                "duration_s": [duration],
            }
        ),
    )
    _activate(wh, label, params.carriers, run_id)
    return ReconRun(
        run_id,
        label,
        params.carriers,
        created=True,
        reactivated=False,
        input_records=count,
        transactions=transactions,
        duration_s=duration,
        summary=summary(wh, run_id),
    )


def list_runs(wh: Warehouse, period: str | None = None) -> list[dict[str, Any]]:
    """Every run (newest first) with whether it is current for its period and carriers."""
    where = f"WHERE r.period = {quote_literal(period)}" if period else ""
    return rows(
        wh.query_arrow(
            "SELECT r.run_id AS run_id, r.period AS period, r.carriers AS carriers,"
            " r.transactions AS transactions, r.input_records AS input_records,"
            " r.token_tolerance AS token_tolerance, r.amount_tolerance AS amount_tolerance,"
            " r.created_at AS created_at, a.current = r.run_id AS current"
            " FROM recon_runs AS r LEFT JOIN (SELECT period, carriers,"
            " argMax(run_id, activated_at) AS current FROM recon_activations"
            " GROUP BY period, carriers) AS a ON a.period = r.period AND a.carriers = r.carriers"
            f" {where} ORDER BY r.created_at DESC"
        )
    )


# ---- decisions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """A recorded decision and how many transactions it covers now."""

    run_id: str
    category: str
    transaction_id: str | None
    decision: str
    transactions: int
    amount: Decimal


def record_decision(
    wh: Warehouse,
    run_id: str,
    category: str,
    decision: str,
    transaction_id: str | None = None,
    note: str = "",
    decided_by: str | None = None,
) -> Decision:
    """Record ``accept`` or ``dispute`` for a category of a run, or one transaction of it.
    Raises ``ReconError`` for an unknown run, category or transaction."""
    run_id = check_run_id(run_id)
    if decision not in DECISIONS:
        raise ReconError(f"decision must be one of {', '.join(DECISIONS)}")
    if category not in DISCREPANCIES:
        raise ReconError(
            f"--category: one of {', '.join(DISCREPANCIES)} (matched transactions are settled"
            " without a decision)"
        )
    info = run_info(wh, run_id)
    where = f"run_id = {quote_literal(run_id)} AND category = {quote_literal(category)}"
    if transaction_id:
        where += f" AND transaction_id = {quote_literal(transaction_id)}"
    found = rows(
        wh.query_arrow(
            "SELECT count() AS n, sum(if(serving_records > 0, serving_amount, home_amount))"
            f" AS amount FROM recon_results WHERE {where}"
        )
    )[0]
    if transaction_id and not found["n"]:
        raise ReconError(
            f"--transaction: {transaction_id} is not in category {category} of run {run_id}"
        )
    seq = scalar(
        wh.query_arrow(
            f"SELECT count() FROM recon_decisions WHERE run_id = {quote_literal(run_id)}"
        )
    )
    wh.insert_arrow(
        "recon_decisions",
        pa.table(
            {
                "run_id": [run_id],
                "period": [info["period"]],
                "category": [category],
                "transaction_id": [transaction_id or ""],
                "decision": [decision],
                "note": [note],
                "decided_by": [decided_by if decided_by is not None else _user()],
                "decided_at": pa.array([_now()], pa.timestamp("us", tz="UTC")),
                "seq": pa.array([int(seq) + 1], pa.uint64()),
            }
        ),
    )
    return Decision(
        run_id,
        category,
        transaction_id,
        decision,
        int(found["n"]),
        Decimal(found["amount"] or 0).quantize(_MICRO),
    )


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return ""


def decided_results_sql(run_ids: Sequence[str], columns: str = "r.*") -> str:
    """SELECT over ``recon_results`` of the given runs with each transaction's effective
    decision as ``decision`` ('accept', 'dispute' or '' for none)."""
    ids = _array(run_ids)
    return f"""
        SELECT {columns},
               if(txd.tx_decision != '', txd.tx_decision, cat.cat_decision) AS decision
        FROM recon_results AS r
        LEFT JOIN (
            SELECT run_id AS cat_run, category AS cat_category,
                   argMax(decision, (decided_at, seq)) AS cat_decision
            FROM recon_decisions WHERE transaction_id = '' AND run_id IN {ids}
            GROUP BY run_id, category
        ) AS cat ON cat.cat_run = r.run_id AND cat.cat_category = r.category
        LEFT JOIN (
            SELECT run_id AS tx_run, transaction_id AS tx_id,
                   argMax(decision, (decided_at, seq)) AS tx_decision
            FROM recon_decisions WHERE transaction_id != '' AND run_id IN {ids}
            GROUP BY run_id, transaction_id
        ) AS txd ON txd.tx_run = r.run_id AND txd.tx_id = r.transaction_id
        WHERE r.run_id IN {ids}
    """


def decision_counts(wh: Warehouse, run_id: str) -> list[dict[str, Any]]:
    """Per category: transactions accepted, disputed and open (no decision), with the
    amounts the settlement would use (serving amount; home amount if no serving record)."""
    inner = decided_results_sql(
        [run_id],
        "r.category AS category, if(r.serving_records > 0, r.serving_amount, r.home_amount)"
        " AS amount",
    )
    return rows(
        wh.query_arrow(
            "SELECT category, countIf(decision = 'accept') AS accepted,"
            " countIf(decision = 'dispute') AS disputed, countIf(decision = '') AS open,"
            " sumIf(amount, decision = 'accept') AS accepted_amount,"
            " sumIf(amount, decision = 'dispute') AS disputed_amount,"
            " sumIf(amount, decision = '') AS open_amount"
            f" FROM ({inner}) WHERE category != 'matched' GROUP BY category"
            f" ORDER BY indexOf({_array(CATEGORIES)}, toString(category))"
        )
    )
