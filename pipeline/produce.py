"""The producer SDK for gateways and terminals.

    producer = UsageProducer.from_settings(load_settings())
    producer.send(UsageEvent(...))       # or send_record(dict) for the Avro shape
    producer.flush()                     # raises DeliveryError if anything failed

What it guarantees:
- events are validated with the worker's own rules before they leave (a bad one raises
  ``InvalidEvent`` with the reason and the field);
- the subscriber id is pseudonymised (keyed HMAC) before it leaves the process;
- the key is the tenant id, so one tenant's events land on one partition, with the
  ``murmur2_random`` partitioner: the same partition faust/aiokafka (and the Java
  client) choose for that key, so the worker's tenant-keyed state lines up;
- the producer is idempotent (no duplicates or reordering from its own retries), and
  every delivery failure is reported to the caller by ``flush``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from pipeline.dead_letters import redact_record
from pipeline.events import (
    Rejection,
    Rules,
    UsageEvent,
    check_record,
    now_ms,
    pseudonymise,
    record_from_json,
)
from pipeline.serde import AvroCodec
from pipeline.settings import Settings
from pipeline.spool import Spool


class InvalidEventError(ValueError):
    """An event the worker would reject; ``rejection`` says why."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(f"{rejection.reason.value}: {rejection.detail}")
        self.rejection = rejection


class DeliveryError(Exception):
    """Some messages were not acknowledged by Kafka."""

    def __init__(self, failures: list[str]) -> None:
        shown = "; ".join(failures[:5])
        more = f" (+{len(failures) - 5} more)" if len(failures) > 5 else ""
        super().__init__(f"{len(failures)} message(s) not delivered: {shown}{more}")
        self.failures = failures


def producer_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    """The confluent-kafka config every tokenmeter producer uses."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 20,
        "batch.num.messages": 10000,
        "compression.type": "lz4",
        "partitioner": "murmur2_random",
        "message.timeout.ms": 60000,
        "queue.buffering.max.messages": 500000,
    }
    config.update(extra)
    return config


@dataclass
class _Tally:
    delivered: int = 0
    spooled: int = 0
    failures: list[str] = field(default_factory=list)
    retriable: list[tuple[bytes | None, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


# Failures that waiting fixes (broker down, network, purged after the spool deadline):
# these messages go to the spool instead of failing the caller.
_RETRIABLE = {
    KafkaError._MSG_TIMED_OUT,
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._PURGE_QUEUE,
    KafkaError._PURGE_INFLIGHT,
    KafkaError._TIMED_OUT,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NETWORK_EXCEPTION,
}


class UsageProducer:
    """Validates, pseudonymises, encodes and sends usage events."""

    def __init__(
        self,
        producer: Producer,
        topic: str,
        pseudonym_key: bytes,
        codec: AvroCodec | None = None,
        rules: Rules | None = None,
        confluent_framing: bool = False,
        spool: Spool | None = None,
        spool_after_s: float = 10.0,
    ) -> None:
        self._producer = producer
        self._confluent = confluent_framing
        self.spool = spool
        self.spool_after_s = spool_after_s
        self.topic = topic
        self._key = pseudonym_key
        self.codec = codec or AvroCodec()
        self.rules = rules or Rules()
        self._tally = _Tally()
        # While the spool holds messages, newer ones wait behind them (in memory until
        # the next flush, then on disk) so that nothing overtakes what was spooled:
        # Kafka then receives one producer's messages in the order they were sent, as
        # the worker's "first copy wins" rule for conflicting duplicates assumes.
        self._held: list[tuple[bytes | None, bytes]] = []
        self._behind_spool = spool is not None and bool(spool.segments())

    @classmethod
    def from_settings(cls, settings: Settings, **config: Any) -> UsageProducer:
        """A producer for the configured broker and the usage topic."""
        codec = AvroCodec()
        if settings.schema_registry_url:
            codec.use_registry(settings.registry_client(), f"{settings.topic_usage}-value")
        return cls(
            Producer(producer_config(settings, **config)),
            settings.topic_usage,
            settings.pseudonym_secret(),
            codec=codec,
            confluent_framing=settings.wire_format == "confluent",
            spool=Spool(settings.spool_path, settings.spool_max_mb << 20),
            spool_after_s=settings.spool_after_s,
            rules=Rules(
                lateness_limit_ms=settings.lateness_limit_s * 1000,
                future_skew_ms=settings.future_skew_s * 1000,
                max_tokens=settings.max_tokens,
            ),
        )

    @property
    def delivered(self) -> int:
        """Messages Kafka acknowledged so far."""
        return self._tally.delivered

    @property
    def spooled(self) -> int:
        """Messages written to the spool so far (Kafka was unreachable)."""
        return self._tally.spooled

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        with self._tally.lock:
            if err is None:
                self._tally.delivered += 1
            elif self.spool is not None and err.code() in _RETRIABLE:
                self._tally.retriable.append((msg.key(), msg.value() or b""))
            else:
                self._tally.failures.append(f"{err.name()}: {err.str()}")

    def send(self, event: UsageEvent) -> None:
        """Validate and send one event (see ``send_record``)."""
        self.send_record(event.to_record())

    def send_record(self, record: dict[str, Any]) -> None:
        """Validate, pseudonymise and send one record. Raises ``InvalidEventError``."""
        rejection = check_record(record, now_ms(), self.rules)
        if rejection is not None:
            raise InvalidEventError(rejection)
        record = dict(record)
        record["subscriber_id"] = pseudonymise(record["subscriber_id"], self._key)
        redact_record(record, self._key)
        encode = self.codec.encode_confluent if self._confluent else self.codec.encode
        self.send_raw(record["tenant_id"].encode(), encode(record))

    def send_raw(self, key: bytes | None, value: bytes) -> None:
        """Send bytes as they are (used by the simulator for deliberately bad input)."""
        if self._behind_spool:
            self._held.append((key, value))
            return
        while True:
            try:
                self._producer.produce(
                    self.topic, value=value, key=key, on_delivery=self._on_delivery
                )
                break
            except BufferError:
                self._producer.poll(0.05)  # local queue full: let deliveries drain
        self._producer.poll(0)

    def flush(self, timeout: float = 60.0) -> int:
        """Make everything sent so far safe. Returns the delivered count.

        With a spool (the default from ``from_settings``), what Kafka has not
        acknowledged after ``spool_after_s`` is written to disk and counts as accepted;
        it is re-sent by ``drain`` once the broker answers. Without one, or for failures
        that waiting cannot fix (e.g. a message too large), raises ``DeliveryError``."""
        self.drain()
        if self._behind_spool:
            if self.spool is not None and self.spool.segments():
                held, self._held = self._held, []
                if held:  # still behind the spool: the held messages join it, in order
                    self.spool.append(held)
                    self._tally.spooled += len(held)
            else:  # drained: the held messages go out now, after everything spooled
                self._behind_spool = False
                held, self._held = self._held, []
                for key, value in held:
                    self.send_raw(key, value)
        wait = min(timeout, self.spool_after_s) if self.spool is not None else timeout
        remaining = self._producer.flush(wait)
        if remaining and self.spool is not None:
            # Give up on the broker for now: fail what is queued or in flight, so the
            # delivery callbacks hand the messages back, and keep them on disk.
            self._producer.purge(in_queue=True, in_flight=True, blocking=False)
            remaining = self._producer.flush(5)
        with self._tally.lock:
            failures = list(self._tally.failures)
            self._tally.failures.clear()
            keep = list(self._tally.retriable)
            self._tally.retriable.clear()
        if keep and self.spool is not None:
            self.spool.append(keep)
            self._tally.spooled += len(keep)
            self._behind_spool = True
        if remaining:
            failures.append(f"{remaining} message(s) still queued after {timeout:.0f} s")
        if failures:
            raise DeliveryError(failures)
        return self._tally.delivered

    def drain(self, timeout: float = 30.0) -> int:
        """Re-send spooled messages if the broker answers. Returns how many were sent
        and acknowledged; a segment is deleted only when all its records were."""
        if self.spool is None or not self.spool.segments():
            return 0
        try:
            self._producer.list_topics(self.topic, timeout=2)
        except KafkaException:
            return 0  # still unreachable: keep everything where it is
        sent = 0
        for segment in self.spool.segments():
            records = list(self.spool.read(segment))
            failed: list[str] = []

            def on_delivery(
                err: KafkaError | None, _msg: Message, failed: list[str] = failed
            ) -> None:
                if err is not None:
                    failed.append(err.name())

            for key, value in records:
                while True:
                    try:
                        self._producer.produce(
                            self.topic, value=value, key=key, on_delivery=on_delivery
                        )
                        break
                    except BufferError:
                        self._producer.poll(0.05)
            if self._producer.flush(timeout) or failed:
                break  # the broker went away again; the segment stays
            self.spool.remove(segment)
            sent += len(records)
        return sent


@dataclass(frozen=True)
class LineProblem:
    """A bad line in a JSONL file."""

    line: int
    reason: str
    detail: str


def read_jsonl(
    path: Path, rules: Rules
) -> Iterator[tuple[int, dict[str, Any] | None, LineProblem | None]]:
    """Yield ``(line_number, record, None)`` for good lines and ``(n, None, problem)`` for
    bad ones. Blank lines are skipped. Validation uses the worker's rules."""
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield (
                    number,
                    None,
                    LineProblem(
                        number, "invalid_json", f"not valid JSON: {exc.msg} (column {exc.colno})"
                    ),
                )
                continue
            record, rejection = record_from_json(obj)
            if rejection is None and record is not None:
                rejection = check_record(record, now_ms(), rules)
            if rejection is not None:
                yield number, None, LineProblem(number, rejection.reason.value, rejection.detail)
                continue
            yield number, record, None
