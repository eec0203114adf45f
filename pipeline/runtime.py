"""The worker's engine room: what happens to one batch, with no faust in sight.

``Pipeline`` owns the warehouse connection, the sink, the dedup index and the
dead-letter producer. Its methods are synchronous and are called from one dedicated
thread (see ``pipeline/app.py``), so its state needs no locks and the event loop stays
free to fetch, heartbeat and serve HTTP while a batch is being written.

Order inside ``process_usage`` is what makes "offsets commit only after the write":
ingest -> write usage_events -> dead letters delivered to Kafka -> return. Only then
does the agent let faust ack (and later commit) the batch's offsets.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from confluent_kafka import Producer

from pipeline.events import Reason, Rejection, Rules, Stage, dedup_key, now_ms, pseudonymise
from pipeline.metering.dedup import DedupIndex
from pipeline.metering.plans import load_plans
from pipeline.metering.pricing import load_cards
from pipeline.produce import DeliveryError, producer_config
from pipeline.serde import AvroCodec, DecodeError
from pipeline.settings import Settings
from pipeline.stages.ingest import (
    DeadLetter,
    IngestStage,
    RawMessage,
    dead_letter_for,
    first_copies,
)
from pipeline.stages.rate import RateStage
from pipeline.stages.sink import Sink, ingested_now
from pipeline.stages.window import GRAINS, corrections_table, rollup_table
from pipeline.warehouse import Warehouse, open_warehouse
from pipeline.warehouse.arrow_rows import dead_letters_table, usage_events_table
from pipeline.warehouse.base import quote_literal
from pipeline.warehouse.price_cards import sync_price_cards

if TYPE_CHECKING:
    from pipeline.metrics import WorkerMetrics
    from pipeline.quota import QuotaService

log = logging.getLogger(__name__)

USAGE_TABLE = "usage_events"
DEAD_LETTER_TABLE = "dead_letters"
CORRECTIONS_TABLE = "usage_corrections"
# Written in this order; usage_events last, so a stored event implies stored rollups.
ROLLUP_TABLES = (*GRAINS, CORRECTIONS_TABLE)

# Chinese mobile numbers, also behind the country code (+86, 0086, 86); a raw payload kept
# for a dead letter has them pseudonymised. No digit boundaries: in Avro bytes the next
# field's length or text may be a digit, and a longer digit run that happens to contain
# such a number is better over-redacted than leaked (found by the hostile-input fuzz).
_PHONE = re.compile(rb"(?:\+?86|0086)?(1[3-9]\d{9})")


def redact_phone_numbers(payload: bytes, key: bytes) -> bytes:
    """Replace anything that looks like a mobile number (with its country code, if any)
    by the pseudonym of the 11-digit number."""
    return _PHONE.sub(lambda m: pseudonymise(m.group(1).decode(), key).encode(), payload)


# A dead letter is one Kafka message, and librdkafka refuses a message over its
# message.max.bytes (1,000,000 by default) at once: a batch with such a letter could never
# be stored, and the worker would stop on it at every replay. An input near the usage
# topic's own limit, or one whose JSON form is longer than its Avro (a NUL is one byte in
# Avro and six in JSON), would not fit, so a longer payload is cut to this many bytes.
MAX_DEAD_LETTER_PAYLOAD = 900_000


def prepare_dead_letter(letter: DeadLetter, key: bytes) -> DeadLetter:
    """Make ``letter`` ready for the dead-letter topic, in place: the phone numbers of a
    raw payload pseudonymised, and a payload over ``MAX_DEAD_LETTER_PAYLOAD`` bytes cut to
    that, which its detail then says (the whole input stays at its source position)."""
    raw = letter.payload_format == "raw"
    if raw:
        letter.payload = redact_phone_numbers(letter.payload, key)
    size = len(letter.payload)
    if size > MAX_DEAD_LETTER_PAYLOAD:
        letter.payload = letter.payload[:MAX_DEAD_LETTER_PAYLOAD]
        if raw:  # the cut may have left the first 11 digits of a longer number
            letter.payload = redact_phone_numbers(letter.payload, key)
        letter.detail += (
            f" (payload cut to its first {MAX_DEAD_LETTER_PAYLOAD:,} of {size:,} bytes)"
        )
    return letter


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
        self._batch: list[RawMessage] = []
        self._batch_by_pos: dict[tuple[int, int], RawMessage] | None = None
        self.dedup = DedupIndex(verify=self._same_event)
        self.ingest = IngestStage(self.codec, self.rules, self.key, self.dedup)
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
        result = self.wh.query_arrow(
            "SELECT reporting_carrier, event_id, payload_hash, partition, offset, "
            "toUnixTimestamp64Milli(event_time) AS ms FROM usage_events "
            f"WHERE topic = {quote_literal(topic)} "
            f"AND partition IN ({', '.join(str(p) for p in new)}) "
            f"AND event_time >= fromUnixTimestamp64Milli({horizon})"
        )
        if result.num_rows:
            cols = [result.column(i).to_pylist() for i in range(6)]
            self.dedup.add_many(
                [f"{c}\x1f{e}" for c, e in zip(cols[0], cols[1], strict=True)],
                cols[2], cols[3], cols[4], cols[5],
            )  # fmt: skip
        usage = self.wh.query_arrow(
            "SELECT tenant_id, plan_period, sum(tier_usage_tu) AS tu FROM usage_events "
            f"WHERE topic = {quote_literal(topic)} "
            f"AND partition IN ({', '.join(str(p) for p in new)}) "
            f"AND event_time >= fromUnixTimestamp64Milli({horizon - 32 * 86_400_000}) "
            "GROUP BY tenant_id, plan_period"
        )
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

    def _same_event(self, key: str, position: tuple[int, int]) -> bool:
        """Does the usage event at (partition, offset) have dedup key ``key``? Asked by
        the dedup index only when two keys share a 64-bit fingerprint but not a payload
        hash (a conflicting duplicate, or a fingerprint collision): from the batch being
        processed (not stored yet), else from usage_events."""
        if self._batch_by_pos is None:
            self._batch_by_pos = {(m.partition, m.offset): m for m in self._batch}
        msg = self._batch_by_pos.get(position)
        if msg is not None:
            try:
                return dedup_key(self.codec.decode(msg.value)) == key
            except DecodeError:
                return False
        carrier, _, event_id = key.partition("\x1f")
        partition, offset = position
        found = self.wh.query_arrow(
            "SELECT count() AS n FROM usage_events "
            f"WHERE topic = {quote_literal(self.settings.topic_usage)} "
            f"AND partition = {int(partition)} AND offset = {int(offset)} "
            f"AND reporting_carrier = {quote_literal(carrier)} "
            f"AND event_id = {quote_literal(event_id)}"
        )
        return bool(found.column("n")[0].as_py())

    def release_usage_partitions(self, partitions: list[int]) -> None:
        """Give partitions up. Every partition's state is then re-read from the warehouse
        before its next batch: the tier counters are per tenant, not per partition, so
        they are cleared as a whole rather than risk counting a returning partition's
        usage twice."""
        topic = self.settings.topic_usage
        held = [p for t, p in self.sink.tables[USAGE_TABLE].loaded if t == topic]
        self.sink.forget(topic, sorted(set(held) | set(partitions)))
        self.rater.usage.clear()

    # ---- the usage path -------------------------------------------------------
    def process_usage(self, messages: list[RawMessage]) -> BatchReport:
        """Ingest one batch and store it. Returns only once everything is stored and the
        dead letters are acknowledged by Kafka; raises ``SinkAbortedError`` or
        ``DeliveryError`` otherwise (the caller must then not commit)."""
        started = time.monotonic()
        self.load_usage_partitions(sorted({m.partition for m in messages}))
        self._batch, self._batch_by_pos = messages, None
        result = self.ingest.process(messages)
        report = BatchReport(consumed=len(messages), accepted=len(result.accepted))
        report.duplicates = result.duplicates
        # Events at or below usage_events' marks are fully stored (it is written last).
        stored = self.sink.tables[USAGE_TABLE]
        fresh = [a for a in result.accepted if stored.fresh(a.topic, a.partition, a.offset)]
        rated, unpriced = self.rater.rate(fresh)
        for acc, why in unpriced:
            # Not counted: forget it, so the same event can be replayed after a card fix.
            self.dedup.forget(dedup_key(acc.record), acc.partition, acc.offset)
            msg = RawMessage(acc.topic, acc.partition, acc.offset, acc.arrived_ms, None, b"")
            result.dead_letters.append(dead_letter_for(msg, why.to_rejection(), acc.record))
        report.accepted -= len(unpriced)
        if result.dead_letters:
            # Before any table is written: a stored event then implies its batch's dead
            # letters are delivered, so reading can resume after usage_events' mark.
            # In source order: the unpriced letters came after the batch's other letters,
            # and the mirror takes a letter at or below an offset it has already seen from
            # that source partition for a copy (``first_copies``, the sink's marks).
            result.dead_letters.sort(key=lambda d: (d.topic, d.partition, d.offset))
            self.send_dead_letters(result.dead_letters)
            report.dead_letters.update(d.reason for d in result.dead_letters)
        if rated:
            now = ingested_now()
            events = usage_events_table(rated, now)
            with_arrival = events.append_column(
                "arrived_ms", pa.array([r.accepted.arrived_ms for r in rated], pa.int64())
            )
            for table in ROLLUP_TABLES:
                todo = self.sink.tables[table].unstored(with_arrival)
                if todo.num_rows == 0:
                    continue
                if table == CORRECTIONS_TABLE:
                    data = corrections_table(todo, self.grace_ms, now)
                else:
                    data = rollup_table(todo, table, self.grace_ms, now)
                self._write(table, data)
            report.inserted = self._write(USAGE_TABLE, events)
            if self.quota is not None:
                self.quota.on_rated_batch(rated)
        report.seconds = time.monotonic() - started
        self._add(report)
        return report

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
                letters.append(_letter_from_rejection(msg, rejection))
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
        letters = first_copies(letters)
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


def _letter_from_rejection(msg: RawMessage, rejection: Rejection) -> DeadLetter:
    return DeadLetter(
        reason=rejection.reason.value,
        stage=rejection.stage.value,
        detail=rejection.detail,
        payload=msg.value,
        payload_format="raw",
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        failed_at_ms=msg.timestamp_ms,
    )


__all__ = ["BatchReport", "Pipeline", "Reason", "prepare_dead_letter", "redact_phone_numbers"]
