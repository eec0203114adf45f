"""pipeline.stages.sink: idempotent, offset-tracked writes into the real engine.

Rows go into the real ``usage_events`` table of the shared embedded warehouse (each test
under a Kafka topic name of its own, so tests never see each other's rows). Failures are
injected by wrapping the real warehouse (``FlakyWarehouse``): the engine still does every
insert and query, the wrapper only makes some calls fail the way a broken connection
would.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest

from pipeline.events import payload_hash
from pipeline.metering.pricing import Rating
from pipeline.stages.ingest import Accepted
from pipeline.stages.rate import Rated
from pipeline.stages.sink import Sink, SinkAbortedError, TrackedTable, dedup_token
from pipeline.warehouse import Warehouse, WarehouseError, rows, scalar
from pipeline.warehouse.arrow_rows import usage_events_table
from pipeline.warehouse.base import quote_literal

TABLE = "usage_events"
NOW = 1_795_852_800_000
RATING = Rating(
    Decimal("1.500000"), Decimal("0.010000"), Decimal("0.010000"), True, "2026-11", "*/*"
)


def usage_rows(
    topic: str, offsets: Sequence[int], partition: int = 0, ingested_at: datetime | None = None
) -> pa.Table:
    """``usage_events`` rows for these offsets of one partition (as the worker builds
    them)."""
    rated = []
    for offset in offsets:
        rec: dict[str, Any] = {
            "event_id": f"{topic}-{partition}-{offset}",
            "event_time": NOW - 60_000,
            "source": "gateway",
            "source_id": "gw",
            "reporting_carrier": "CMCC",
            "home_carrier": "CMCC",
            "serving_carrier": "CMCC",
            "transaction_id": None,
            "tenant_id": "tenant-a",
            "subscriber_id": "sub_" + "0" * 32,
            "channel": "app",
            "model_id": "deepseek-v3",
            "provider": "deepseek",
            "input_tokens": 10,
            "output_tokens": 5,
            "cached_tokens": 0,
            "reasoning_tokens": 0,
            "status": "ok",
            "routing_policy": None,
            "latency_ms": None,
            "region": None,
            "attributes": {},
        }
        acc = Accepted(rec, payload_hash(rec), topic, partition, offset, NOW)
        rated.append(Rated(acc, RATING, None, "2026-11"))
    return usage_events_table(rated, ingested_at or datetime.now(tz=UTC))


def concat(*tables: pa.Table) -> pa.Table:
    return pa.concat_tables(tables)


def stored(wh: Warehouse, topic: str) -> list[tuple[int, int]]:
    """(partition, offset) of every stored row of this topic, duplicates included."""
    result = wh.query_arrow(
        f"SELECT partition, offset FROM {TABLE} WHERE topic = {quote_literal(topic)} "
        "ORDER BY partition, offset"
    )
    return [(r["partition"], r["offset"]) for r in rows(result)] if result.num_rows else []


@pytest.fixture
def topic() -> str:
    return f"sink-{uuid.uuid4().hex[:12]}"


class FlakyWarehouse:
    """The real warehouse, with the next ``insert_failures`` inserts (and
    ``query_failures`` queries) failing like a lost connection. ``land_then_fail`` makes a
    failing insert reach the engine first: the write landed, only its answer was lost."""

    def __init__(
        self,
        real: Warehouse,
        insert_failures: int = 0,
        query_failures: int = 0,
        land_then_fail: bool = False,
    ) -> None:
        self.real = real
        self.kind = real.kind
        self.location = real.location
        self.insert_failures = insert_failures
        self.query_failures = query_failures
        self.land_then_fail = land_then_fail
        self.insert_calls = 0
        self.tokens: list[str | None] = []

    def execute(self, sql: str, params: dict[str, Any] | None = None) -> None:
        self.real.execute(sql, params)

    def query_arrow(self, sql: str, params: dict[str, Any] | None = None) -> pa.Table:
        if self.query_failures:
            self.query_failures -= 1
            raise WarehouseError("Connection refused (injected)")
        return self.real.query_arrow(sql, params)

    def query_readonly(self, sql: str, query_id: str | None = None) -> pa.Table:
        return self.real.query_readonly(sql, query_id)

    def cancel_readonly(self, query_id: str | None = None) -> None:
        self.real.cancel_readonly(query_id)

    def insert_arrow(self, table: str, data: pa.Table, dedup_token: str | None = None) -> int:
        self.insert_calls += 1
        self.tokens.append(dedup_token)
        if self.insert_failures:
            self.insert_failures -= 1
            if self.land_then_fail:
                self.real.insert_arrow(table, data, dedup_token=dedup_token)
            raise WarehouseError("Timeout exceeded while reading from socket (injected)")
        return self.real.insert_arrow(table, data, dedup_token=dedup_token)

    def close(self) -> None:
        pass  # the shared warehouse belongs to the session


# ---- TrackedTable -------------------------------------------------------------------------


def test_unstored_keeps_rows_above_each_partitions_mark(topic: str) -> None:
    tracked = TrackedTable(TABLE)
    data = concat(
        usage_rows(topic, range(5), 0),
        usage_rows(topic, range(5), 1),
        usage_rows(topic, range(2), 2),
    )
    assert tracked.unstored(data).num_rows == 12  # no marks: everything
    tracked.marks = {(topic, 0): 2, (topic, 1): 10}
    todo = tracked.unstored(data)
    pairs = list(
        zip(todo.column("partition").to_pylist(), todo.column("offset").to_pylist(), strict=True)
    )
    assert pairs == [(0, 3), (0, 4), (2, 0), (2, 1)]  # partition 2 has no mark yet
    assert tracked.fresh(topic, 0, 3) and not tracked.fresh(topic, 0, 2)
    assert tracked.fresh(topic, 2, 0) and not tracked.fresh(topic, 1, 10)
    # another topic's mark does not apply
    tracked.marks = {("other", 0): 100}
    assert tracked.unstored(data).num_rows == 12


def test_advance_raises_marks_and_never_lowers_them(topic: str) -> None:
    tracked = TrackedTable(TABLE)
    tracked.advance(concat(usage_rows(topic, [3, 9, 4], 0), usage_rows(topic, [1], 5)))
    assert tracked.marks == {(topic, 0): 9, (topic, 5): 1}
    tracked.advance(usage_rows(topic, [2], 0))
    assert tracked.marks[(topic, 0)] == 9
    tracked.advance(usage_rows(topic, [], 0))
    assert tracked.marks == {(topic, 0): 9, (topic, 5): 1}


def test_load_reads_the_highest_stored_offset_per_partition(
    warehouse: Warehouse, topic: str
) -> None:
    warehouse.insert_arrow(
        TABLE, concat(usage_rows(topic, [0, 1, 7], 0), usage_rows(topic, [4], 3))
    )
    tracked = TrackedTable(TABLE, marks={(topic, 2): 99})  # stale: partition 2 is empty
    tracked.load(warehouse, topic, [0, 2, 3, 3])
    assert tracked.marks == {(topic, 0): 7, (topic, 3): 4}
    assert tracked.loaded == {(topic, 0), (topic, 2), (topic, 3)}
    tracked.load(warehouse, topic, [])  # nothing asked, nothing changes
    assert tracked.marks == {(topic, 0): 7, (topic, 3): 4}


def test_dedup_token_names_the_block_by_its_positions(topic: str) -> None:
    block = usage_rows(topic, [5, 6, 7], 1)
    assert dedup_token(TABLE, block) == dedup_token(TABLE, usage_rows(topic, [7, 5, 6], 1))
    assert dedup_token(TABLE, block).startswith(f"{TABLE}-")
    others = [
        usage_rows(topic, [5, 6], 1),
        usage_rows(topic, [5, 6, 8], 1),
        usage_rows(topic, [5, 6, 7], 2),
        usage_rows(topic + "x", [5, 6, 7], 1),
    ]
    assert len({dedup_token(TABLE, b) for b in others} | {dedup_token(TABLE, block)}) == 5
    assert dedup_token("dead_letters", block) != dedup_token(TABLE, block)


# ---- Sink.write: idempotence -----------------------------------------------------------------


def test_writing_the_same_batch_twice_stores_it_once(warehouse: Warehouse, topic: str) -> None:
    sink = Sink(warehouse, [TABLE])
    batch = usage_rows(topic, range(5))
    assert sink.write(TABLE, batch) == 5
    assert sink.write(TABLE, batch) == 0
    assert stored(warehouse, topic) == [(0, o) for o in range(5)]


def test_a_restarted_sink_reloads_its_marks_and_skips_what_is_stored(
    warehouse: Warehouse, topic: str
) -> None:
    batch = usage_rows(topic, range(5))
    Sink(warehouse, [TABLE]).write(TABLE, batch)
    restarted = Sink(warehouse, [TABLE])
    restarted.ensure_loaded(topic, [0])
    assert restarted.write(TABLE, batch) == 0
    assert stored(warehouse, topic) == [(0, o) for o in range(5)]


def test_the_dedup_token_protects_even_without_marks(warehouse: Warehouse, topic: str) -> None:
    # A retry whose marks are stale sends the same positions again, rebuilt with another
    # ingested_at (so ClickHouse's content hash differs): the token still drops it.
    first = datetime(2026, 11, 28, 8, 0, 0, tzinfo=UTC)
    again = datetime(2026, 11, 28, 8, 0, 5, tzinfo=UTC)
    Sink(warehouse, [TABLE]).write(TABLE, usage_rows(topic, range(4), ingested_at=first))
    # no ensure_loaded: no marks at all
    Sink(warehouse, [TABLE]).write(TABLE, usage_rows(topic, range(4), ingested_at=again))
    assert stored(warehouse, topic) == [(0, o) for o in range(4)]


def test_a_replay_with_other_batch_boundaries_stores_each_row_once(
    warehouse: Warehouse, topic: str
) -> None:
    first = Sink(warehouse, [TABLE])
    first.write(TABLE, usage_rows(topic, range(0, 5)))
    first.write(TABLE, concat(usage_rows(topic, range(5, 10)), usage_rows(topic, range(3), 1)))
    # crash; the log is re-read from older committed offsets, cut differently
    replay = Sink(warehouse, [TABLE])
    replay.ensure_loaded(topic, [0, 1])
    assert replay.write(TABLE, usage_rows(topic, range(3, 8))) == 0
    assert (
        replay.write(
            TABLE, concat(usage_rows(topic, range(8, 13)), usage_rows(topic, range(1, 6), 1))
        )
        == 3 + 3
    )
    assert stored(warehouse, topic) == [(0, o) for o in range(13)] + [(1, o) for o in range(6)]


def test_overlapping_batches_in_one_run_store_only_the_new_rows(
    warehouse: Warehouse, topic: str
) -> None:
    sink = Sink(warehouse, [TABLE])
    assert sink.write(TABLE, usage_rows(topic, range(0, 5))) == 5
    assert sink.write(TABLE, usage_rows(topic, range(3, 8))) == 3
    assert stored(warehouse, topic) == [(0, o) for o in range(8)]


def test_forget_drops_marks_until_the_partition_is_loaded_again(
    warehouse: Warehouse, topic: str
) -> None:
    sink = Sink(warehouse, [TABLE])
    sink.ensure_loaded(topic, [0])
    sink.write(TABLE, usage_rows(topic, range(3)))
    sink.forget(topic, [0])
    tracked = sink.tables[TABLE]
    assert (topic, 0) not in tracked.marks and (topic, 0) not in tracked.loaded
    sink.ensure_loaded(topic, [0])
    assert tracked.marks[(topic, 0)] == 2
    assert sink.write(TABLE, usage_rows(topic, range(4))) == 1


# ---- Sink.write: failures ---------------------------------------------------------------------


def test_a_failing_warehouse_is_retried_until_the_rows_are_stored(
    warehouse: Warehouse, topic: str
) -> None:
    flaky = FlakyWarehouse(warehouse, insert_failures=3)
    retries: list[tuple[str, int, str]] = []
    sink = Sink(
        flaky, [TABLE], retry_max_s=0.01, on_retry=lambda t, n, e: retries.append((t, n, str(e)))
    )
    assert sink.write(TABLE, usage_rows(topic, range(6))) == 6
    assert [(t, n) for t, n, _ in retries] == [(TABLE, 1), (TABLE, 2), (TABLE, 3)]
    assert "injected" in retries[0][2]
    assert flaky.insert_calls == 4
    # every attempt is the same block, with the same token
    assert flaky.tokens[0] is not None and set(flaky.tokens) == {flaky.tokens[0]}
    assert stored(warehouse, topic) == [(0, o) for o in range(6)]


def test_a_lost_answer_is_not_stored_twice(warehouse: Warehouse, topic: str) -> None:
    # The insert landed but the sink saw an error: it re-reads the marks before retrying.
    flaky = FlakyWarehouse(warehouse, insert_failures=1, land_then_fail=True)
    sink = Sink(flaky, [TABLE], retry_max_s=0.01)
    sink.write(TABLE, usage_rows(topic, range(5)))
    assert flaky.insert_calls == 1  # the re-read marks showed nothing was left to do
    assert sink.tables[TABLE].marks[(topic, 0)] == 4
    assert stored(warehouse, topic) == [(0, o) for o in range(5)]
    assert sink.write(TABLE, usage_rows(topic, range(7))) == 2


def test_marks_that_cannot_be_reread_are_retried_too(warehouse: Warehouse, topic: str) -> None:
    flaky = FlakyWarehouse(warehouse, insert_failures=2, query_failures=2)
    sink = Sink(flaky, [TABLE], retry_max_s=0.01)
    assert sink.write(TABLE, usage_rows(topic, range(3))) == 3
    assert flaky.query_failures == 0  # the re-reads were attempted and failed
    assert stored(warehouse, topic) == [(0, o) for o in range(3)]


def test_backoff_doubles_from_0_4_s_and_is_capped(warehouse: Warehouse, topic: str) -> None:
    times: list[float] = []
    flaky = FlakyWarehouse(warehouse, insert_failures=2)
    sink = Sink(flaky, [TABLE], retry_max_s=30, on_retry=lambda *_: times.append(time.monotonic()))
    started = time.monotonic()
    sink.write(TABLE, usage_rows(topic, range(2)))
    assert times[1] - times[0] >= 0.4  # first wait 0.4 s
    assert time.monotonic() - times[1] >= 0.8  # then 0.8 s
    assert time.monotonic() - started < 10

    capped = FlakyWarehouse(warehouse, insert_failures=4)
    started = time.monotonic()
    Sink(capped, [TABLE], retry_max_s=0.05).write(TABLE, usage_rows(topic, range(2, 4)))
    assert time.monotonic() - started < 1.5  # 4 waits of 0.05 s, not 0.4+0.8+1.6+3.2
    assert stored(warehouse, topic) == [(0, o) for o in range(4)]


def test_a_stopping_worker_aborts_the_retries_and_stores_nothing(
    warehouse: Warehouse, topic: str
) -> None:
    flaky = FlakyWarehouse(warehouse, insert_failures=10**6)
    stopping = {"now": False}
    sink = Sink(
        flaky,
        [TABLE],
        retry_max_s=30,
        should_stop=lambda: stopping["now"],
        on_retry=lambda *_: stopping.update(now=True),
    )
    started = time.monotonic()
    with pytest.raises(SinkAbortedError, match=TABLE):
        sink.write(TABLE, usage_rows(topic, range(3)))
    assert time.monotonic() - started < 1.0  # not after a 30 s backoff
    assert stored(warehouse, topic) == []
    assert (topic, 0) not in sink.tables[TABLE].marks  # nothing claimed as stored
    # once the warehouse is back, the same batch is stored whole
    assert Sink(warehouse, [TABLE]).write(TABLE, usage_rows(topic, range(3))) == 3
    assert (
        scalar(
            warehouse.query_arrow(
                f"SELECT count() FROM {TABLE} WHERE topic = {quote_literal(topic)}"
            )
        )
        == 3
    )
