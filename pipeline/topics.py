"""Every Kafka topic, declared once and named for the data it holds.

The contract's names are the defaults; settings may override them (tests give each
run its own topics). ``usage-events`` is stamped by the broker (LogAppendTime), so the
worker validates "too late" and "in the future" against the time the broker received
the event: the same answer on every replay.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.settings import Settings

QUOTA_DEFINITIONS = "tokenmeter-quota-definitions"


@dataclass(frozen=True)
class TopicSpec:
    """A topic's name, partition count and broker config."""

    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    doc: str = ""


def usage_events(s: Settings) -> TopicSpec:
    """Raw Avro usage events from gateways and terminals, keyed by tenant_id."""
    return TopicSpec(
        s.topic_usage,
        s.kafka_partitions,
        {"message.timestamp.type": "LogAppendTime", "retention.ms": str(7 * 86_400_000)},
        "raw usage events (Avro single-object encoding), key = tenant_id",
    )


def dead_letters(s: Settings) -> TopicSpec:
    """Every rejected input with its reason (DeadLetter Avro), keyed by source partition."""
    return TopicSpec(
        s.topic_dead_letters,
        s.kafka_partitions,
        {"retention.ms": str(35 * 86_400_000)},
        "rejected inputs with reason; mirrored exactly once into dead_letters",
    )


def quota_events(s: Settings) -> TopicSpec:
    """Quota threshold crossings, keyed by tenant_id."""
    return TopicSpec(s.topic_quota_events, s.kafka_partitions, {}, "quota threshold crossings")


def quota_definitions(s: Settings) -> TopicSpec:
    """Quota definitions, compacted: the source of truth for `tokenmeter quota set`."""
    return TopicSpec(
        QUOTA_DEFINITIONS, 1, {"cleanup.policy": "compact"}, "quota definitions (compacted)"
    )


def all_topics(s: Settings) -> list[TopicSpec]:
    """The topics `tokenmeter stack up` creates."""
    return [usage_events(s), dead_letters(s), quota_events(s), quota_definitions(s)]
