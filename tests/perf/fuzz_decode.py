"""Mutation fuzzing of the compiled columnar decoder against fastavro, for minutes at a time.

    .venv/bin/python tests/perf/fuzz_decode.py [--seconds 60] [--seed 1]

Valid v1 events (maps of 0..24 entries, nulls and non-nulls) get 1-4 random mutations
(bit flips, inserted/deleted bytes, boundary bytes, truncation, runs of varint
continuation bytes) and are decoded in batches of 2,000; every row must be FALLBACK or
exactly fastavro's record (``check_against_fastavro`` of the unit tests). To catch
out-of-bounds reads and undefined behaviour, build the extension with the sanitizers and
preload them:

    gcc -shared -fPIC -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined \\
        -I"$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \\
        pipeline/_avrocol.c -o "pipeline/_avrocol$(.venv/bin/python -c \\
        'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \\
        ASAN_OPTIONS=detect_leaks=0 .venv/bin/python tests/perf/fuzz_decode.py

(then ``pip install -e .`` again for the optimised build). Not collected by pytest.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.serde_columnar import OK  # noqa: E402
from tests.integration.faults.hostile import CODEC, valid_record  # noqa: E402
from tests.unit.test_serde_columnar import NOW, check_against_fastavro  # noqa: E402


def mutate(rng: random.Random, value: bytes) -> bytes:
    """``value`` with 1-4 random mutations."""
    out = bytearray(value)
    for _ in range(rng.randint(1, 4)):
        op, pos = rng.randrange(6), rng.randrange(len(out) + 1)
        if op == 0 and out:
            out[pos % len(out)] ^= 1 << rng.randrange(8)
        elif op == 1:
            out[pos:pos] = rng.randbytes(rng.randint(1, 4))
        elif op == 2:
            del out[pos : pos + rng.randint(1, 4)]
        elif op == 3 and out:
            out[pos % len(out)] = rng.choice([0, 1, 2, 0x7F, 0x80, 0x81, 0xFE, 0xFF])
        elif op == 4:
            out = out[:pos]
        else:
            out[pos:pos] = bytes([0xFF] * rng.randint(1, 10) + [0x01])
    return bytes(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    seeds = [
        CODEC.encode(valid_record(i, NOW, attributes={f"k{j}": "v" * j for j in range(i % 25)}))
        for i in range(50)
    ]
    empty = {"transaction_id": None, "routing_policy": None, "latency_ms": None, "region": None}
    seeds += [CODEC.encode(valid_record(i, 0, attributes={}, **empty)) for i in range(10)]
    started, ok, total = time.monotonic(), 0, 0
    while time.monotonic() - started < args.seconds:
        batch = check_against_fastavro([mutate(rng, rng.choice(seeds)) for _ in range(2000)])
        ok += int((batch.status == OK).sum())
        total += len(batch.status)
    print(f"{total} mutated messages: {ok} decoded OK and equal to fastavro, the rest FALLBACK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
