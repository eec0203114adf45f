"""Shared fixtures.

chdb (the embedded ClickHouse engine) serves one data path per process at a time: a
second path opens only after the first session is closed. Unit tests therefore share
one session-scoped embedded warehouse (``warehouse``), and ``clean_warehouse`` empties
the worker's tables for tests that need a blank slate. Integration tests run the worker
and the CLI as subprocesses, each with its own data directory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.settings import Settings, load_settings
from pipeline.warehouse import Warehouse, open_warehouse

WORKER_TABLES = ("usage_events", "dead_letters")


@pytest.fixture(scope="session")
def warehouse_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings pointing at a session-wide temporary data directory."""
    return load_settings(data_dir=tmp_path_factory.mktemp("tokenmeter-data"))


@pytest.fixture(scope="session")
def warehouse(warehouse_settings: Settings) -> Iterator[Warehouse]:
    """The embedded warehouse, migrated, shared by the whole test session."""
    wh = open_warehouse(warehouse_settings)
    yield wh
    wh.close()


@pytest.fixture
def clean_warehouse(warehouse: Warehouse) -> Warehouse:
    """The shared warehouse with every non-ledger table emptied."""
    tables = warehouse.query_arrow(
        "SELECT name FROM system.tables WHERE database = currentDatabase() "
        "AND engine LIKE '%MergeTree' AND name != 'schema_migrations'"
    )
    for name in tables.column("name").to_pylist() if tables.num_rows else []:
        warehouse.execute(f"TRUNCATE TABLE `{name}`")
    return warehouse


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A fresh data directory for subprocess-based tests."""
    path = tmp_path / "data"
    path.mkdir()
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``long`` (the fault runs of minutes each) first, so that `make test`'s
    parallel processes (``--dist loadfile --no-loadscope-reorder``) each start on one of
    them instead of finding them queued behind each other at the end."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
