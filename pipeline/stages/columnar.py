"""The usage path on columns: validation masks, pseudonyms per distinct subscriber, the
usage_events rows and the quota feed, for a whole batch at once.

Pure (no I/O). Each function works on the Arrow table ``ColumnarDecoder`` produces (the
22 contract fields in the v1 shape: ``event_time`` as epoch ms, token counts as int64,
``attributes`` a map) and numpy arrays of the rows' Kafka positions.

Exactness: the vectorised masks only decide which rows are certainly valid. A row any
mask doubts goes through ``check_record``, the one scalar rule set every entry point
uses, so a dead letter's reason and detail are the scalar path's, word for word.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.dead_letters import FREE_TEXT, PHONE_LIKE, DeadLetter, redact_text
from pipeline.events import (
    CARRIERS,
    FIELDS,
    ROUTING_POLICIES,
    SOURCES,
    STATUSES,
    TOKEN_FIELDS,
    Rules,
    pseudonymise,
)
from pipeline.metering.rating_columns import RatedColumns
from pipeline.serde_columnar import PAYLOAD_HASH_VERSION
from pipeline.warehouse.arrow_rows import USAGE_EVENTS

I64 = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]

_ENUMS: dict[str, frozenset[str]] = {
    "source": SOURCES,
    "reporting_carrier": CARRIERS,
    "home_carrier": CARRIERS,
    "serving_carrier": CARRIERS,
    "status": STATUSES,
    "routing_policy": ROUTING_POLICIES,
}
_STRING_FIELDS = tuple(name for name, (types, _, _) in FIELDS.items() if types == (str,))
_MAX_STRING = 256
_MAX_ATTRIBUTES = 64


def _np_bool(arr: pa.Array | pa.ChunkedArray) -> Mask:
    """A boolean Arrow result as numpy (nulls as False)."""
    filled = pc.fill_null(arr, False)
    if isinstance(filled, pa.ChunkedArray):
        filled = filled.combine_chunks()
    return np.asarray(filled.to_numpy(zero_copy_only=False), dtype=bool)


def _ints(table: pa.Table, name: str) -> I64:
    col = table.column(name)
    return np.asarray(pc.fill_null(col, 0).to_numpy(), dtype=np.int64)


def _attribute_entries(table: pa.Table) -> tuple[pa.MapArray, pa.ListArray]:
    """The attributes column, and the same maps as lists of (k, v) structs: list kernels
    (lengths, flatten, parent indices) work on those, slices included."""
    attributes = table.column("attributes")
    if isinstance(attributes, pa.ChunkedArray):
        attributes = attributes.combine_chunks()
    entries = pa.ListArray.from_arrays(
        attributes.offsets,
        pa.StructArray.from_arrays([attributes.keys, attributes.items], ["k", "v"]),
    )
    return attributes, entries


def suspect_rows(table: pa.Table, arrived_ms: I64, rules: Rules) -> Mask:
    """True for every row some contract rule might refuse (``check_record`` then decides);
    False only for rows that certainly pass every rule."""
    n = table.num_rows
    bad = np.zeros(n, dtype=bool)
    for name in _STRING_FIELDS:
        col = table.column(name)
        required = FIELDS[name][1]
        if required:
            bad |= _np_bool(pc.is_null(col))
        limit = 128 if name == "event_id" else _MAX_STRING
        # bytes >= characters: a byte length within the limit is a character length within it
        bad |= _np_bool(pc.greater(pc.binary_length(col), limit))
        bad |= _np_bool(pc.equal(pc.binary_length(col), 0))
        bad |= _np_bool(pc.utf8_is_space(col))
        # a value with leading/trailing spaces is fine unless it is all spaces (above)
        allowed = _ENUMS.get(name)
        if allowed is not None:
            known = pc.is_in(col, value_set=pa.array(sorted(allowed), pa.string()))
            bad |= ~_np_bool(pc.or_kleene(known, pc.is_null(col)))
    max_tokens = rules.max_tokens
    for name in TOKEN_FIELDS:
        counts = _ints(table, name)
        bad |= (counts < 0) | (counts > max_tokens)
    latency = table.column("latency_ms")
    bad |= _np_bool(pc.less(latency, 0))
    attributes, entries = _attribute_entries(table)
    bad |= _np_bool(pc.greater(pc.list_value_length(entries), _MAX_ATTRIBUTES))
    flat = pc.list_flatten(entries)
    if len(flat):
        long_entry = _np_bool(
            pc.greater(pc.binary_length(flat.field("k")), _MAX_STRING)
        ) | _np_bool(pc.greater(pc.binary_length(flat.field("v")), _MAX_STRING))
        if long_entry.any():
            parents = pc.list_parent_indices(entries).to_numpy()
            bad[np.unique(parents[long_entry])] = True
    event_ms = _ints(table, "event_time")
    bad |= event_ms > arrived_ms + rules.future_skew_ms
    bad |= event_ms < arrived_ms - rules.lateness_limit_ms
    cross = _np_bool(pc.not_equal(table.column("home_carrier"), table.column("serving_carrier")))
    no_txn = _np_bool(pc.is_null(table.column("transaction_id")))
    bad |= cross & no_txn
    return bad


def row_records(table: pa.Table, rows: npt.NDArray[np.int64]) -> list[dict[str, Any]]:
    """Rows ``rows`` as records (the events.py shape: ``attributes`` a dict), in one
    conversion (a few rows of a batch: the doubtful, the conflicting, the unpriced)."""
    records: list[dict[str, Any]] = table.take(rows).to_pylist() if len(rows) else []
    for rec in records:
        rec["attributes"] = dict(rec.get("attributes") or [])
    return records


def pseudonymise_column(col: pa.Array | pa.ChunkedArray, key: bytes) -> pa.Array:
    """The keyed pseudonym of every subscriber id, computed once per distinct id."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    encoded = pc.dictionary_encode(col)
    names = [pseudonymise(s, key) for s in encoded.dictionary.to_pylist()]
    return pc.take(pa.array(names, pa.string()), encoded.indices)


def redact_columns(table: pa.Table, key: bytes) -> pa.Table:
    """Mobile numbers in the free-text columns and in attribute keys and values replaced
    by their pseudonyms (``redact_text``); Arrow's regex finds the few rows to touch."""
    for name in FREE_TEXT:
        col = table.column(name)
        hit = _np_bool(pc.match_substring_regex(col, PHONE_LIKE))
        if hit.any():
            values = col.to_pylist()
            for i in np.flatnonzero(hit):
                values[i] = redact_text(values[i], key)
            table = table.set_column(
                table.schema.get_field_index(name), name, pa.array(values, col.type)
            )
    attributes, entries = _attribute_entries(table)
    flat = pc.list_flatten(entries)
    if len(flat):
        hit = _np_bool(pc.match_substring_regex(flat.field("k"), PHONE_LIKE)) | _np_bool(
            pc.match_substring_regex(flat.field("v"), PHONE_LIKE)
        )
        if hit.any():
            rows = set(pc.list_parent_indices(entries).to_numpy()[hit].tolist())
            values = attributes.to_pylist()
            for r in rows:
                values[r] = [(redact_text(k, key), redact_text(v, key)) for k, v in values[r]]
            table = table.set_column(
                table.schema.get_field_index("attributes"),
                "attributes",
                pa.array(values, attributes.type),
            )
    return table


def _constant(value: object, n: int, type_: pa.DataType) -> pa.Array:
    return pa.array([value], type_).take(np.zeros(n, dtype=np.int32))


def _plain(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.cast(pa.string()) if pa.types.is_dictionary(col.type) else col


@dataclass(frozen=True, slots=True)
class Positions:
    """Where a batch's rows came from: one topic, partition/offset/arrival per row, and
    the row's index in the consumed batch (``source``)."""

    topic: str
    partitions: I64
    offsets: I64
    arrived_ms: I64
    source: I64

    def take(self, rows: I64 | Mask) -> Positions:
        return Positions(
            self.topic,
            self.partitions[rows],
            self.offsets[rows],
            self.arrived_ms[rows],
            self.source[rows],
        )


def usage_events_rows(
    events: pa.Table,
    payload_hash: I64,
    rated: RatedColumns,
    where: Positions,
    ingested_at: datetime,
) -> pa.Table:
    """The ``usage_events`` rows of rated events (every row of ``events`` priced)."""
    n = events.num_rows
    ts = pa.timestamp("ms", tz="UTC")
    cols: dict[str, pa.Array | pa.ChunkedArray] = {}
    for name in USAGE_EVENTS.names[:22]:
        col = events.column(name)
        target = USAGE_EVENTS.field(name).type
        cols[name] = col if col.type == target else pc.cast(col, target)
    cols["event_time"] = pc.cast(events.column("event_time"), ts)
    cols["payload_hash"] = pa.array(payload_hash, pa.int64())
    cols["payload_hash_version"] = _constant(PAYLOAD_HASH_VERSION, n, pa.uint8())
    for name in ("token_units", "amount", "list_amount"):
        cols[name] = rated.decimals(name)
    cols["currency"] = _constant("CNY", n, pa.string())
    cols["price_card_version"] = _plain(rated.price_card_version)
    cols["price_line"] = _plain(rated.price_line)
    cols["billable"] = pa.array(rated.billable, pa.bool_())
    cols["tenant_plan"] = _plain(rated.tenant_plan)
    cols["plan_period"] = _plain(rated.plan_period)
    cols["tier_usage_tu"] = rated.decimals("tier_usage_tu")
    cols["rating_run"] = _constant("stream", n, pa.string())
    cols["topic"] = _constant(where.topic, n, pa.string())
    cols["partition"] = pa.array(where.partitions.astype(np.uint32), pa.uint32())
    cols["offset"] = pa.array(where.offsets.astype(np.uint64), pa.uint64())
    cols["ingested_at"] = _constant(ingested_at, n, ts)
    return pa.table([cols[name] for name in USAGE_EVENTS.names], schema=USAGE_EVENTS)


@dataclass(slots=True)
class PreparedUsage:
    """One batch, ready to store: what the store thread writes, in order, and reports."""

    consumed: int
    dead_letters: list[DeadLetter] = field(default_factory=list)
    writes: list[tuple[str, pa.Table]] = field(default_factory=list)  # usage_events last
    duplicates: int = 0
    accepted: int = 0
    quota_feed: Callable[[], None] | None = None
    # the accepted events (table, positions), for the dedup verify until they are stored
    unstored: tuple[pa.Table, Positions] | None = None
