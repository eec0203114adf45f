"""The embedded backend: the ClickHouse engine in-process (chdb), persisted on disk.

Only one process can open a chdb directory at a time. The worker holds it while it
runs; other commands reach the data through the worker's read-only query endpoint
(see ``pipeline/web.py``) or open it themselves when no worker runs.

Within the process, chdb serves any number of sessions on the open path, and runs
them concurrently; calls on ONE session are serialised. So the pipeline's calls share
one session (under a lock), and each analyst query gets a session of its own with
the ``TOKENMETER_QUERY_MAX_*`` limits set before ``readonly=1``: it never waits for
an insert nor an insert for it (measured, chdb 4.4: an insert during a 9 s query
took 50 ms on a second session, 8.8 s on the same one), and a failed query cannot
leave its partial output in the pipeline's session (chdb returns a failed query's
unread output with the next result of the same session). A query is stopped with
``KILL QUERY`` from yet another session (0.1 s), found by a tag comment at the start
of its text: chdb's ``StreamingResult.cancel()`` does not interrupt a running query
(it returned when the query ended, 29 s later) and left its session unusable.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
from chdb import session as chdb_session
from chdb._exceptions import ChdbError

from pipeline.settings import PRIVATE_UMASK, QueryLimits, private_dir
from pipeline.warehouse.base import (
    RunningQueries,
    WarehouseError,
    WarehouseLockedError,
    arrow_stream_bytes,
    binary_unless_utf8,
    datetime_columns,
    kill_statement,
    query_tag,
    quote_ident,
    quote_literal,
    readonly_error,
    readonly_statement,
    with_timestamps,
)

# how long close() waits for cancelled analyst queries to end
_CLOSE_WAIT_S = 10.0


class EmbeddedWarehouse:
    """chdb on ``path``. Thread-safe: the pipeline's calls are serialised by a lock on
    its one session; analysts' queries (``query_readonly``) each run on a session of
    their own under ``limits``, beside them."""

    kind = "embedded"

    def __init__(self, path: Path, limits: QueryLimits | None = None) -> None:
        # The engine writes its files with the process umask, and one process opens one
        # warehouse: owner-only for this process (the warehouse holds every event).
        os.umask(PRIVATE_UMASK)
        private_dir(path)
        self.location = str(path)
        self.limits = limits if limits is not None else QueryLimits()
        self._lock = threading.Lock()
        self._queries = RunningQueries()
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
        return _arrow(self._call(sql, "ArrowTable", params))

    def query_readonly(self, sql: str, query_id: str | None = None) -> pa.Table:
        """An analyst's query, on a session of its own under ``self.limits`` and
        ``readonly=1`` (set in that order, so the query cannot change them).
        SELECT-like statements run as a subquery (DateTime columns as time stamps).
        ``query_id`` (letters, digits, ``-``, ``_``) names it for ``cancel_readonly``.
        Raises ``QueryLimitError`` over a limit or when cancelled, ``WarehouseError``
        for the engine's other refusals."""
        with self._queries.run(query_id, self.limits.seconds, self.cancel_readonly) as qid:
            session = self._reader_session()
            try:
                return self._run_readonly(session, qid, sql)
            finally:
                session.close()

    def _reader_session(self) -> chdb_session.Session:
        """A new session on the open path with the query limits, then ``readonly=1``."""
        try:
            session = chdb_session.Session(self.location)
        except (ChdbError, RuntimeError) as exc:
            raise WarehouseError(_first_line(str(exc))) from None
        try:
            for name, value in self.limits.engine_settings().items():
                literal = quote_literal(value) if isinstance(value, str) else repr(value)
                session.query(f"SET {name} = {literal}")
        except (ChdbError, RuntimeError, ValueError) as exc:
            session.close()
            raise WarehouseError(_first_line(str(exc))) from None
        return session

    def _run_readonly(self, session: chdb_session.Session, qid: str, sql: str) -> pa.Table:
        def read(text: str, fmt: str = "ArrowTable") -> Any:
            self._queries.check(qid)
            try:
                return session.query(text, fmt)
            except (ChdbError, RuntimeError, ValueError) as exc:
                raise readonly_error(str(exc)) from None

        tag = query_tag(qid) + "\n"
        text, is_select = readonly_statement(sql, lambda q: str(read(q, "TabSeparatedRaw")))
        if is_select:
            described = _arrow(read(f"{tag}DESCRIBE (\n{text}\n)"))
            return _arrow(read(tag + with_timestamps(text, datetime_columns(described))))
        return _arrow(read(tag + text))

    def cancel_readonly(self, query_id: str | None = None) -> None:
        """Stop analyst query ``query_id`` (all of them when None) with ``KILL QUERY``
        from a session of its own: the pipeline's session may be busy with an insert."""
        self._kill(self._queries.cancel(query_id))

    def _kill(self, ids: list[str]) -> None:
        if not ids:
            return
        try:
            session = chdb_session.Session(self.location)
            try:
                session.query(kill_statement(ids), "CSV")
            finally:
                session.close()
        except (ChdbError, RuntimeError, ValueError) as exc:
            raise WarehouseError(_first_line(str(exc))) from None

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
        """Stop the analyst queries still running (waiting a little for them to end),
        close the session and release the directory lock."""
        with contextlib.suppress(WarehouseError):  # closing anyway
            self._kill(self._queries.close())
        self._queries.wait_idle(_CLOSE_WAIT_S)
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


def _arrow(result: Any) -> pa.Table:
    """chdb's ArrowTable result, String columns with non-UTF-8 bytes as binary."""
    if not isinstance(result, pa.Table):  # an empty result can come back as bytes
        return pa.table({})
    return binary_unless_utf8(result)


def _first_line(message: str) -> str:
    return message.strip().split("\n", 1)[0][:500]
