"""The worker's questions to the warehouse about the usage it stored, in one place.

Each function builds one query (names quoted, values as literals of their own type) and
returns plain values; the pipeline and the sink never write SQL themselves.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

from pipeline.warehouse.base import Warehouse, quote_ident, quote_literal


def _partitions(partitions: Iterable[int]) -> str:
    return ", ".join(str(int(p)) for p in sorted(set(partitions)))


def high_water_marks(
    wh: Warehouse, table: str, topic: str, partitions: Iterable[int]
) -> dict[int, int]:
    """The highest stored offset per partition of ``topic`` in ``table`` (partitions
    with nothing stored are absent)."""
    result = wh.query_arrow(
        f"SELECT partition, max(offset) AS mark FROM {quote_ident(table)} "
        f"WHERE topic = {quote_literal(topic)} AND partition IN ({_partitions(partitions)}) "
        "GROUP BY partition"
    )
    if not result.num_rows:
        return {}
    return {
        int(p): int(m)
        for p, m in zip(
            result.column("partition").to_pylist(), result.column("mark").to_pylist(), strict=True
        )
    }


def stored_dedup_keys(
    wh: Warehouse, topic: str, partitions: Iterable[int], since_ms: int
) -> pa.Table:
    """The dedup entries of the events stored from these partitions with an event time
    from ``since_ms`` on: reporting_carrier, event_id, payload_hash, partition, offset,
    ms (event time), payload_hash_version."""
    return wh.query_arrow(
        "SELECT reporting_carrier, event_id, payload_hash, partition, offset, "
        "toUnixTimestamp64Milli(event_time) AS ms, payload_hash_version FROM usage_events "
        f"WHERE topic = {quote_literal(topic)} AND partition IN ({_partitions(partitions)}) "
        f"AND event_time >= fromUnixTimestamp64Milli({int(since_ms)})"
    )


def stored_tier_usage(
    wh: Warehouse, topic: str, partitions: Iterable[int], since_ms: int
) -> pa.Table:
    """Billable TU per (tenant_id, plan_period) stored from these partitions (events
    from ``since_ms`` on): tenant_id, plan_period, tu (Decimal)."""
    return wh.query_arrow(
        "SELECT tenant_id, plan_period, sum(tier_usage_tu) AS tu FROM usage_events "
        f"WHERE topic = {quote_literal(topic)} AND partition IN ({_partitions(partitions)}) "
        f"AND event_time >= fromUnixTimestamp64Milli({int(since_ms)}) "
        "GROUP BY tenant_id, plan_period"
    )


def stored_event_has_key(
    wh: Warehouse, topic: str, partition: int, offset: int, carrier: str, event_id: str
) -> bool:
    """Is the event stored at (topic, partition, offset) the one with this dedup key?"""
    found = wh.query_arrow(
        "SELECT count() AS n FROM usage_events "
        f"WHERE topic = {quote_literal(topic)} "
        f"AND partition = {int(partition)} AND offset = {int(offset)} "
        f"AND reporting_carrier = {quote_literal(carrier)} "
        f"AND event_id = {quote_literal(event_id)}"
    )
    return bool(found.column("n")[0].as_py())
