"""Quota definitions on Kafka: the compacted topic ``tokenmeter-quota-definitions``.

The topic is the source of truth. Key = ``tenant`` or ``tenant/subscriber``; value = the
definition as JSON; a tombstone (null value) deletes it. Compaction keeps the latest
value per key, so reading the topic from the start gives the current definitions.

- ``publish_definition`` / ``publish_tombstone``: what ``tokenmeter quota set|delete``
  do (idempotent producer, waits for the broker's acknowledgement);
- ``read_definitions``: read the whole topic (the worker at start, ``quota show``);
- ``DefinitionFollower``: a thread that follows the topic after that and hands each
  change to a callback (the worker's quota service).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from pydantic import ValidationError

from pipeline.metering.quota import QuotaDefinition, fmt
from pipeline.produce import DeliveryError, producer_config
from pipeline.settings import Settings
from pipeline.topics import QUOTA_DEFINITIONS, quota_definitions, quota_events

log = logging.getLogger(__name__)


class DefinitionError(ValueError):
    """A record on the definitions topic is not a valid definition."""


@dataclass(frozen=True, slots=True)
class DefinitionChange:
    """One record of the topic: a definition, or ``None`` for a deletion."""

    key: str
    definition: QuotaDefinition | None
    partition: int
    offset: int
    timestamp_ms: int


def encode_definition(d: QuotaDefinition) -> bytes:
    """The topic value: JSON with Decimals as exact strings."""
    return json.dumps(definition_json(d), separators=(",", ":")).encode()


def definition_json(d: QuotaDefinition) -> dict[str, Any]:
    """A definition as JSON values, Decimals as exact strings (the topic's value; the
    quota server reads the same)."""
    return {
        "tenant_id": d.tenant_id,
        "subscriber_id": d.subscriber_id,
        "period": d.period,
        "limit_tu": fmt(d.limit_tu),
        "limit_cny": fmt(d.limit_cny) if d.limit_cny is not None else None,
        "thresholds": [fmt(t) for t in d.thresholds],
        "hard": d.hard,
        "updated_at": (d.updated_at or datetime.now(tz=UTC)).isoformat(),
    }


def decode_definition(value: bytes) -> QuotaDefinition:
    """Parse a topic value; raises ``DefinitionError`` with the reason."""
    try:
        data = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DefinitionError(f"not JSON: {exc}") from None
    try:
        return QuotaDefinition.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "value"
        raise DefinitionError(f"{where}: {first['msg']}") from None


def _change(msg: Any) -> DefinitionChange | None:
    key = msg.key().decode("utf-8", errors="replace") if msg.key() is not None else ""
    value = msg.value()
    _, ts = msg.timestamp()
    definition = None
    if value is not None:
        try:
            definition = decode_definition(value)
        except DefinitionError as exc:
            log.warning("ignoring quota definition %r at offset %d: %s", key, msg.offset(), exc)
            return None
        if definition.topic_key != key:
            log.warning(
                "ignoring quota definition at offset %d: key %r != %r",
                msg.offset(),
                key,
                definition.topic_key,
            )
            return None
    return DefinitionChange(key, definition, msg.partition(), msg.offset(), int(ts))


def ensure_quota_topics(settings: Settings, timeout_s: float = 30.0) -> None:
    """Create ``quota-events`` and the compacted definitions topic if missing. Raises
    ``StackError`` when that fails, also when no broker answers within ``timeout_s``."""
    from pipeline.stack import create_topics

    specs = [quota_events(settings), quota_definitions(settings)]
    create_topics(settings.kafka_bootstrap, specs, timeout_s)


def _producer(settings: Settings) -> Producer:
    return Producer(producer_config(settings, **{"linger.ms": 0}))


def _deliver(settings: Settings, key: str, value: bytes | None) -> None:
    producer = _producer(settings)
    failures: list[str] = []

    def on_delivery(err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            failures.append(f"{err.name()}: {err.str()}")

    producer.produce(QUOTA_DEFINITIONS, value=value, key=key.encode(), on_delivery=on_delivery)
    if producer.flush(30):
        failures.append("not acknowledged within 30 s")
    if failures:
        raise DeliveryError(failures)


def publish_definition(settings: Settings, definition: QuotaDefinition) -> None:
    """Write a definition (replacing the key's previous one). Raises ``DeliveryError``."""
    _deliver(settings, definition.topic_key, encode_definition(definition))


def publish_tombstone(settings: Settings, key: str) -> None:
    """Delete the definition under ``key`` (compaction removes it later)."""
    _deliver(settings, key, None)


def _consumer(settings: Settings, purpose: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"tokenmeter-{purpose}-{uuid.uuid4().hex[:8]}",  # never committed
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "log_level": 3,
        }
    )


def read_topic(
    settings: Settings, topic: str, timeout_s: float = 30.0, purpose: str = "read"
) -> tuple[list[Any], dict[int, int]]:
    """Every message of ``topic`` up to its current end, and the end offset per
    partition. Raises ``TimeoutError`` if it cannot be read within ``timeout_s``."""
    import time

    consumer = _consumer(settings, purpose)
    try:
        meta = consumer.list_topics(topic, timeout=timeout_s)
        tmeta = meta.topics.get(topic)
        if tmeta is None or tmeta.error is not None:
            raise TimeoutError(
                f"topic {topic} not available: {tmeta.error if tmeta else 'missing'}"
            )
        ends: dict[int, int] = {}
        todo: list[TopicPartition] = []
        for p in tmeta.partitions:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, p), timeout=timeout_s, cached=False
            )
            ends[p] = high
            if high > low:
                todo.append(TopicPartition(topic, p, OFFSET_BEGINNING))
        out: list[Any] = []
        if not todo:
            return out, ends
        consumer.assign(todo)
        remaining = {tp.partition for tp in todo}
        deadline = time.monotonic() + timeout_s
        while remaining:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} took more than {timeout_s:.0f} s")
            for msg in consumer.consume(num_messages=10_000, timeout=0.5):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        remaining.discard(msg.partition())
                        continue
                    raise TimeoutError(f"reading {topic}: {err}")
                part, offset = int(msg.partition() or 0), int(msg.offset() or 0)
                if offset < ends[part]:
                    out.append(msg)
                if offset >= ends[part] - 1:
                    remaining.discard(part)
        return out, ends
    finally:
        consumer.close()


def read_definitions(
    settings: Settings, timeout_s: float = 30.0
) -> tuple[list[DefinitionChange], dict[int, int]]:
    """All changes on the definitions topic, in order, and the end offsets."""
    messages, ends = read_topic(settings, QUOTA_DEFINITIONS, timeout_s, "quota-definitions")
    changes = [c for c in (_change(m) for m in messages) if c is not None]
    return changes, ends


def current_definitions(changes: list[DefinitionChange]) -> dict[str, DefinitionChange]:
    """The latest live definition per key (deletions removed)."""
    latest: dict[str, DefinitionChange] = {}
    for change in changes:
        if change.definition is None:
            latest.pop(change.key, None)
        else:
            latest[change.key] = change
    return latest


class DefinitionFollower:
    """Follows the definitions topic from given offsets on a daemon thread and calls
    ``on_change`` (from that thread) for every change."""

    def __init__(
        self,
        settings: Settings,
        start: dict[int, int],
        on_change: Callable[[DefinitionChange], None],
    ) -> None:
        self._consumer = _consumer(settings, "quota-follow")
        self._consumer.assign([TopicPartition(QUOTA_DEFINITIONS, p, o) for p, o in start.items()])
        self._on_change = on_change
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="quota-definitions", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for msg in self._consumer.consume(num_messages=500, timeout=0.5):
                    err = msg.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            log.warning("quota definitions: %s", err)
                        continue
                    change = _change(msg)
                    if change is not None:
                        self._on_change(change)
        finally:
            self._consumer.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
