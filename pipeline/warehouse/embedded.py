"""The embedded backend: the ClickHouse engine in-process (chdb), persisted on disk.

Only one process can open a chdb directory at a time. The worker holds it while it
runs; other commands reach the data through the worker's read-only query endpoint
(see ``pipeline/web.py``) or open it themselves when no worker runs.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
from chdb import session as chdb_session
from chdb._exceptions import ChdbError

from pipeline.warehouse.base import (
    ReadOnlyViolationError,
    WarehouseError,
    WarehouseLockedError,
    arrow_stream_bytes,
    binary_unless_utf8,
    datetime_columns,
    quote_ident,
    quote_literal,
    strip_statement,
    with_timestamps,
)

_READ_STATEMENTS = ("Show", "Describe", "Explain", "Exists")


class EmbeddedWarehouse:
    """chdb on ``path``. Thread-safe: calls are serialised by a lock, because one chdb
    session is one connection."""

    kind = "embedded"

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.location = str(path)
        self._lock = threading.Lock()
        # inserts are staged here (one at a time, under the lock): beside the engine's
        # directory, never inside it
        self._staging = path.parent / f".{path.name}-insert-{os.getpid()}.arrows"
        try:
            self._session = chdb_session.Session(str(path))
        except (ChdbError, RuntimeError) as exc:
            # chdb prints "Cannot lock file .../status" to stderr but raises only
            # "Error initializing EmbeddedServer", so ask the lock itself.
            if "lock" in str(exc).lower() or _held_by_another_process(path):
                raise WarehouseLockedError(
                    f"the embedded warehouse at {path} is open in another process "
                    "(is `tokenmeter worker` running?)"
                ) from None
            raise WarehouseError(str(exc)) from None

    def _call(self, sql: str, fmt: str, params: dict[str, Any] | None = None) -> Any:
        with self._lock:
            try:
                return (
                    self._session.query(sql, fmt, params=params)
                    if params
                    else (self._session.query(sql, fmt))
                )
            except (ChdbError, RuntimeError, ValueError) as exc:
                raise WarehouseError(_first_line(str(exc))) from None

    def execute(self, sql: str, params: dict[str, Any] | None = None) -> None:
        """Run a statement that returns nothing."""
        self._call(sql, "CSV", params)

    def query_arrow(self, sql: str, params: dict[str, Any] | None = None) -> pa.Table:
        """Run a query; the result as an Arrow table."""
        result = self._call(sql, "ArrowTable", params)
        if not isinstance(result, pa.Table):  # an empty result can come back as bytes
            return pa.table({})
        return binary_unless_utf8(result)

    def query_readonly(self, sql: str) -> pa.Table:
        """An analyst's query under ``readonly=1``. SELECT-like statements run as a
        subquery so the setting applies whatever the text ends with."""
        text = self._single_statement(strip_statement(sql))
        ast = self._explain_ast(text)
        kind = ast[0].split(" ", 1)[0] if ast else ""
        if kind == "DescribeQuery" and len(ast) > 2 and ast[2].strip().startswith("Function "):
            # readonly=1 does not stop DESCRIBE from reading a table function's source
            # (DESCRIBE file('/etc/passwd', 'TSVWithNames') shows its first line).
            raise ReadOnlyViolationError(
                "read-only access: DESCRIBE of a table function is not allowed"
            )
        if kind in ("SelectWithUnionQuery", "SelectIntersectExceptQuery"):
            described = self.query_arrow(f"DESCRIBE (\n{text}\n) SETTINGS readonly = 1")
            wrapped = with_timestamps(text, datetime_columns(described))
            return self.query_arrow(f"{wrapped} SETTINGS readonly = 1")
        if kind.startswith(_READ_STATEMENTS):
            return self.query_arrow(f"{text}\nSETTINGS readonly = 1")
        raise ReadOnlyViolationError(
            "read-only access: only SELECT, SHOW, DESCRIBE, EXPLAIN and EXISTS statements"
        )

    def _single_statement(self, text: str) -> str:
        # chdb runs every statement of a multi-statement text, so "SELECT 1; DROP ..."
        # must never reach it as SQL. ClickHouse's own formatter, given the text as a
        # string literal, refuses several statements and returns one canonical
        # statement (comments dropped), which is what runs from here on. (Not a bound
        # parameter: those are read in escaped form, where a raw newline is an error.)
        try:
            formatted = self._call(f"SELECT formatQuery({quote_literal(text)})", "TabSeparatedRaw")
        except WarehouseError as exc:
            if "multi-statements" in str(exc).lower():
                raise ReadOnlyViolationError("read-only access: one statement at a time") from None
            raise
        return str(formatted).strip()

    def _explain_ast(self, text: str) -> list[str]:
        ast = self._call(f"EXPLAIN AST {text}", "TabSeparatedRaw")
        return [line for line in str(ast).split("\n") if line.strip()]

    def insert_arrow(self, table: str, data: pa.Table, dedup_token: str | None = None) -> int:
        """Insert one Arrow block: ``INSERT ... FROM INFILE`` of its ``ArrowStream`` bytes,
        staged in a file beside the engine's directory.

        Not chdb's streaming ``send_insert``: when the engine fails to write the part
        (a data directory it cannot write, too many parts) that path reports the rows
        as written and raises nothing, so the sink would commit offsets for a batch that
        is not stored. A plain query raises the engine's error. (Found by the fault
        suite; tests/unit/test_warehouse_faults.py keeps it honest.)"""
        if data.num_rows == 0:
            return 0
        cols = ", ".join(quote_ident(c) for c in data.column_names)
        settings = (
            f" SETTINGS insert_deduplication_token = {quote_literal(dedup_token)}"
            if dedup_token
            else ""
        )
        payload = arrow_stream_bytes(data)
        with self._lock:
            try:
                self._staging.write_bytes(payload)
                self._session.query(
                    f"INSERT INTO {quote_ident(table)} ({cols})"
                    f" FROM INFILE {quote_literal(str(self._staging))}{settings}"
                    " FORMAT ArrowStream"
                )
            except OSError as exc:
                raise WarehouseError(f"cannot stage an insert into {table}: {exc}") from None
            except (ChdbError, RuntimeError, ValueError) as exc:
                raise WarehouseError(_first_line(str(exc))) from None
            finally:
                self._staging.unlink(missing_ok=True)
        return data.num_rows

    def close(self) -> None:
        """Close the session and release the directory lock."""
        with self._lock:
            self._session.close()


def _held_by_another_process(path: Path) -> bool:
    """True if another process holds the engine's lock on ``path/status`` (a flock)."""
    try:
        fd = os.open(path / "status", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _first_line(message: str) -> str:
    return message.strip().split("\n", 1)[0][:500]
