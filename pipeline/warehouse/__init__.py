"""The warehouse: ``open_warehouse(settings)`` is the one place a backend is chosen."""

from __future__ import annotations

from pipeline.settings import Settings
from pipeline.warehouse.base import (
    QueryLimitError,
    ReadOnlyViolationError,
    Warehouse,
    WarehouseError,
    WarehouseLockedError,
    rows,
    scalar,
)
from pipeline.warehouse.migrations import apply_migrations

__all__ = [
    "QueryLimitError",
    "ReadOnlyViolationError",
    "Warehouse",
    "WarehouseError",
    "WarehouseLockedError",
    "apply_migrations",
    "open_warehouse",
    "rows",
    "scalar",
]


def open_warehouse(settings: Settings, migrate: bool = True) -> Warehouse:
    """The embedded warehouse under the data dir, or a server when
    ``TOKENMETER_WAREHOUSE_URL`` is a ``clickhouse://`` URL. Applies migrations unless
    ``migrate=False``."""
    wh: Warehouse
    url = settings.warehouse_url.get_secret_value()
    if url:
        from pipeline.warehouse.server import ServerWarehouse

        wh = ServerWarehouse(url, limits=settings.query_limits())
    else:
        from pipeline.warehouse.embedded import EmbeddedWarehouse

        wh = EmbeddedWarehouse(settings.warehouse_path, settings.query_limits())
    if settings.fault_file is not None:
        from pipeline.warehouse.faults import FaultSwitchWarehouse

        wh = FaultSwitchWarehouse(wh, settings.fault_file)
    if migrate:
        try:
            apply_migrations(wh)
        except WarehouseError:
            wh.close()
            raise
    return wh
