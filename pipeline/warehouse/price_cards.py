"""The ``price_cards`` table: what the loaded price cards say, for analysts and jobs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from pipeline.metering.pricing import PriceBook, price_lines_rows
from pipeline.warehouse.base import Warehouse, quote_literal

TS = pa.timestamp("ms", tz="UTC")
DEC = pa.decimal128(38, 6)

_PRICE_CARDS = pa.schema(
    [
        ("price_card_version", pa.string()),
        ("effective_from", TS),
        ("serving_carrier", pa.string()),
        ("model_id", pa.string()),
        ("token_class", pa.string()),
        ("unit_price_per_million", DEC),
        ("token_unit_factor", DEC),
    ]
)


def to_ms(when: datetime) -> int:
    """An aware datetime as UTC epoch milliseconds."""
    if when.tzinfo is None:
        raise ValueError("a date-time without a UTC offset")
    return (when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def sync_price_cards(wh: Warehouse, book: PriceBook) -> list[str]:
    """Store the versions whose lines differ from ``price_cards`` (a fixed price in an
    existing version replaces that version's rows). Returns the versions written."""
    rows = price_lines_rows(book)
    wanted: dict[str, set[tuple[Any, ...]]] = {}
    for r in rows:
        wanted.setdefault(r["price_card_version"], set()).add(
            (
                to_ms(r["effective_from"]),
                r["serving_carrier"],
                r["model_id"],
                r["token_class"],
                r["unit_price_per_million"],
                r["token_unit_factor"],
            )
        )
    versions = ", ".join(quote_literal(v) for v in wanted)
    stored_rows = wh.query_arrow(
        "SELECT price_card_version AS v, toUnixTimestamp64Milli(effective_from) AS ms, "
        "serving_carrier, model_id, token_class, unit_price_per_million, token_unit_factor "
        f"FROM price_cards FINAL WHERE price_card_version IN ({versions})"
    )
    stored: dict[str, set[tuple[Any, ...]]] = {}
    for r in stored_rows.to_pylist() if stored_rows.num_rows else []:
        stored.setdefault(r.pop("v"), set()).add(tuple(r.values()))
    written = []
    for version, lines in wanted.items():
        if stored.get(version) == lines:
            continue
        if version in stored:
            wh.execute(
                f"ALTER TABLE price_cards DELETE WHERE price_card_version = "
                f"{quote_literal(version)} SETTINGS mutations_sync = 2"
            )
        mine = [r for r in rows if r["price_card_version"] == version]
        wh.insert_arrow("price_cards", pa.Table.from_pylist(mine, schema=_PRICE_CARDS))
        written.append(version)
    return written
