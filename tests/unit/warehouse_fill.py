"""Fill the shared unit-test warehouse with real rows, made by the real stages.

Simulated messages go through ``IngestStage`` (decode, validate, pseudonymise, dedup),
``RateStage`` and ``window.rollup_table``/``corrections_table``, then the same Arrow
builders the worker uses, straight into the tables (no Kafka, no faust): what lands is
what the worker would write for that log.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.dead_letters import dead_letter_for
from pipeline.events import Rules, dedup_key
from pipeline.metering.dedup import DedupIndex
from pipeline.metering.plans import TenantPlans, load_plans
from pipeline.metering.pricing import PriceBook, load_cards, price_lines_rows
from pipeline.serde import AvroCodec
from pipeline.simulate import Simulation
from pipeline.stages.ingest import IngestStage, RawMessage
from pipeline.stages.rate import Rated, RateStage
from pipeline.stages.window import GRAINS, corrections_table, rollup_table
from pipeline.warehouse import Warehouse
from pipeline.warehouse.arrow_rows import dead_letters_table, usage_events_table

REPO = Path(__file__).resolve().parents[2]
CARDS = REPO / "config" / "price_cards"
PLANS = REPO / "config" / "tenant_plans.yaml"
# 2026-11-28 10:00 Beijing time: simulated events lie in the two hours before
NOW_MS = int(datetime(2026, 11, 28, 2, 0, tzinfo=UTC).timestamp() * 1000)
GRACE_MS = 300_000
KEY = b"unit-test-pseudonym-key-0123456789"
TOPIC = "usage-events"
PRICE_CARDS = pa.schema(
    [
        ("price_card_version", pa.string()),
        ("effective_from", pa.timestamp("ms", tz="UTC")),
        ("serving_carrier", pa.string()),
        ("model_id", pa.string()),
        ("token_class", pa.string()),
        ("unit_price_per_million", pa.decimal128(38, 6)),
        ("token_unit_factor", pa.decimal128(38, 6)),
    ]
)


@dataclass
class Filled:
    """What was written."""

    rated: list[Rated] = field(default_factory=list)
    dead_letters: int = 0
    late: int = 0


def partition_of(tenant_id: str, partitions: int = 4) -> int:
    """A stable partition per tenant (one tenant, one partition, as with Kafka keys)."""
    return zlib.crc32(tenant_id.encode()) % partitions


def write_rated(
    wh: Warehouse, rated: list[Rated], grace_ms: int = GRACE_MS, ingested_at: datetime | None = None
) -> None:
    """Rollups first, usage_events last, like ``Pipeline.process_usage``."""
    now = ingested_at or datetime.now(tz=UTC)
    events = usage_events_table(rated, now)
    with_arrival = events.append_column(
        "arrived_ms", pa.array([r.accepted.arrived_ms for r in rated], pa.int64())
    )
    for grain in GRAINS:
        wh.insert_arrow(grain, rollup_table(with_arrival, grain, grace_ms, now))
    wh.insert_arrow("usage_corrections", corrections_table(with_arrival, grace_ms, now))
    wh.insert_arrow("usage_events", events)


def store_price_cards(wh: Warehouse, book: PriceBook) -> None:
    """The loaded card versions into ``price_cards``, as the worker does at start."""
    stored = wh.query_arrow("SELECT DISTINCT price_card_version AS v FROM price_cards")
    known = set(stored.column("v").to_pylist()) if stored.num_rows else set()
    rows = [r for r in price_lines_rows(book) if r["price_card_version"] not in known]
    if rows:
        wh.insert_arrow("price_cards", pa.Table.from_pylist(rows, schema=PRICE_CARDS))


def fill(
    wh: Warehouse,
    events: int = 3000,
    seed: int = 7,
    book: PriceBook | None = None,
    plans: TenantPlans | None = None,
    late_every: int = 25,
    bad_rate: float = 0.02,
    dup_rate: float = 0.01,
    now_ms: int = NOW_MS,
    tenants: int = 40,
) -> Filled:
    """Simulate ``events`` messages and store what the worker would. Valid events arrive
    2 s after they happen, every ``late_every``-th 20 minutes after (late); bad ones at
    ``now_ms``. Returns the rated events (log order) and counts."""
    book = book or load_cards(CARDS)
    plans = plans if plans is not None else load_plans(PLANS)
    sim = Simulation(seed=seed, now_ms=now_ms, tenants=tenants)
    ingest = IngestStage(
        AvroCodec(),
        Rules(lateness_limit_ms=35 * 86_400_000, future_skew_ms=300_000, max_tokens=10_000_000),
        KEY,
        DedupIndex(),
    )
    offsets = [0, 0, 0, 0]
    raw: list[RawMessage] = []
    valid = 0
    for msg in sim.messages(events, dup_rate=dup_rate, bad_rate=bad_rate):
        part = zlib.crc32(msg.key) % 4
        arrived = now_ms
        if msg.kind != "bad" and msg.record is not None:
            valid += 1
            delay = 1_200_000 if valid % late_every == 0 else 2_000
            arrived = msg.record["event_time"] + delay
        raw.append(RawMessage(TOPIC, part, offsets[part], arrived, msg.key, msg.value))
        offsets[part] += 1
    raw.sort(key=lambda m: (m.partition, m.offset))
    result = ingest.process(raw)
    rated, unpriced = RateStage(book, plans).rate(result.accepted)
    letters = list(result.dead_letters)
    for acc, why in unpriced:
        ingest.dedup.forget(dedup_key(acc.record))
        where = RawMessage(acc.topic, acc.partition, acc.offset, acc.arrived_ms, None, b"")
        letters.append(dead_letter_for(where, why.to_rejection(), acc.record))
    store_price_cards(wh, book)
    write_rated(wh, rated)
    now = datetime.now(tz=UTC)
    if letters:
        wh.insert_arrow("dead_letters", dead_letters_table(letters, now))
    late = sum(
        1
        for r in rated
        if r.accepted.arrived_ms
        >= (r.accepted.record["event_time"] // 60_000 + 1) * 60_000 + GRACE_MS
    )
    return Filled(rated, len(letters), late)


def sums(wh: Warehouse, table: str, where: str = "1") -> dict[str, Any]:
    """events, tokens, token_units, amount of a rollup table or rated_usage."""
    if table == "rated_usage":
        sql = (
            "SELECT count() AS events, toInt64(countIf(billable)) AS billable_events, "
            "sum(token_units) AS token_units, sum(amount) AS amount FROM rated_usage "
            f"WHERE {where}"
        )
    else:
        sql = (
            "SELECT sum(events) AS events, sum(billable_events) AS billable_events, "
            "sum(token_units) AS token_units, sum(amount) AS amount "
            f"FROM {table} WHERE {where}"
        )
    row: dict[str, Any] = wh.query_arrow(sql).to_pylist()[0]
    return {k: int(v) if k.endswith("events") else v for k, v in row.items()}


def tenants_of(rated: Iterable[Rated]) -> set[str]:
    return {r.accepted.record["tenant_id"] for r in rated}
