"""The warehouse interface: one small protocol, two real backends.

``EmbeddedWarehouse`` runs the ClickHouse engine in-process (chdb) on a directory;
``ServerWarehouse`` talks to a ClickHouse server over HTTP (clickhouse-connect). Both
take the same SQL, the same migrations and the same Arrow batches, so nothing above
this package knows which one it has. ``open_warehouse`` in ``__init__`` chooses.
"""

from __future__ import annotations

import io
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import pyarrow as pa


class WarehouseError(Exception):
    """A warehouse call failed; the message is ClickHouse's, without a traceback."""


class WarehouseLockedError(WarehouseError):
    """The embedded warehouse directory is held by another process (usually the worker)."""


class ReadOnlyViolationError(WarehouseError):
    """A statement given to a read-only entry point would change something."""


class QueryLimitError(WarehouseError):
    """An analyst's query went over one of the ``TOKENMETER_QUERY_MAX_*`` limits, or was
    cancelled (its client went away, the worker is stopping)."""


# The engine's error names for the limits in QueryLimits.engine_settings, and the
# setting that raises each one. TOO_MANY_ROWS_OR_BYTES is the result's limit (rows or
# bytes: the engine's text says which, "max rows" / "max bytes").
_LIMIT_ERRORS = {
    "TIMEOUT_EXCEEDED": "TOKENMETER_QUERY_MAX_SECONDS",
    "MEMORY_LIMIT_EXCEEDED": "TOKENMETER_QUERY_MAX_MEMORY",
    "TOO_MANY_ROWS_OR_BYTES": "TOKENMETER_QUERY_MAX_RESULT_ROWS",
    "TOO_MANY_ROWS": "TOKENMETER_QUERY_MAX_ROWS_TO_READ",
    "TOO_MANY_BYTES": "TOKENMETER_QUERY_MAX_BYTES_TO_READ",
}


def readonly_error(message: str) -> WarehouseError:
    """The error to give an analyst for the engine's ``message`` (its first line): a
    ``QueryLimitError`` that names the setting when a limit stopped the query, or when
    it was cancelled; otherwise the engine's message as a ``WarehouseError``."""
    line = message.strip().split("\n", 1)[0][:500]
    for name, setting in _LIMIT_ERRORS.items():
        if f"({name})" in line:
            bytes_over = name == "TOO_MANY_ROWS_OR_BYTES" and "max bytes" in line
            named = "TOKENMETER_QUERY_MAX_RESULT_BYTES" if bytes_over else setting
            return QueryLimitError(f"query limit exceeded ({named}): {line}")
    if "(QUERY_WAS_CANCELLED)" in line:
        return QueryLimitError(
            "query cancelled (its client went away, its time was up, or the worker is stopping)"
        )
    return WarehouseError(line)


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

    def query_readonly(self, sql: str, query_id: str | None = None) -> pa.Table:
        """Run an analyst's statement with ClickHouse's ``readonly=1`` and the
        ``TOKENMETER_QUERY_MAX_*`` limits set before it (so the statement cannot lift
        them); writes are refused by the engine itself, not by string matching. Never
        waits for the pipeline's inserts, nor they for it. ``query_id`` names the query
        for ``cancel_readonly``. Raises ``QueryLimitError`` over a limit."""
        ...

    def cancel_readonly(self, query_id: str | None = None) -> None:
        """Stop the analyst query ``query_id`` (every one running, when None); it then
        raises ``QueryLimitError``. Returns at once; a query that already ended is
        ignored."""
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
    """Drop trailing semicolons and blanks; refuse an empty statement, and text that
    cannot be UTF-8 (the engine's input) with a message, not a traceback. (Several
    statements at once are refused by the backends: a server's HTTP interface runs one,
    and the embedded one checks with ClickHouse's parser first.)"""
    text = _TRAILING.sub("", sql.strip())
    if not text:
        raise ReadOnlyViolationError("empty query")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. JSON's "\udcff"
        raise WarehouseError(
            f"query: not valid Unicode text (character {exc.start + 1} is a lone surrogate)"
        ) from None
    return text


_READ_STATEMENTS = ("Show", "Describe", "Explain", "Exists")
_SELECTS = ("SelectWithUnionQuery", "SelectIntersectExceptQuery")


# system tables that hold other sessions' query text or ids: the running queries, the
# query cache, pending async inserts and every *_log table (query_log, text_log, ...)
_PRIVATE_SYSTEM = frozenset(
    {"processes", "user_processes", "query_cache", "asynchronous_inserts", "session_query_ids"}
)
# table functions that name tables by strings or expressions (merge's database can be a
# REGEXP); an argument that is "system" or computed is refused
_MULTI_TABLE_FUNCTIONS = frozenset(
    {"merge", "cluster", "clusterAllReplicas", "remote", "remoteSecure"}
)
_ALIAS = re.compile(r" \(alias [^)]*\)$")


def _is_private(database: str, table: str) -> bool:
    return database == "system" and (table in _PRIVATE_SYSTEM or table.endswith("_log"))


def _private_system_table(ast: list[str]) -> str:
    """The first private system table the statement reads, from the lines of its
    ``EXPLAIN AST`` (one node a line, indented by depth): a ``TableIdentifier`` or
    ``Identifier`` ``system.<name>`` anywhere (subqueries, ``view()``, ``loop()``),
    a ``SHOW``/``EXISTS`` naming one, ``SHOW PROCESSLIST``, or a ``merge``-like table
    function whose arguments say "system" or are computed. "" when there is none."""
    for i, line in enumerate(ast):
        depth = len(line) - len(line.lstrip(" "))
        node, _, rest = line.strip().partition(" ")
        rest = _ALIAS.sub("", rest)
        if node == "ShowProcesslistQuery":
            return "system.processes"
        if node in ("TableIdentifier", "Identifier"):
            database, _, table = rest.partition(".")
            if _is_private(database, table):
                return rest
        elif node.endswith("Query") and len(rest.split(" ")) >= 2:
            database, table = rest.split(" ")[:2]  # e.g. "ShowCreateTableQuery system query_log"
            if _is_private(database, table):
                return f"{database}.{table}"
        elif node == "Function" and rest.split(" ")[0] in _MULTI_TABLE_FUNCTIONS:
            name = rest.split(" ")[0]
            for arg in ast[i + 1 :]:
                if len(arg) - len(arg.lstrip(" ")) <= depth:
                    break
                arg_node, _, arg_rest = arg.strip().partition(" ")
                # a literal may come back escaped (\'system\' in TabSeparated), by client
                arg_rest = _ALIAS.sub("", arg_rest).replace("\\'", "'")
                if arg_node == "Function" or arg_rest in ("'system'", "system"):
                    return f"system tables through {name}()"
    return ""


def readonly_statement(sql: str, read_text: Callable[[str], str]) -> tuple[str, bool]:
    """Check an analyst's text with the engine's own parser, through ``read_text`` (runs
    a query on the analyst's read-only connection; its result as text, rows joined by
    newlines). Returns the one statement to run, in ClickHouse's canonical form
    (comments dropped), and whether it is a SELECT. Raises ``ReadOnlyViolationError``
    for several statements, a statement other than SELECT, SHOW, DESCRIBE, EXPLAIN or
    EXISTS, a DESCRIBE of a table function, and a read of a system table that shows
    other sessions' queries (``system.processes``, ``system.query_log``, ...)."""
    text = strip_statement(sql)
    # chdb runs every statement of a multi-statement text, so "SELECT 1; DROP ..."
    # must never reach it as SQL. ClickHouse's own formatter, given the text as a
    # string literal, refuses several statements and returns one canonical statement,
    # which is what runs from here on. (Not a bound parameter: those are read in
    # escaped form, where a raw newline is an error.)
    try:
        text = read_text(f"SELECT formatQuery({quote_literal(text)})").strip()
    except WarehouseError as exc:
        if "multi-statements" in str(exc).lower():
            raise ReadOnlyViolationError("read-only access: one statement at a time") from None
        raise
    ast = [line for line in read_text(f"EXPLAIN AST {text}").split("\n") if line.strip()]
    kind = ast[0].split(" ", 1)[0] if ast else ""
    if kind == "DescribeQuery" and len(ast) > 2 and ast[2].strip().startswith("Function "):
        # readonly=1 does not stop DESCRIBE from reading a table function's source
        # (DESCRIBE file('/etc/passwd', 'TSVWithNames') shows its first line; DESCRIBE
        # url(...) makes the request).
        raise ReadOnlyViolationError(
            "read-only access: DESCRIBE of a table function is not allowed"
        )
    private = _private_system_table(ast)
    if private:
        raise ReadOnlyViolationError(
            f"read-only access: {private} is not readable by analysts "
            "(it shows other users' queries)"
        )
    if kind in _SELECTS:
        return text, True
    if kind.startswith(_READ_STATEMENTS):
        return text, False
    raise ReadOnlyViolationError(
        "read-only access: only SELECT, SHOW, DESCRIBE, EXPLAIN and EXISTS statements"
    )


_QUERY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# how long past TOKENMETER_QUERY_MAX_SECONDS a query may run before it is killed (the
# engine checks its time limit between blocks; one long block could overrun it)
WATCHDOG_GRACE_S = 5.0


class RunningQueries:
    """A backend's analyst queries that are running, by id, and those asked to stop;
    thread-safe. ``run`` registers one (with a watchdog that cancels it past its time),
    ``check`` raises once it was cancelled, ``cancel`` marks them and returns their ids
    (the backend then kills them in the engine), ``close`` refuses new ones."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running: set[str] = set()
        self._cancelled: set[str] = set()
        self._closed = False

    @contextmanager
    def run(
        self, query_id: str | None, seconds: float, on_timeout: Callable[[str], None]
    ) -> Iterator[str]:
        """Register a query (a new id when ``query_id`` is None) for the block's time;
        ``on_timeout(id)`` is called if it lasts ``seconds`` + a grace period."""
        qid = query_id or uuid.uuid4().hex
        if not _QUERY_ID.match(qid):
            raise WarehouseError("query id: 1-64 letters, digits, '-' and '_'")
        with self._cond:
            if self._closed:
                raise WarehouseError("the warehouse is closed")
            if qid in self._running:
                raise WarehouseError("a query with this id is running")
            self._running.add(qid)
        watchdog = threading.Timer(seconds + WATCHDOG_GRACE_S, on_timeout, (qid,))
        watchdog.daemon = True
        watchdog.start()
        try:
            yield qid
        finally:
            watchdog.cancel()
            with self._cond:
                self._running.discard(qid)
                self._cancelled.discard(qid)
                self._cond.notify_all()

    def check(self, query_id: str) -> None:
        """Raise ``QueryLimitError`` if ``query_id`` was cancelled."""
        with self._cond:
            if query_id in self._cancelled:
                raise readonly_error("(QUERY_WAS_CANCELLED)")

    def cancel(self, query_id: str | None) -> list[str]:
        """Mark ``query_id`` (every running query when None) cancelled; the ids of those
        that are running."""
        with self._cond:
            ids = sorted(self._running) if query_id is None else [query_id]
            ids = [i for i in ids if i in self._running]
            self._cancelled.update(ids)
        return ids

    def close(self) -> list[str]:
        """Refuse new queries; cancel the running ones (their ids)."""
        with self._cond:
            self._closed = True
        return self.cancel(None)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no query runs (at most ``timeout`` s); True if none does."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._running, timeout=timeout)


def query_tag(query_id: str) -> str:
    """The comment an analyst query's text starts with, so that ``KILL QUERY`` can find
    it in ``system.processes`` (which keeps the text as sent)."""
    return f"/* tokenmeter-query {query_id} */"


def kill_statement(query_ids: list[str]) -> str:
    """``KILL QUERY`` (not waiting) for the analyst queries with these ids."""
    where = " OR ".join(f"startsWith(query, {quote_literal(query_tag(i))})" for i in query_ids)
    return f"KILL QUERY WHERE {where} ASYNC"


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
