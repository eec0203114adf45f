"""The worker's engine room: what happens to one batch, with no faust in sight.

``Pipeline`` owns the warehouse connection, the sink, the dedup index, the tier
counters and the dead-letter producer. A usage batch goes through two calls, on two
threads (``pipeline/usage_reader.py``):

``prepare_usage`` (the reader thread), every stage on columns, each turning the batch's
rows into fewer rows plus dead letters:

1. decode: the compiled decoder (``serde_columnar``); rows it flags go through fastavro;
2. validate: column masks, the scalar rules only for the rows a mask doubts;
3. pseudonymise: one keyed HMAC per distinct subscriber;
4. dedup: ``DedupIndex.check_many``; rows at or below usage_events' mark are replays;
5. rate: ``rate_columns``, integer micro-units;
6. build: the usage_events rows;
7. rollups: minute rows by group-by, hour and day rows from the minute rows.

``store_usage`` (the pipeline thread, one batch behind): dead letters to Kafka, then
the rollups, then usage_events (so a stored event implies its batch's letters and
rollups are stored), then the quota feed. Only then are the batch's offsets committed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import Producer

from pipeline.dead_letters import (
    DeadLetter,
    dead_letter_for,
    first_copies,
    letter_from_rejection,
    prepare_dead_letter,
)
from pipeline.events import (
    Reason,
    Rejection,
    Rules,
    Stage,
    check_record,
    now_ms,
    payload_hash,
    pseudonymise,
)
from pipeline.metering.dedup import Decision, DedupIndex
from pipeline.metering.plans import load_plans
from pipeline.metering.pricing import load_cards
from pipeline.produce import DeliveryError, producer_config
from pipeline.serde import MAGIC, AvroCodec, DecodeError
from pipeline.serde_columnar import (
    OK,
    PAYLOAD_HASH_VERSION,
    ColumnarDecoder,
    DecodedBatch,
    key_fingerprints,
)
from pipeline.settings import Settings
from pipeline.stages.columnar import (
    Positions,
    PreparedUsage,
    pseudonymise_column,
    redact_columns,
    row_records,
    suspect_rows,
    usage_events_rows,
)
from pipeline.stages.ingest import RawMessage
from pipeline.stages.rate import RateStage
from pipeline.stages.sink import Sink, ingested_now
from pipeline.stages.window import (
    GRAINS,
    corrections_table,
    rollup_from_minutes,
    rollup_table,
)
from pipeline.warehouse import Warehouse, open_warehouse
from pipeline.warehouse.arrow_rows import dead_letters_table
from pipeline.warehouse.price_cards import sync_price_cards
from pipeline.warehouse.usage_store import (
    stored_dedup_keys,
    stored_event_has_key,
    stored_tier_usage,
)

if TYPE_CHECKING:
    from pipeline.usage_reader import ConsumedBatch

if TYPE_CHECKING:
    from pipeline.metrics import WorkerMetrics
    from pipeline.quota import QuotaService

log = logging.getLogger(__name__)

USAGE_TABLE = "usage_events"
DEAD_LETTER_TABLE = "dead_letters"
CORRECTIONS_TABLE = "usage_corrections"
# Written in this order; usage_events last, so a stored event implies stored rollups.
ROLLUP_TABLES = (*GRAINS, CORRECTIONS_TABLE)


@dataclass
class BatchReport:
    """What one batch did; feeds metrics and logs."""

    consumed: int = 0
    accepted: int = 0
    inserted: int = 0
    duplicates: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


class Pipeline:
    """The stages for one worker process."""

    def __init__(
        self,
        settings: Settings,
        wh: Warehouse | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.wh = wh if wh is not None else open_warehouse(settings)
        self.codec = AvroCodec()
        if settings.schema_registry_url:
            self.codec.use_registry(settings.registry_client(), f"{settings.topic_usage}-value")
        self.dl_codec = AvroCodec("dead_letter")
        self.key = settings.pseudonym_secret()
        self.rules = Rules(
            lateness_limit_ms=settings.lateness_limit_s * 1000,
            future_skew_ms=settings.future_skew_s * 1000,
            max_tokens=settings.max_tokens,
        )
        # the payload hash (v2) and the dedup-key fingerprints are keyed SipHash-2-4
        # with a key derived from the pseudonym key: stable per data directory, as the
        # hashes stored in usage_events must be
        self.hash_key = hmac.new(self.key, b"tokenmeter payload hash v2", hashlib.sha256).digest()[
            :16
        ]
        self.decoder = ColumnarDecoder(self.codec, self.hash_key)
        self._current: tuple[pa.Table, Positions] | None = None
        # batches prepared but not stored yet (the store thread is one behind): the dedup
        # index's verify must see their events, which the warehouse does not have yet
        self._unstored: deque[tuple[pa.Table, Positions]] = deque()
        # (partition, offset) -> row, per batch a verify looked into (by id of Positions)
        self._rows_by_position: dict[int, tuple[Positions, dict[tuple[int, int], int]]] = {}
        self.dedup = DedupIndex(verify=self._same_event, fingerprint=self._key_fingerprint)
        self.stage_cpu_us: Counter[str] = Counter()
        # stored rows with a payload hash of an older definition are in the index
        self._older_hashes = False
        self.book = load_cards(settings.price_cards)
        self.rater = RateStage(self.book, load_plans(settings.tenant_plans))
        self.grace_ms = settings.window_grace_s * 1000
        self.stopping = False
        self.sink_errors = 0
        self.sink = Sink(
            self.wh,
            [USAGE_TABLE, DEAD_LETTER_TABLE, *ROLLUP_TABLES],
            retry_max_s=settings.sink_retry_max_s,
            on_retry=self._on_sink_retry,
            should_stop=lambda: self.stopping,
        )
        self.dl_producer = Producer(producer_config(settings, **{"linger.ms": 5}))
        self.totals = BatchReport()
        self.quota: QuotaService | None = None
        # The cards in force are recorded for analysts (a version whose lines changed
        # replaces its rows).
        sync_price_cards(self.wh, self.book)

    def _on_sink_retry(self, table: str, attempt: int, exc: Exception) -> None:
        self.sink_errors += 1
        if self.metrics is not None:
            self.metrics.observe_sink_retry(table)

    def _write(self, table: str, data: pa.Table) -> int:
        """``sink.write``, timed for the metrics."""
        started = time.monotonic()
        rows = self.sink.write(table, data)
        if self.metrics is not None:
            self.metrics.observe_flush(table, time.monotonic() - started, rows)
        return rows

    # ---- partitions -----------------------------------------------------------
    def load_usage_partitions(self, partitions: list[int]) -> None:
        """Take over partitions of the usage topic: read the sink's marks and the dedup
        keys stored for them (within the lateness limit) from the warehouse."""
        topic = self.settings.topic_usage
        new = [p for p in partitions if (topic, p) not in self.sink.tables[USAGE_TABLE].loaded]
        if not new:
            return
        started = time.monotonic()
        self.sink.ensure_loaded(topic, new)
        horizon = now_ms() - self.rules.lateness_limit_ms - self.rules.future_skew_ms
        result = stored_dedup_keys(self.wh, topic, new, horizon)
        if result.num_rows:
            if pc.any(pc.not_equal(result.column(6), PAYLOAD_HASH_VERSION)).as_py():
                self._older_hashes = True
            ints = [np.asarray(result.column(i).to_numpy(), dtype=np.int64) for i in range(2, 6)]
            self.dedup.add_many_fp(
                key_fingerprints(result.column(0), result.column(1), self.hash_key),
                ints[0], ints[1], ints[2], ints[3],
                keys=lambda i: f"{result.column(0)[i].as_py()}\x1f{result.column(1)[i].as_py()}",
            )  # fmt: skip
        # a month before the horizon: a tier period (a month) of usage
        usage = stored_tier_usage(self.wh, topic, new, horizon - 32 * 86_400_000)
        if usage.num_rows:
            for tenant, period, tu in zip(
                *(usage.column(i).to_pylist() for i in range(3)), strict=True
            ):
                self.rater.add_usage(tenant, period, tu)
        log.info(
            "took partitions %s: %d dedup keys loaded in %.2f s",
            new,
            result.num_rows,
            time.monotonic() - started,
        )

    def take_usage_partitions(self, partitions: list[int]) -> dict[int, int | None]:
        """Take over usage partitions (``load_usage_partitions``) and return each one's
        mark in ``usage_events``: the offset of the last stored event, or ``None``. Every
        input at or below it is done (dead letters are sent before any table is written),
        so reading resumes after it."""
        self.load_usage_partitions(partitions)
        marks = self.sink.tables[USAGE_TABLE].marks
        topic = self.settings.topic_usage
        return {p: marks.get((topic, p)) for p in partitions}

    def _key_fingerprint(self, key: str) -> int:
        """The dedup index's fingerprint of a key string: the decoder's ``key_fp``."""
        carrier, _, event_id = key.partition("\x1f")
        fp = key_fingerprints(pa.array([carrier]), pa.array([event_id]), self.hash_key)
        return int(fp[0])

    def _same_event(self, key: str, position: tuple[int, int]) -> bool:
        """Does the usage event at (partition, offset) have dedup key ``key``? Asked by
        the dedup index only when two keys share a 64-bit fingerprint but not a payload
        hash (a conflicting duplicate, or a fingerprint collision): from the batch being
        processed (not stored yet), else from usage_events."""
        batches = [*self._unstored, self._current] if self._current else list(self._unstored)
        for table, where in batches:
            cached = self._rows_by_position.get(id(where))
            if cached is None or cached[0] is not where:
                # once per batch, and only for batches a verify looks into; the entry
                # keeps its batch alive, so its id is not reused while it is cached
                if len(self._rows_by_position) > 8:
                    self._rows_by_position.clear()
                cached = self._rows_by_position[id(where)] = (
                    where,
                    {
                        pos: i
                        for i, pos in enumerate(
                            zip(where.partitions.tolist(), where.offsets.tolist(), strict=True)
                        )
                    },
                )
            row = cached[1].get(position)
            if row is not None:
                return _row_key(table, row) == key
        carrier, _, event_id = key.partition("\x1f")
        partition, offset = position
        return stored_event_has_key(
            self.wh, self.settings.topic_usage, partition, offset, carrier, event_id
        )

    def release_usage_partitions(self, partitions: list[int]) -> None:
        """Give partitions up. Every partition's state is then re-read from the warehouse
        before its next batch: the tier counters are per tenant, not per partition, so
        they are cleared as a whole rather than risk counting a returning partition's
        usage twice."""
        topic = self.settings.topic_usage
        held = [p for t, p in self.sink.tables[USAGE_TABLE].loaded if t == topic]
        self.sink.forget(topic, sorted(set(held) | set(partitions)))
        self.rater.usage.clear()
        self._unstored.clear()
        self._rows_by_position.clear()

    # ---- the usage path -------------------------------------------------------
    def process_usage(self, messages: list[RawMessage]) -> BatchReport:
        """Prepare and store one batch of usage messages (``prepare_usage`` then
        ``store_usage``, on the calling thread). Raises like ``store_usage``."""
        from pipeline.usage_reader import ConsumedBatch

        topics = {m.topic for m in messages}
        batch = ConsumedBatch(
            topics.pop() if len(topics) == 1 else self.settings.topic_usage,
            [m.value for m in messages],
            [m.partition for m in messages],
            [m.offset for m in messages],
            [m.timestamp_ms for m in messages],
        )
        self.load_usage_partitions(sorted(set(batch.partitions)))
        return self.store_usage(self.prepare_usage(batch))

    def prepare_usage(self, batch: ConsumedBatch) -> PreparedUsage:
        """Stages 1 to 7 for one batch, on columns: decode -> validate -> pseudonymise ->
        dedup -> rate -> usage_events rows -> rollups. Touches no table and no topic (the
        dedup index and the tier counters advance); ``store_usage`` writes the result.
        Its partitions must have been taken (``take_usage_partitions``)."""
        clock = _StageClock(self.stage_cpu_us)
        clock.add("consume", batch.consume_cpu_s)
        out = PreparedUsage(consumed=len(batch))
        where = Positions(
            batch.topic,
            np.asarray(batch.partitions, dtype=np.int64),
            np.asarray(batch.offsets, dtype=np.int64),
            np.asarray(batch.timestamps, dtype=np.int64),
            np.arange(len(batch), dtype=np.int64),
        )
        decoded = self.decoder.decode(batch.values)
        table, phash, fps, rows = self._decoded_rows(batch, decoded, out.dead_letters)
        where = where.take(rows)
        clock.lap("decode")

        keep = ~suspect_rows(table, where.arrived_ms, self.rules)
        doubtful = np.flatnonzero(~keep)
        for i, record in zip(doubtful, row_records(table, doubtful), strict=True):
            rejection = check_record(record, int(where.arrived_ms[i]), self.rules)
            if rejection is None:
                keep[i] = True
                continue
            out.dead_letters.append(self._letter(batch, int(where.source[i]), rejection, record))
        if not keep.all():
            table, phash, fps, where = table.filter(keep), phash[keep], fps[keep], where.take(keep)
        clock.lap("validate")

        subscribers = table.schema.get_field_index("subscriber_id")
        table = table.set_column(
            subscribers, "subscriber_id", pseudonymise_column(table.column(subscribers), self.key)
        )
        table = redact_columns(table, self.key)
        clock.lap("pseudonymise")

        self._current = (table, where)
        try:
            decisions = self.dedup.check_many(
                fps, phash, where.partitions, where.offsets,
                np.asarray(table.column("event_time").to_numpy(), dtype=np.int64),
                keys=lambda i: _row_key(table, i),
            )  # fmt: skip
        finally:
            self._current = None
        conflicts = np.flatnonzero(decisions == Decision.CONFLICT)
        for c, record in zip(conflicts, row_records(table, conflicts), strict=True):
            if self._older_hashes and self.dedup.holds(int(fps[c]), payload_hash(record)):
                # a copy of an event stored with the v1 hash (before the compiled path)
                decisions[c] = Decision.DUPLICATE
                continue
            rejection = Rejection(
                Reason.CONFLICTING_DUPLICATE,
                Stage.DEDUP,
                f"event_id: {record['event_id']!r} from {record['reporting_carrier']} was "
                "already counted with different content; the first one stands",
            )
            out.dead_letters.append(self._letter(batch, int(where.source[c]), rejection, record))
        new = decisions == Decision.NEW
        out.duplicates = int(np.count_nonzero(decisions == Decision.DUPLICATE))
        out.accepted = int(np.count_nonzero(new))
        # Events at or below usage_events' marks are stored already (a replay).
        fresh = np.flatnonzero(new & self._above_marks(where))
        table, phash, fps, where = table.take(fresh), phash[fresh], fps[fresh], where.take(fresh)
        clock.lap("dedup")

        rated = self.rater.rate_columns(table)
        if rated.unpriced.any():
            unpriced = np.asarray([u for u, _ in rated.unpriced_detail], dtype=np.int64)
            for (u, why), record in zip(
                rated.unpriced_detail, row_records(table, unpriced), strict=True
            ):
                # Not counted: forget it, so the same event can be replayed after a card fix.
                self.dedup.forget_fp(int(fps[u]), int(where.partitions[u]), int(where.offsets[u]))
                origin = int(where.source[u])
                out.dead_letters.append(self._letter(batch, origin, why.to_rejection(), record))
            priced = np.flatnonzero(~rated.unpriced)
            out.accepted -= len(rated.unpriced_detail)
            table, phash, where = table.take(priced), phash[priced], where.take(priced)
            rated = rated.take(priced)
        clock.lap("rate")

        now = ingested_now()
        events = usage_events_rows(table, phash, rated, where, now)
        clock.lap("build")
        out.unstored = (table, where)
        self._unstored.append(out.unstored)
        if events.num_rows:
            with_arrival = events.append_column("arrived_ms", pa.array(where.arrived_ms))
            out.writes = [*self._rollups(with_arrival, where, now), (USAGE_TABLE, events)]
            feed = pa.table(
                {
                    "tenant_id": table.column("tenant_id"),
                    "subscriber_id": table.column("subscriber_id"),
                    "event_time": table.column("event_time"),
                    "event_id": table.column("event_id"),
                    "partition": pa.array(where.partitions),
                }
            )
            tu, cny = rated.tier_usage_micro, rated.amount_micro
            if self.quota is not None:
                quota = self.quota
                out.quota_feed = lambda: quota.on_rated_columns(feed, tu, cny)
        clock.lap("rollups")
        return out

    def store_usage(self, prepared: PreparedUsage) -> BatchReport:
        """Store a prepared batch: dead letters first (delivered to Kafka), then the
        rollups, then usage_events, then the quota feed. Returns only once everything is
        stored; raises ``SinkAbortedError`` or ``DeliveryError`` otherwise (the caller
        must then not commit)."""
        started = time.monotonic()
        clock = _StageClock(self.stage_cpu_us)
        report = BatchReport(
            consumed=prepared.consumed,
            accepted=prepared.accepted,
            duplicates=prepared.duplicates,
        )
        if prepared.dead_letters:
            # Before any table is written: a stored event then implies its batch's dead
            # letters are delivered, so reading can resume after usage_events' mark.
            # In source order: the mirror takes a letter at or below an offset it has
            # already seen from that source partition for a copy (``first_copies``).
            prepared.dead_letters.sort(key=lambda d: (d.topic, d.partition, d.offset))
            self.send_dead_letters(prepared.dead_letters)
            # and stored here, like the batch's events: the mirror of the dead-letter
            # topic (faust's agent) may lose letters around a rebalance, and it drops the
            # copies it then reads (the marks by source position), so a letter is stored
            # once whichever path stores it first
            stored = self._store_letters(prepared.dead_letters)
            if self.metrics is not None:
                self.metrics.observe_dead_letters_stored(stored)
            report.dead_letters.update(d.reason for d in prepared.dead_letters)
            clock.lap("dead_letters")
        for table, data in prepared.writes:
            rows = self._write(table, data)
            if table == USAGE_TABLE:
                report.inserted = rows
        clock.lap("sink")
        if prepared.quota_feed is not None:
            prepared.quota_feed()
            clock.lap("quota_feed")
        if self._unstored and self._unstored[0] is prepared.unstored:
            self._unstored.popleft()  # stored in the order prepared
        report.seconds = time.monotonic() - started
        self._add(report)
        return report

    def _decoded_rows(
        self, batch: ConsumedBatch, decoded: DecodedBatch, letters: list[DeadLetter]
    ) -> tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray]:
        """The decoded rows of a batch, in log order: the fast path's, plus the rows it
        flagged that the exact fastavro path decodes (another schema version, Confluent
        framing), re-encoded in v1 and decoded by the fast path, so every row has the
        same shape, payload hash and key fingerprint. Undecodable rows become dead
        letters. Returns (table, payload hashes, key fingerprints, source rows)."""
        ok = decoded.status == OK
        if ok.all():
            return decoded.table, decoded.payload_hash, decoded.key_fp, np.arange(len(ok))
        again: list[bytes] = []
        again_rows: list[int] = []
        for i in np.flatnonzero(~ok):
            try:
                record = self.codec.decode(batch.values[i])
                again.append(MAGIC + self.codec.fingerprint + self.codec.encode_body(record))
            except DecodeError as exc:
                rejection = Rejection(exc.reason, Stage.DECODE, exc.detail)
                letters.append(dead_letter_for(batch.message(int(i)), rejection, None))
                continue
            except ValueError as exc:  # decoded, but does not fit v1 (a future schema)
                rejection = Rejection(Reason.UNDECODABLE, Stage.DECODE, f"payload: {exc}")
                letters.append(dead_letter_for(batch.message(int(i)), rejection, None))
                continue
            again_rows.append(int(i))
        fast = np.flatnonzero(ok)
        if not again:
            return (
                decoded.table.take(fast), decoded.payload_hash[fast], decoded.key_fp[fast], fast
            )  # fmt: skip
        redone = self.decoder.decode(again)
        if not (redone.status == OK).all():  # fastavro and the fast path disagree: a bug
            raise RuntimeError("a row fastavro decoded does not decode after re-encoding")
        source = np.concatenate([fast, np.asarray(again_rows, dtype=np.int64)])
        order = np.argsort(source, kind="stable")
        table = pa.concat_tables([decoded.table.take(fast), redone.table]).take(order)
        phash = np.concatenate([decoded.payload_hash[fast], redone.payload_hash])[order]
        fps = np.concatenate([decoded.key_fp[fast], redone.key_fp])[order]
        return table, phash, fps, source[order]

    def _letter(
        self, batch: ConsumedBatch, row: int, rejection: Rejection, record: dict[str, Any]
    ) -> DeadLetter:
        """The dead letter for source row ``row`` of a batch, with its decoded record
        (the subscriber pseudonymised here if it is not yet)."""
        subscriber = record.get("subscriber_id")
        if isinstance(subscriber, str):
            record["subscriber_id"] = pseudonymise(subscriber, self.key)
        return dead_letter_for(batch.message(row), rejection, record)

    def _above_marks(self, where: Positions) -> np.ndarray:
        """Per row: is it above usage_events' mark of its partition (not stored yet)?"""
        marks = self.sink.tables[USAGE_TABLE].marks
        fresh = np.ones(len(where.offsets), dtype=bool)
        for part in np.unique(where.partitions):
            mark = marks.get((where.topic, int(part)))
            if mark is not None:
                fresh &= ~((where.partitions == part) & (where.offsets <= mark))
        return fresh

    def _rollups(
        self, with_arrival: pa.Table, where: Positions, now: datetime
    ) -> list[tuple[str, pa.Table]]:
        """The rollup and correction rows of a batch's fresh events, in write order. When
        every rollup table has stored exactly what usage_events has (always, but after a
        crash between two of a batch's writes), hour and day come from the minute rows."""
        parts = [(where.topic, int(p)) for p in np.unique(where.partitions)]
        usage_marks = self.sink.tables[USAGE_TABLE].marks
        in_step = all(
            self.sink.tables[t].marks.get(pos) == usage_marks.get(pos)
            for t in ROLLUP_TABLES
            for pos in parts
        )
        writes: list[tuple[str, pa.Table]] = []
        minute: pa.Table | None = None
        for table in ROLLUP_TABLES:
            todo = with_arrival if in_step else self.sink.tables[table].unstored(with_arrival)
            if todo.num_rows == 0:
                continue
            if table == CORRECTIONS_TABLE:
                data = corrections_table(todo, self.grace_ms, now)
                if data.num_rows == 0:
                    continue
            elif in_step and minute is not None:
                data = rollup_from_minutes(minute, table, now)
            else:
                data = rollup_table(todo, table, self.grace_ms, now)
                if table == "usage_minute":
                    minute = data
            writes.append((table, data))
        return writes

    def send_dead_letters(self, letters: list[DeadLetter]) -> None:
        """Deliver dead letters to the dead-letter topic and wait for the broker.

        Keyed by the source position so one source partition's letters stay in order in
        one dead-letter partition (the table mirror relies on that)."""
        topic = self.settings.topic_dead_letters
        failures: list[str] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                failures.append(str(err))

        for letter in letters:
            prepare_dead_letter(letter, self.key)
            key = f"{letter.topic}:{letter.partition}".encode()
            while True:
                try:
                    self.dl_producer.produce(
                        topic, self.dl_codec.encode(letter.to_avro()), key, on_delivery=on_delivery
                    )
                    break
                except BufferError:
                    self.dl_producer.poll(0.05)
        remaining = self.dl_producer.flush(60)
        if remaining:
            failures.append(f"{remaining} dead letter(s) undelivered after 60 s")
        if failures:
            raise DeliveryError(failures)

    # ---- the dead-letter mirror -------------------------------------------------
    def process_dead_letters(self, messages: list[RawMessage]) -> int:
        """Mirror dead-letter records into ``dead_letters``, exactly once.

        A record's identity is its *source* position; records of one source partition
        arrive in order, so ``first_copies`` (within this batch) and the sink's marks per
        source (topic, partition; across batches) drop the copies a replayed upstream
        batch sent again. Returns rows inserted."""
        letters = []
        for msg in messages:
            try:
                rec = self.dl_codec.decode(msg.value)
            except DecodeError as exc:
                # Garbage on the dead-letter topic is itself a dead letter, positioned on
                # the dead-letter topic.
                rejection = Rejection(exc.reason, Stage.DECODE, exc.detail)
                letters.append(letter_from_rejection(msg, rejection))
                continue
            letters.append(
                DeadLetter(
                    reason=rec["reason"],
                    stage=rec["stage"],
                    detail=rec["detail"],
                    payload=rec["payload"],
                    payload_format=rec["payload_format"],
                    topic=rec["source_topic"],
                    partition=rec["source_partition"],
                    offset=rec["source_offset"],
                    failed_at_ms=rec["failed_at"],
                    event_id=rec["event_id"],
                    reporting_carrier=rec["reporting_carrier"],
                    tenant_id=rec["tenant_id"],
                    event_time_ms=rec["event_time"],
                )
            )
        return self._store_letters(first_copies(letters))

    def _store_letters(self, letters: list[DeadLetter]) -> int:
        """Store letters of one or more sources, each source's in offset order, in
        ``dead_letters``, skipping those at or below the marks. Returns rows inserted."""
        if not letters:
            return 0
        table = dead_letters_table(letters, ingested_now())
        self._ensure_dl_marks(table)
        return self._write(DEAD_LETTER_TABLE, table)

    def _ensure_dl_marks(self, table: pa.Table) -> None:
        tracked = self.sink.tables[DEAD_LETTER_TABLE]
        pairs = set(
            zip(
                table.column("topic").to_pylist(),
                table.column("partition").to_pylist(),
                strict=True,
            )
        )
        by_topic: dict[str, list[int]] = {}
        for topic, part in pairs:
            if (topic, part) not in tracked.loaded:
                by_topic.setdefault(topic, []).append(part)
        for topic, parts in by_topic.items():
            tracked.load(self.wh, topic, parts)

    def _add(self, report: BatchReport) -> None:
        t = self.totals
        t.consumed += report.consumed
        t.accepted += report.accepted
        t.inserted += report.inserted
        t.duplicates += report.duplicates
        t.dead_letters.update(report.dead_letters)

    def close(self) -> None:
        """Flush the producer and release the warehouse."""
        self.dl_producer.flush(10)
        self.wh.close()


class _StageClock:
    """Adds the calling thread's CPU time per stage to ``totals`` (microseconds)."""

    def __init__(self, totals: Counter[str]) -> None:
        self.totals = totals
        self.last = time.thread_time()

    def add(self, stage: str, seconds: float) -> None:
        self.totals[stage] += int(seconds * 1e6)

    def lap(self, stage: str) -> None:
        now = time.thread_time()
        self.totals[stage] += int((now - self.last) * 1e6)
        self.last = now


def _row_key(table: pa.Table, row: int) -> str:
    """The dedup key of one row of a decoded batch."""
    carrier = table.column("reporting_carrier")[row].as_py()
    return f"{carrier}\x1f{table.column('event_id')[row].as_py()}"


__all__ = ["BatchReport", "Pipeline", "Reason"]
