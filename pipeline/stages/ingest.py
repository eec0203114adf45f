"""Ingest and dedup: raw Kafka messages to accepted records and dead letters.

Pure (no I/O): given the same messages and the same dedup index it returns the same
result, which is what makes a replay after a crash safe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.dead_letters import DeadLetter, dead_letter_for
from pipeline.events import (
    Reason,
    Rejection,
    Rules,
    Stage,
    check_record,
    dedup_key,
    payload_hash,
    pseudonymise,
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
class IngestResult:
    """What one batch became."""

    accepted: list[Accepted] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    duplicates: int = 0


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
