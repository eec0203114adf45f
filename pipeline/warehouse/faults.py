"""Fault injection for the warehouse, for the fault suite and for drills.

``TOKENMETER_FAULT_FILE=/path/to/switch``: while that file exists, every insert fails
with a ``WarehouseError`` (as if ClickHouse refused writes); queries still work. Remove
the file and writes succeed again. The worker must retry with backoff, hold its offsets
and resume by itself (tests/integration/faults/test_warehouse_outage.py). A read-only
data directory is no substitute here: the worker runs as root in CI, and root writes
through file permissions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.warehouse.base import Warehouse, WarehouseError


class FaultSwitchWarehouse:
    """Wraps a warehouse; inserts fail while ``switch`` exists."""

    def __init__(self, inner: Warehouse, switch: Path) -> None:
        self.inner = inner
        self.switch = switch
        self.kind = inner.kind
        self.location = inner.location

    def execute(self, sql: str, params: dict[str, Any] | None = None) -> None:
        self.inner.execute(sql, params)

    def query_arrow(self, sql: str, params: dict[str, Any] | None = None) -> pa.Table:
        return self.inner.query_arrow(sql, params)

    def query_readonly(self, sql: str) -> pa.Table:
        return self.inner.query_readonly(sql)

    def insert_arrow(self, table: str, data: pa.Table, dedup_token: str | None = None) -> int:
        if self.switch.exists():
            raise WarehouseError(f"fault injected: writes refused while {self.switch} exists")
        return self.inner.insert_arrow(table, data, dedup_token)

    def close(self) -> None:
        self.inner.close()
