"""Re-rating: recompute the ratings of an event-time range after a price-card fix.

``rerate(wh, book, plans, start_ms, end_ms)`` prices every event of ``usage_events`` with
``start_ms <= event_time < end_ms`` again, with the given cards and tenant plans, and
corrects everything that holds its rating. It is what ``tokenmeter rerate`` runs.

What is re-rated, and with which tier usage
-------------------------------------------
Graduated plan tiers make an event's amount depend on the tenant's billable Token Units
earlier in the same plan period, in log order (partition, offset), exactly as the
worker counts them. So for every tenant on a plan, all its events of the plan periods
the range touches (the Beijing-time months from ``start`` to ``end``) are read in log
order; a running usage per (tenant, period) adds the *new* ``tier_usage_tu`` of events in
the range and the *stored* one of the others, and only the events in the range are
priced again (``RateStage``, i.e. ``PriceBook.rate``, the worker's own code). Tenants on
list price need only their events in the range. Events after ``end`` keep their stored
rating even if a re-rated event moved their tier position: extend ``--to`` to the end
of the period to carry such a change forward.

An event the new cards cannot price aborts the run before anything is written (the
range is never half re-rated and an event is never priced at zero); dead-lettered
``unpriced`` events are not in ``usage_events`` and are not re-rated here (replay them
through the worker).

A changed event is one whose new rating differs from the stored one in any of
``RATING_COLUMNS``. No changed event: nothing is written (so running a rerate twice
changes nothing the second time).

Writes, in this order, each step idempotent
-------------------------------------------
``run_id`` is ``rr_`` + a hash of the exact sorted list of (event key, old rating
including the run that last priced it, new rating): the same state and the same cards
give the same id (a crash-and-rerun), and no later run can reuse an id (every changed
event's ``rating_run`` becomes the run id, so its "old rating" differs next time).

1. ``rerate_runs``: a row with ``status = 'applying'`` and the run's header.
2. ``rerate_changes``: the journal, one row per changed event with old and new rating
   (one insert, checked by count). Everything below is derived from it.
3. ``usage_minute/hour/day``: delta rows (new - old) grouped like
   ``pipeline/stages/window.py`` (period in Beijing time, tenant, carriers, model,
   channel, partition), ``kind = 'rerate'``, ``topic = 'rerate:<run_id>'``,
   ``offset`` = the group's highest event offset. ``events`` and token counts do not
   move; ``billable_events``, ``token_units`` and ``amount`` do. Skipped when that topic
   already has rows (checked first), and sent with an ``insert_deduplication_token``.
4. ``usage_events``: the new ratings are loaded into a temporary ``Join`` table
   (``rerate_join_<hash>``, persistent, so a mutation interrupted by a crash resumes on
   the next open) and applied in place by one ``ALTER TABLE ... UPDATE ... = joinGet(...)``
   with ``mutations_sync = 2``; ``rating_run`` becomes the run id. The table stays one
   row per event, exact under plain ``sum()``.
5. ``rerate_runs``: ``status = 'done'`` with ``finished_at``; the Join table is dropped.

An interrupted run (``status = 'applying'`` and no ``done``) is finished by the next
``rerate`` before it plans anything: from its journal if the journal is complete
(steps 3-5 are idempotent), else it is marked ``abandoned`` (nothing else had been
written yet). A mutation that fails is never killed (that would leave ``usage_events``
half updated): ClickHouse retries it, and ``rerate`` waits for pending mutations first.

``usage_corrections`` is left as it is, on purpose: it is the log of what arrived after
its window closed, at the rating it arrived with, and its sums stay equal to the
rollups' ``kind = 'late'`` rows. A re-rating of a late event is a correction of its own
(``kind = 'rerate'`` rows, ``rerate_changes``); join ``usage_corrections`` to
``rated_usage`` on (reporting_carrier, event_id) for late events' current amounts.

``price_cards`` gets the loaded versions whose lines differ from what is stored (a fixed
price in an existing version, or a new version), so analysts' queries on it see the
prices the amounts were computed with.

Run it with the worker stopped: with the embedded warehouse the worker holds the chdb
directory (``open_warehouse`` raises ``WarehouseLockedError``); with a server, a running
worker keeps its in-memory tier counters and price cards until restarted. Deploy the
fixed cards to the worker too, or events arriving later are priced with the old ones.
One ``rerate`` at a time.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.metering.plans import BEIJING, TenantPlans
from pipeline.metering.pricing import PriceBook, Unpriced
from pipeline.stages.ingest import Accepted
from pipeline.stages.rate import Rated, RateStage
from pipeline.stages.window import GRAINS, ROLLUP
from pipeline.warehouse.base import Warehouse, WarehouseError, quote_ident, quote_literal
from pipeline.warehouse.price_cards import sync_price_cards, to_ms

log = logging.getLogger(__name__)

USAGE_TABLE = "usage_events"
RUNS_TABLE = "rerate_runs"
CHANGES_TABLE = "rerate_changes"
JOIN_PREFIX = "rerate_join_"
# The columns of usage_events that hold an event's rating (what a rerate may change).
RATING_COLUMNS = (
    "token_units",
    "amount",
    "list_amount",
    "price_card_version",
    "price_line",
    "billable",
    "tenant_plan",
    "plan_period",
    "tier_usage_tu",
)
_DECIMAL_RATING = frozenset({"token_units", "amount", "list_amount", "tier_usage_tu"})
_DIMS = ("tenant_id", "reporting_carrier", "home_carrier", "serving_carrier", "model_id", "channel")
_TOKENS = ("input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens")
_ZERO = Decimal("0.000000")
_MUTATION_WAIT_S = 600.0

DEC = pa.decimal128(38, 6)
TS = pa.timestamp("ms", tz="UTC")


def _rating_type(column: str) -> pa.DataType:
    if column in _DECIMAL_RATING:
        return DEC
    return pa.bool_() if column == "billable" else pa.string()


CHANGES = pa.schema(
    [
        ("run_id", pa.string()),
        ("reporting_carrier", pa.string()),
        ("event_id", pa.string()),
        ("event_time", TS),
        ("tenant_id", pa.string()),
        ("home_carrier", pa.string()),
        ("serving_carrier", pa.string()),
        ("model_id", pa.string()),
        ("channel", pa.string()),
        ("topic", pa.string()),
        ("partition", pa.uint32()),
        ("offset", pa.uint64()),
    ]
    + [(f"{age}_{c}", _rating_type(c)) for c in RATING_COLUMNS for age in ("old", "new")]
    + [("old_rating_run", pa.string()), ("recorded_at", TS)]
)


RUNS = pa.schema(
    [
        ("run_id", pa.string()),
        ("status", pa.string()),
        ("range_from", TS),
        ("range_to", TS),
        ("price_card_versions", pa.list_(pa.string())),
        ("price_card_source", pa.string()),
        ("events_in_range", pa.uint64()),
        ("events_rerated", pa.uint64()),
        ("old_token_units", DEC),
        ("new_token_units", DEC),
        ("old_amount", DEC),
        ("new_amount", DEC),
        ("old_list_amount", DEC),
        ("new_list_amount", DEC),
        ("started_at", TS),
        ("finished_at", TS),
        ("updated_at", TS),
    ]
)


class RerateError(Exception):
    """The rerate cannot go on; the message says why and what to do. Nothing half-done
    is left behind that the next run would not finish."""


class UnpricedEventsError(RerateError):
    """The new cards cannot price some events of the range; nothing was written.
    ``events`` holds ``(reporting_carrier, event_id, Unpriced)`` for each."""

    def __init__(self, events: list[tuple[str, str, Unpriced]]) -> None:
        self.events = events
        first = events[0]
        super().__init__(
            f"{len(events):,} event(s) of the range cannot be priced with these cards "
            f"(first: {first[0]} {first[1]}: {first[2].detail}); nothing was changed"
        )


@dataclass
class Totals:
    """Sums over a set of events (money and TU exact, as stored)."""

    events: int = 0
    token_units: Decimal = _ZERO
    amount: Decimal = _ZERO
    list_amount: Decimal = _ZERO


@dataclass
class RerateReport:
    """What a rerate found (and, unless a dry run, did).

    ``old``/``new``: the range's totals before and after; ``by_model``: model ->
    (old, new); ``by_version_old``/``by_version_new``: totals per price card version as
    stored before / as re-rated. ``changes``: the journal rows (``CHANGES`` schema).
    ``recovered``: interrupted runs this call finished (or abandoned) first.
    """

    start_ms: int
    end_ms: int
    versions: list[str]
    source: str
    run_id: str | None = None
    events_read: int = 0
    changed: int = 0
    old: Totals = field(default_factory=Totals)
    new: Totals = field(default_factory=Totals)
    by_model: dict[str, tuple[Totals, Totals]] = field(default_factory=dict)
    by_version_old: dict[str, Totals] = field(default_factory=dict)
    by_version_new: dict[str, Totals] = field(default_factory=dict)
    changes: pa.Table | None = None
    rollup_rows: dict[str, int] = field(default_factory=dict)
    price_cards_stored: list[str] = field(default_factory=list)
    recovered: list[tuple[str, str]] = field(default_factory=list)
    applied: bool = False
    seconds: dict[str, float] = field(default_factory=dict)


# ---- small helpers --------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(tz=UTC)


def _ms_literal(ms: int) -> str:
    return f"fromUnixTimestamp64Milli(toInt64({int(ms)}))"


def _month_start_ms(ms: int) -> int:
    """Start of the Beijing-time calendar month containing ``ms`` (UTC epoch ms)."""
    local = datetime.fromtimestamp(ms // 1000, tz=UTC) + BEIJING
    start = datetime(local.year, local.month, 1, tzinfo=UTC) - BEIJING
    return int(start.timestamp()) * 1000


def _next_month_start_ms(ms: int) -> int:
    local = datetime.fromtimestamp(ms // 1000, tz=UTC) + BEIJING
    year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    start = datetime(year, month, 1, tzinfo=UTC) - BEIJING
    return int(start.timestamp()) * 1000


def period_span_ms(start_ms: int, end_ms: int) -> tuple[int, int]:
    """The Beijing-time months that ``[start_ms, end_ms)`` touches, as ``[from, to)``
    epoch ms: every plan period (a month, or a day within one) of an event in the range
    lies inside it."""
    return _month_start_ms(start_ms), _next_month_start_ms(end_ms - 1)


def _fmt(value: Any) -> str:
    if isinstance(value, Decimal):
        return f"{value:.6f}"
    return str(value)


def run_id_for(entries: Iterable[tuple[str, str, tuple[Any, ...], tuple[Any, ...]]]) -> str:
    """``rr_`` + a hash of (reporting_carrier, event_id, old rating, new rating) entries,
    taken in sorted key order (so the id does not depend on reading order)."""
    digest = hashlib.sha256()
    for carrier, event_id, old, new in sorted(entries, key=lambda e: (e[0], e[1])):
        line = "\x1f".join([carrier, event_id, *map(_fmt, old), "->", *map(_fmt, new)])
        digest.update(line.encode())
        digest.update(b"\x1e")
    return "rr_" + digest.hexdigest()[:24]


def _scalar(wh: Warehouse, sql: str) -> Any:
    result = wh.query_arrow(sql)
    if result.num_rows == 0:
        return None
    return result.column(0)[0].as_py()


def _database(wh: Warehouse) -> str:
    return str(_scalar(wh, "SELECT currentDatabase() AS db"))


def _join_table(run_id: str) -> str:
    return JOIN_PREFIX + run_id.removeprefix("rr_")


def _topic(run_id: str) -> str:
    return f"rerate:{run_id}"


# ---- pending mutations and interrupted runs ----------------------------------------------


def wait_for_mutations(
    wh: Warehouse,
    tables: tuple[str, ...] = (USAGE_TABLE, CHANGES_TABLE, "price_cards"),
    timeout_s: float = _MUTATION_WAIT_S,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Block until the tables have no unfinished mutation (an interrupted rerate's
    ``UPDATE`` resumes when the warehouse is opened). Raises ``RerateError`` with
    ClickHouse's reason if one keeps failing past ``timeout_s``."""
    names = ", ".join(quote_literal(t) for t in tables)
    deadline = time.monotonic() + timeout_s
    while True:
        pending = wh.query_arrow(
            "SELECT table, mutation_id, latest_fail_reason AS reason FROM system.mutations "
            f"WHERE database = currentDatabase() AND table IN ({names}) AND is_done = 0"
        )
        if pending.num_rows == 0:
            return
        if time.monotonic() > deadline:
            row = pending.to_pylist()[0]
            raise RerateError(
                f"{row['table']}: mutation {row['mutation_id']} is still not finished after "
                f"{timeout_s:.0f} s ({row['reason'] or 'no error reported'}); ClickHouse keeps "
                "retrying it. Fix the cause and run `tokenmeter rerate` again"
            )
        sleep(0.2)


def _latest_runs(wh: Warehouse, run_ids: list[str] | None = None) -> dict[str, dict[str, Any]]:
    where = ""
    if run_ids is not None:
        if not run_ids:
            return {}
        where = f"WHERE run_id IN ({', '.join(quote_literal(r) for r in run_ids)})"
    result = wh.query_arrow(f"SELECT * FROM {RUNS_TABLE} FINAL {where} ORDER BY run_id")
    return {r["run_id"]: r for r in result.to_pylist()} if result.num_rows else {}


def recover(wh: Warehouse) -> list[tuple[str, str]]:
    """Finish every interrupted run (status ``applying``) from its journal, or mark it
    ``abandoned`` when its journal is incomplete (then nothing else was written), and drop
    leftover Join tables. Returns ``[(run_id, "finished" | "abandoned")]``."""
    wait_for_mutations(wh)
    done: list[tuple[str, str]] = []
    for run_id, header in _latest_runs(wh).items():
        if header["status"] != "applying":
            continue
        journal = int(
            _scalar(
                wh,
                f"SELECT count() FROM {CHANGES_TABLE} WHERE run_id = {quote_literal(run_id)}",
            )
        )
        if journal == int(header["events_rerated"]):
            log.warning("rerate: finishing interrupted run %s from its journal", run_id)
            _finish(wh, run_id, header)
            done.append((run_id, "finished"))
        else:
            log.warning("rerate: abandoning run %s (its journal is incomplete)", run_id)
            wh.execute(
                f"ALTER TABLE {CHANGES_TABLE} DELETE WHERE run_id = {quote_literal(run_id)} "
                "SETTINGS mutations_sync = 2"
            )
            wh.execute(f"DROP TABLE IF EXISTS {quote_ident(_join_table(run_id))}")
            _write_run(wh, {**header, "status": "abandoned", "updated_at": _now()})
            done.append((run_id, "abandoned"))
    # Join tables of runs that are over (a crash between 'done' and the drop).
    leftovers = wh.query_arrow(
        "SELECT name FROM system.tables WHERE database = currentDatabase() "
        f"AND name LIKE {quote_literal(JOIN_PREFIX + '%')}"
    )
    for name in leftovers.column("name").to_pylist() if leftovers.num_rows else []:
        wh.execute(f"DROP TABLE IF EXISTS {quote_ident(name)}")
    return done


# ---- planning (read only) ---------------------------------------------------------------

_READ_COLUMNS = (
    "reporting_carrier, event_id, toUnixTimestamp64Milli(event_time) AS event_ms, tenant_id, "
    "home_carrier, serving_carrier, model_id, channel, status, input_tokens, output_tokens, "
    "cached_tokens, reasoning_tokens, token_units, amount, list_amount, price_card_version, "
    "price_line, billable, tenant_plan, plan_period, tier_usage_tu, rating_run, topic, "
    "partition, offset"
)


def plan_rerate(
    wh: Warehouse,
    book: PriceBook,
    plans: TenantPlans,
    start_ms: int,
    end_ms: int,
    source: str = "",
) -> RerateReport:
    """Re-rate the range in memory and compare with what is stored. Writes nothing.

    Raises ``UnpricedEventsError`` if the cards cannot price an event of the range."""
    if end_ms <= start_ms:
        raise RerateError("--to must be after --from")
    report = RerateReport(start_ms, end_ms, book.versions, source)
    started = time.monotonic()
    in_range = f"event_time >= {_ms_literal(start_ms)} AND event_time < {_ms_literal(end_ms)}"
    tenants = wh.query_arrow(f"SELECT DISTINCT tenant_id FROM {USAGE_TABLE} WHERE {in_range}")
    names = tenants.column("tenant_id").to_pylist() if tenants.num_rows else []
    planned = sorted(t for t in names if plans.plan_for(t) is not None)
    where = f"({in_range})"
    if planned:
        span_from, span_to = period_span_ms(start_ms, end_ms)
        where += (
            f" OR (tenant_id IN ({', '.join(quote_literal(t) for t in planned)}) "
            f"AND event_time >= {_ms_literal(span_from)} AND event_time < {_ms_literal(span_to)})"
        )
    data = wh.query_arrow(
        f"SELECT {_READ_COLUMNS} FROM {USAGE_TABLE} WHERE {where} "
        "ORDER BY partition, offset, topic, reporting_carrier, event_id"
    )
    report.events_read = data.num_rows
    report.seconds["read"] = time.monotonic() - started
    started = time.monotonic()
    if data.num_rows:
        _rate_and_compare(report, data, RateStage(book, plans))
    report.seconds["rate"] = time.monotonic() - started
    return report


def _rate_in_log_order(
    report: RerateReport, c: dict[str, list[Any]], rater: RateStage
) -> tuple[dict[int, Rated], list[tuple[str, str, Unpriced]]]:
    """Rate the range's events in log order, runs of consecutive in-range events in one
    ``RateStage.rate`` call; out-of-range events add their stored tier usage."""
    start_ms, end_ms = report.start_ms, report.end_ms
    ratings: dict[int, Rated] = {}
    unpriced: list[tuple[str, str, Unpriced]] = []
    batch: list[Accepted] = []
    index: dict[int, int] = {}  # id(Accepted) -> row

    def flush() -> None:
        rated, bad = rater.rate(batch)
        for r in rated:
            ratings[index[id(r.accepted)]] = r
        for acc, why in bad:
            i = index[id(acc)]
            unpriced.append((c["reporting_carrier"][i], c["event_id"][i], why))
        batch.clear()
        index.clear()

    for i, event_ms in enumerate(c["event_ms"]):
        if not start_ms <= event_ms < end_ms:
            if batch:
                flush()
            # context for the tier position: the stored rating stands
            rater.add_usage(c["tenant_id"][i], c["plan_period"][i], c["tier_usage_tu"][i])
            continue
        record = {
            "event_time": event_ms,
            "tenant_id": c["tenant_id"][i],
            "serving_carrier": c["serving_carrier"][i],
            "model_id": c["model_id"][i],
            "status": c["status"][i],
            **{name: int(c[name][i]) for name in _TOKENS},
        }
        acc = Accepted(record, 0, c["topic"][i], c["partition"][i], c["offset"][i])
        index[id(acc)] = i
        batch.append(acc)
    if batch:
        flush()
    return ratings, unpriced


_RATED_FIELDS = (
    "event_ms",
    "tenant_id",
    "serving_carrier",
    "model_id",
    "status",
    *_TOKENS,
    "topic",
    "partition",
    "offset",
    "plan_period",
    "tier_usage_tu",
    "reporting_carrier",
    "event_id",
)


def _rate_and_compare(report: RerateReport, data: pa.Table, rater: RateStage) -> None:
    """Rate in log order (Python, the worker's code), then compare and total with Arrow."""
    c = {name: data.column(name).to_pylist() for name in _RATED_FIELDS}
    ratings, unpriced = _rate_in_log_order(report, c, rater)
    if unpriced:
        raise UnpricedEventsError(unpriced)
    rows = sorted(ratings)
    old = data.take(pa.array(rows, pa.int64()))
    rated = [ratings[i] for i in rows]
    new = pa.table(
        {
            "token_units": pa.array([r.rating.token_units for r in rated], DEC),
            "amount": pa.array([r.rating.amount for r in rated], DEC),
            "list_amount": pa.array([r.rating.list_amount for r in rated], DEC),
            "price_card_version": pa.array(
                [r.rating.price_card_version for r in rated], pa.string()
            ),
            "price_line": pa.array([r.rating.price_line for r in rated], pa.string()),
            "billable": pa.array([r.rating.billable for r in rated], pa.bool_()),
            "tenant_plan": pa.array([r.plan or "" for r in rated], pa.string()),
            "plan_period": pa.array([r.period for r in rated], pa.string()),
            "tier_usage_tu": pa.array([r.rating.tier_usage_tu for r in rated], DEC),
        }
    )
    differs = pa.array([False] * len(rows), pa.bool_())
    for name in RATING_COLUMNS:
        before = old.column(name).cast(new.column(name).type)
        differs = pc.or_(differs, pc.not_equal(before, new.column(name)))
    _totals(report, old, new)
    changed_old, changed_new = old.filter(differs), new.filter(differs)
    report.changed = changed_old.num_rows
    if report.changed == 0:
        return
    old_cols = {n: changed_old.column(n).to_pylist() for n in (*RATING_COLUMNS, "rating_run")}
    new_cols = {n: changed_new.column(n).to_pylist() for n in RATING_COLUMNS}
    entries = [
        (
            carrier,
            event_id,
            (*(old_cols[n][k] for n in RATING_COLUMNS), old_cols["rating_run"][k]),
            tuple(new_cols[n][k] for n in RATING_COLUMNS),
        )
        for k, (carrier, event_id) in enumerate(
            zip(
                changed_old.column("reporting_carrier").to_pylist(),
                changed_old.column("event_id").to_pylist(),
                strict=True,
            )
        )
    ]
    report.run_id = run_id_for(entries)
    report.changes = _journal(report.run_id, changed_old, changed_new)


def _sum(column: pa.ChunkedArray | pa.Array) -> Decimal:
    value = pc.sum(column).as_py()
    return _ZERO if value is None else Decimal(value)


def _group_totals(keys: pa.ChunkedArray, values: pa.Table) -> dict[str, Totals]:
    grouped = (
        pa.table({"k": keys.cast(pa.string()), **{n: values.column(n) for n in _SUMMED}})
        .group_by("k", use_threads=False)
        .aggregate([("k", "count"), *((n, "sum") for n in _SUMMED)])
    )
    out = {}
    for row in grouped.to_pylist():
        out[row["k"]] = Totals(
            row["k_count"], row["token_units_sum"], row["amount_sum"], row["list_amount_sum"]
        )
    return dict(sorted(out.items()))


_SUMMED = ("token_units", "amount", "list_amount")


def _totals(report: RerateReport, old: pa.Table, new: pa.Table) -> None:
    n = old.num_rows
    report.old = Totals(n, *(_sum(old.column(c)) for c in _SUMMED))
    report.new = Totals(n, *(_sum(new.column(c)) for c in _SUMMED))
    report.by_version_old = _group_totals(old.column("price_card_version"), old)
    report.by_version_new = _group_totals(new.column("price_card_version"), new)
    models = old.column("model_id")
    by_old, by_new = _group_totals(models, old), _group_totals(models, new)
    report.by_model = {m: (by_old[m], by_new[m]) for m in by_old}


def _journal(run_id: str, old: pa.Table, new: pa.Table) -> pa.Table:
    """Journal rows (``CHANGES``) from the changed events' stored and new ratings."""
    cols: dict[str, Any] = {"run_id": pa.array([run_id] * old.num_rows, pa.string())}
    for name in (
        "reporting_carrier",
        "event_id",
        "tenant_id",
        "home_carrier",
        "serving_carrier",
        "model_id",
        "channel",
        "topic",
        "partition",
        "offset",
    ):
        cols[name] = old.column(name)
    cols["event_time"] = pc.cast(old.column("event_ms"), pa.int64()).cast(TS)
    for name in RATING_COLUMNS:
        cols[f"old_{name}"] = old.column(name)
        cols[f"new_{name}"] = new.column(name)
    cols["old_rating_run"] = old.column("rating_run")
    cols["recorded_at"] = pa.array([_now()] * old.num_rows, TS)
    table = pa.table({f.name: cols[f.name].cast(f.type) for f in CHANGES}, schema=CHANGES)
    return table.sort_by([("reporting_carrier", "ascending"), ("event_id", "ascending")])


# ---- applying ---------------------------------------------------------------------------


def rollup_deltas(changes: pa.Table, grain: str, run_id: str, ingested_at: datetime) -> pa.Table:
    """Delta rows (new - old) for one rollup table from journal rows, grouped like
    ``pipeline/stages/window.py`` plus the event's partition. Groups whose deltas are all
    zero are left out. Deterministic: the same journal gives the same rows, in order."""
    start_of = GRAINS[grain]
    c = {name: changes.column(name).to_pylist() for name in changes.column_names}
    times = changes.column("event_time").cast(pa.int64()).to_pylist()
    acc: dict[tuple[Any, ...], list[Any]] = {}
    for i, event_ms in enumerate(times):
        key = (
            start_of(event_ms),
            *(c[d][i] for d in _DIMS),
            c["partition"][i],
        )
        row = acc.get(key)
        if row is None:
            row = acc[key] = [0, _ZERO, _ZERO, -1]
        row[0] += int(c["new_billable"][i]) - int(c["old_billable"][i])
        row[1] += c["new_token_units"][i] - c["old_token_units"][i]
        row[2] += c["new_amount"][i] - c["old_amount"][i]
        row[3] = max(row[3], c["offset"][i])
    keys = sorted(k for k, v in acc.items() if v[0] or v[1] or v[2])
    n = len(keys)
    cols: dict[str, list[Any]] = {"period_start": [k[0] for k in keys]}
    for j, dim in enumerate(_DIMS, start=1):
        cols[dim] = [k[j] for k in keys]
    cols["events"] = [0] * n
    cols["billable_events"] = [acc[k][0] for k in keys]
    for name in _TOKENS:
        cols[name] = [0] * n
    cols["token_units"] = [acc[k][1] for k in keys]
    cols["amount"] = [acc[k][2] for k in keys]
    cols["kind"] = ["rerate"] * n
    cols["topic"] = [_topic(run_id)] * n
    cols["partition"] = [k[len(_DIMS) + 1] for k in keys]
    cols["offset"] = [acc[k][3] for k in keys]
    cols["ingested_at"] = [ingested_at] * n
    return pa.table(cols, schema=ROLLUP)


def _write_run(wh: Warehouse, header: dict[str, Any]) -> None:
    row = {f.name: header.get(f.name) for f in RUNS}
    wh.insert_arrow(RUNS_TABLE, pa.Table.from_pylist([row], schema=RUNS))


def _header(report: RerateReport, status: str, now: datetime) -> dict[str, Any]:
    assert report.run_id is not None
    return {
        "run_id": report.run_id,
        "status": status,
        "range_from": report.start_ms,
        "range_to": report.end_ms,
        "price_card_versions": report.versions,
        "price_card_source": report.source,
        "events_in_range": report.old.events,
        "events_rerated": report.changed,
        "old_token_units": report.old.token_units,
        "new_token_units": report.new.token_units,
        "old_amount": report.old.amount,
        "new_amount": report.new.amount,
        "old_list_amount": report.old.list_amount,
        "new_list_amount": report.new.list_amount,
        "started_at": now,
        "finished_at": None,
        "updated_at": now,
    }


def apply_rerate(wh: Warehouse, report: RerateReport) -> None:
    """Write a planned run (steps 1-5 of the module doc). No-op without changes."""
    if report.run_id is None or report.changes is None:
        return
    run_id = report.run_id
    started = time.monotonic()
    header = _latest_runs(wh, [run_id]).get(run_id)
    if header is not None and header["status"] == "done":  # pragma: no cover - id reuse
        raise RerateError(f"run {run_id} is already recorded as done")
    if header is None or header["status"] != "applying":
        header = _header(report, "applying", _now())
        _write_run(wh, header)
    where = f"run_id = {quote_literal(run_id)}"
    stored = int(_scalar(wh, f"SELECT count() FROM {CHANGES_TABLE} WHERE {where}"))
    if stored != report.changed:
        if stored:
            raise RerateError(
                f"{CHANGES_TABLE} holds {stored} of {report.changed} rows of run {run_id}; "
                "run `tokenmeter rerate` again to clean it up"
            )
        wh.insert_arrow(CHANGES_TABLE, report.changes, dedup_token=f"{run_id}-journal")
    report.rollup_rows = _finish(wh, run_id, header)
    report.applied = True
    report.seconds["write"] = time.monotonic() - started


def _finish(wh: Warehouse, run_id: str, header: dict[str, Any]) -> dict[str, int]:
    """Steps 3-5 from the journal; each is skipped if already done."""
    changes = wh.query_arrow(
        f"SELECT * FROM {CHANGES_TABLE} WHERE run_id = {quote_literal(run_id)} "
        "ORDER BY reporting_carrier, event_id"
    )
    written: dict[str, int] = {}
    topic = quote_literal(_topic(run_id))
    now = _now()
    for grain in GRAINS:
        if int(_scalar(wh, f"SELECT count() FROM {grain} WHERE topic = {topic}")):
            written[grain] = 0
            continue
        deltas = rollup_deltas(changes, grain, run_id, now)
        wh.insert_arrow(grain, deltas, dedup_token=f"{grain}-{run_id}")
        written[grain] = deltas.num_rows
    _update_usage_events(wh, run_id)
    _write_run(wh, {**header, "status": "done", "finished_at": _now(), "updated_at": _now()})
    wh.execute(f"DROP TABLE IF EXISTS {quote_ident(_join_table(run_id))}")
    return written


def _update_usage_events(wh: Warehouse, run_id: str) -> None:
    join = _join_table(run_id)
    wh.execute(f"DROP TABLE IF EXISTS {quote_ident(join)}")
    wh.execute(
        f"CREATE TABLE {quote_ident(join)} (reporting_carrier String, event_id String, "
        "token_units Decimal(38, 6), amount Decimal(38, 6), list_amount Decimal(38, 6), "
        "price_card_version String, price_line String, billable Bool, tenant_plan String, "
        "plan_period String, tier_usage_tu Decimal(38, 6), hit UInt8) "
        "ENGINE = Join(ANY, LEFT, reporting_carrier, event_id)"
    )
    news = ", ".join(f"new_{c}" for c in RATING_COLUMNS)
    wh.execute(
        f"INSERT INTO {quote_ident(join)} SELECT toString(reporting_carrier), event_id, {news}, 1 "
        f"FROM {CHANGES_TABLE} WHERE run_id = {quote_literal(run_id)}"
    )
    # joinGet needs the database in the name: mutations run without a default database
    qualified = quote_literal(f"{_database(wh)}.{join}")

    def get(column: str) -> str:
        return f"joinGet({qualified}, {quote_literal(column)}, reporting_carrier, event_id)"

    sets = ", ".join(f"{c} = {get(c)}" for c in RATING_COLUMNS)
    wh.execute(
        f"ALTER TABLE {USAGE_TABLE} UPDATE {sets}, rating_run = {quote_literal(run_id)} "
        f"WHERE {get('hit')} = 1 SETTINGS mutations_sync = 2"
    )


def rerate(
    wh: Warehouse,
    book: PriceBook,
    plans: TenantPlans,
    start_ms: int,
    end_ms: int,
    dry_run: bool = False,
    source: str = "",
) -> RerateReport:
    """Finish interrupted runs, plan, and (unless ``dry_run``) apply. See the module doc."""
    recovered: list[tuple[str, str]] = []
    if dry_run:
        wait_for_mutations(wh)
        recovered = [
            (run_id, "interrupted; the next rerate (without --dry-run) finishes it")
            for run_id, header in _latest_runs(wh).items()
            if header["status"] == "applying"
        ]
    else:
        recovered = recover(wh)
    report = plan_rerate(wh, book, plans, start_ms, end_ms, source)
    report.recovered = recovered
    if not dry_run:
        apply_rerate(wh, report)
        report.price_cards_stored = sync_price_cards(wh, book)
    return report


__all__ = [
    "CHANGES",
    "RATING_COLUMNS",
    "RerateError",
    "RerateReport",
    "Totals",
    "UnpricedEventsError",
    "WarehouseError",
    "apply_rerate",
    "period_span_ms",
    "plan_rerate",
    "recover",
    "rerate",
    "rollup_deltas",
    "run_id_for",
    "sync_price_cards",
    "to_ms",
    "wait_for_mutations",
]
