"""The local Kafka stack against a real broker: up, up again, status, down, restart.

The broker runs from a temporary data dir on free ports (never 9092/9093), so these tests
do not touch a broker someone else is running. It is always stopped at the end.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from pipeline import stack
from pipeline.settings import Settings
from pipeline.stack import StackStatus
from pipeline.topics import QUOTA_DEFINITIONS, all_topics
from tests.integration.harness import free_port

pytestmark = pytest.mark.integration

PARTITIONS = 3  # not the default (4), to see that the setting is used


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings for a private broker; whatever the tests do, it is stopped afterwards."""
    port = free_port()
    s = Settings(
        data_dir=tmp_path_factory.mktemp("stack") / "data",
        kafka_port=port,
        kafka_controller_port=free_port(),
        kafka_bootstrap=f"127.0.0.1:{port}",
        kafka_partitions=PARTITIONS,
        kafka_heap_mb=512,
    )
    yield s
    stack.stack_down(s)
    assert not _port_open(s.kafka_port), "broker still listening after the tests"


@pytest.fixture
def running(settings: Settings) -> StackStatus:
    """The broker, up (started if a previous test stopped it)."""
    return stack.stack_up(settings, timeout_s=120)


def _produce(bootstrap: str, topic: str, key: bytes, value: bytes) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0


def _consume_until(bootstrap: str, topic: str, value: bytes, timeout_s: float = 60) -> bytes:
    """Read ``topic`` from the beginning in a fresh group until ``value`` shows up."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-stack-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            err = msg.error()
            assert err is None or err.code() == KafkaError._PARTITION_EOF, err
            if err is None and msg.value() == value:
                return bytes(msg.key() or b"")
    finally:
        consumer.close()
    raise AssertionError(f"{value!r} not consumed from {topic} within {timeout_s} s")


def test_up_round_trips_a_message_and_creates_the_topics(
    settings: Settings, running: StackStatus
) -> None:
    assert running.running
    assert running.bootstrap == f"127.0.0.1:{settings.kafka_port}"

    value = uuid.uuid4().hex.encode()
    _produce(running.bootstrap, settings.topic_usage, b"sub-1", value)
    assert _consume_until(running.bootstrap, settings.topic_usage, value) == b"sub-1"

    admin = AdminClient({"bootstrap.servers": running.bootstrap})
    topics = admin.list_topics(timeout=10).topics
    for name in (settings.topic_usage, settings.topic_dead_letters, settings.topic_quota_events):
        assert len(topics[name].partitions) == PARTITIONS, name
    # every declared topic exists as declared: partition count and each config entry
    for spec in all_topics(settings):
        assert len(topics[spec.name].partitions) == spec.partitions, spec.name
        resource = ConfigResource(ResourceType.TOPIC, spec.name)
        config = admin.describe_configs([resource])[resource].result(timeout=10)
        for key, value in spec.config.items():
            assert config[key].value == value, (spec.name, key)
        policy = "compact" if spec.name == QUOTA_DEFINITIONS else "delete"
        assert config["cleanup.policy"].value == policy, spec.name


def test_up_again_is_a_no_op(settings: Settings, running: StackStatus) -> None:
    started = time.monotonic()
    again = stack.stack_up(settings, timeout_s=120)
    assert time.monotonic() - started < 10
    assert again.running
    assert again.pid == running.pid
    assert again.topics == running.topics


def test_status_describes_the_running_broker(settings: Settings, running: StackStatus) -> None:
    status = stack.stack_status(settings)
    assert status.running
    assert status.pid == running.pid
    assert status.bootstrap == f"127.0.0.1:{settings.kafka_port}"
    assert status.kafka_version == "3.9.1"
    assert status.data_dir == settings.kafka_path
    assert status.topics[settings.topic_usage] == PARTITIONS
    assert set(status.topics) >= {spec.name for spec in all_topics(settings)}
    assert not any(name.startswith("__") for name in status.topics)
    assert "Kafka Server started" in status.log_file.read_text()


def test_ensure_topics_is_idempotent(settings: Settings, running: StackStatus) -> None:
    name = f"test-stack-{uuid.uuid4().hex[:8]}"
    stack.ensure_topics(settings, {name: {"cleanup.policy": "compact"}}, partitions=2)
    stack.ensure_topics(settings, {name: {"cleanup.policy": "compact"}}, partitions=2)
    assert stack.stack_status(settings).topics[name] == 2


def test_down_stops_the_broker_and_is_idempotent(settings: Settings, running: StackStatus) -> None:
    assert running.pid is not None
    assert stack.stack_down(settings) is True
    assert not _port_open(settings.kafka_port)
    assert not _port_open(settings.kafka_controller_port)
    with pytest.raises(ProcessLookupError):
        os.kill(running.pid, 0)
    assert not (settings.kafka_path / "broker.pid").exists()

    status = stack.stack_status(settings)
    assert status.running is False
    assert status.pid is None
    assert status.topics == {}

    assert stack.stack_down(settings) is False


def test_restart_keeps_topics_and_messages(settings: Settings, running: StackStatus) -> None:
    value = uuid.uuid4().hex.encode()
    _produce(running.bootstrap, settings.topic_dead_letters, b"k", value)
    assert stack.stack_down(settings) is True

    restarted = stack.stack_up(settings, timeout_s=120)
    assert restarted.running
    assert restarted.pid != running.pid
    assert restarted.topics == running.topics
    assert _consume_until(restarted.bootstrap, settings.topic_dead_letters, value) == b"k"


def test_a_broker_that_dies_at_startup_is_reported_with_its_log(
    tmp_path: Path, settings: Settings
) -> None:
    port = free_port()
    broken = settings.model_copy(
        update={
            "data_dir": tmp_path / "broken",
            "kafka_port": port,
            "kafka_controller_port": free_port(),
            "kafka_bootstrap": f"127.0.0.1:{port}",
        }
    )
    # a log dir formatted for another node: the broker refuses it and exits
    logs = broken.kafka_path / "logs"
    logs.mkdir(parents=True)
    (logs / "meta.properties").write_text(
        "version=1\ncluster.id=AAAAAAAAAAAAAAAAAAAAAA\nnode.id=7\n"
    )
    with pytest.raises(stack.StackError) as info:
        stack.stack_up(broken, timeout_s=60)
    message = str(info.value)
    assert "exited" in message
    assert "node id 7" in message  # the broker's own explanation, from its log
    assert not (broken.kafka_path / "broker.pid").exists()
    assert stack.stack_status(broken).running is False
    assert not _port_open(port)
