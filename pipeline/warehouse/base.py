"""The warehouse interface: one small protocol, two real backends.

``EmbeddedWarehouse`` runs the ClickHouse engine in-process (chdb) on a directory;
``ServerWarehouse`` talks to a ClickHouse server over HTTP (clickhouse-connect). Both
take the same SQL, the same migrations and the same Arrow batches, so nothing above
this package knows which one it has. ``open_warehouse`` in ``__init__`` chooses.
"""

from __future__ import annotations

import io
import re
from typing import Any, Protocol

import pyarrow as pa


class WarehouseError(Exception):
    """A warehouse call failed; the message is ClickHouse's, without a traceback."""


class WarehouseLockedError(WarehouseError):
    """The embedded warehouse directory is held by another process (usually the worker)."""


class ReadOnlyViolationError(WarehouseError):
    """A statement given to a read-only entry point would change something."""


class Warehouse(Protocol):
    """What the pipeline and the jobs need from ClickHouse."""

    kind: str  # "embedded" or "server"
    location: str  # a path or a URL without credentials, safe to print

    def execute(self, sql: str, params: dict[str, Any] | None = None) -> None:
        """Run a statement that returns nothing (DDL, INSERT ... SELECT, ...)."""
        ...

    def query_arrow(self, sql: str, params: dict[str, Any] | None = None) -> pa.Table:
        """Run a query and return its result as an Arrow table."""
        ...

    def query_readonly(self, sql: str) -> pa.Table:
        """Run an analyst's statement with ClickHouse's ``readonly=1``; writes are refused
        by the engine itself, not by string matching."""
        ...

    def insert_arrow(self, table: str, data: pa.Table, dedup_token: str | None = None) -> int:
        """Insert an Arrow table as one block. With ``dedup_token``, a retry of the same
        block is dropped by ClickHouse (the table needs a deduplication window)."""
        ...

    def close(self) -> None:
        """Release the connection (and, for chdb, the directory lock)."""
        ...


def rows(table: pa.Table) -> list[dict[str, Any]]:
    """An Arrow result as a list of dicts (small results only)."""
    out: list[dict[str, Any]] = table.to_pylist()
    return out


def scalar(table: pa.Table) -> Any:
    """The single value of a one-row, one-column result."""
    if table.num_rows != 1 or table.num_columns != 1:
        raise WarehouseError(f"expected one value, got {table.num_rows}x{table.num_columns}")
    return table.column(0)[0].as_py()


def binary_unless_utf8(table: pa.Table) -> pa.Table:
    """The result with every String column that holds non-UTF-8 bytes (a raw dead-letter
    payload) typed as binary: ClickHouse sends String as Arrow utf8, and pyarrow cannot
    turn invalid utf8 into Python values (``to_pylist`` raises UnicodeDecodeError)."""
    for i, column_field in enumerate(table.schema):
        if not pa.types.is_string(column_field.type):
            continue
        column = table.column(i)
        try:
            column.validate(full=True)
        except pa.ArrowInvalid:
            table = table.set_column(
                i, column_field.with_type(pa.binary()), column.cast(pa.binary())
            )
    return table


def arrow_stream_bytes(table: pa.Table) -> bytes:
    """Serialise an Arrow table as an IPC stream (ClickHouse's ``ArrowStream`` format)."""
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def quote_ident(name: str) -> str:
    """A table or column name, checked and back-quoted."""
    if not _IDENT.match(name):
        raise WarehouseError(f"not a valid identifier: {name!r}")
    return f"`{name}`"


def quote_literal(value: str) -> str:
    """A string literal for ClickHouse SQL."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


_TRAILING = re.compile(r"[\s;]+$")


def strip_statement(sql: str) -> str:
    """Drop trailing semicolons and blanks; refuse an empty statement. (Several
    statements at once are refused by the backends: a server's HTTP interface runs one,
    and the embedded one checks with ClickHouse's parser first.)"""
    text = _TRAILING.sub("", sql.strip())
    if not text:
        raise ReadOnlyViolationError("empty query")
    return text


# ClickHouse's Arrow output turns DateTime (not DateTime64) into plain uint32 seconds.
# Analysts' queries are wrapped so such columns come back as time stamps with their zone.
_DATETIME = re.compile(r"^(?:Nullable\(|LowCardinality\()*DateTime(?:\('[^']*'\))?\)*$")


def datetime_columns(describe: pa.Table) -> list[str]:
    """Names of the DateTime (not DateTime64) columns in a ``DESCRIBE`` result."""
    if describe.num_rows == 0:
        return []
    names = describe.column("name").to_pylist()
    types = describe.column("type").to_pylist()
    return [n for n, t in zip(names, types, strict=True) if _DATETIME.match(str(t))]


def with_timestamps(text: str, columns: list[str]) -> str:
    """``SELECT * FROM (text)``, with the given DateTime columns as DateTime64."""
    if not columns:
        return f"SELECT * FROM (\n{text}\n)"
    replaced = ", ".join(f"toDateTime64({_backtick(c)}, 0) AS {_backtick(c)}" for c in columns)
    return f"SELECT * REPLACE ({replaced}) FROM (\n{text}\n)"


def _backtick(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"
