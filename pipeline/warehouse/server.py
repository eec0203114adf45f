"""The server backend: a ClickHouse server over HTTP via clickhouse-connect.

URL form: ``clickhouse://user:password@host:8123/database`` (``clickhouses://`` for TLS).
The password never leaves this module: ``location`` drops it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import clickhouse_connect
import pyarrow as pa
from clickhouse_connect.driver.exceptions import ClickHouseError

from pipeline.warehouse.base import (
    WarehouseError,
    binary_unless_utf8,
    datetime_columns,
    strip_statement,
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
    """A ClickHouse server. ``client`` may be injected (contract tests)."""

    kind = "server"

    def __init__(self, url: str, client: Any = None) -> None:
        self.location = redact_url(url)
        self._args = parse_url(url)
        if client is None:
            try:
                # No HTTP session: the worker's query endpoint and its pipeline thread
                # call concurrently, and clickhouse-connect refuses concurrent queries
                # within one session.
                client = clickhouse_connect.get_client(**self._args, autogenerate_session_id=False)
            except (ClickHouseError, OSError) as exc:
                raise WarehouseError(f"cannot reach {self.location}: {exc}") from None
        self._client = client

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

    def query_readonly(self, sql: str) -> pa.Table:
        """An analyst's query with the ``readonly=1`` setting sent along with it."""
        text = strip_statement(sql)
        readonly = {"readonly": 1}
        try:
            if text.split(None, 1)[0].upper() in ("SELECT", "WITH", "("):
                described = self._client.query_arrow(f"DESCRIBE ({text})", settings=readonly)
                text = with_timestamps(text, datetime_columns(described))
            table: pa.Table = self._client.query_arrow(text, settings=readonly)
        except ClickHouseError as exc:
            raise WarehouseError(str(exc).split("\n", 1)[0]) from None
        return binary_unless_utf8(table)

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
        """Close the HTTP client."""
        self._client.close()
