"""The ceiling reference for ``bench_pipeline.py``: the fastest batch consumer we have.

A confluent-kafka consumer reads the topic in batches (``consume(num_messages=10000)``),
decodes every value and throws the records away. The decoder is the compiled batch
decoder ``pipeline.serde_columnar.ColumnarDecoder`` (one ``decode`` call per batch) when
that module imports, else ``AvroCodec.decode`` (fastavro) per message; ``decoder`` in the
output says which, and why the columnar one was not used. No faust, no validation, no
storage: what the pipeline could reach if everything after decoding were free. Prints
one JSON line: events, seconds, CPU seconds, decoder and (t, count) progress samples for
the bench's rate computation.

    .venv/bin/python tests/perf/ceiling.py BOOTSTRAP TOPIC EVENTS [--fastavro]

Not collected by pytest.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# any fixed key does: the ceiling discards the payload hashes the decoder computes
HASH_KEY = hashlib.blake2b(b"tokenmeter-bench-ceiling", digest_size=16).digest()


def batch_decoder(force_fastavro: bool = False) -> tuple[Callable[[list[bytes]], int], str]:
    """A function decoding a list of message values (returns how many failed to
    decode, or 0 when the decoder reports failures per row instead of raising) and its
    name: ``columnar`` or ``fastavro`` (with the reason the columnar one was not used)."""
    from pipeline.serde import AvroCodec, DecodeError

    codec = AvroCodec()
    why = "--fastavro given"
    if not force_fastavro:
        try:
            from pipeline.serde_columnar import ColumnarDecoder  # type: ignore[import-not-found]

            columnar = ColumnarDecoder(codec, HASH_KEY)
        except Exception as exc:  # noqa: BLE001 - any failure means: use fastavro
            why = f"pipeline.serde_columnar unavailable: {type(exc).__name__}: {exc}"
        else:

            def decode_columnar(values: list[bytes]) -> int:
                columnar.decode(values)  # rows it cannot decode are flagged, not raised
                return 0

            return decode_columnar, "columnar"

    decode = codec.decode

    def decode_each(values: list[bytes]) -> int:
        bad = 0
        for value in values:
            try:
                decode(value)
            except DecodeError:
                bad += 1
        return bad

    return decode_each, f"fastavro ({why})"


def run(
    bootstrap: str, topic: str, events: int, partitions: int = 4, force_fastavro: bool = False
) -> dict[str, Any]:
    """Consume ``events`` messages of ``topic`` from the start; decode, discard."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    decode, decoder = batch_decoder(force_fastavro)
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
            values = [msg.value() or b"" for msg in batch if msg.error() is None]
            if values:
                undecodable += decode(values)
                count += len(values)
                samples.append((time.monotonic() - started, count))
            elif time.monotonic() - started > 600:
                break
    finally:
        consumer.close()
    return {
        "events": count,
        "decoder": decoder,
        "undecodable": undecodable,
        "seconds": round(time.monotonic() - started, 3),
        "cpu_seconds": round(time.process_time() - cpu0, 3),
        "samples": samples,
    }


if __name__ == "__main__":
    print(
        json.dumps(
            run(sys.argv[1], sys.argv[2], int(sys.argv[3]), force_fastavro="--fastavro" in sys.argv)
        )
    )
