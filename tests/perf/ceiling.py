"""The ceiling reference for ``bench_pipeline.py``: the fastest plain Python consumer.

A confluent-kafka consumer reads the topic in batches (``consume(num_messages=10000)``),
decodes every value with ``AvroCodec.decode`` (fastavro) and throws the record away.
No faust, no validation, no storage: what the pipeline could reach if everything after
decoding were free. Prints one JSON line: events, seconds, and (t, count) progress
samples for the bench's steady-state computation.

    .venv/bin/python tests/perf/ceiling.py BOOTSTRAP TOPIC EVENTS

Not collected by pytest.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def run(bootstrap: str, topic: str, events: int, partitions: int = 4) -> dict[str, Any]:
    """Consume ``events`` messages of ``topic`` from the start; decode, discard."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from pipeline.serde import AvroCodec, DecodeError

    codec = AvroCodec()
    decode = codec.decode
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-ceiling-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    count = undecodable = 0
    samples: list[tuple[float, int]] = []
    cpu0 = time.process_time()
    started = time.monotonic()
    try:
        while count < events:
            batch = consumer.consume(num_messages=10_000, timeout=1.0)
            for msg in batch:
                if msg.error() is not None:
                    continue
                try:
                    decode(msg.value() or b"")
                except DecodeError:
                    undecodable += 1
                count += 1
            if batch:
                samples.append((time.monotonic() - started, count))
            elif time.monotonic() - started > 600:
                break
    finally:
        consumer.close()
    return {
        "events": count,
        "undecodable": undecodable,
        "seconds": round(time.monotonic() - started, 3),
        "cpu_seconds": round(time.process_time() - cpu0, 3),
        "samples": samples,
    }


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
