"""Analysts see DateTime columns as times with their zone, not as epoch integers."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from pipeline.warehouse import Warehouse


def test_datetime_columns_are_times_in_their_zone(warehouse: Warehouse) -> None:
    result = warehouse.query_readonly(
        "SELECT toDateTime('2026-11-28 08:00:00', 'Asia/Shanghai') AS period_start, "
        "toUInt32(7) AS n, toDateTime64('2026-11-28 00:00:00.123', 3, 'UTC') AS t"
    )
    row = result.to_pylist()[0]
    assert row["period_start"] == datetime(2026, 11, 28, 8, tzinfo=ZoneInfo("Asia/Shanghai"))
    assert row["n"] == 7  # a genuine UInt32 stays a number
    assert row["t"].microsecond == 123_000
