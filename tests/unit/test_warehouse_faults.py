"""The warehouse fault switch (TOKENMETER_FAULT_FILE): the layer refuses inserts, or the
ClickHouse engine itself does (``engine``), and both clear when the switch goes away,
also for a worker that starts after being killed mid-outage."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.warehouse import Warehouse, WarehouseError, faults
from pipeline.warehouse.faults import FaultSwitchWarehouse

TABLE = "fault_probe"


@pytest.fixture
def probe(warehouse: Warehouse) -> Warehouse:
    warehouse.execute(f"DROP TABLE IF EXISTS {TABLE}")
    warehouse.execute(f"CREATE TABLE {TABLE} (n UInt32) ENGINE = MergeTree ORDER BY n")
    warehouse.insert_arrow(TABLE, pa.table({"n": pa.array([1], pa.uint32())}))
    yield warehouse
    warehouse.execute(f"DROP TABLE IF EXISTS {TABLE}")


def rows(n: int) -> pa.Table:
    return pa.table({"n": pa.array([n], pa.uint32())})


def count(wh: Warehouse) -> int:
    return int(wh.query_arrow(f"SELECT count() AS c FROM {TABLE}").column("c")[0].as_py())


def armed_how(switch: Path) -> str:
    armed = faults.armed_list(switch)
    return armed.read_text().splitlines()[0] if armed.exists() else ""


def test_layer_fault_refuses_until_the_switch_is_removed(probe: Warehouse, tmp_path: Path) -> None:
    switch = tmp_path / "down"
    wh = FaultSwitchWarehouse(probe, switch)
    switch.touch()
    with pytest.raises(WarehouseError, match="fault injected"):
        wh.insert_arrow(TABLE, rows(2))
    assert wh.query_arrow(f"SELECT count() AS c FROM {TABLE}").num_rows == 1  # reads work
    switch.unlink()
    wh.insert_arrow(TABLE, rows(2))
    assert count(probe) == 2


@pytest.mark.parametrize("immutable", [True, False], ids=["read-only-dirs", "too-many-parts"])
def test_engine_fault_is_the_engines_own_refusal_and_clears(
    probe: Warehouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, immutable: bool
) -> None:
    if not immutable:  # as on a machine without CAP_LINUX_IMMUTABLE

        def refuse(path: Path, on: bool) -> None:
            raise PermissionError(1, "Operation not permitted", str(path))

        monkeypatch.setattr(faults, "_set_immutable", refuse)
    switch = tmp_path / "down"
    wh = FaultSwitchWarehouse(probe, switch)
    switch.write_text("engine\n")
    try:
        with pytest.raises(WarehouseError) as refused:
            wh.insert_arrow(TABLE, rows(2))
        engine_error = "Operation not permitted" if immutable else "Too many parts"
        assert engine_error in str(refused.value)  # the engine's own error, surfaced
        assert armed_how(switch) == ("immutable" if immutable else "setting")
        with pytest.raises(WarehouseError):  # a plain insert, past the wrapper, too
            probe.insert_arrow(TABLE, rows(3))
        assert count(probe) == 1

        # a worker killed mid-outage leaves it armed: the next one clears it
        switch.unlink()
        restarted = FaultSwitchWarehouse(probe, switch)
        assert armed_how(switch) == ""
        restarted.insert_arrow(TABLE, rows(4))
        assert count(probe) == 2
    finally:
        switch.unlink(missing_ok=True)
        FaultSwitchWarehouse(probe, switch)  # never leave the shared warehouse armed
