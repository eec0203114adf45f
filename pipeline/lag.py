"""How far the worker is behind: end offsets versus the group's committed offsets.

``tokenmeter wait`` and the demo use this to know that everything produced so far has
been processed (committed offsets move only after the sink's write succeeded).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaException, TopicPartition

from pipeline.settings import Settings


@dataclass(frozen=True)
class PartitionLag:
    """One partition's end offset, committed offset and the difference."""

    topic: str
    partition: int
    end: int
    committed: int

    @property
    def lag(self) -> int:
        return max(0, self.end - max(self.committed, 0))


class LagReader:
    """Reads end and committed offsets for the worker's group."""

    def __init__(self, settings: Settings, topics: list[str] | None = None) -> None:
        self.topics = topics or [settings.topic_usage, settings.topic_dead_letters]
        self._consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "group.id": settings.consumer_group,
                "enable.auto.commit": False,
                # its failures reach the caller (the worker logs one line per reading);
                # librdkafka's own would repeat every connection retry while Kafka is down
                "log_level": 0,
            }
        )

    def partitions(self) -> list[TopicPartition]:
        """Every partition of the watched topics."""
        meta = self._consumer.list_topics(timeout=10)
        out: list[TopicPartition] = []
        for topic in self.topics:
            if topic not in meta.topics or meta.topics[topic].error is not None:
                raise KafkaException(f"topic {topic} does not exist (is the stack up?)")
            out.extend(TopicPartition(topic, p) for p in sorted(meta.topics[topic].partitions))
        return out

    def read(self) -> list[PartitionLag]:
        """The lag of every partition, now."""
        parts = self.partitions()
        committed = {
            (tp.topic, tp.partition): tp.offset
            for tp in self._consumer.committed(parts, timeout=10)
        }
        out = []
        for tp in parts:
            _low, high = self._consumer.get_watermark_offsets(tp, timeout=10, cached=False)
            out.append(
                PartitionLag(tp.topic, tp.partition, high, committed[(tp.topic, tp.partition)])
            )
        return out

    def end_offsets(self, topic: str) -> dict[int, int]:
        """End offset per partition of one topic."""
        return {
            tp.partition: self._consumer.get_watermark_offsets(tp, timeout=10, cached=False)[1]
            for tp in self.partitions()
            if tp.topic == topic
        }

    def close(self) -> None:
        """Leave without committing anything."""
        self._consumer.close()


def wait_caught_up(
    settings: Settings,
    idle_s: float,
    timeout_s: float,
    on_status: Callable[[str], None] = lambda _text: None,
    poll_s: float = 0.5,
) -> list[PartitionLag] | None:
    """Block until the worker's committed offsets reach the end of its topics and stay
    there for ``idle_s`` seconds. Returns ``None`` when caught up, or the last lag
    reading when ``timeout_s`` passed first. ``on_status`` receives progress text."""
    reader = LagReader(settings)
    deadline = time.monotonic() + timeout_s
    idle_since: float | None = None
    try:
        while True:
            lags = reader.read()
            behind = sum(p.lag for p in lags)
            now = time.monotonic()
            if behind == 0:
                idle_since = idle_since or now
                if now - idle_since >= idle_s:
                    return None
                on_status(f"caught up; idle {now - idle_since:.1f}/{idle_s:.0f} s")
            else:
                idle_since = None
                on_status(f"{behind:,} message(s) left to process")
            if now > deadline:
                return lags
            time.sleep(poll_s)
    finally:
        reader.close()
