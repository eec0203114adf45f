"""pipeline.metering.dedup, the compact index: the same decisions as a plain dict keyed by
the full key, under random streams with replays, duplicates, conflicts, forgets, prunes,
merges and forced fingerprint collisions."""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable

import pytest

from pipeline.metering.dedup import Decision, DedupIndex

T = 1_795_852_800_000  # a whole second


class Reference:
    """The previous dict-based index: key -> (payload hash, partition, offset, ms)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[int, int, int, int]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def check(self, key: str, ph: int, partition: int, offset: int, ms: int) -> Decision:
        entry = self.entries.get(key)
        if entry is None:
            self.entries[key] = (ph, partition, offset, ms)
            return Decision.NEW
        if entry[1] == partition and entry[2] == offset:
            return Decision.NEW
        return Decision.DUPLICATE if entry[0] == ph else Decision.CONFLICT

    def add(self, key: str, ph: int, partition: int, offset: int, ms: int) -> None:
        self.entries.setdefault(key, (ph, partition, offset, ms))

    def forget(self, key: str) -> None:
        self.entries.pop(key, None)

    def prune(self, older_than_ms: int) -> int:
        stale = [k for k, v in self.entries.items() if v[3] < older_than_ms]
        for k in stale:
            del self.entries[k]
        return len(stale)


def tiny(buckets: int) -> Callable[[str], int]:
    """A fingerprint with only ``buckets`` values: almost every key collides."""
    return lambda key: zlib.crc32(key.encode()) % buckets


def payload_hash(key: str, version: int) -> int:
    """Content hash of (key, content version), like the real one covers the key."""
    return int.from_bytes(zlib.crc32(f"{key}|{version}".encode()).to_bytes(4) * 2, "big") - (
        1 << 63
    )


def run_stream(
    seed: int,
    steps: int,
    *,
    fingerprint: Callable[[str], int] | None = None,
    delta_min: int = 1 << 16,
    universe: int = 400,
    verify: bool = True,
) -> tuple[DedupIndex, Reference]:
    """Feed one random stream to both indexes and assert identical answers throughout."""
    rng = random.Random(seed)
    at: dict[tuple[int, int], str] = {}  # every position seen -> its key (the log)
    messages: list[tuple[str, int, int, int, int]] = []  # (key, ph, partition, offset, ms)
    next_offset = [0, 0, 0, 0]
    compact = DedupIndex(
        verify=(lambda key, pos: at.get(pos) == key) if verify else None,
        fingerprint=fingerprint,
        delta_min=delta_min,
    )
    ref = Reference()
    horizon = T

    def position() -> tuple[int, int]:
        part = rng.randrange(4)
        next_offset[part] += 1 + rng.randrange(3)
        return part, next_offset[part]

    for _ in range(steps):
        r = rng.random()
        if r < 0.5 or not messages:  # a fresh message, maybe a key seen before
            key = f"C{rng.randrange(3)}\x1fev-{rng.randrange(universe)}"
            ph = payload_hash(key, rng.randrange(3))
            part, off = position()
            msg = (key, ph, part, off, horizon + rng.randrange(-5000, 600_000))
        elif r < 0.65:  # an exact copy at a new position (producer retry)
            key, ph, _, _, ms = rng.choice(messages)
            part, off = position()
            msg = (key, ph, part, off, ms)
        elif r < 0.75:  # same key, other content
            key, _, _, _, ms = rng.choice(messages)
            part, off = position()
            msg = (key, payload_hash(key, 10 + rng.randrange(5)), part, off, ms)
        elif r < 0.9:  # a replay: the same message at its own position
            msg = rng.choice(messages)
        elif r < 0.95:
            key = rng.choice(messages)[0]
            ref.forget(key)
            compact.forget(key)
            assert len(compact) == len(ref)
            continue
        elif r < 0.97:
            horizon += 1000 * rng.randrange(1, 120)
            assert compact.prune(horizon) == ref.prune(horizon)
            assert len(compact) == len(ref)
            continue
        else:  # a stored event loaded from the warehouse
            msg = rng.choice(messages)
            ref.add(*msg)
            compact.add(*msg)
            assert len(compact) == len(ref)
            continue
        at[(msg[2], msg[3])] = msg[0]
        messages.append(msg)
        assert compact.check(*msg) is ref.check(*msg), msg
        assert len(compact) == len(ref)
    return compact, ref


@pytest.mark.parametrize("seed", range(6))
def test_random_streams_decide_like_a_dict(seed: int) -> None:
    run_stream(seed, 4000)


@pytest.mark.parametrize("seed", range(4))
def test_random_streams_with_many_merges(seed: int) -> None:
    run_stream(100 + seed, 4000, delta_min=16, universe=2000)


@pytest.mark.parametrize("seed", range(4))
def test_forced_collisions_are_resolved_exactly_by_verify(seed: int) -> None:
    # 7 fingerprint values for 1,200 keys: nearly every lookup is a collision
    run_stream(200 + seed, 3000, fingerprint=tiny(7), delta_min=32, universe=400)


def test_a_collision_without_verify_is_a_conflict_never_a_silent_drop() -> None:
    same = tiny(1)  # every key has one fingerprint
    index = DedupIndex(fingerprint=same)
    assert index.check("CMCC\x1fa", 1, 0, 1, T) is Decision.NEW
    # another key, other content: unverifiable, so it is treated as the same key
    assert index.check("CMCC\x1fb", 2, 0, 2, T) is Decision.CONFLICT
    verified = DedupIndex(fingerprint=same, verify=lambda key, pos: pos == (0, 1) and key == "a")
    assert verified.check("a", 1, 0, 1, T) is Decision.NEW
    assert verified.check("b", 2, 0, 2, T) is Decision.NEW  # verify says: another key
    assert verified.check("b", 2, 0, 3, T) is Decision.DUPLICATE
    assert verified.check("a", 9, 0, 4, T) is Decision.CONFLICT
    assert len(verified) == 2


def test_verify_is_only_asked_about_conflicts_and_collisions() -> None:
    asked: list[tuple[str, tuple[int, int]]] = []

    def verify(key: str, pos: tuple[int, int]) -> bool:
        asked.append((key, pos))
        return True

    index = DedupIndex(verify=verify)
    for i in range(1000):
        assert index.check(f"CMCC\x1fe{i}", i, 0, i, T) is Decision.NEW
    for i in range(1000):
        assert index.check(f"CMCC\x1fe{i}", i, 1, i, T) is Decision.DUPLICATE
        assert index.check(f"CMCC\x1fe{i}", i, 0, i, T) is Decision.NEW  # replay
    assert asked == []
    assert index.check("CMCC\x1fe7", 999_999, 2, 1, T) is Decision.CONFLICT
    assert asked == [("CMCC\x1fe7", (0, 7))]


def test_forget_with_a_position_drops_only_that_entry() -> None:
    index = DedupIndex(fingerprint=tiny(1), verify=lambda key, pos: pos[1] == int(key[-1]))
    index.check("k1", 1, 0, 1, T)
    index.check("k2", 2, 0, 2, T)
    assert len(index) == 2
    index.forget("k2", 0, 2)
    assert len(index) == 1
    assert index.check("k1", 1, 0, 9, T) is Decision.DUPLICATE
    assert index.check("k2", 5, 0, 2, T) is Decision.NEW
    index.forget("k1")  # verify picks k1's entry
    assert len(index) == 1
    assert index.check("k2", 5, 0, 8, T) is Decision.DUPLICATE


def test_growth_through_chunks_probe_tables_and_merges() -> None:
    index = DedupIndex(delta_min=50_000)
    n = 120_000  # several delta chunks, probe-table rebuilds, two merges
    for i in range(n):
        assert index.check(f"CTCC\x1fg{i}", i, i & 3, i, T + i) is Decision.NEW
    assert len(index) == n
    for i in range(0, n, 7):
        assert index.check(f"CTCC\x1fg{i}", i, i & 3, i + 1, T) is Decision.DUPLICATE
        assert index.check(f"CTCC\x1fg{i}", i, i & 3, i, T) is Decision.NEW
        assert index.check(f"CTCC\x1fg{i}", -i - 1, 9, i, T) is Decision.CONFLICT
    assert index.prune(T + 60_000) == 60_000
    assert len(index) == n - 60_000
    assert index.check("CTCC\x1fg10", 10, 2, 10, T) is Decision.NEW  # pruned: new again
    assert index.check("CTCC\x1fg70000", 70_000, 0, 1, T) is Decision.DUPLICATE


def test_about_thirty_bytes_a_key() -> None:
    index = DedupIndex()
    n = 300_000
    for i in range(n):
        index.check(f"CUCC\x1fcucc-3f9a1c20b7-{i}", i, i & 3, i, T)
    assert index.nbytes / n <= 32


def test_add_many_equals_add_row_by_row() -> None:
    rng = random.Random(5)
    rows = []
    for i in range(3000):
        key = f"CMCC\x1fe{rng.randrange(2000)}"
        rows.append((key, payload_hash(key, rng.randrange(2)), i & 3, i, T + i))
    for fingerprint in (None, tiny(50)):
        at = {(r[2], r[3]): r[0] for r in rows}

        def verify(key: str, pos: tuple[int, int], at: dict[tuple[int, int], str] = at) -> bool:
            return at.get(pos) == key

        one = DedupIndex(fingerprint=fingerprint, verify=verify, delta_min=64)
        bulk = DedupIndex(fingerprint=fingerprint, verify=verify, delta_min=64)
        for row in rows[:500]:
            one.add(*row)
            bulk.add(*row)
        for row in rows[500:]:
            one.add(*row)
        rest = rows[500:]
        bulk.add_many(*(list(col) for col in zip(*rest, strict=True)))
        assert len(one) == len(bulk)
        for key, ph, _, _, ms in rows:
            for probe in ((key, ph, 9, 1, ms), (key, ph + 1, 9, 2, ms)):
                assert one.check(*probe) is bulk.check(*probe)


def test_positions_out_of_range_are_refused() -> None:
    index = DedupIndex()
    with pytest.raises(ValueError, match="out of range"):
        index.check("CMCC\x1fx", 1, 65_535, 0, T)
    with pytest.raises(ValueError, match="out of range"):
        index.check("CMCC\x1fx", 1, 0, 1 << 48, T)
    assert len(index) == 0
