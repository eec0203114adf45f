"""Ingest and dedup: raw Kafka messages to accepted records and dead letters.

Pure (no I/O): given the same messages and the same dedup index it returns the same
result, which is what makes a replay after a crash safe.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pipeline.events import (
    Reason,
    Rejection,
    Rules,
    Stage,
    check_record,
    dedup_key,
    payload_hash,
    pseudonymise,
    record_to_json,
)
from pipeline.metering.dedup import Decision, DedupIndex
from pipeline.serde import AvroCodec, DecodeError


@dataclass(frozen=True, slots=True)
class RawMessage:
    """One consumed Kafka message. ``timestamp_ms`` is the broker's append time."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes


@dataclass(slots=True)
class Accepted:
    """A valid, first-seen event with its position in the log."""

    record: dict[str, Any]
    payload_hash: int
    topic: str
    partition: int
    offset: int
    arrived_ms: int = 0  # the broker's receive time (LogAppendTime)


@dataclass(slots=True)
class DeadLetter:
    """A rejected input, ready for the dead-letter topic and table."""

    reason: str
    stage: str
    detail: str
    payload: bytes
    payload_format: str  # "json" or "raw"
    topic: str
    partition: int
    offset: int
    failed_at_ms: int
    event_id: str | None = None
    reporting_carrier: str | None = None
    tenant_id: str | None = None
    event_time_ms: int | None = None

    def to_avro(self) -> dict[str, Any]:
        """The record for ``schemas/avro/dead_letter.v1.avsc``."""
        return {
            "reason": self.reason,
            "stage": self.stage,
            "detail": self.detail,
            "event_id": self.event_id,
            "reporting_carrier": self.reporting_carrier,
            "tenant_id": self.tenant_id,
            "event_time": self.event_time_ms,
            "payload": self.payload,
            "payload_format": self.payload_format,
            "source_topic": self.topic,
            "source_partition": self.partition,
            "source_offset": self.offset,
            "failed_at": self.failed_at_ms,
        }


@dataclass(slots=True)
class IngestResult:
    """What one batch became."""

    accepted: list[Accepted] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    duplicates: int = 0


def _str_or_none(value: Any) -> str | None:
    return value[:256] if isinstance(value, str) else None


# DateTime64(3) holds 1900-01-01 .. 2299-12-31; a hostile timestamp outside stays in the
# payload but not in the event_time column.
_MIN_MS, _MAX_MS = -2_208_988_800_000, 10_413_791_999_000


def _storable_time(value: Any) -> bool:
    return isinstance(value, int) and _MIN_MS <= value <= _MAX_MS


def dead_letter_for(
    msg: RawMessage, rejection: Rejection, record: dict[str, Any] | None
) -> DeadLetter:
    """Build the dead letter for a message; a decoded record is kept as JSON (already
    pseudonymised by the caller), undecodable bytes as they came."""
    if record is None:
        payload, fmt = msg.value, "raw"
    else:
        payload = json.dumps(record_to_json(record), ensure_ascii=False, default=str).encode()
        fmt = "json"
    event_time = record.get("event_time") if record else None
    return DeadLetter(
        reason=rejection.reason.value,
        stage=rejection.stage.value,
        detail=rejection.detail,
        payload=payload,
        payload_format=fmt,
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        failed_at_ms=msg.timestamp_ms,
        event_id=_str_or_none(record.get("event_id")) if record else None,
        reporting_carrier=_str_or_none(record.get("reporting_carrier")) if record else None,
        tenant_id=_str_or_none(record.get("tenant_id")) if record else None,
        event_time_ms=event_time if _storable_time(event_time) else None,
    )


class IngestStage:
    """Decode -> validate -> pseudonymise -> dedup, for one batch at a time."""

    def __init__(
        self, codec: AvroCodec, rules: Rules, pseudonym_key: bytes, dedup: DedupIndex
    ) -> None:
        self.codec = codec
        self.rules = rules
        self.key = pseudonym_key
        self.dedup = dedup

    def process(self, messages: list[RawMessage]) -> IngestResult:
        """Classify every message of a batch. Never raises for bad input."""
        result = IngestResult()
        decode = self.codec.decode
        check = self.dedup.check
        for msg in messages:
            try:
                record = decode(msg.value)
            except DecodeError as exc:
                rejection = Rejection(exc.reason, Stage.DECODE, exc.detail)
                result.dead_letters.append(dead_letter_for(msg, rejection, None))
                continue
            invalid = check_record(record, msg.timestamp_ms, self.rules)
            # After the check (a blank id must be refused, not hashed), before anything
            # is kept: dead-letter payloads carry the pseudonym too.
            subscriber = record.get("subscriber_id")
            if isinstance(subscriber, str):
                record["subscriber_id"] = pseudonymise(subscriber, self.key)
            if invalid is not None:
                result.dead_letters.append(dead_letter_for(msg, invalid, record))
                continue
            phash = payload_hash(record)
            decision = check(
                dedup_key(record), phash, msg.partition, msg.offset, record["event_time"]
            )
            if decision is Decision.NEW:
                result.accepted.append(
                    Accepted(record, phash, msg.topic, msg.partition, msg.offset, msg.timestamp_ms)
                )
            elif decision is Decision.DUPLICATE:
                result.duplicates += 1
            else:
                rejection = Rejection(
                    Reason.CONFLICTING_DUPLICATE,
                    Stage.DEDUP,
                    f"event_id: {record['event_id']!r} from {record['reporting_carrier']} was "
                    "already counted with different content; the first one stands",
                )
                result.dead_letters.append(dead_letter_for(msg, rejection, record))
        return result


def first_copies(letters: list[DeadLetter]) -> list[DeadLetter]:
    """The letters of a batch read back from the dead-letter topic, without the copies a
    replayed upstream batch sent again.

    One source partition's letters share one dead-letter partition (keyed by source
    position), so they arrive in source order, and a copy always comes after letters
    at a later or equal source offset: keep a letter only if its source offset is above
    every offset of its source already kept in this batch. (The sink's marks drop the
    copies of what earlier batches stored; this drops those within one batch. A copy
    within one batch made ``dead_letters`` count a letter twice after a SIGKILL:
    tests/integration/faults/test_worker_kills.py.)"""
    highest: dict[tuple[str, int], int] = {}
    kept = []
    for letter in letters:
        pos = (letter.topic, letter.partition)
        if letter.offset <= highest.get(pos, -1):
            continue
        highest[pos] = letter.offset
        kept.append(letter)
    return kept
