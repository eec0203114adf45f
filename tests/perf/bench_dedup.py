"""Dedup index: bytes per key and ns per check, compact index vs a dict vs a plain set,
and the batch path (``check_many``) in us per event.

    .venv/bin/python tests/perf/bench_dedup.py --keys 1000000 10000000 [--out F.json]
    .venv/bin/python tests/perf/bench_dedup.py --structures many --keys 1000000 5000000 \
        --batches 10000 50000

Each (structure, size) runs in a fresh subprocess. Memory is the growth of the process's
RSS while the structure is built, measured after ``gc.collect()`` and glibc's
``malloc_trim`` (so freed temporaries do not count), and for the compact index also its
arrays' ``nbytes``. Keys look like the worker's: ``"CMCC\\x1fcmcc-<tag>-<n>"``.
Timings: ``insert`` = ``check`` of a new key (merges included, amortised over the
build), ``dup`` = ``check`` of a held key at another position (the duplicate path),
``miss`` = ``check`` of a new key once the index is full. Not collected by pytest.

``many``: the index is loaded with ``--keys`` random fingerprints (``add_many_fp``, as
from the warehouse), then ``check_many`` runs on batches of ``--batches`` rows (CPU time
of the call only, per event): ``live_us`` = live-shaped batches (99 % new keys, 1 % exact
copies of held keys at other positions; the delta's growth, probe-table rebuilds and
merges included, over ``MANY_EVENTS`` events; ``live_merge_us`` is the merges' share),
``dup_us`` = batches of copies of held
keys, ``replay_us`` = held events replayed at their own positions (a restart from an
old offset), ``conflict_us`` = held keys with other content and no ``verify`` (each
such row with ``verify`` set also costs one ``verify`` call).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PROBES = 500_000
MANY_EVENTS = 1_000_000
CARRIERS = ("CMCC", "CTCC", "CUCC")
T0 = 1_795_852_800_000


def key(i: int) -> str:
    return f"{CARRIERS[i % 3]}\x1f{CARRIERS[i % 3].lower()}-3f9a1c20b7-{i}"


def trim() -> None:
    """Return freed heap memory to the OS (glibc), so RSS shows live memory."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class DictIndex:
    """The previous implementation: key -> (payload hash, partition, offset, event ms)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[int, int, int, int]] = {}

    def check(self, key: str, ph: int, partition: int, offset: int, ms: int) -> int:
        entry = self.entries.get(key)
        if entry is None:
            self.entries[key] = (ph, partition, offset, ms)
            return 0
        if entry[1] == partition and entry[2] == offset:
            return 0
        return 1 if entry[0] == ph else 2


def measure(kind: str, n: int) -> dict[str, Any]:
    from pipeline.metering.dedup import DedupIndex

    gc.collect()
    trim()
    before = rss()
    index: Any
    plain: set[str] = set()
    if kind == "compact":
        index = DedupIndex()
    elif kind == "dict":
        index = DictIndex()
    else:
        index = None
    started = time.process_time()
    if index is not None:
        check = index.check
        for i in range(n):
            check(key(i), i * 7919, i & 3, i, T0 + i)
    else:
        add = plain.add
        for i in range(n):
            add(key(i))
    built = time.process_time() - started
    gc.collect()
    trim()  # count what the structure holds, not what the allocator kept
    grown = rss() - before
    out: dict[str, Any] = {
        "structure": kind,
        "keys": n,
        "rss_bytes_per_key": round(grown / n, 1),
        "insert_ns": round(1e9 * built / n),
    }
    if kind == "compact":
        out["nbytes_per_key"] = round(index.nbytes / n, 1)
    # cost of building the probe keys alone, to subtract
    started = time.process_time()
    for i in range(PROBES):
        key(i * 13 % n)
    base = time.process_time() - started
    if index is not None:
        check = index.check
        started = time.process_time()
        for i in range(PROBES):
            j = i * 13 % n
            check(key(j), j * 7919, (j & 3) ^ 1, j, T0 + j)
        out["dup_ns"] = round(1e9 * (time.process_time() - started - base) / PROBES)
        started = time.process_time()
        for i in range(PROBES):
            j = n + i
            check(key(j), j * 7919, j & 3, j, T0 + j)
        out["miss_ns"] = round(1e9 * (time.process_time() - started - base) / PROBES)
    else:
        started = time.process_time()
        for i in range(PROBES):
            _ = key(i * 13 % n) in plain
        out["dup_ns"] = round(1e9 * (time.process_time() - started - base) / PROBES)
    return out


def measure_many(n: int, batch: int) -> dict[str, Any]:
    """``check_many`` figures for an index holding ``n`` keys (see the docstring)."""
    import numpy as np

    from pipeline.metering.dedup import DedupIndex

    rng = np.random.default_rng(n ^ batch)

    def fingerprints(size: int) -> Any:
        return rng.integers(0, 1 << 63, size, dtype=np.int64).astype(np.uint64) << np.uint64(1)

    held = fingerprints(n)
    held_ph = rng.integers(-(1 << 63), (1 << 63) - 1, n, dtype=np.int64)
    offsets = np.arange(n, dtype=np.int64)
    index = DedupIndex()
    started = time.process_time()
    index.add_many_fp(held, held_ph, offsets & 3, offsets, np.full(n, T0, np.int64))
    out: dict[str, Any] = {
        "structure": "many",
        "keys": n,
        "batch": batch,
        "load_us": round(1e6 * (time.process_time() - started) / n, 3),
    }
    next_offset = n

    def run(make: Any, events: int) -> float:
        spent = 0.0
        for _ in range(max(1, events // batch)):
            cols = make()
            started = time.process_time()
            index.check_many(*cols)
            spent += time.process_time() - started
        return round(1e6 * spent / (max(1, events // batch) * batch), 3)

    def live() -> tuple[Any, ...]:
        nonlocal next_offset
        fps = fingerprints(batch)
        ph = rng.integers(-(1 << 62), 1 << 62, batch, dtype=np.int64)
        copies = rng.random(batch) < 0.01
        pick = rng.integers(0, n, int(copies.sum()))
        fps[copies], ph[copies] = held[pick], held_ph[pick]
        offs = np.arange(next_offset, next_offset + batch, dtype=np.int64)
        next_offset += batch
        return fps, ph, offs & 3, offs, np.full(batch, T0, np.int64)

    def held_rows(shift_position: bool, other_hash: bool) -> tuple[Any, ...]:
        pick = rng.integers(0, n, batch)
        offs = offsets[pick] + (1 << 40 if shift_position else 0)
        ph = held_ph[pick] ^ (1 if other_hash else 0)
        return held[pick], ph, offs & 3, offs, np.full(batch, T0, np.int64)

    out["dup_us"] = run(lambda: held_rows(True, False), 200_000)
    out["replay_us"] = run(lambda: held_rows(False, False), 200_000)
    out["conflict_us"] = run(lambda: held_rows(True, True), 200_000)
    merging = [0.0]
    merge = DedupIndex._merge

    def timed_merge(self: DedupIndex) -> None:
        started = time.process_time()
        merge(self)
        merging[0] += time.process_time() - started

    DedupIndex._merge = timed_merge  # type: ignore[method-assign]
    out["live_us"] = run(live, MANY_EVENTS)
    out["live_merge_us"] = round(1e6 * merging[0] / (MANY_EVENTS // batch * batch), 3)
    out["nbytes_per_key"] = round(index.nbytes / len(index), 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument(
        "--structures", nargs="+", default=["compact", "dict", "set"], help="or: many"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # structure keys batch
    args = parser.parse_args()
    if args.one:
        kind, n, batch = args.one[0], int(args.one[1]), int(args.one[2])
        print(json.dumps(measure_many(n, batch) if kind == "many" else measure(kind, n)))
        return 0
    results = []
    runs = [
        (kind, n, batch)
        for n in args.keys
        for kind in args.structures
        for batch in (args.batches if kind == "many" else [0])
    ]
    for kind, n, batch in runs:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", kind, str(n), str(batch)],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
