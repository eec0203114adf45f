"""pipeline.warehouse.server: ``ServerWarehouse`` driving the real clickhouse-connect.

No ClickHouse server can be installed here, so the client talks HTTP to
``ClickHouseHTTPStub`` (see its docstring for what that does and does not prove). The
assertions are on what crossed the wire: statements, settings, Arrow bodies, credentials.
"""

from __future__ import annotations

import base64
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import pyarrow as pa
import pytest

from pipeline.settings import load_settings
from pipeline.warehouse import WarehouseError, open_warehouse
from pipeline.warehouse.migrations import discover
from pipeline.warehouse.server import ServerWarehouse, parse_url, redact_url
from tests.unit.clickhouse_http_stub import ClickHouseHTTPStub

USER = "meter"
PASSWORD = "s3cr:t@P%ss/wörd"  # every character a URL makes awkward


@pytest.fixture
def stub() -> Iterator[ClickHouseHTTPStub]:
    with ClickHouseHTTPStub(user=USER, password=PASSWORD) as running:
        yield running


@pytest.fixture
def wh(stub: ClickHouseHTTPStub) -> Iterator[ServerWarehouse]:
    warehouse = ServerWarehouse(stub.url())
    yield warehouse
    warehouse.close()


# ---- URLs -------------------------------------------------------------------------------


def test_parse_url_gives_client_arguments() -> None:
    assert parse_url("clickhouse://meter:p%40ss%3Aw@ch.example:9000/billing") == {
        "host": "ch.example",
        "port": 9000,
        "username": "meter",
        "password": "p@ss:w",
        "database": "billing",
        "secure": False,
    }
    assert parse_url("clickhouse://ch.example") == {
        "host": "ch.example",
        "port": 8123,
        "username": "default",
        "password": "",
        "database": "default",
        "secure": False,
    }
    tls = parse_url("clickhouses://u:p@[2001:db8::1]/db")
    assert (tls["host"], tls["port"], tls["secure"]) == ("2001:db8::1", 8443, True)


@pytest.mark.parametrize(
    "url",
    [
        "http://meter:hunter2@ch.example:8123/db",
        "clickhouse://meter:hunter2@:8123/db",
        "clickhouse://meter:hunter2@ch.example:port/db",
        "clickhouse://meter:hunter2@ch.example:99999/db",
        "clickhouse://meter:hunter2@[::1/db",
        "meter:hunter2@ch.example",
    ],
)
def test_a_bad_url_names_the_setting_and_not_the_password(url: str) -> None:
    with pytest.raises(WarehouseError) as caught:
        ServerWarehouse(url)
    assert "TOKENMETER_WAREHOUSE_URL" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    assert "hunter2" not in redact_url(url)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("clickhouse://meter:hunter2@ch:8123/db", "clickhouse://meter:***@ch:8123/db"),
        ("clickhouse://meter:hun%40ter2@ch/db", "clickhouse://meter:***@ch/db"),
        ("clickhouse://meter:p@ss@ch/db", "clickhouse://meter:***@ch/db"),
        ("clickhouses://ch:8443/db", "clickhouses://ch:8443/db"),
        ("clickhouse://meter@ch/db", "clickhouse://meter@ch/db"),
        ("meter:hunter2@ch.example", "***@ch.example"),
    ],
)
def test_redact_url_hides_only_the_password(url: str, expected: str) -> None:
    assert redact_url(url) == expected


# ---- connecting -------------------------------------------------------------------------


def test_connecting_sends_the_credentials_and_hides_them(
    stub: ClickHouseHTTPStub, wh: ServerWarehouse
) -> None:
    assert wh.kind == "server"
    assert wh.location == f"clickhouse://{USER}:***@127.0.0.1:{stub.port}/tm"
    assert PASSWORD not in wh.location
    # clickhouse-connect's own connect-time queries, answered like a server
    queries = stub.queries()
    assert queries[0] == "SELECT version(), timezone()"
    assert queries[1].startswith("SELECT name, value, readonly FROM system.settings")
    # the URL-encoded password arrived decoded, as HTTP basic auth, never in the URL
    for request in stub.requests:
        user, _, password = (
            base64.b64decode(request.headers["Authorization"].removeprefix("Basic "))
            .decode()
            .partition(":")
        )
        assert (user, password) == (USER, PASSWORD)
        assert PASSWORD not in str(request.params)
    assert stub.last("system.settings").params["database"] == "tm"


def test_a_wrong_password_fails_without_echoing_either_password(
    stub: ClickHouseHTTPStub,
) -> None:
    with pytest.raises(WarehouseError) as caught:
        ServerWarehouse(stub.url(password="wrong-guess"))
    message = str(caught.value)
    assert "AUTHENTICATION_FAILED" in message or "516" in message
    assert f"clickhouse://{USER}:***@127.0.0.1:{stub.port}/tm" in message
    assert "wrong-guess" not in message and PASSWORD not in message


def test_an_unreachable_server_is_a_warehouse_error_naming_the_redacted_url() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"clickhouse://{USER}:hunter2@127.0.0.1:{port}/tm"
    with pytest.raises(WarehouseError) as caught:
        ServerWarehouse(url)
    assert f"cannot reach clickhouse://{USER}:***@127.0.0.1:{port}/tm" in str(caught.value)
    assert "hunter2" not in str(caught.value)


# ---- queries ------------------------------------------------------------------------------


def test_query_arrow_returns_the_servers_arrow_result(
    stub: ClickHouseHTTPStub, wh: ServerWarehouse
) -> None:
    answer = pa.table(
        {
            "model_id": pa.array(["qwen-max", "kimi-k2"]),
            "events": pa.array([3, 4], pa.uint64()),
            "amount": pa.array([Decimal("0.100000"), Decimal("12.345678")], pa.decimal128(38, 6)),
            "day": pa.array([datetime(2026, 11, 28, tzinfo=UTC)] * 2, pa.timestamp("ms", "UTC")),
        }
    )
    stub.answer("FROM usage_day", answer)
    result = wh.query_arrow("SELECT model_id, events, amount, day FROM usage_day")
    assert result.equals(answer)
    assert result.column("amount").to_pylist() == [Decimal("0.100000"), Decimal("12.345678")]
    request = stub.last("FROM usage_day")
    assert request.query.endswith("FORMAT Arrow")
    assert request.params["database"] == "tm"


def test_query_parameters_are_sent_for_server_side_binding(
    stub: ClickHouseHTTPStub, wh: ServerWarehouse
) -> None:
    stub.answer("FROM usage_events WHERE", pa.table({"n": pa.array([1], pa.uint64())}))
    wh.query_arrow(
        "SELECT count() AS n FROM usage_events "
        "WHERE tenant_id = {t:String} AND offset > {o:UInt64}",
        {"t": "tenant-'a", "o": 41},
    )
    request = stub.last("FROM usage_events WHERE")
    assert request.params["param_t"] == "tenant-\\'a"  # ClickHouse's escaped text form
    assert request.params["param_o"] == "41"
    assert "{t:String}" in request.query  # the value never spliced into the SQL


def test_execute_sends_the_statement(stub: ClickHouseHTTPStub, wh: ServerWarehouse) -> None:
    wh.execute("CREATE TABLE IF NOT EXISTS x (a UInt8) ENGINE = MergeTree ORDER BY a")
    request = stub.last("CREATE TABLE IF NOT EXISTS x")
    assert request.method == "POST"
    assert request.params["database"] == "tm"


def test_server_errors_become_one_line_warehouse_errors(
    stub: ClickHouseHTTPStub, wh: ServerWarehouse
) -> None:
    stub.fail_on(
        "FROM missing_table",
        60,
        "UNKNOWN_TABLE",
        "Unknown table expression identifier 'missing_table'",
    )
    stub.fail_on("DROP TABLE", 497, "ACCESS_DENIED", "meter: Not enough privileges")
    with pytest.raises(WarehouseError) as caught:
        wh.query_arrow("SELECT * FROM missing_table")
    assert "UNKNOWN_TABLE" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(WarehouseError, match="ACCESS_DENIED"):
        wh.execute("DROP TABLE usage_events")


# ---- read-only --------------------------------------------------------------------------


def parses_as(stub: ClickHouseHTTPStub, statement: str, kind: str = "SelectWithUnionQuery") -> None:
    """Answer the two parser queries a read-only query starts with (register first: the
    stub answers with the first pattern a query contains, and these contain the SQL)."""
    stub.answer("formatQuery(", pa.table({"f": [statement]}))
    stub.answer("EXPLAIN AST", pa.table({"explain": [f"{kind} (children 1)"]}))


def test_query_readonly_sends_the_limits_then_readonly_1(
    stub: ClickHouseHTTPStub, wh: ServerWarehouse
) -> None:
    parses_as(stub, "SELECT count() AS n FROM usage_hour")
    stub.answer("DESCRIBE", pa.table({"name": ["n"], "type": ["UInt64"]}))
    stub.answer("FROM usage_hour", pa.table({"n": pa.array([7], pa.uint64())}))
    result = wh.query_readonly("SELECT count() AS n FROM usage_hour ;\n", query_id="q1")
    assert result.column("n").to_pylist() == [7]
    expected = {k: str(v) for k, v in load_settings().query_limits().engine_settings().items()}
    for request in (stub.last("formatQuery"), stub.last("DESCRIBE"), stub.last("FROM usage_hour")):
        sent = {k: v for k, v in request.params.items() if k in expected}
        assert sent == expected
        assert list(sent)[-1] == "readonly"  # after the limits: they cannot be lifted
    assert stub.last("FROM usage_hour").query == (
        "/* tokenmeter-query q1 */\nSELECT * FROM (\nSELECT count() AS n FROM usage_hour\n)"
        "\n FORMAT Arrow"
    )
    # ordinary queries do not carry them
    wh.query_arrow("SELECT count() AS n FROM usage_hour")
    assert "readonly" not in stub.last("FROM usage_hour").params
    assert "max_execution_time" not in stub.last("FROM usage_hour").params


def test_describe_of_a_table_function_is_refused_before_it_runs(
    stub: ClickHouseHTTPStub, wh: ServerWarehouse
) -> None:
    # DESCRIBE url(...) makes the request and DESCRIBE file(...) reads the file even
    # under readonly=1; the AST (the engine's, here as a server answers it) shows it.
    stub.answer("formatQuery(", pa.table({"f": ["DESCRIBE TABLE url('http://10.0.0.1/x')"]}))
    stub.answer(
        "EXPLAIN AST",
        pa.table({"explain": ["DescribeQuery (children 1)", " TableExpression", "  Function url"]}),
    )
    with pytest.raises(WarehouseError, match="DESCRIBE of a table function"):
        wh.query_readonly("DESCRIBE url('http://10.0.0.1/x')")
    assert not [q for q in stub.queries() if q.startswith(("DESCRIBE", "/*"))]


def test_a_refused_readonly_statement_is_a_warehouse_error(
    stub: ClickHouseHTTPStub, wh: ServerWarehouse
) -> None:
    # What the server answers a write under readonly=1 (the refusal itself is the
    # engine's; see test_warehouse.py for it on the real engine).
    stub.fail_on(
        "INSERT INTO usage_events", 164, "READONLY", "meter: Cannot execute query in readonly mode"
    )
    with pytest.raises(WarehouseError, match="READONLY"):
        wh.query_readonly("INSERT INTO usage_events SELECT * FROM usage_events")
    assert stub.last("INSERT INTO usage_events").params["readonly"] == "1"
    # a statement the engine's parser says is not a read is refused before it runs
    stub.answer("formatQuery(", pa.table({"f": ["OPTIMIZE TABLE usage_events"]}))
    stub.answer("EXPLAIN AST", pa.table({"explain": ["OptimizeQuery  usage_events"]}))
    with pytest.raises(WarehouseError, match="only SELECT"):
        wh.query_readonly("OPTIMIZE TABLE usage_events")
    with pytest.raises(WarehouseError, match="empty query"):
        wh.query_readonly(" ; ")


def test_non_utf8_strings_come_back_as_bytes(stub: ClickHouseHTTPStub, wh: ServerWarehouse) -> None:
    # ClickHouse sends String as Arrow utf8 even when a raw dead-letter payload is not
    # UTF-8; pyarrow cannot turn that into Python values without help.
    payloads = [b"\xff\xfe raw", b"ok"]
    raw = pa.Array.from_buffers(pa.string(), 2, pa.array(payloads, pa.binary()).buffers())
    parses_as(stub, "SELECT payload FROM dead_letters")
    stub.answer("DESCRIBE", pa.table({"name": ["payload"], "type": ["String"]}))
    stub.answer("FROM dead_letters", pa.table({"payload": raw}))
    for result in (
        wh.query_arrow("SELECT payload FROM dead_letters"),
        wh.query_readonly("SELECT payload FROM dead_letters"),
    ):
        assert result.column("payload").to_pylist() == payloads


# ---- inserts -------------------------------------------------------------------------------


def test_insert_arrow_sends_the_table_columns_rows_and_token(
    stub: ClickHouseHTTPStub, wh: ServerWarehouse
) -> None:
    data = pa.table(
        {
            "event_id": ["e1", "e2", "e3"],
            "amount": pa.array([Decimal("1.000001")] * 3, pa.decimal128(38, 6)),
            "offset": pa.array([10, 11, 12], pa.uint64()),
        }
    )
    assert wh.insert_arrow("usage_events", data, dedup_token="usage_events-abc123") == 3
    [insert] = stub.inserts
    assert insert.table == "usage_events"
    assert insert.columns == ["event_id", "amount", "offset"]
    assert insert.data.equals(data)
    assert insert.params["insert_deduplication_token"] == "usage_events-abc123"
    assert insert.params["database"] == "tm"


def test_insert_without_token_and_empty_inserts(
    stub: ClickHouseHTTPStub, wh: ServerWarehouse
) -> None:
    data = pa.table({"a": pa.array([1], pa.uint8())})
    wh.insert_arrow("t", data)
    assert "insert_deduplication_token" not in stub.inserts[-1].params
    before = len(stub.requests)
    assert wh.insert_arrow("t", data.slice(0, 0), dedup_token="x") == 0
    assert len(stub.requests) == before  # nothing sent for nothing


def test_concurrent_calls_from_two_threads_do_not_collide(
    stub: ClickHouseHTTPStub, wh: ServerWarehouse
) -> None:
    # The worker's query endpoint and its pipeline thread share one warehouse.
    stub.answer("SELECT slow", pa.table({"x": pa.array([1], pa.uint8())}), delay_s=0.3)
    errors: list[str] = []

    def call() -> None:
        try:
            wh.query_arrow("SELECT slow")
        except WarehouseError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    wh.insert_arrow("t", pa.table({"a": pa.array([1], pa.uint8())}))
    for t in threads:
        t.join()
    assert errors == []
    assert len(stub.inserts) == 1


# ---- migrations through open_warehouse -------------------------------------------------


LEDGER = pa.schema([("version", pa.uint32()), ("checksum", pa.string())])


def test_open_warehouse_applies_every_migration_to_the_server(stub: ClickHouseHTTPStub) -> None:
    stub.answer("FROM schema_migrations", LEDGER.empty_table())
    wh = open_warehouse(load_settings(warehouse_url=stub.url()))
    try:
        assert wh.kind == "server"
        sent = stub.queries()
        positions = []
        for migration in discover():
            for statement in migration.statements():
                assert statement in sent, f"{migration.path.name} not sent"
                positions.append(sent.index(statement))
        assert positions == sorted(positions)  # in file and version order
        ledger = [i for i in stub.inserts if i.table == "schema_migrations"]
        assert [i.data.column("version").to_pylist()[0] for i in ledger] == [
            m.version for m in discover()
        ]
        assert [i.data.column("checksum").to_pylist()[0] for i in ledger] == [
            m.checksum for m in discover()
        ]
    finally:
        wh.close()


def test_open_warehouse_on_a_migrated_server_sends_no_ddl(stub: ClickHouseHTTPStub) -> None:
    files = discover()
    stub.answer(
        "FROM schema_migrations",
        pa.table(
            {
                "version": pa.array([m.version for m in files], pa.uint32()),
                "checksum": [m.checksum for m in files],
            }
        ),
    )
    wh = open_warehouse(load_settings(warehouse_url=stub.url()))
    wh.close()
    assert stub.inserts == []
    sent = stub.queries()
    assert not any(s in sent for m in files for s in m.statements())


def test_a_failing_migration_stops_open_warehouse_and_is_not_recorded(
    stub: ClickHouseHTTPStub,
) -> None:
    stub.answer("FROM schema_migrations", LEDGER.empty_table())
    stub.fail_on(
        "CREATE TABLE IF NOT EXISTS dead_letters",
        62,
        "SYNTAX_ERROR",
        "Syntax error: failed at position 1",
    )
    with pytest.raises(WarehouseError, match="SYNTAX_ERROR"):
        open_warehouse(load_settings(warehouse_url=stub.url()))
    failing = next(
        m.version
        for m in discover()
        if any("TABLE IF NOT EXISTS dead_letters" in s for s in m.statements())
    )
    recorded = [i.data.column("version").to_pylist()[0] for i in stub.inserts]
    # those before it went through; it failed, and nothing after it ran
    assert recorded == [m.version for m in discover() if m.version < failing]
    assert not any("usage_minute" in q for q in stub.queries() if q.startswith("CREATE"))


def test_datetime_columns_come_back_as_timestamps(
    stub: ClickHouseHTTPStub, wh: ServerWarehouse
) -> None:
    # ClickHouse's Arrow output sends DateTime as bare uint32 seconds; the read-only path
    # asks for DateTime64 instead, so analysts see times, not integers.
    parses_as(stub, "SELECT period_start, count() AS n FROM usage_day GROUP BY period_start")
    stub.answer(
        "DESCRIBE",
        pa.table({"name": ["period_start", "n"], "type": ["DateTime('Asia/Shanghai')", "UInt64"]}),
    )
    stub.answer("FROM usage_day", pa.table({"n": pa.array([1], pa.uint64())}))
    wh.query_readonly("SELECT period_start, count() AS n FROM usage_day GROUP BY period_start")
    sent = stub.last("FROM usage_day").query.split("\n", 1)[1]  # after the tag
    assert sent.startswith("SELECT * REPLACE (toDateTime64(`period_start`, 0) AS `period_start`)")
