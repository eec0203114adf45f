"""Window: tumbling event-time windows (minute, hour, day) as additive partial sums.

Each batch becomes delta rows per (window, tenant, carriers, model, channel), written
within seconds of the events arriving; the rollup tables are plain sums of those rows.
An event whose minute window had closed when the broker received it (window end +
grace <= receive time) is *late*: its delta rows carry ``kind = 'late'`` and it gets a
row in ``usage_corrections``. Receive time comes from the log (LogAppendTime), so a
replay classifies every event the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.metering.plans import day_start_s, hour_start_s, minute_start_s
from pipeline.stages.rate import Rated

DEC = pa.decimal128(38, 6)
TS = pa.timestamp("ms", tz="UTC")
PERIOD = pa.timestamp("s", tz="UTC")

GRAINS: dict[str, Callable[[int], int]] = {
    "usage_minute": minute_start_s,
    "usage_hour": hour_start_s,
    "usage_day": day_start_s,
}
_DIMS = ("tenant_id", "reporting_carrier", "home_carrier", "serving_carrier", "model_id", "channel")
_COUNTS = ("input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens")

ROLLUP = pa.schema(
    [("period_start", PERIOD)]
    + [(d, pa.string()) for d in _DIMS]
    + [("events", pa.int64()), ("billable_events", pa.int64())]
    + [(c, pa.int64()) for c in _COUNTS]
    + [("token_units", DEC), ("amount", DEC), ("kind", pa.string())]
    + [("topic", pa.string()), ("partition", pa.uint32()), ("offset", pa.uint64())]
    + [("ingested_at", TS)]
)

CORRECTIONS = pa.schema(
    [
        ("event_id", pa.string()),
        ("reporting_carrier", pa.string()),
        ("event_time", TS),
        ("window_start", PERIOD),
        ("arrived_at", TS),
        ("lateness_s", pa.float64()),
        ("tenant_id", pa.string()),
        ("home_carrier", pa.string()),
        ("serving_carrier", pa.string()),
        ("model_id", pa.string()),
        ("channel", pa.string()),
    ]
    + [(c, pa.int64()) for c in _COUNTS]
    + [("token_units", DEC), ("amount", DEC)]
    + [("topic", pa.string()), ("partition", pa.uint32()), ("offset", pa.uint64())]
    + [("ingested_at", TS)]
)


def is_late(rated: Rated, grace_ms: int) -> bool:
    """True when the event's minute window had closed when the broker received it."""
    window_end_ms = (rated.accepted.record["event_time"] // 60_000 + 1) * 60_000
    return rated.accepted.arrived_ms >= window_end_ms + grace_ms


_BEIJING_S = 8 * 3600


def _period_starts(ms: pa.Array, grain: str) -> pa.Array:
    """Window start (epoch seconds) per event, vectorised; see plans.*_start_s."""
    secs = pc.divide(ms, 1000)  # integer division: event times are after 1970
    if grain == "usage_minute":
        return pc.multiply(pc.divide(secs, 60), 60)
    if grain == "usage_hour":
        return pc.multiply(pc.divide(secs, 3600), 3600)
    local_day = pc.divide(pc.add(secs, _BEIJING_S), 86_400)
    return pc.subtract(pc.multiply(local_day, 86_400), _BEIJING_S)


def late_mask(events: pa.Table, grace_ms: int) -> pa.Array:
    """Per row of a usage_events batch (with ``arrived_ms``): was its window closed?"""
    ms = pc.cast(events.column("event_time"), pa.int64())
    window_end = pc.multiply(pc.add(pc.divide(ms, 60_000), 1), 60_000)
    return pc.greater_equal(events.column("arrived_ms"), pc.add(window_end, grace_ms))


def rollup_table(events: pa.Table, grain: str, grace_ms: int, ingested_at: datetime) -> pa.Table:
    """Aggregate a usage_events batch (plus ``arrived_ms``) into delta rows for one
    rollup table, with Arrow's group-by (no Python loop per event)."""
    if grain not in GRAINS:
        raise KeyError(grain)
    ms = pc.cast(events.column("event_time"), pa.int64())
    work = pa.table(
        {
            "period_start": _period_starts(ms, grain),
            **{d: events.column(d) for d in _DIMS},
            "kind": pc.if_else(late_mask(events, grace_ms), "late", "stream"),
            "topic": events.column("topic"),
            "partition": events.column("partition"),
            "events": pa.array(np.ones(events.num_rows, dtype=np.int64)),
            "billable_events": pc.cast(events.column("billable"), pa.int64()),
            **{c: pc.cast(events.column(c), pa.int64()) for c in _COUNTS},
            "token_units": events.column("token_units"),
            "amount": events.column("amount"),
            "offset": events.column("offset"),
        }
    )
    return _aggregate(work, ingested_at)


def rollup_from_minutes(minutes: pa.Table, grain: str, ingested_at: datetime) -> pa.Table:
    """The hour or day delta rows of a batch from its minute delta rows (``rollup_table``
    with ``usage_minute``): a minute lies in one hour and one Beijing day, and ``kind`` is
    decided per minute window, so regrouping the minute rows gives exactly the rows
    ``rollup_table`` gives from the events, for a fraction of the work."""
    if grain not in GRAINS:
        raise KeyError(grain)
    secs = pc.cast(minutes.column("period_start"), pa.int64())
    work = pa.table(
        {
            "period_start": _period_starts(pc.multiply(secs, 1000), grain),
            **{d: minutes.column(d) for d in _DIMS},
            "kind": minutes.column("kind"),
            "topic": minutes.column("topic"),
            "partition": minutes.column("partition"),
            "events": minutes.column("events"),
            "billable_events": minutes.column("billable_events"),
            **{c: minutes.column(c) for c in _COUNTS},
            "token_units": minutes.column("token_units"),
            "amount": minutes.column("amount"),
            "offset": minutes.column("offset"),
        }
    )
    return _aggregate(work, ingested_at)


def _aggregate(work: pa.Table, ingested_at: datetime) -> pa.Table:
    keys = ["period_start", *_DIMS, "kind", "topic", "partition"]
    grouped = work.group_by(keys, use_threads=False).aggregate(
        [("events", "sum"), ("billable_events", "sum")]
        + [(c, "sum") for c in _COUNTS]
        + [("token_units", "sum"), ("amount", "sum"), ("offset", "max")]
    )
    n = grouped.num_rows
    return pa.table(
        {
            "period_start": pc.cast(grouped.column("period_start"), pa.int64()).cast(PERIOD),
            **{d: grouped.column(d) for d in _DIMS},
            "events": grouped.column("events_sum"),
            "billable_events": grouped.column("billable_events_sum"),
            **{c: grouped.column(f"{c}_sum") for c in _COUNTS},
            "token_units": grouped.column("token_units_sum").cast(DEC),
            "amount": grouped.column("amount_sum").cast(DEC),
            "kind": grouped.column("kind"),
            "topic": grouped.column("topic"),
            "partition": grouped.column("partition"),
            "offset": grouped.column("offset_max"),
            "ingested_at": pa.array([ingested_at] * n, TS),
        },
        schema=ROLLUP,
    )


def corrections_table(events: pa.Table, grace_ms: int, ingested_at: datetime) -> pa.Table:
    """One row per late event of a usage_events batch (plus ``arrived_ms``)."""
    late = events.filter(late_mask(events, grace_ms))
    ms = pc.cast(late.column("event_time"), pa.int64())
    window_start = _period_starts(ms, "usage_minute")
    closed_ms = pc.add(pc.add(pc.multiply(window_start, 1000), 60_000), grace_ms)
    lateness = pc.divide(
        pc.cast(pc.subtract(late.column("arrived_ms"), closed_ms), pa.float64()), 1000.0
    )
    cols = {name: late.column(name) for name in CORRECTIONS.names if name in late.column_names}
    cols["window_start"] = pc.cast(window_start, pa.int64()).cast(PERIOD)
    cols["arrived_at"] = pc.cast(late.column("arrived_ms"), pa.int64()).cast(TS)
    cols["lateness_s"] = lateness
    cols["ingested_at"] = pa.array([ingested_at] * late.num_rows, TS)
    return pa.table({name: cols[name] for name in CORRECTIONS.names}, schema=CORRECTIONS)
