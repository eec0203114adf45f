"""The sink: idempotent, offset-tracked writes to the warehouse.

Exactly-once into ClickHouse without transactions, in three parts:

1. Every row the worker writes carries the Kafka position of the input that made it
   (``topic``, ``partition``, ``offset``); rows of one (topic, partition) are written in
   offset order, and each insert is one part (one ``ingested_at`` value per insert and
   ``PARTITION BY toYYYYMM(ingested_at)``), so it lands whole or not at all.
2. Hence the highest stored offset per (table, topic, partition), the *high-water mark*,
   says exactly what is stored: rows at or below it are there, rows above it are not.
   The sink loads the marks when it takes a partition and drops every row at or below
   its mark before inserting. A replay after a crash therefore writes only what is
   missing.
3. A retried insert (the first attempt may have landed and only its answer been lost)
   re-reads the marks from the warehouse first, and also carries an
   ``insert_deduplication_token`` made from the block's content positions.

Offsets are committed to Kafka only after ``write`` returned (see ``pipeline/app.py``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.warehouse.base import Warehouse, WarehouseError
from pipeline.warehouse.usage_store import high_water_marks

log = logging.getLogger(__name__)

Position = tuple[str, int]  # (topic, partition)


@dataclass
class TrackedTable:
    """One warehouse table written by the worker, with its high-water marks."""

    name: str
    marks: dict[Position, int] = field(default_factory=dict)
    loaded: set[Position] = field(default_factory=set)

    def load(self, wh: Warehouse, topic: str, partitions: Iterable[int]) -> None:
        """Read the marks of these partitions from the warehouse."""
        wanted = sorted(set(partitions))
        if not wanted:
            return
        found = high_water_marks(wh, self.name, topic, wanted)
        for part in wanted:
            pos = (topic, part)
            if part in found:
                self.marks[pos] = found[part]
            else:
                self.marks.pop(pos, None)
            self.loaded.add(pos)

    def fresh(self, topic: str, partition: int, offset: int) -> bool:
        """True if a row from this position is not stored yet."""
        return offset > self.marks.get((topic, partition), -1)

    def unstored(self, data: pa.Table) -> pa.Table:
        """The rows of ``data`` above the marks (vectorised)."""
        if data.num_rows == 0 or not self.marks:
            return data
        topics = data.column("topic")
        parts = data.column("partition")
        offsets = data.column("offset")
        keep = None
        pairs = {(t, p) for t, p in zip(topics.to_pylist(), parts.to_pylist(), strict=True)}
        for topic, part in pairs:
            mark = self.marks.get((topic, part))
            here = pc.and_(pc.equal(topics, topic), pc.equal(parts, part))
            ok = here if mark is None else pc.and_(here, pc.greater(offsets, mark))
            keep = ok if keep is None else pc.or_(keep, ok)
        return data.filter(keep) if keep is not None else data

    def advance(self, data: pa.Table) -> None:
        """Raise the marks to what ``data`` (just stored) reached."""
        if data.num_rows == 0:
            return
        grouped = data.group_by(["topic", "partition"]).aggregate([("offset", "max")])
        for topic, part, mark in zip(
            grouped.column("topic").to_pylist(),
            grouped.column("partition").to_pylist(),
            grouped.column("offset_max").to_pylist(),
            strict=True,
        ):
            pos = (topic, int(part))
            self.marks[pos] = max(self.marks.get(pos, -1), int(mark))


def dedup_token(table: str, data: pa.Table) -> str:
    """A token naming a block by the positions it covers (same block, same token)."""
    grouped = data.group_by(["topic", "partition"]).aggregate(
        [("offset", "min"), ("offset", "max"), ("offset", "count")]
    )
    parts = sorted(
        zip(
            grouped.column("topic").to_pylist(),
            grouped.column("partition").to_pylist(),
            grouped.column("offset_min").to_pylist(),
            grouped.column("offset_max").to_pylist(),
            grouped.column("offset_count").to_pylist(),
            strict=True,
        )
    )
    digest = hashlib.sha256(repr((table, parts)).encode()).hexdigest()[:32]
    return f"{table}-{digest}"


def ingested_now() -> datetime:
    """One ingest timestamp per insert (UTC)."""
    return datetime.now(tz=UTC)


class Sink:
    """Writes worker tables idempotently; retries with backoff until the write succeeds.

    ``on_retry(table, attempt, error)`` is called for every failed attempt (metrics,
    logs). ``should_stop()`` lets a stopping worker give up retrying; it then raises
    ``SinkAbortedError`` and the caller must not commit.
    """

    def __init__(
        self,
        wh: Warehouse,
        tables: Iterable[str],
        retry_max_s: float = 30.0,
        on_retry: Callable[[str, int, WarehouseError], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.wh = wh
        self.tables = {name: TrackedTable(name) for name in tables}
        self.retry_max_s = retry_max_s
        self.on_retry = on_retry
        self.should_stop = should_stop or (lambda: False)

    def ensure_loaded(self, topic: str, partitions: Iterable[int]) -> None:
        """Load the marks of partitions this worker has not seen yet (all tables)."""
        for table in self.tables.values():
            missing = [p for p in partitions if (topic, p) not in table.loaded]
            if missing:
                table.load(self.wh, topic, missing)

    def forget(self, topic: str, partitions: Iterable[int]) -> None:
        """Drop the marks of revoked partitions; they are re-read if they come back."""
        for table in self.tables.values():
            for part in partitions:
                table.loaded.discard((topic, part))
                table.marks.pop((topic, part), None)

    def write(self, table: str, data: pa.Table) -> int:
        """Store the rows of ``data`` not stored yet. Blocks, retrying with exponential
        backoff (capped at ``retry_max_s``), until the warehouse takes them. Returns the
        number of rows inserted."""
        tracked = self.tables[table]
        attempt = 0
        while True:
            todo = tracked.unstored(data)
            if todo.num_rows == 0:
                return 0
            try:
                self.wh.insert_arrow(table, todo, dedup_token=dedup_token(table, todo))
            except WarehouseError as exc:
                attempt += 1
                if self.on_retry is not None:
                    self.on_retry(table, attempt, exc)
                log.warning("sink: insert into %s failed (attempt %d): %s", table, attempt, exc)
                delay = min(self.retry_max_s, 0.2 * 2 ** min(attempt, 10))
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline:
                    if self.should_stop():
                        raise SinkAbortedError(f"stopped while retrying {table}") from exc
                    time.sleep(min(0.2, delay))
                self._reload_marks(tracked, todo)
                continue
            tracked.advance(todo)
            return int(todo.num_rows)

    def _reload_marks(self, tracked: TrackedTable, data: pa.Table) -> None:
        # The failed attempt may have landed; ask the warehouse what it has.
        by_topic: dict[str, set[int]] = {}
        for topic, part in zip(
            data.column("topic").to_pylist(), data.column("partition").to_pylist(), strict=True
        ):
            by_topic.setdefault(topic, set()).add(int(part))
        for topic, parts in by_topic.items():
            try:
                tracked.load(self.wh, topic, parts)
            except WarehouseError as exc:
                log.warning("sink: cannot re-read marks of %s yet: %s", tracked.name, exc)


class SinkAbortedError(Exception):
    """The worker stopped before a batch was stored; its offsets must not be committed."""
