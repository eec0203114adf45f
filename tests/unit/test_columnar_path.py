"""The worker's columnar path against the scalar reference, row for row.

``Pipeline.prepare_usage`` (compiled decode, validation masks, pseudonyms per distinct
subscriber, ``check_many``, integer rating, Arrow rows) must classify every message and
price every event exactly as the scalar stages do (``IngestStage`` then ``RateStage``),
which the fault suite and the contract tests pin down: the same dead letters (reason,
stage, detail, payload), the same duplicates, and the same usage_events rows.
"""

from __future__ import annotations

import json
import zlib
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pytest

from pipeline.dead_letters import DeadLetter, dead_letter_for
from pipeline.events import Rules, now_ms
from pipeline.metering.dedup import DedupIndex
from pipeline.metering.plans import load_plans
from pipeline.metering.pricing import load_cards
from pipeline.runtime import Pipeline
from pipeline.serde import AvroCodec
from pipeline.settings import Settings
from pipeline.simulate import Simulation
from pipeline.stages.ingest import IngestStage, RawMessage
from pipeline.stages.rate import RateStage
from pipeline.stages.window import rollup_from_minutes, rollup_table
from pipeline.usage_reader import ConsumedBatch
from pipeline.warehouse import Warehouse
from pipeline.warehouse.arrow_rows import usage_events_table
from tests.integration.faults.hostile import corpus

TOPIC = "usage-events"
PARTITIONS = 4


def _messages(values: list[tuple[bytes, bytes]], arrived: int) -> list[RawMessage]:
    """Messages keyed like the producer (one key, one partition), offsets per partition."""
    next_offset = [0] * PARTITIONS
    out = []
    for key, value in values:
        part = zlib.crc32(key) % PARTITIONS
        out.append(RawMessage(TOPIC, part, next_offset[part], arrived, key, value))
        next_offset[part] += 1
    return out


def _letter_view(d: DeadLetter) -> tuple[Any, ...]:
    payload: Any = json.loads(d.payload) if d.payload_format == "json" else d.payload
    return (d.partition, d.offset, d.reason, d.stage, d.detail, d.payload_format, payload)


def _run_both(
    pipe: Pipeline, messages: list[RawMessage], batch_size: int
) -> tuple[list[Any], int, pa.Table, list[Any], int, pa.Table]:
    """(letters, duplicates, usage rows) from the scalar stages and from the columnar
    path fed in batches of ``batch_size``."""
    settings = pipe.settings
    scalar = IngestStage(pipe.codec, pipe.rules, pipe.key, DedupIndex()).process(messages)
    rater = RateStage(load_cards(settings.price_cards), load_plans(settings.tenant_plans))
    rated, unpriced = rater.rate(scalar.accepted)
    want_letters = [_letter_view(d) for d in scalar.dead_letters]
    for acc, why in unpriced:
        msg = RawMessage(acc.topic, acc.partition, acc.offset, acc.arrived_ms, None, b"")
        want_letters.append(_letter_view(dead_letter_for(msg, why.to_rejection(), acc.record)))
    want_rows = usage_events_table(rated, datetime.now(tz=UTC))

    got_letters: list[Any] = []
    got_dups = 0
    got_tables = []
    for start in range(0, len(messages), batch_size):
        part = messages[start : start + batch_size]
        batch = ConsumedBatch(
            TOPIC,
            [m.value for m in part],
            [m.partition for m in part],
            [m.offset for m in part],
            [m.timestamp_ms for m in part],
        )
        prepared = pipe.prepare_usage(batch)
        got_letters += [_letter_view(d) for d in prepared.dead_letters]
        got_dups += prepared.duplicates
        got_tables += [t for name, t in prepared.writes if name == "usage_events"]
    got_rows = pa.concat_tables(got_tables) if got_tables else want_rows.slice(0, 0)
    return (
        sorted(want_letters, key=lambda v: v[:2]),
        scalar.duplicates,
        want_rows,
        sorted(got_letters, key=lambda v: v[:2]),
        got_dups,
        got_rows,
    )


def _comparable(rows: pa.Table) -> list[dict[str, Any]]:
    """usage_events rows without what legitimately differs: the payload hash (v1 scalar,
    v2 compiled: see serde_columnar) and the insert time."""
    skip = ("payload_hash", "payload_hash_version", "ingested_at")
    keep = [n for n in rows.column_names if n not in skip]
    out = rows.select(keep).to_pylist()
    for row in out:
        row["attributes"] = sorted(row["attributes"] or [])
    return sorted(out, key=lambda r: (r["partition"], r["offset"]))


@pytest.mark.parametrize("batch_size", [997, 20_000])
def test_simulated_traffic_gives_the_scalar_paths_rows_and_letters(
    clean_warehouse: Warehouse, warehouse_settings: Settings, batch_size: int
) -> None:
    now = now_ms()
    sim = Simulation(seed=29, now_ms=now, tenants=60, late_share=0.05)
    values = [(m.key, m.value) for m in sim.messages(12_000, dup_rate=0.05, bad_rate=0.04)]
    messages = _messages(values, now)
    pipe = Pipeline(warehouse_settings, wh=clean_warehouse)
    pipe.take_usage_partitions(list(range(PARTITIONS)))
    want_letters, want_dups, want_rows, got_letters, got_dups, got_rows = _run_both(
        pipe, messages, batch_size
    )
    assert got_dups == want_dups > 0
    assert len(got_letters) == len(want_letters) > 0
    assert got_letters == want_letters
    assert got_rows.num_rows == want_rows.num_rows > 10_000
    assert _comparable(got_rows) == _comparable(want_rows)
    # the pseudonym, not the number, in every row
    assert all(s.startswith("sub_") for s in got_rows.column("subscriber_id").to_pylist())


def test_hostile_corpus_gives_the_scalar_paths_verdicts(
    clean_warehouse: Warehouse, warehouse_settings: Settings
) -> None:
    now = now_ms()
    values = [(b"k%d" % (i % 7), v) for i, (v, _, _) in enumerate(corpus(now, huge=20_000))]
    messages = _messages(values, now)
    pipe = Pipeline(warehouse_settings, wh=clean_warehouse)
    pipe.take_usage_partitions(list(range(PARTITIONS)))
    want_letters, want_dups, want_rows, got_letters, got_dups, got_rows = _run_both(
        pipe, messages, 500
    )
    assert got_dups == want_dups
    assert got_letters == want_letters
    assert _comparable(got_rows) == _comparable(want_rows)


def test_hour_and_day_rows_from_minutes_equal_rows_from_events() -> None:
    """The hour and day rollups the worker derives from its minute rows are the rows
    rollup_table makes from the events themselves (late events and Beijing days too)."""
    now = now_ms()
    sim = Simulation(seed=3, now_ms=now, tenants=20, late_share=0.2)
    cards = load_cards(Settings().price_cards)
    rater = RateStage(cards, load_plans(None))
    stage = IngestStage(AvroCodec(), Rules(), b"k" * 32, DedupIndex())
    messages = _messages([(m.key, m.value) for m in sim.messages(5_000)], now)
    rated, _ = rater.rate(stage.process(messages).accepted)
    at = datetime.now(tz=UTC)
    events = usage_events_table(rated, at)
    events = events.append_column("arrived_ms", pa.array([now] * events.num_rows, pa.int64()))
    minutes = rollup_table(events, "usage_minute", 300_000, at)
    for grain in ("usage_hour", "usage_day"):
        want = rollup_table(events, grain, 300_000, at).to_pylist()
        got = rollup_from_minutes(minutes, grain, at).to_pylist()

        def order(r: dict[str, Any]) -> tuple[Any, ...]:
            return tuple(str(v) for v in r.values())

        assert sorted(got, key=order) == sorted(want, key=order)
        assert any(r["kind"] == "late" for r in got)


def test_copies_of_events_stored_with_the_v1_hash_are_duplicates(
    clean_warehouse: Warehouse, warehouse_settings: Settings
) -> None:
    """Rows stored before the compiled path carry payload hash v1 (``payload_hash_version``
    1); an exact copy arriving now is a duplicate, a changed one a conflict."""
    now = now_ms()
    sim = Simulation(seed=41, now_ms=now, tenants=5)
    values = [(m.key, m.value) for m in sim.messages(300)]
    first = _messages(values, now)
    pipe = Pipeline(warehouse_settings, wh=clean_warehouse)
    old = IngestStage(pipe.codec, pipe.rules, pipe.key, DedupIndex()).process(first)
    rated, _ = RateStage(
        load_cards(warehouse_settings.price_cards), load_plans(warehouse_settings.tenant_plans)
    ).rate(old.accepted)
    stored = usage_events_table(rated, datetime.now(tz=UTC))
    clean_warehouse.insert_arrow("usage_events", stored)
    assert clean_warehouse.query_arrow(
        "SELECT min(payload_hash_version) AS v FROM usage_events"
    ).column("v")[0].as_py() == 1

    pipe.take_usage_partitions(list(range(PARTITIONS)))
    copies = [m.value for m in first[:50]]
    records = [pipe.codec.decode(v) for v in copies[:5]]
    for rec in records:
        rec["output_tokens"] += 1  # same key, other content
    changed = [pipe.codec.encode(r) for r in records]
    batch = ConsumedBatch(
        TOPIC,
        copies + changed,
        [0] * 55,
        list(range(10_000, 10_055)),
        [now] * 55,
    )
    prepared = pipe.prepare_usage(batch)
    assert prepared.duplicates == 50
    assert [d.reason for d in prepared.dead_letters] == ["conflicting_duplicate"] * 5
    assert not [t for name, t in prepared.writes if name == "usage_events"]
