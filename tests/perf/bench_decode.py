"""Decode cost per event: fastavro one message at a time vs the compiled columnar decoder.

    .venv/bin/python tests/perf/bench_decode.py [--events 50000] [--batch 10000] [--runs 5]
        [--bad-rate 0.001] [--dup-rate 0.01] [--out F.json]

The messages are the simulator's (``pipeline.simulate``: live-shaped usage events, with
``--bad-rate`` garbage and ``--dup-rate`` copies). ``fastavro`` is ``AvroCodec.decode``
per message (bad messages caught), as the worker does today; ``columnar`` is
``ColumnarDecoder.decode`` per batch of ``--batch`` messages, including building the
``pa.Table``, plus ``AvroCodec.decode`` of the rows it flags FALLBACK (the exact path the
worker takes for them). Figures are CPU microseconds per event (``time.process_time``),
the median of ``--runs`` runs. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.events import now_ms  # noqa: E402
from pipeline.serde import AvroCodec, DecodeError  # noqa: E402
from pipeline.serde_columnar import FALLBACK, ColumnarDecoder  # noqa: E402
from pipeline.simulate import Simulation  # noqa: E402


def _median_us(run: Callable[[], None], events: int, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return statistics.median(times) / events * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--bad-rate", type=float, default=0.001)
    parser.add_argument("--dup-rate", type=float, default=0.01)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    codec = AvroCodec()
    sim = Simulation(seed=11, now_ms=now_ms(), live_rate=50_000.0)
    values = [m.value for m in sim.messages(args.events, args.dup_rate, args.bad_rate)]
    decoder = ColumnarDecoder(codec, b"bench-hash-key!!")
    batches = [values[i : i + args.batch] for i in range(0, len(values), args.batch)]

    def scalar() -> None:
        for value in values:
            try:
                codec.decode(value)
            except DecodeError:
                pass

    fallbacks = 0

    def columnar() -> None:
        nonlocal fallbacks
        fallbacks = 0
        for batch in batches:
            decoded = decoder.decode(batch)
            for i in (decoded.status == FALLBACK).nonzero()[0]:
                fallbacks += 1
                try:
                    codec.decode(batch[i])
                except DecodeError:
                    pass

    def columnar_only() -> None:
        for batch in batches:
            decoder.decode(batch)

    result = {
        "events": len(values),
        "batch": args.batch,
        "mean_bytes": sum(map(len, values)) / len(values),
        "fastavro_us_per_event": _median_us(scalar, len(values), args.runs),
        "columnar_us_per_event": _median_us(columnar, len(values), args.runs),
        "columnar_decode_only_us_per_event": _median_us(columnar_only, len(values), args.runs),
    }
    result["fallback_rows"] = fallbacks
    result["speedup"] = result["fastavro_us_per_event"] / result["columnar_us_per_event"]
    for name, value in result.items():
        print(f"{name:36} {value:.3f}" if isinstance(value, float) else f"{name:36} {value}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
