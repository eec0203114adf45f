"""pipeline.warehouse: migrations, read-only queries, Arrow round trips, the chdb lock.

The engine is real: chdb (ClickHouse 26.9 in-process). chdb serves ONE data path per
process at a time (a second path fails with "EmbeddedServer already initialized with
path ..." until the first session is closed), so:

- in-process tests share the session-wide ``warehouse`` fixture (tests/conftest.py) and
  write under table names or Kafka topics of their own;
- tests that need a fresh directory (migrations from scratch) or a second process (the
  directory lock) run a short Python script in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from pipeline.events import Rules
from pipeline.metering.dedup import DedupIndex
from pipeline.metering.pricing import Rating
from pipeline.serde import AvroCodec
from pipeline.stages.ingest import IngestStage, RawMessage
from pipeline.stages.rate import Rated
from pipeline.warehouse import (
    ReadOnlyViolationError,
    Warehouse,
    WarehouseError,
    apply_migrations,
    rows,
    scalar,
)
from pipeline.warehouse.arrow_rows import dead_letters_table, usage_events_table
from pipeline.warehouse.base import binary_unless_utf8, quote_ident, quote_literal
from pipeline.warehouse.migrations import MIGRATIONS_DIR, discover

REPO = Path(__file__).resolve().parents[2]
CODEC = AvroCodec()
KEY = b"unit-test-pseudonym-key"
NOW = 1_795_852_800_000  # 2026-11-28T08:00:00Z


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def run_script(script: str, *args: str, timeout: float = 120) -> dict[str, Any]:
    """Run ``script`` in a fresh Python process (its own chdb); it prints one line
    ``RESULT <json>``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
        check=False,
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return result
    raise AssertionError(f"no result (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")


# ---- a fresh process: migrations from scratch, one path at a time -----------------------

FRESH = r"""
import json, sys
from pathlib import Path
from pipeline.settings import load_settings
from pipeline.warehouse import (
    WarehouseError, WarehouseLockedError, apply_migrations, open_warehouse, rows)
from pipeline.warehouse.embedded import EmbeddedWarehouse

data, mig, other = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
out = {}
wh = open_warehouse(load_settings(data_dir=data))  # the real entry point, real files
out["kind"] = wh.kind
out["ledger"] = rows(wh.query_arrow(
    "SELECT version, name, checksum FROM schema_migrations ORDER BY applied_at, version"))
out["tables"] = wh.query_arrow("SHOW TABLES").column(0).to_pylist()
out["rerun"] = [m.version for m in apply_migrations(wh)]

(mig / "900_probe.sql").write_text(
    "-- a probe table\nCREATE TABLE probe (a UInt8) ENGINE = MergeTree ORDER BY a;\n")
(mig / "901_probe_more.sql").write_text(
    "-- only works after 900\nALTER TABLE probe ADD COLUMN b String;\n"
    "INSERT INTO probe (a, b) VALUES (1, 'x;y'), (2, 'z');\n")
out["probe_applied"] = [m.version for m in apply_migrations(wh, mig)]
out["probe_rows"] = rows(wh.query_arrow("SELECT a, b FROM probe ORDER BY a"))
out["probe_rerun"] = [m.version for m in apply_migrations(wh, mig)]

(mig / "900_probe.sql").write_text((mig / "900_probe.sql").read_text() + "-- edited\n")
(mig / "902_never.sql").write_text("CREATE TABLE never (a UInt8) ENGINE = Memory;\n")
try:
    apply_migrations(wh, mig)
    out["edited"] = None
except WarehouseError as exc:
    out["edited"] = str(exc)
out["never_exists"] = rows(wh.query_arrow("EXISTS TABLE never"))[0]["result"]
out["ledger_after"] = wh.query_arrow(
    "SELECT version FROM schema_migrations ORDER BY version").column(0).to_pylist()

# chdb: the same path again shares the engine; another path fails while one is open
same = EmbeddedWarehouse(Path(wh.location))
out["same_path_sees"] = rows(same.query_arrow("SELECT count() AS n FROM probe"))[0]["n"]
try:
    EmbeddedWarehouse(other)
    out["second_path"] = "opened"
except WarehouseLockedError as exc:
    out["second_path"] = "locked: " + str(exc)
except WarehouseError as exc:
    out["second_path"] = "error: " + str(exc)
same.close()
wh.close()
second = EmbeddedWarehouse(other)  # once closed, another path opens
out["second_after_close"] = second.query_arrow("SELECT 1 AS one").column(0).to_pylist()
second.close()

wh = open_warehouse(load_settings(data_dir=data))  # reopen: persisted, nothing re-applied
out["reopened_rows"] = rows(wh.query_arrow("SELECT count() AS n FROM probe"))[0]["n"]
out["reopened_ledger"] = wh.query_arrow("SELECT count() AS n FROM schema_migrations"
                                        ).column(0).to_pylist()[0]
wh.close()
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One new process with its own chdb: a warehouse migrated from scratch, then the
    one-path-per-process rule probed."""
    base = tmp_path_factory.mktemp("fresh")
    mig = base / "migrations"
    shutil.copytree(MIGRATIONS_DIR, mig)
    return run_script(FRESH, str(base / "data"), str(mig), str(base / "other"))


def test_a_fresh_warehouse_gets_every_migration_in_order(fresh: dict[str, Any]) -> None:
    files = discover()
    assert fresh["kind"] == "embedded"
    assert [r["version"] for r in fresh["ledger"]] == [m.version for m in files]
    assert [r["version"] for r in fresh["ledger"]] == sorted(m.version for m in files)
    assert [r["name"] for r in fresh["ledger"]] == [m.name for m in files]
    assert [r["checksum"] for r in fresh["ledger"]] == [m.checksum for m in files]
    # the contract's tables exist
    for table in (
        "usage_events",
        "dead_letters",
        "rated_usage",
        "usage_minute",
        "usage_hour",
        "usage_day",
        "usage_corrections",
        "price_cards",
    ):
        assert table in fresh["tables"]


def test_rerunning_migrations_is_a_no_op(fresh: dict[str, Any]) -> None:
    assert fresh["rerun"] == []
    assert fresh["probe_rerun"] == []
    assert fresh["reopened_ledger"] == len(discover()) + 2


def test_new_migrations_apply_in_version_order(fresh: dict[str, Any]) -> None:
    assert fresh["probe_applied"] == [900, 901]
    # 901 alters what 900 created; a ';' inside a string literal does not split it
    assert fresh["probe_rows"] == [{"a": 1, "b": "x;y"}, {"a": 2, "b": "z"}]
    assert fresh["reopened_rows"] == 2


def test_an_edited_applied_migration_is_refused_before_anything_runs(
    fresh: dict[str, Any],
) -> None:
    assert fresh["edited"] is not None
    assert "900_probe.sql changed after it was applied" in fresh["edited"]
    assert "new migration" in fresh["edited"]
    assert fresh["never_exists"] == 0  # 902 did not run
    assert 902 not in fresh["ledger_after"]


def test_chdb_serves_one_path_per_process_at_a_time(fresh: dict[str, Any]) -> None:
    # The constraint the whole test suite is built around (see the module docstring).
    assert fresh["same_path_sees"] == 2
    assert fresh["second_path"].startswith("error: ")
    assert "already initialized with path" in fresh["second_path"]
    assert fresh["second_after_close"] == [1]


def test_migration_files_must_be_named_and_numbered_uniquely(tmp_path: Path) -> None:
    (tmp_path / "001_a.sql").write_text("SELECT 1;\n")
    (tmp_path / "1_b.sql").write_text("SELECT 1;\n")
    with pytest.raises(WarehouseError, match="1_b.sql: migration files are named NNN_name"):
        discover(tmp_path)
    (tmp_path / "1_b.sql").unlink()
    (tmp_path / "001_b.sql").write_text("SELECT 1;\n")
    with pytest.raises(WarehouseError, match="share a version"):
        discover(tmp_path)


def test_statements_split_at_line_ending_semicolons_and_drop_comments(tmp_path: Path) -> None:
    (tmp_path / "001_x.sql").write_text(
        "-- header\nCREATE TABLE a (s String)\nENGINE = Memory;\n"
        "INSERT INTO a VALUES ('1;2');  \n  -- trailing comment\nSELECT 1"
    )
    [migration] = discover(tmp_path)
    assert migration.statements() == [
        "CREATE TABLE a (s String)\nENGINE = Memory",
        "INSERT INTO a VALUES ('1;2')",
        "SELECT 1",
    ]


def test_the_shared_warehouse_is_fully_migrated(warehouse: Warehouse) -> None:
    ledger = rows(warehouse.query_arrow("SELECT version, checksum FROM schema_migrations"))
    recorded = {r["version"]: r["checksum"] for r in ledger}
    assert {m.version: m.checksum for m in discover()}.items() <= recorded.items()
    assert apply_migrations(warehouse) == []


# ---- the directory lock between processes ------------------------------------------------

HOLD = r"""
import sys
from pathlib import Path
from pipeline.warehouse.embedded import EmbeddedWarehouse
wh = EmbeddedWarehouse(Path(sys.argv[1]))
wh.execute("CREATE TABLE IF NOT EXISTS held (x UInt8) ENGINE = MergeTree ORDER BY x")
wh.execute("INSERT INTO held VALUES (1), (2)")
print("ready", flush=True)
sys.stdin.readline()
wh.close()
"""

CONTEND = r"""
import json, sys
from pathlib import Path
from pipeline.warehouse import WarehouseError, WarehouseLockedError
from pipeline.warehouse.embedded import EmbeddedWarehouse

def attempt():
    try:
        wh = EmbeddedWarehouse(Path(sys.argv[1]))
    except WarehouseLockedError as exc:
        return {"locked": str(exc)}
    except WarehouseError as exc:
        return {"error": str(exc)}
    found = wh.query_arrow("SELECT count() AS n FROM held").column(0).to_pylist()
    wh.close()
    return {"rows": found}

sys.stdin.readline()  # the holder has the lock
print("RESULT " + json.dumps(attempt()), flush=True)
sys.stdin.readline()  # the holder has closed: try again, in the same process
print("RESULT " + json.dumps(attempt()), flush=True)
"""


def _python(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # chdb prints the lock failure there too
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("RESULT "):
            found: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return found
    raise AssertionError(f"no result, exit {proc.wait()}")


def test_a_second_process_gets_warehouse_locked_error_until_release(tmp_path: Path) -> None:
    path = tmp_path / "warehouse"
    holder = _python(HOLD, str(path))
    contender = _python(CONTEND, str(path))  # starts up meanwhile, then waits
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert contender.stdin is not None
        assert holder.stdout.readline().strip() == "ready"
        contender.stdin.write("\n")
        contender.stdin.flush()
        first = _result(contender)
        assert "locked" in first, first
        assert str(path) in first["locked"]
        assert "tokenmeter worker" in first["locked"]  # tells the user what holds it
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=60) == 0
        # released on close: the waiting process now opens it and sees the data
        contender.stdin.write("\n")
        contender.stdin.flush()
        assert _result(contender) == {"rows": [2]}
        assert contender.wait(timeout=60) == 0
    finally:
        for proc in (holder, contender):
            if proc.poll() is None:
                proc.kill()


# ---- read-only queries ------------------------------------------------------------------


@pytest.fixture(scope="module")
def probe_table(warehouse: Warehouse) -> str:
    name = unique("ro_probe")
    warehouse.execute(
        f"CREATE TABLE {name} (id UInt32, label String) ENGINE = MergeTree ORDER BY id"
    )
    return name


def _fill(warehouse: Warehouse, table: str) -> None:
    warehouse.execute(f"TRUNCATE TABLE {table}")
    warehouse.execute(f"INSERT INTO {table} VALUES (1, 'a'), (2, 'b')")


@pytest.mark.parametrize(
    ("sql", "expected_rows"),
    [
        ("SELECT id, label FROM {t} ORDER BY id", 2),
        ("  select count() from {t} ;; ", 1),
        ("WITH 2 AS k SELECT id FROM {t} WHERE id = k", 1),
        ("SELECT id FROM {t} UNION ALL SELECT id FROM {t}", 4),
        ("SELECT id FROM {t} -- a comment", 2),
        ("SHOW TABLES", None),
        ("DESCRIBE TABLE {t}", 2),
        ("DESCRIBE (SELECT 1 AS x)", 1),
        ("EXPLAIN SELECT id FROM {t}", None),
        ("EXISTS TABLE {t}", 1),
        # analysts paste formatted, commented SQL
        ("SELECT\n    id,\n    label\nFROM {t}\n-- it's sorted\nORDER BY id\n", 2),
        ("SELECT id FROM {t} WHERE match(label, '^\\\\w$')\t/* regex; tab */", 2),
        ("SELECT 'x;y' AS s", 1),
    ],
)
def test_read_statements_are_allowed(
    warehouse: Warehouse, probe_table: str, sql: str, expected_rows: int | None
) -> None:
    _fill(warehouse, probe_table)
    result = warehouse.query_readonly(sql.format(t=probe_table))
    if expected_rows is None:
        assert result.num_rows > 0
    else:
        assert result.num_rows == expected_rows


def test_readonly_results_are_the_data(warehouse: Warehouse, probe_table: str) -> None:
    _fill(warehouse, probe_table)
    text = warehouse.query_readonly("SELECT 'a\\tb;c\\\\d' AS s, 'it''s' AS q")
    assert rows(text) == [{"s": "a\tb;c\\d", "q": "it's"}]
    result = warehouse.query_readonly(f"SELECT id, label FROM {probe_table} ORDER BY id")
    assert rows(result) == [{"id": 1, "label": "a"}, {"id": 2, "label": "b"}]
    assert probe_table in warehouse.query_readonly("SHOW TABLES").column(0).to_pylist()


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO {t} VALUES (3, 'c')",
        "INSERT INTO {t} SELECT 3, 'c'",
        "CREATE TABLE {t}_x (a UInt8) ENGINE = Memory",
        "DROP TABLE {t}",
        "ALTER TABLE {t} DELETE WHERE 1",
        "ALTER TABLE {t} ADD COLUMN z UInt8",
        "TRUNCATE TABLE {t}",
        "OPTIMIZE TABLE {t} FINAL",
        "SET readonly = 0",
        "SYSTEM DROP DNS CACHE",
        "SELECT 1; DROP TABLE {t}",
        "SELECT 1;DROP TABLE {t}",
        "SELECT 1 INTO OUTFILE '{out}'",
        "",
        " ; ",
    ],
)
def test_writes_are_refused_and_change_nothing(
    warehouse: Warehouse, probe_table: str, tmp_path: Path, sql: str
) -> None:
    _fill(warehouse, probe_table)
    out = tmp_path / "out.csv"
    with pytest.raises(WarehouseError):
        warehouse.query_readonly(sql.format(t=probe_table, out=out))
    assert rows(warehouse.query_arrow(f"SELECT id, label FROM {probe_table} ORDER BY id")) == [
        {"id": 1, "label": "a"},
        {"id": 2, "label": "b"},
    ]
    assert scalar(warehouse.query_arrow(f"EXISTS TABLE {probe_table}_x")) == 0
    assert not out.exists()


def test_several_statements_are_refused_as_such(warehouse: Warehouse, probe_table: str) -> None:
    with pytest.raises(ReadOnlyViolationError, match="one statement"):
        warehouse.query_readonly(f"SELECT 1; DROP TABLE {probe_table}")
    with pytest.raises(ReadOnlyViolationError, match="only SELECT"):
        warehouse.query_readonly(f"DROP TABLE {probe_table}")
    assert scalar(warehouse.query_arrow(f"EXISTS TABLE {probe_table}")) == 1


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM file('{f}', 'TSVWithNames')",
        "SELECT * FROM file('{f}', 'TSVWithNames') SETTINGS readonly = 0",
        "SELECT count() FROM (SELECT * FROM file('{f}', 'LineAsString'))",
        "DESCRIBE TABLE file('{f}', 'TSVWithNames')",
        "DESC file('{f}', 'TSVWithNames')",
        "DESCRIBE (SELECT * FROM file('{f}', 'TSVWithNames'))",
        "EXPLAIN SELECT * FROM file('{f}', 'TSVWithNames')",
        "SELECT * FROM url('http://127.0.0.1:9/x', 'CSV', 'a UInt8')",
    ],
)
def test_reading_outside_the_warehouse_is_refused(
    warehouse: Warehouse, tmp_path: Path, sql: str
) -> None:
    # The engine's readonly=1 stops table functions in SELECT; DESCRIBE ignores it and
    # would show a file's first line as a column name, so it is refused up front.
    secret = tmp_path / "secret.tsv"
    secret.write_text("top_secret_header\nvalue\n")
    with pytest.raises(WarehouseError) as caught:
        warehouse.query_readonly(sql.format(f=secret))
    assert "top_secret_header" not in str(caught.value)


def test_readonly_is_enforced_by_the_engine(warehouse: Warehouse) -> None:
    # The query runs with the engine's readonly setting on, whatever the text says.
    result = warehouse.query_readonly("SELECT getSetting('readonly') AS ro")
    assert scalar(result) == 1


# ---- errors, quoting, helpers ---------------------------------------------------------


def test_engine_errors_become_one_line_warehouse_errors(warehouse: Warehouse) -> None:
    with pytest.raises(WarehouseError) as caught:
        warehouse.query_arrow("SELECT * FROM no_such_table_here")
    message = str(caught.value)
    assert "no_such_table_here" in message and "UNKNOWN_TABLE" in message
    assert "\n" not in message


def test_query_parameters_are_bound_by_the_engine(warehouse: Warehouse) -> None:
    result = warehouse.query_arrow(
        "SELECT {n:UInt32} + 1 AS n, {s:String} AS s", {"n": 41, "s": "it's"}
    )
    assert rows(result) == [{"n": 42, "s": "it's"}]


@pytest.mark.parametrize(
    "text", ["plain", "it's", "back\\slash", "quote'); DROP TABLE x; --", "多字节"]
)
def test_quote_literal_round_trips_through_the_engine(warehouse: Warehouse, text: str) -> None:
    assert scalar(warehouse.query_arrow(f"SELECT {quote_literal(text)} AS s")) == text


@pytest.mark.parametrize("name", ["a`b", "a b", "1abc", "", "t; DROP TABLE x"])
def test_quote_ident_refuses_anything_but_plain_names(name: str) -> None:
    with pytest.raises(WarehouseError):
        quote_ident(name)
    assert quote_ident("usage_events") == "`usage_events`"


def test_scalar_wants_exactly_one_value(warehouse: Warehouse) -> None:
    assert scalar(warehouse.query_arrow("SELECT 5 AS x")) == 5
    with pytest.raises(WarehouseError, match="expected one value"):
        scalar(warehouse.query_arrow("SELECT 1 AS a, 2 AS b"))
    with pytest.raises(WarehouseError, match="expected one value"):
        scalar(warehouse.query_arrow("SELECT number FROM numbers(2)"))


def test_an_empty_result_is_an_empty_table(warehouse: Warehouse) -> None:
    assert warehouse.query_arrow("SELECT 1 AS x WHERE 0").num_rows == 0


# ---- Decimal and bytes round trips -----------------------------------------------------

DEC = pa.decimal128(38, 6)
AMOUNTS = [
    Decimal("0.100000"),
    Decimal("0.200000"),
    Decimal("-0.000001"),
    Decimal("12345678901234567890123456789012.123456"),  # 38 digits
    Decimal("0.000001"),
]


def test_decimal_round_trip_is_exact(warehouse: Warehouse) -> None:
    table = unique("dec_probe")
    warehouse.execute(
        f"CREATE TABLE {table} (id UInt32, amount Decimal(38, 6)) ENGINE = MergeTree ORDER BY id"
    )
    data = pa.table(
        {"id": pa.array(range(len(AMOUNTS)), pa.uint32()), "amount": pa.array(AMOUNTS, DEC)}
    )
    assert warehouse.insert_arrow(table, data) == len(AMOUNTS)
    back = warehouse.query_arrow(f"SELECT amount FROM {table} ORDER BY id")
    assert back.schema.field("amount").type == DEC  # never a float on the way
    assert back.column("amount").to_pylist() == AMOUNTS
    total = scalar(warehouse.query_readonly(f"SELECT sum(amount) FROM {table} WHERE id < 2"))
    assert total == Decimal("0.300000")  # 0.1 + 0.2, exactly


def test_non_utf8_bytes_come_back_as_bytes(warehouse: Warehouse) -> None:
    # A raw dead-letter payload is whatever a producer sent; reading it must not crash.
    table = unique("bytes_probe")
    warehouse.execute(
        f"CREATE TABLE {table} (id UInt32, payload String) ENGINE = MergeTree ORDER BY id"
    )
    payloads = [b"\xff\x00\xc3 junk", "héllo".encode()]
    data = pa.table(
        {"id": pa.array([1, 2], pa.uint32()), "payload": pa.array(payloads, pa.binary())}
    )
    warehouse.insert_arrow(table, data)
    for result in (
        warehouse.query_arrow(f"SELECT payload FROM {table} ORDER BY id"),
        warehouse.query_readonly(f"SELECT payload FROM {table} ORDER BY id"),
    ):
        assert result.column("payload").to_pylist() == payloads
    # valid text stays text
    assert warehouse.query_arrow("SELECT 'héllo' AS s").column("s").to_pylist() == ["héllo"]


def test_binary_unless_utf8_leaves_valid_tables_alone() -> None:
    table = pa.table({"s": ["a", None, "ü"], "n": [1, 2, 3]})
    assert binary_unless_utf8(table).equals(table)


def test_a_retried_block_with_the_same_token_is_stored_once(warehouse: Warehouse) -> None:
    table = unique("token_probe")
    warehouse.execute(
        f"CREATE TABLE {table} (id UInt32, at DateTime64(3, 'UTC')) "
        "ENGINE = MergeTree ORDER BY id SETTINGS non_replicated_deduplication_window = 100"
    )

    def block(second: int) -> pa.Table:
        at = datetime(2026, 11, 28, 8, 0, second, tzinfo=UTC)
        return pa.table(
            {
                "id": pa.array([1, 2, 3], pa.uint32()),
                "at": pa.array([at] * 3, pa.timestamp("ms", "UTC")),
            }
        )

    warehouse.insert_arrow(table, block(0), dedup_token="block-1")
    # the retry was rebuilt (another timestamp): the token, not the content, identifies it
    warehouse.insert_arrow(table, block(5), dedup_token="block-1")
    assert scalar(warehouse.query_arrow(f"SELECT count() FROM {table}")) == 3
    warehouse.insert_arrow(table, block(0), dedup_token="block-2")  # another block
    assert scalar(warehouse.query_arrow(f"SELECT count() FROM {table}")) == 6
    assert warehouse.insert_arrow(table, block(0).slice(0, 0)) == 0


# ---- the worker's Arrow batches, inserted for real --------------------------------------


def _ingested(values: list[dict[str, Any] | bytes], topic: str) -> Any:
    messages = [
        RawMessage(topic, 1, i, NOW, None, CODEC.encode(v) if isinstance(v, dict) else v)
        for i, v in enumerate(values)
    ]
    return IngestStage(CODEC, Rules(), KEY, DedupIndex()).process(messages)


def _event(**changes: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "event_id": "evt-1",
        "event_time": NOW - 61_234,
        "source": "terminal",
        "source_id": "stb-1",
        "reporting_carrier": "CUCC",
        "home_carrier": "CUCC",
        "serving_carrier": "CTCC",
        "transaction_id": "tx-1",
        "tenant_id": "tenant-a",
        "subscriber_id": "13800138000",
        "channel": "home_terminal",
        "model_id": "glm-4.6",
        "provider": "zhipu",
        "input_tokens": 10_000_000,
        "output_tokens": 2,
        "cached_tokens": 3,
        "reasoning_tokens": 4,
        "status": "failover",
        "routing_policy": "quality_first",
        "latency_ms": 2**63 - 1,
        "region": "shanghai",
        "attributes": {"k": "v", "多": "字节"},
    }
    rec.update(changes)
    return rec


def test_usage_events_rows_land_field_for_field(warehouse: Warehouse) -> None:
    topic = unique("t_arrow")
    result = _ingested(
        [
            _event(),
            _event(
                event_id="evt-2",
                transaction_id=None,
                home_carrier="CTCC",
                routing_policy=None,
                latency_ms=None,
                region=None,
                attributes={},
            ),
        ],
        topic,
    )
    rating = Rating(
        Decimal("10.000009"), Decimal("12.345678"), Decimal("13.000001"), True, "2026-11", "CTCC/*"
    )
    rated = [
        Rated(a, rating, "gold" if i == 0 else None, "2026-11")
        for i, a in enumerate(result.accepted)
    ]
    ingested_at = datetime(2026, 11, 28, 8, 0, 1, 500_000, tzinfo=UTC)
    data = usage_events_table(rated, ingested_at)
    assert warehouse.insert_arrow("usage_events", data) == 2

    got = rows(
        warehouse.query_arrow(
            "SELECT * EXCEPT (ingested_at), toUnixTimestamp64Milli(ingested_at) AS ingested_ms "
            f"FROM usage_events WHERE topic = {quote_literal(topic)} ORDER BY offset"
        )
    )
    first, second = got
    expected = dict(result.accepted[0].record)
    for name, value in expected.items():
        if name == "event_time":
            assert first[name] == datetime.fromtimestamp(value / 1000, tz=UTC)
        elif name == "attributes":
            assert dict(first[name]) == value
        else:
            assert first[name] == value, name
    assert first["subscriber_id"].startswith("sub_")
    assert (first["token_units"], first["amount"], first["list_amount"]) == (
        Decimal("10.000009"),
        Decimal("12.345678"),
        Decimal("13.000001"),
    )
    assert first["billable"] is True and first["currency"] == "CNY"
    assert (first["tenant_plan"], second["tenant_plan"]) == ("gold", "")
    assert first["payload_hash"] == result.accepted[0].payload_hash
    assert (first["topic"], first["partition"], first["offset"]) == (topic, 1, 0)
    assert first["ingested_ms"] == int(ingested_at.timestamp() * 1000)
    # absent optional fields are NULL, not empty strings
    assert (
        second["transaction_id"],
        second["routing_policy"],
        second["latency_ms"],
        second["region"],
    ) == (None, None, None, None)
    assert dict(second["attributes"]) == {}
    # the rated_usage view shows them
    assert scalar(
        warehouse.query_arrow(
            f"SELECT sum(amount) FROM rated_usage WHERE topic = {quote_literal(topic)}"
        )
    ) == Decimal("24.691356")


def test_dead_letter_rows_land_with_payloads_and_clamped_times(warehouse: Warehouse) -> None:
    topic = unique("t_dl")
    edge_ms = int(datetime(2299, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp() * 1000)
    first_ms = int(datetime(1900, 1, 1, tzinfo=UTC).timestamp() * 1000)
    junk = b"\xff\xfe not avro \x00"
    result = _ingested(
        [
            junk,
            _event(input_tokens=-1),
            _event(event_id="e-edge", event_time=edge_ms),
            _event(event_id="e-over", event_time=edge_ms + 1000),
            _event(event_id="e-first", event_time=first_ms),
            _event(event_id="e-under", event_time=first_ms - 1000),
        ],
        topic,
    )
    assert len(result.dead_letters) == 6
    data = dead_letters_table(result.dead_letters, datetime(2026, 11, 28, tzinfo=UTC))
    assert warehouse.insert_arrow("dead_letters", data) == 6

    got = rows(
        warehouse.query_arrow(
            "SELECT reason, stage, event_id, payload, payload_format, offset, "
            "toUnixTimestamp64Milli(event_time) AS t, toUnixTimestamp64Milli(failed_at) AS f "
            f"FROM dead_letters WHERE topic = {quote_literal(topic)} ORDER BY offset"
        )
    )
    assert [(r["reason"], r["stage"]) for r in got] == [
        ("undecodable", "decode"),
        ("negative_tokens", "validate"),
        ("future_event_time", "validate"),
        ("future_event_time", "validate"),
        ("too_late", "validate"),
        ("too_late", "validate"),
    ]
    assert got[0]["payload"] == junk and got[0]["payload_format"] == "raw"
    payload = json.loads(got[1]["payload"])
    assert payload["input_tokens"] == -1 and payload["subscriber_id"].startswith("sub_")
    assert b"13800138000" not in b"".join(
        r["payload"] if isinstance(r["payload"], bytes) else r["payload"].encode() for r in got
    )
    # DateTime64(3) takes the extremes exactly; outside them the column is NULL
    assert [r["t"] for r in got] == [None, NOW - 61_234, edge_ms, None, first_ms, None]
    assert {r["f"] for r in got} == {NOW}
