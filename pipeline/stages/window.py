"""Window: tumbling event-time windows (minute, hour, day) as additive partial sums.

Each batch becomes delta rows per (window, tenant, carriers, model, channel), written
within seconds of the events arriving; the rollup tables are plain sums of those rows.
An event whose minute window had closed when the broker received it (window end +
grace <= receive time) is *late*: its delta rows carry ``kind = 'late'`` and it gets a
row in ``usage_corrections``. Receive time comes from the log (LogAppendTime), so a
replay classifies every event the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from decimal import Decimal

import pyarrow as pa

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


def rollup_table(
    rated: Sequence[Rated], grain: str, grace_ms: int, ingested_at: datetime
) -> pa.Table:
    """Aggregate a batch into delta rows for one rollup table."""
    start_of = GRAINS[grain]
    acc: dict[tuple[object, ...], list[object]] = {}
    for r in rated:
        a = r.accepted
        rec = a.record
        key = (
            start_of(rec["event_time"]),
            rec["tenant_id"], rec["reporting_carrier"], rec["home_carrier"],
            rec["serving_carrier"], rec["model_id"], rec["channel"],
            "late" if is_late(r, grace_ms) else "stream",
            a.topic, a.partition,
        )  # fmt: skip
        row = acc.get(key)
        if row is None:
            row = acc[key] = [0, 0, 0, 0, 0, 0, Decimal(0), Decimal(0), -1]
        row[0] += 1  # type: ignore[operator]
        row[1] += 1 if r.rating.billable else 0  # type: ignore[operator]
        row[2] += rec["input_tokens"]  # type: ignore[operator]
        row[3] += rec["output_tokens"]  # type: ignore[operator]
        row[4] += rec["cached_tokens"]  # type: ignore[operator]
        row[5] += rec["reasoning_tokens"]  # type: ignore[operator]
        row[6] += r.rating.token_units  # type: ignore[operator]
        row[7] += r.rating.amount  # type: ignore[operator]
        row[8] = max(row[8], a.offset)  # type: ignore[call-overload]
    keys = list(acc)
    vals = [acc[k] for k in keys]
    cols: dict[str, list[object]] = {"period_start": [k[0] for k in keys]}
    for i, dim in enumerate(_DIMS, start=1):
        cols[dim] = [k[i] for k in keys]
    for i, name in enumerate(("events", "billable_events", *_COUNTS, "token_units", "amount")):
        cols[name] = [v[i] for v in vals]
    cols["kind"] = [k[7] for k in keys]
    cols["topic"] = [k[8] for k in keys]
    cols["partition"] = [k[9] for k in keys]
    cols["offset"] = [v[8] for v in vals]
    cols["ingested_at"] = [ingested_at] * len(keys)
    return pa.table(cols, schema=ROLLUP)


def corrections_table(rated: Sequence[Rated], grace_ms: int, ingested_at: datetime) -> pa.Table:
    """One row per late event."""
    late = [r for r in rated if is_late(r, grace_ms)]
    recs = [r.accepted.record for r in late]
    return pa.table(
        {
            "event_id": [x["event_id"] for x in recs],
            "reporting_carrier": [x["reporting_carrier"] for x in recs],
            "event_time": [x["event_time"] for x in recs],
            "window_start": [minute_start_s(x["event_time"]) for x in recs],
            "arrived_at": [r.accepted.arrived_ms for r in late],
            "lateness_s": [
                (
                    r.accepted.arrived_ms
                    - (minute_start_s(x["event_time"]) * 1000 + 60_000 + grace_ms)
                )
                / 1000
                for r, x in zip(late, recs, strict=True)
            ],
            "tenant_id": [x["tenant_id"] for x in recs],
            "home_carrier": [x["home_carrier"] for x in recs],
            "serving_carrier": [x["serving_carrier"] for x in recs],
            "model_id": [x["model_id"] for x in recs],
            "channel": [x["channel"] for x in recs],
            **{c: [x[c] for x in recs] for c in _COUNTS},
            "token_units": [r.rating.token_units for r in late],
            "amount": [r.rating.amount for r in late],
            "topic": [r.accepted.topic for r in late],
            "partition": [r.accepted.partition for r in late],
            "offset": [r.accepted.offset for r in late],
            "ingested_at": [ingested_at] * len(late),
        },
        schema=CORRECTIONS,
    )
