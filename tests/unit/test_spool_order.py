"""The producer spool keeps one producer's messages in the order they were sent: while
it holds messages (Kafka unreachable), newer ones queue behind them, on disk too, so a
drain can never deliver them out of order. No broker needed: nothing listens on the
port, which is the outage."""

from __future__ import annotations

import socket
from pathlib import Path

from confluent_kafka import Producer

from pipeline.produce import UsageProducer, producer_config
from pipeline.settings import load_settings
from pipeline.spool import Spool


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_messages_sent_while_spooling_queue_behind_the_spool(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, kafka_bootstrap=f"127.0.0.1:{_dead_port()}")
    spool = Spool(tmp_path / "spool")
    kafka = Producer(producer_config(settings, **{"socket.connection.setup.timeout.ms": 1000}))
    producer = UsageProducer(
        kafka,
        "usage-events",
        b"k" * 32,
        spool=spool,
        spool_after_s=0.5,
    )
    for i in range(3):
        producer.send_raw(b"tn-1", f"m{i}".encode())
    producer.flush()
    assert producer.spooled == 3
    for i in range(3, 6):
        producer.send_raw(b"tn-1", f"m{i}".encode())
    # not handed to Kafka, where they could overtake the spool once the broker is back
    assert len(kafka) == 0
    producer.flush()
    assert producer.spooled == 6
    on_disk = [value for seg in spool.segments() for _, value in spool.read(seg)]
    assert on_disk == [f"m{i}".encode() for i in range(6)]

    # a new process on the same spool also queues behind it
    again = UsageProducer(
        Producer(producer_config(settings)), "usage-events", b"k" * 32, spool=spool
    )
    again.send_raw(b"tn-1", b"m6")
    again.flush(timeout=1)
    on_disk = [value for seg in spool.segments() for _, value in spool.read(seg)]
    assert on_disk[-1] == b"m6" and len(on_disk) == 7
