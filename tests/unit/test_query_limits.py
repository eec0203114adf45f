"""Limits on analysts' queries (issue 14, item 3), on the real engine.

Both backends run the engine in this process: the embedded one (chdb sessions) and the
server one through clickhouse-connect's chdb client (``dsn="chdb:///path"``), on the
session-wide warehouse's directory (chdb serves one path per process).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import clickhouse_connect
import pyarrow as pa
import pytest

from pipeline.settings import QueryLimits, load_settings
from pipeline.warehouse import QueryLimitError, Warehouse, WarehouseError
from pipeline.warehouse.embedded import EmbeddedWarehouse
from pipeline.warehouse.server import ServerWarehouse

LIMITS = QueryLimits(seconds=3, memory=64 * 1024**2, result_rows=1000, result_bytes=100_000)
HEAVY = "SELECT count() FROM numbers(1000000000) WHERE sipHash64(number) % 7 = 3"


@pytest.fixture(params=["embedded", "server-on-chdb"])
def limited(
    request: pytest.FixtureRequest, warehouse: Warehouse, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    """The warehouse (either backend) with small limits, as TOKENMETER_QUERY_MAX_* set."""
    assert isinstance(warehouse, EmbeddedWarehouse)
    if request.param == "embedded":
        monkeypatch.setattr(warehouse, "limits", LIMITS)
        yield warehouse
        return
    dsn = f"chdb://{warehouse.location}"
    server = ServerWarehouse(
        "clickhouse://chdb-in-process",
        client=clickhouse_connect.get_client(dsn=dsn),
        limits=LIMITS,
        reader_factory=lambda: clickhouse_connect.get_client(dsn=dsn),
    )
    yield server
    server.close()


def in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn(*args)`` on a thread; the dict gets its result or error and duration."""
    out: dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            out["result"] = fn(*args)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc
        out["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_the_settings_give_the_limits_with_defaults() -> None:
    limits = load_settings().query_limits()
    assert (limits.seconds, limits.memory, limits.result_rows) == (60, 2 * 1024**3, 1_000_000)
    engine = limits.engine_settings()
    assert list(engine)[-1] == "readonly" and engine["readonly"] == 1
    assert engine["max_execution_time"] == 60 and engine["max_result_rows"] == 1_000_000
    with pytest.raises(Exception, match="TOKENMETER_QUERY_MAX_SECONDS"):
        load_settings(query_max_seconds=0)
    with pytest.raises(Exception, match="TOKENMETER_QUERY_MAX_MEMORY"):
        load_settings(query_max_memory="lots")


def test_a_query_that_never_ends_stops_at_the_time_limit(
    limited: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # only the time limit: an idle engine counts the 10 billion rows the default lets a
    # query read in about 3 s, and would stop it for that first
    monkeypatch.setattr(limited, "limits", replace(LIMITS, rows_to_read=10**18))
    started = time.monotonic()
    with pytest.raises(QueryLimitError, match="TOKENMETER_QUERY_MAX_SECONDS") as caught:
        limited.query_readonly("SELECT count() FROM system.numbers LIMIT 5")
    assert time.monotonic() - started < LIMITS.seconds + 10
    assert "limit exceeded" in str(caught.value) and "\n" not in str(caught.value)


def test_too_many_rows_memory_or_reading_is_a_clear_error(limited: Any) -> None:
    assert limited.query_readonly("SELECT number FROM numbers(1000)").num_rows == 1000
    with pytest.raises(QueryLimitError, match="TOKENMETER_QUERY_MAX_RESULT_ROWS"):
        limited.query_readonly("SELECT number FROM numbers(200000)")
    with pytest.raises(QueryLimitError, match="TOKENMETER_QUERY_MAX_RESULT_BYTES"):
        limited.query_readonly(
            "SELECT randomPrintableASCII(1000) AS s FROM numbers(300) UNION ALL "
            "SELECT randomPrintableASCII(1000) AS s FROM numbers(300)"
        )
    with pytest.raises(QueryLimitError, match="TOKENMETER_QUERY_MAX_MEMORY"):
        limited.query_readonly(
            "SELECT count() FROM (SELECT number, groupArray(number) FROM numbers(20000000) "
            "GROUP BY number)"
        )
    with pytest.raises(QueryLimitError, match="TOKENMETER_QUERY_MAX_ROWS_TO_READ"):
        limited.query_readonly("SELECT sum(number) FROM numbers(20000000000)")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT number FROM numbers(5000) SETTINGS max_result_rows = 0",
        "SELECT * FROM (SELECT number FROM numbers(5000) SETTINGS max_result_rows = 0)",
        "SELECT count() FROM system.numbers SETTINGS max_execution_time = 0",
        "SELECT count() FROM (SELECT count() FROM system.numbers SETTINGS max_execution_time = 0)",
        "SELECT count() FROM system.numbers SETTINGS readonly = 2, max_execution_time = 0",
    ],
)
def test_the_analyst_cannot_lift_a_limit(limited: Any, sql: str) -> None:
    # refused (readonly) or ignored (the limit still stops it): never 5000 rows, never
    # a query past its time
    started = time.monotonic()
    with pytest.raises(WarehouseError):
        limited.query_readonly(sql)
    assert time.monotonic() - started < LIMITS.seconds + 10
    result = limited.query_readonly(
        "SELECT getSetting('max_execution_time') AS t, getSetting('max_result_rows') AS r,"
        " getSetting('readonly') AS ro"
    )
    assert result.to_pylist() == [{"t": 3.0, "r": 1000, "ro": 1}]


def test_a_heavy_query_does_not_hold_inserts(limited: Any, warehouse: Warehouse) -> None:
    table = f"probe_{uuid.uuid4().hex[:10]}"
    warehouse.execute(f"CREATE TABLE {table} (x UInt64) ENGINE = MergeTree ORDER BY x")
    try:
        thread, out = in_thread(limited.query_readonly, HEAVY)
        time.sleep(0.5)
        waited = []
        while thread.is_alive() and len(waited) < 5:
            started = time.monotonic()
            warehouse.insert_arrow(table, pa.table({"x": pa.array([len(waited)], pa.uint64())}))
            waited.append(time.monotonic() - started)
            time.sleep(0.1)
        thread.join()
        # the inserts went in while the query ran (before: each waited for the query)
        assert len(waited) == 5, out
        assert max(waited) < 2.0, waited
        assert isinstance(out.get("error"), QueryLimitError), out  # it ran to its limit
        assert warehouse.query_arrow(f"SELECT count() AS n FROM {table}").to_pylist() == [{"n": 5}]
    finally:
        warehouse.execute(f"DROP TABLE {table}")


def test_a_running_query_can_be_cancelled(limited: Any) -> None:
    thread, out = in_thread(limited.query_readonly, "SELECT count() FROM system.numbers", "q-1")
    time.sleep(1)
    cancelled_at = time.monotonic()
    limited.cancel_readonly("q-1")
    thread.join(10)
    assert not thread.is_alive()
    assert isinstance(out["error"], QueryLimitError) and "cancelled" in str(out["error"])
    assert time.monotonic() - cancelled_at < 2
    # the backend answers the next query normally
    assert limited.query_readonly("SELECT 1 AS one").to_pylist() == [{"one": 1}]


def test_the_embedded_table_function_guard_holds_on_the_server_backend(limited: Any) -> None:
    with pytest.raises(WarehouseError, match="DESCRIBE of a table function"):
        limited.query_readonly("DESCRIBE file('/etc/hostname', 'LineAsString')")
    with pytest.raises(WarehouseError, match="one statement"):
        limited.query_readonly("SELECT 1; SELECT 2")


def test_text_that_is_not_unicode_is_refused_with_a_message(limited: Any) -> None:
    with pytest.raises(WarehouseError, match="not valid Unicode"):
        limited.query_readonly("SELECT 'x\udcff'")


PRIVATE_SYSTEM_READS = [
    "SELECT query FROM system.processes",
    "SELECT query FROM `system`.`processes` AS p WHERE p.elapsed >= 0",
    "SHOW PROCESSLIST",
    "SELECT * FROM system.query_log",
    "SELECT * FROM system.query_thread_log",
    "SELECT 1 WHERE 'x' IN (SELECT query FROM system.processes)",
    "WITH q AS (SELECT query FROM system.processes) SELECT * FROM q",
    "SELECT * FROM view(SELECT query FROM system.processes)",
    "SELECT * FROM loop(system.processes) LIMIT 1",
    "SELECT query FROM merge('system', '^processes$')",
    "SELECT query FROM merge(REGEXP('^sys'), '^processes$')",
    "SELECT query FROM merge(concat('sys', 'tem'), '^processes$')",
    "SELECT * FROM cluster('default', 'system', 'processes')",
    "DESCRIBE TABLE system.processes",
    "SHOW CREATE TABLE system.query_log",
    "EXPLAIN SELECT query FROM system.processes",
]


@pytest.mark.parametrize("sql", PRIVATE_SYSTEM_READS)
def test_analysts_cannot_read_other_users_queries(limited: Any, sql: str) -> None:
    """Another analyst's query text is in system.processes while it runs: refused in
    every spelling the parser accepts (issue 14, low)."""
    secret = f"tenant-{uuid.uuid4().hex}"
    other, _ = in_thread(limited.query_readonly, f"{HEAVY} AND toString(number) != '{secret}'")
    try:
        time.sleep(0.3)
        with pytest.raises(WarehouseError, match="not readable by analysts"):
            limited.query_readonly(sql)
    finally:
        limited.cancel_readonly()
        other.join(10)


def test_ordinary_system_tables_stay_readable(limited: Any) -> None:
    tables = limited.query_readonly(
        "SELECT name FROM system.tables WHERE database = 'system' AND name = 'processes'"
    )
    assert tables.column("name").to_pylist() == ["processes"]
    assert limited.query_readonly("SELECT 'system' AS system").to_pylist() == [{"system": "system"}]


def test_introspection_functions_are_off_for_analysts(limited: Any) -> None:
    assert QueryLimits().engine_settings()["allow_introspection_functions"] == 0
    with pytest.raises(WarehouseError, match="(?i)introspection"):
        limited.query_readonly("SELECT demangle('_Z1fv') AS f")
