"""Arrow batches for the tables the worker writes, typed to match the migrations.

One builder per table, fed with the stages' dataclasses; both backends take these
batches unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:
    from pipeline.dead_letters import DeadLetter
    from pipeline.stages.rate import Rated

TS = pa.timestamp("ms", tz="UTC")
DEC = pa.decimal128(38, 6)

USAGE_EVENTS = pa.schema(
    [
        ("event_id", pa.string()),
        ("event_time", TS),
        ("source", pa.string()),
        ("source_id", pa.string()),
        ("reporting_carrier", pa.string()),
        ("home_carrier", pa.string()),
        ("serving_carrier", pa.string()),
        ("transaction_id", pa.string()),
        ("tenant_id", pa.string()),
        ("subscriber_id", pa.string()),
        ("channel", pa.string()),
        ("model_id", pa.string()),
        ("provider", pa.string()),
        ("input_tokens", pa.uint64()),
        ("output_tokens", pa.uint64()),
        ("cached_tokens", pa.uint64()),
        ("reasoning_tokens", pa.uint64()),
        ("status", pa.string()),
        ("routing_policy", pa.string()),
        ("latency_ms", pa.uint64()),
        ("region", pa.string()),
        ("attributes", pa.map_(pa.string(), pa.string())),
        ("payload_hash", pa.int64()),
        ("payload_hash_version", pa.uint8()),  # 1 here (events.payload_hash), 2 columnar
        ("token_units", DEC),
        ("amount", DEC),
        ("list_amount", DEC),
        ("currency", pa.string()),
        ("price_card_version", pa.string()),
        ("price_line", pa.string()),
        ("billable", pa.bool_()),
        ("tenant_plan", pa.string()),
        ("plan_period", pa.string()),
        ("tier_usage_tu", DEC),
        ("rating_run", pa.string()),
        ("topic", pa.string()),
        ("partition", pa.uint32()),
        ("offset", pa.uint64()),
        ("ingested_at", TS),
    ]
)
_RECORD_FIELDS = [f.name for f in USAGE_EVENTS][:22]

DEAD_LETTERS = pa.schema(
    [
        ("reason", pa.string()),
        ("stage", pa.string()),
        ("detail", pa.string()),
        ("event_id", pa.string()),
        ("reporting_carrier", pa.string()),
        ("tenant_id", pa.string()),
        ("event_time", TS),
        ("payload", pa.binary()),
        ("payload_format", pa.string()),
        ("topic", pa.string()),
        ("partition", pa.uint32()),
        ("offset", pa.uint64()),
        ("failed_at", TS),
        ("ingested_at", TS),
    ]
)


def usage_events_table(rated: Sequence[Rated], ingested_at: datetime) -> pa.Table:
    """Rows for ``usage_events``: the event, its rating and its Kafka position."""
    accepted = [r.accepted for r in rated]
    ratings = [r.rating for r in rated]
    cols: dict[str, list[object]] = {
        name: [a.record[name] for a in accepted] for name in _RECORD_FIELDS
    }
    cols["attributes"] = [list((a.record["attributes"] or {}).items()) for a in accepted]
    cols["payload_hash"] = [a.payload_hash for a in accepted]
    cols["payload_hash_version"] = [1] * len(accepted)
    cols["token_units"] = [x.token_units for x in ratings]
    cols["amount"] = [x.amount for x in ratings]
    cols["list_amount"] = [x.list_amount for x in ratings]
    cols["currency"] = [x.currency for x in ratings]
    cols["price_card_version"] = [x.price_card_version for x in ratings]
    cols["price_line"] = [x.price_line for x in ratings]
    cols["billable"] = [x.billable for x in ratings]
    cols["tenant_plan"] = [r.plan or "" for r in rated]
    cols["plan_period"] = [r.period for r in rated]
    cols["tier_usage_tu"] = [x.tier_usage_tu for x in ratings]
    cols["rating_run"] = ["stream"] * len(rated)
    cols["topic"] = [a.topic for a in accepted]
    cols["partition"] = [a.partition for a in accepted]
    cols["offset"] = [a.offset for a in accepted]
    cols["ingested_at"] = [ingested_at] * len(accepted)
    return pa.table(cols, schema=USAGE_EVENTS)


def dead_letters_table(letters: Sequence[DeadLetter], ingested_at: datetime) -> pa.Table:
    """Rows for ``dead_letters``."""
    return pa.table(
        {
            "reason": [d.reason for d in letters],
            "stage": [d.stage for d in letters],
            "detail": [d.detail for d in letters],
            "event_id": [d.event_id for d in letters],
            "reporting_carrier": [d.reporting_carrier for d in letters],
            "tenant_id": [d.tenant_id for d in letters],
            "event_time": [d.event_time_ms for d in letters],
            "payload": [d.payload for d in letters],
            "payload_format": [d.payload_format for d in letters],
            "topic": [d.topic for d in letters],
            "partition": [d.partition for d in letters],
            "offset": [d.offset for d in letters],
            "failed_at": [d.failed_at_ms for d in letters],
            "ingested_at": [ingested_at] * len(letters),
        },
        schema=DEAD_LETTERS,
    )
