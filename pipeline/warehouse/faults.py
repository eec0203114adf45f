"""Fault injection for the warehouse, for the fault suite and for drills.

``TOKENMETER_FAULT_FILE=/path/to/switch``: while that file exists, writes fail; queries
still work. Remove the file and writes succeed again. The worker must retry with
backoff, hold its offsets and resume by itself
(tests/integration/faults/test_warehouse_outage.py). Two ways to fail, chosen by what
the file holds:

* anything but ``engine`` (e.g. an empty file): the warehouse layer refuses every insert
  with a ``WarehouseError``, before the engine sees it;
* ``engine``: the ClickHouse engine itself fails to write. Every MergeTree table's data
  directory is made immutable (``chattr +i``: a read-only data directory that root,
  whom CI runs as, cannot write through either), so the engine cannot create a part.
  Where the immutable flag is not permitted (no CAP_LINUX_IMMUTABLE, or a filesystem
  without it), every table gets ``parts_to_throw_insert = 1`` instead and the engine
  refuses inserts into tables holding data with ``TOO_MANY_PARTS``, the error a real
  server gives when merges fall behind. What was done is listed in ``<switch>.armed``
  and undone when the switch goes away, also by a worker restarted after a kill.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import logging
import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.warehouse.base import Warehouse, WarehouseError

log = logging.getLogger(__name__)

_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_IMMUTABLE_FL = 0x10


def _set_immutable(path: Path, on: bool) -> None:
    """``chattr +i`` / ``-i`` on a directory (Linux); raises OSError if not permitted."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = array.array("l", [0])
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
        value = flags[0] | _FS_IMMUTABLE_FL if on else flags[0] & ~_FS_IMMUTABLE_FL
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, array.array("l", [value]))
    finally:
        os.close(fd)


ENGINE = "engine"
_SETTING = "parts_to_throw_insert"


def armed_list(switch: Path) -> Path:
    """Where an ``engine`` fault records what it did, beside the switch."""
    return switch.with_name(switch.name + ".armed")


def release_directories(switch: Path) -> None:
    """Undo an ``engine`` fault's immutable flags without a warehouse (for a test's
    clean-up after the worker is gone); settings-mode faults wait for the next worker."""
    armed = armed_list(switch)
    if not armed.exists():
        return
    how, *items = armed.read_text().splitlines()
    if how != "immutable":
        return
    for item in items:
        with contextlib.suppress(FileNotFoundError):
            _set_immutable(Path(item), False)
    armed.unlink()


class FaultSwitchWarehouse:
    """Wraps a warehouse; inserts fail while ``switch`` exists (see the module doc)."""

    def __init__(self, inner: Warehouse, switch: Path) -> None:
        self.inner = inner
        self.switch = switch
        self.armed_list = armed_list(switch)
        self.kind = inner.kind
        self.location = inner.location
        if self._mode() != ENGINE:
            self._disarm()  # left armed by a worker killed during an engine outage

    def _mode(self) -> str | None:
        try:
            return self.switch.read_text().strip() or "layer"
        except FileNotFoundError:
            return None

    def _arm(self) -> None:
        if self.armed_list.exists():
            return
        tables = self.inner.query_arrow(
            "SELECT name, data_paths FROM system.tables WHERE database = currentDatabase()"
            " AND engine LIKE '%MergeTree%' ORDER BY name"
        ).to_pylist()
        dirs = [Path(d) for t in tables for d in t["data_paths"]]
        try:
            for d in dirs:
                _set_immutable(d, True)
            lines = ["immutable", *map(str, dirs)]
        except OSError as exc:
            for d in dirs:
                with contextlib.suppress(OSError):
                    _set_immutable(d, False)
            log.warning("fault switch: cannot make directories immutable (%s)", exc)
            for t in tables:
                self.inner.execute(f"ALTER TABLE `{t['name']}` MODIFY SETTING {_SETTING} = 1")
            lines = ["setting", *(t["name"] for t in tables)]
        self.armed_list.write_text("".join(f"{line}\n" for line in lines))
        log.warning("fault injected: the engine cannot write (%s, %d)", lines[0], len(lines) - 1)

    def _disarm(self) -> None:
        if not self.armed_list.exists():
            return
        how, *items = self.armed_list.read_text().splitlines()
        if how == "immutable":
            release_directories(self.switch)
        else:
            for item in items:
                self.inner.execute(f"ALTER TABLE `{item}` RESET SETTING {_SETTING}")
            self.armed_list.unlink()
        log.warning("fault cleared: the engine writes again")

    def execute(self, sql: str, params: dict[str, Any] | None = None) -> None:
        self.inner.execute(sql, params)

    def query_arrow(self, sql: str, params: dict[str, Any] | None = None) -> pa.Table:
        return self.inner.query_arrow(sql, params)

    def query_readonly(self, sql: str, query_id: str | None = None) -> pa.Table:
        return self.inner.query_readonly(sql, query_id)

    def cancel_readonly(self, query_id: str | None = None) -> None:
        self.inner.cancel_readonly(query_id)

    def insert_arrow(self, table: str, data: pa.Table, dedup_token: str | None = None) -> int:
        mode = self._mode()
        if mode == ENGINE:
            self._arm()  # and let the engine refuse the insert itself
        else:
            self._disarm()
            if mode is not None:
                raise WarehouseError(f"fault injected: writes refused while {self.switch} exists")
        return self.inner.insert_arrow(table, data, dedup_token)

    def close(self) -> None:
        self.inner.close()
