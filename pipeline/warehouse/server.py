"""The server backend: a ClickHouse server over HTTP via clickhouse-connect.

URL form: ``clickhouse://user:password@host:8123/database`` (``clickhouses://`` for TLS).
The password never leaves this module: ``location`` drops it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import clickhouse_connect
import pyarrow as pa
from clickhouse_connect.driver.exceptions import ClickHouseError

from pipeline.settings import QueryLimits
from pipeline.warehouse.base import (
    RunningQueries,
    WarehouseError,
    binary_unless_utf8,
    datetime_columns,
    kill_statement,
    query_tag,
    readonly_error,
    readonly_statement,
    with_timestamps,
)


def parse_url(url: str) -> dict[str, Any]:
    """Split a ``clickhouse://`` URL into clickhouse-connect's keyword arguments."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port that is not a number in 0..65535
    except ValueError:
        raise WarehouseError(
            "TOKENMETER_WAREHOUSE_URL: not a valid URL "
            "(expected clickhouse://user:pass@host:8123/db)"
        ) from None
    if parts.scheme not in ("clickhouse", "clickhouses"):
        raise WarehouseError(
            "TOKENMETER_WAREHOUSE_URL: expected clickhouse://user:pass@host:8123/db"
        )
    if not parts.hostname:
        raise WarehouseError("TOKENMETER_WAREHOUSE_URL: no host")
    return {
        "host": parts.hostname,
        "port": port or (8443 if parts.scheme == "clickhouses" else 8123),
        "username": unquote(parts.username or "default"),
        "password": unquote(parts.password or ""),
        "database": parts.path.lstrip("/") or "default",
        "secure": parts.scheme == "clickhouses",
    }


def redact_url(url: str) -> str:
    """The URL with its password replaced, safe for logs and output."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable TOKENMETER_WAREHOUSE_URL>"
    if parts.password is None:
        if "@" in url and not parts.netloc:  # "user:pass@host" without a scheme
            return "***@" + url.rsplit("@", 1)[1]
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


class ServerWarehouse:
    """A ClickHouse server. ``client`` may be injected (contract tests), and so may a
    ``reader_factory`` that makes a client for each analyst query: clickhouse-connect's
    in-process engine (``get_client(dsn="chdb:///path")``) keeps a query's settings
    on its session, and a session in readonly=1 refuses to set the limits again."""

    kind = "server"

    def __init__(
        self,
        url: str,
        client: Any = None,
        limits: QueryLimits | None = None,
        reader_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.location = redact_url(url)
        self._args = parse_url(url)
        self.limits = limits if limits is not None else QueryLimits()
        if client is None:
            # No HTTP session: the worker's query endpoint and its pipeline thread call
            # concurrently, and clickhouse-connect refuses concurrent queries within
            # one session. Analysts' queries get a client of their own: on a client
            # with a session (chdb) per-query settings stick to it, and readonly=1
            # would then refuse the pipeline's next insert.
            client = self._connect()
            reader = self._connect()
        else:
            reader = client
        self._client = client
        self._reader = reader
        self._reader_factory = reader_factory
        self._queries = RunningQueries()

    def _connect(self) -> Any:
        try:
            return clickhouse_connect.get_client(**self._args, autogenerate_session_id=False)
        except (ClickHouseError, OSError) as exc:
            raise WarehouseError(f"cannot reach {self.location}: {exc}") from None

    def execute(self, sql: str, params: dict[str, Any] | None = None) -> None:
        """Run a statement that returns nothing."""
        try:
            self._client.command(sql, parameters=params)
        except ClickHouseError as exc:
            raise WarehouseError(str(exc).split("\n", 1)[0]) from None

    def query_arrow(self, sql: str, params: dict[str, Any] | None = None) -> pa.Table:
        """Run a query; the result as an Arrow table."""
        try:
            table: pa.Table = self._client.query_arrow(sql, parameters=params)
        except ClickHouseError as exc:
            raise WarehouseError(str(exc).split("\n", 1)[0]) from None
        return binary_unless_utf8(table)

    def query_readonly(self, sql: str, query_id: str | None = None) -> pa.Table:
        """An analyst's query on the reader client, with the ``TOKENMETER_QUERY_MAX_*``
        limits and then ``readonly=1`` sent along with it (HTTP: URL parameters, which
        the server applies before the query's own SETTINGS clause, which readonly=1
        then refuses). Checked first like the embedded backend's (one statement, a
        read, no DESCRIBE of a table function). ``query_id`` names it for
        ``cancel_readonly``. Raises ``QueryLimitError`` over a limit."""
        settings = self.limits.engine_settings()
        with self._queries.run(query_id, self.limits.seconds, self.cancel_readonly) as qid:
            reader = self._reader_factory() if self._reader_factory else self._reader
            try:
                return self._run_readonly(reader, qid, sql, settings)
            finally:
                if reader is not self._reader:
                    reader.close()

    def _run_readonly(self, reader: Any, qid: str, sql: str, settings: dict[str, Any]) -> pa.Table:
        def read_text(text: str) -> str:
            self._queries.check(qid)
            try:
                raw: bytes = reader.raw_query(text, settings=settings, fmt="TabSeparatedRaw")
            except ClickHouseError as exc:
                raise readonly_error(str(exc)) from None
            return raw.decode("utf-8", errors="replace")

        def read(text: str) -> pa.Table:
            self._queries.check(qid)
            try:
                table = reader.query_arrow(text, settings=settings)
            except ClickHouseError as exc:
                raise readonly_error(str(exc)) from None
            return binary_unless_utf8(table)

        text, is_select = readonly_statement(sql, read_text)
        tag = query_tag(qid) + "\n"
        if is_select:
            described = read(f"{tag}DESCRIBE (\n{text}\n)")
            text = with_timestamps(text, datetime_columns(described))
        return read(tag + text)

    def cancel_readonly(self, query_id: str | None = None) -> None:
        """``KILL QUERY`` for analyst query ``query_id`` (all when None), sent by the
        pipeline's client (the analysts' may be busy; the server's user needs the
        KILL QUERY grant)."""
        self._kill(self._queries.cancel(query_id))

    def _kill(self, ids: list[str]) -> None:
        if ids:
            self.execute(kill_statement(ids))

    def insert_arrow(self, table: str, data: pa.Table, dedup_token: str | None = None) -> int:
        """Insert one Arrow block; ``dedup_token`` is sent as insert_deduplication_token."""
        if data.num_rows == 0:
            return 0
        settings = {"insert_deduplication_token": dedup_token} if dedup_token else None
        try:
            self._client.insert_arrow(table, data, settings=settings)
        except ClickHouseError as exc:
            raise WarehouseError(str(exc).split("\n", 1)[0]) from None
        return data.num_rows

    def close(self) -> None:
        """Stop the analyst queries still running, close the clients."""
        try:
            self._kill(self._queries.close())
        except WarehouseError:
            pass  # closing anyway
        self._queries.wait_idle(10.0)
        if self._reader is not self._client:
            self._reader.close()
        self._client.close()
