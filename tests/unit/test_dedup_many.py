"""pipeline.metering.dedup, ``check_many``: a batch decided at once gives exactly the
decisions of ``check`` called row by row, and leaves an index that answers every later
question the same way (random batches with in-batch repeats, replays at their own
positions, conflicting copies, forgotten keys, prunes, loads, merges and forced
fingerprint collisions)."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.metering.dedup import Decision, DedupIndex
from tests.unit.test_dedup_compact import Reference, payload_hash, tiny

T = 1_795_852_800_000
M64 = (1 << 64) - 1
Msg = tuple[str, int, int, int, int]  # key, payload hash, partition, offset, event ms


def spread(buckets: int) -> Callable[[str], int]:
    """``tiny(buckets)`` spread over the 64-bit range, as real fingerprints are (tiny
    values all share the probe table's first slot and the directory's first bucket)."""
    few = tiny(buckets)
    return lambda key: (few(key) * 0x9E37_79B9_7F4A_7C15) & M64


class Twins:
    """The same history fed to two indexes: ``seq`` by ``check``, ``bulk`` by
    ``check_many`` with the caller's fingerprints (and a plain dict as the exact
    reference when ``verify`` is on); every answer is compared."""

    def __init__(
        self,
        fingerprint: Callable[[str], int],
        *,
        verify: bool = True,
        delta_min: int = 64,
        reference: bool = True,
    ) -> None:
        self.fp = fingerprint
        self.at: dict[tuple[int, int], str] = {}  # the log: position -> key
        self.asked: list[int] = []  # rows whose key check_many asked for

        def check_log(key: str, pos: tuple[int, int]) -> bool:
            return self.at.get(pos) == key

        self.seq, self.bulk = (
            DedupIndex(
                verify=check_log if verify else None, fingerprint=fingerprint, delta_min=delta_min
            )
            for _ in range(2)
        )
        # the dict decides like the index only when verify resolves every collision and
        # a position always holds the same content (as in a Kafka log)
        self.ref = Reference() if verify and reference else None
        self.messages: list[Msg] = []

    def fps(self, keys: list[str]) -> np.ndarray:
        return np.array([self.fp(k) & M64 for k in keys], np.uint64)

    def batch(self, batch: list[Msg]) -> list[Decision]:
        for key, _, part, off, _ in batch:  # verify knows the batch in flight
            self.at[(part, off)] = key
        expected = [self.seq.check(*m) for m in batch]
        self.asked = []

        def key_of(row: int) -> str:
            self.asked.append(row)
            return batch[row][0]

        cols = list(zip(*batch, strict=True)) if batch else [[], [], [], [], []]
        got = self.bulk.check_many(
            self.fps(list(cols[0])),
            np.array(cols[1], np.int64),
            np.array(cols[2], np.int64),
            np.array(cols[3], np.int64),
            np.array(cols[4], np.int64),
            key_of,
        )
        assert got.dtype == np.uint8
        assert [Decision(d) for d in got.tolist()] == expected, batch
        if self.ref is not None:
            assert [self.ref.check(*m) for m in batch] == expected
        # keys are asked only for rows that needed verify, each at most once
        assert len(set(self.asked)) == len(self.asked)
        for row in self.asked:
            assert expected[row] is not Decision.DUPLICATE
        self.messages += batch
        self.same_size()
        return expected

    def forget(self, msg: Msg, with_position: bool) -> None:
        key, _, part, off, _ = msg
        if with_position:
            self.seq.forget(key, part, off)
            self.bulk.forget_fp(self.fp(key) & M64, part, off)
            if self.ref is not None and self.ref.entries.get(key, (0, -1, -1))[1:3] == (
                part,
                off,
            ):
                self.ref.forget(key)
        else:
            self.seq.forget(key)
            self.bulk.forget_fp(self.fp(key) & M64, key=key)
            if self.ref is not None:
                self.ref.forget(key)
        self.same_size()

    def prune(self, horizon: int) -> None:
        dropped = self.seq.prune(horizon)
        assert self.bulk.prune(horizon) == dropped
        if self.ref is not None:
            assert self.ref.prune(horizon) == dropped
        self.same_size()

    def load(self, rows: list[Msg]) -> None:
        """Stored events loaded from the warehouse: ``add`` vs ``add_many_fp``."""
        for m in rows:
            self.seq.add(*m)
            if self.ref is not None:
                self.ref.add(*m)
        cols = list(zip(*rows, strict=True))
        keys = list(cols[0])
        self.bulk.add_many_fp(self.fps(keys), *cols[1:], keys=keys.__getitem__)
        self.same_size()

    def same_size(self) -> None:
        assert len(self.bulk) == len(self.seq)
        if self.ref is not None:
            assert len(self.ref) == len(self.seq)

    def same_answers(self) -> None:
        """Every key seen, probed as an exact copy, a conflicting copy and a replay, one
        probe batch at a time (so the probes do not see each other)."""
        seen = {m[0]: m for m in self.messages}
        offset = 1 << 40  # probes at positions of their own
        for key, ph, _, _, ms in seen.values():
            offset += 2
            for probe in ((key, ph, 7, offset, ms), (key, ph ^ 1, 7, offset + 1, ms)):
                self.at[(probe[2], probe[3])] = key
                got = self.bulk.check_many(
                    self.fps([key]),
                    np.array([probe[1]]),
                    np.array([probe[2]]),
                    np.array([probe[3]]),
                    np.array([ms]),
                    lambda _row, key=key: key,
                )
                expected = self.seq.check(*probe)
                assert Decision(got[0]) is expected, probe
                if self.ref is not None:
                    assert self.ref.check(*probe) is expected
        self.same_size()


def random_history(
    seed: int,
    rows: int,
    *,
    fingerprint: Callable[[str], int] = hash,
    verify: bool = True,
    delta_min: int = 64,
    universe: int = 400,
    batch_max: int = 300,
) -> Twins:
    """A random log cut into random batches, with forgets, prunes and loads between."""
    rng = random.Random(seed)
    twins = Twins(fingerprint, verify=verify, delta_min=delta_min)
    next_offset = [0, 0, 0, 0]
    horizon = T
    done = 0
    while done < rows:
        batch: list[Msg] = []

        def earlier(batch: list[Msg] = batch) -> Msg:  # of an earlier batch or of this one
            i = rng.randrange(len(twins.messages) + len(batch))
            return twins.messages[i] if i < len(twins.messages) else batch[i - len(twins.messages)]

        for _ in range(rng.randrange(1, batch_max)):
            r = rng.random()
            part = rng.randrange(4)
            next_offset[part] += 1 + rng.randrange(3)
            off = next_offset[part]
            if r < 0.5 or not (
                twins.messages or batch
            ):  # a fresh message, maybe of a key seen before
                key = f"C{rng.randrange(3)}\x1fev-{rng.randrange(universe)}"
                ph = payload_hash(key, rng.randrange(3))
                batch.append((key, ph, part, off, horizon + rng.randrange(-5000, 600_000)))
            elif r < 0.65:  # an exact copy at a new position (a producer retry)
                key, ph, _, _, ms = earlier()
                batch.append((key, ph, part, off, ms))
            elif r < 0.78:  # same key, other content
                key, _, _, _, ms = earlier()
                batch.append((key, payload_hash(key, 10 + rng.randrange(5)), part, off, ms))
            else:  # a replay at its own position, from this batch or an earlier one
                batch.append(earlier())
        twins.batch(batch)
        done += len(batch)
        r = rng.random()
        if r < 0.3:
            for _ in range(rng.randrange(1, 20)):
                twins.forget(rng.choice(twins.messages), with_position=rng.random() < 0.5)
        elif r < 0.45:
            horizon += 1000 * rng.randrange(1, 120)
            twins.prune(horizon)
        elif r < 0.6:
            twins.load(rng.sample(twins.messages, min(len(twins.messages), 30)))
    return twins


@pytest.mark.parametrize("seed", range(3))
def test_random_batches_decide_like_check_row_by_row(seed: int) -> None:
    random_history(seed, 6000).same_answers()


@pytest.mark.parametrize("seed", range(3))
def test_forced_collisions_in_batches_are_resolved_like_check(seed: int) -> None:
    # 5 fingerprint values for ~1,200 keys: nearly every row meets another key
    random_history(10 + seed, 3000, fingerprint=tiny(5), delta_min=16).same_answers()


@pytest.mark.parametrize("seed", range(2))
def test_without_verify_a_collision_is_a_conflict_in_batches_too(seed: int) -> None:
    random_history(20 + seed, 3000, fingerprint=tiny(40), verify=False).same_answers()


def test_two_hundred_thousand_operations_with_merges_and_probe_growth() -> None:
    # 30,000 keys, batches up to 4,000 rows, delta merges every few batches
    twins = random_history(
        7, 200_000, universe=10_000, delta_min=2_000, batch_max=4_000, fingerprint=hash
    )
    assert len(twins.seq) > 10_000
    twins.same_answers()


def test_two_hundred_thousand_operations_under_collisions() -> None:
    twins = random_history(
        8, 200_000, universe=3_000, delta_min=500, batch_max=2_000, fingerprint=spread(1 << 12)
    )
    twins.same_answers()


ROW = st.tuples(st.integers(0, 12), st.integers(0, 2), st.integers(0, 9))
BATCHES = st.lists(
    st.tuples(st.lists(ROW, max_size=25), st.sampled_from(["", "forget", "prune", "load"])),
    max_size=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=BATCHES,
    buckets=st.sampled_from([1, 3, 1 << 62]),
    verify=st.booleans(),
    rewrite=st.booleans(),
)
def test_any_batches_decide_like_check(
    batches: list[tuple[list[tuple[int, int, int]], str]],
    buckets: int,
    verify: bool,
    rewrite: bool,
) -> None:
    """Rows: (key, content, what): what 0-5 a new position, 6-7 a replay of an earlier
    message at its own position, 8-9 a copy of the key with another content, at a new
    position or (``rewrite``: input no Kafka log can produce) at the earlier one's with
    some other message's payload hash."""
    twins = Twins(tiny(buckets), verify=verify, delta_min=4, reference=not rewrite)
    offset = 0
    horizon = T
    for rows, between in batches:
        batch: list[Msg] = []
        for k, content, what in rows:
            pool = twins.messages + batch
            offset += 1
            key = f"CMCC\x1fe{k}"
            if what >= 6 and pool:
                old = pool[(k * 7 + content) % len(pool)]
                if what <= 7:
                    batch.append(old)
                else:
                    if rewrite:  # its position, with the content of another message
                        ph = pool[(k * 3 + content) % len(pool)][1]
                        batch.append((old[0], ph, old[2], old[3], old[4]))
                    else:
                        batch.append((old[0], payload_hash(old[0], 9), 0, offset, old[4]))
            else:
                batch.append((key, payload_hash(key, content), k % 2, offset, T + 1000 * k))
        twins.batch(batch)
        if not twins.messages:
            continue
        if between == "forget":
            twins.forget(twins.messages[len(rows) % len(twins.messages)], bool(len(rows) % 2))
        elif between == "prune":
            horizon += 3000
            twins.prune(horizon)
        elif between == "load":
            twins.load(twins.messages[-3:])
    twins.same_answers()


def test_a_batch_with_repeats_replays_and_conflicts() -> None:
    index = DedupIndex()
    index.check("CMCC\x1fheld", 50, 1, 1, T)
    keys = ["CMCC\x1fa", "CMCC\x1fa", "CMCC\x1fa", "CMCC\x1fheld", "CMCC\x1fheld", "CMCC\x1fa"]
    fps = np.array([hash(k) & M64 for k in keys], np.uint64)
    got = index.check_many(
        fps,
        np.array([10, 10, 11, 50, 51, 10]),
        np.array([0, 0, 0, 1, 0, 0]),
        np.array([5, 6, 7, 1, 8, 5]),
        np.full(6, T),
    )
    assert got.tolist() == [
        Decision.NEW,  # first copy of a
        Decision.DUPLICATE,  # exact copy at another position
        Decision.CONFLICT,  # same key, other content: the first stands
        Decision.NEW,  # the held event replayed at its own position
        Decision.CONFLICT,
        Decision.NEW,  # a's first copy replayed at its own position
    ]
    assert len(index) == 2


def test_keys_are_asked_only_for_verify_and_needed_then() -> None:
    same = tiny(1)  # one fingerprint for every key
    index = DedupIndex(fingerprint=same, verify=lambda key, pos: pos == (0, 1) and key == "a")
    fps = np.zeros(3, np.uint64)
    cols = (np.array([1, 1, 2]), np.zeros(3, np.int64), np.array([1, 2, 3]), np.full(3, T))
    with pytest.raises(ValueError, match="keys"):
        index.check_many(fps, *cols)
    assert len(index) == 0  # refused whole
    asked: list[int] = []

    def keys(row: int) -> str:
        asked.append(row)
        return ["a", "a", "b"][row]

    got = index.check_many(fps, *cols, keys=keys)
    # row 1 is an exact copy (no question); row 2 has another hash: verify says "b" is
    # another key than the entry at (0, 1), so it is a second key with that fingerprint
    assert got.tolist() == [Decision.NEW, Decision.DUPLICATE, Decision.NEW]
    assert asked == [2]
    assert len(index) == 2


def test_a_position_out_of_range_refuses_the_whole_batch() -> None:
    index = DedupIndex()
    with pytest.raises(ValueError, match="out of range"):
        index.check_many(
            np.array([1, 2], np.uint64),
            np.array([1, 2]),
            np.array([0, 65_535]),
            np.array([0, 0]),
            np.full(2, T),
        )
    with pytest.raises(ValueError, match="offsets: 1 values for 2 keys"):
        index.check_many(
            np.array([1, 2], np.uint64),
            np.array([1, 2]),
            np.array([0, 0]),
            np.array([0]),
            np.full(2, T),
        )
    assert len(index) == 0


def test_add_many_fp_equals_add_many() -> None:
    rng = random.Random(3)
    rows = []
    for i in range(5000):
        key = f"CMCC\x1fe{rng.randrange(3000)}"
        rows.append((key, payload_hash(key, rng.randrange(2)), i & 3, i, T + i))
    at = {(r[2], r[3]): r[0] for r in rows}
    fp = tiny(900)
    by_key = DedupIndex(fingerprint=fp, verify=lambda k, p: at.get(p) == k, delta_min=64)
    by_fp = DedupIndex(fingerprint=fp, verify=lambda k, p: at.get(p) == k, delta_min=64)
    keys = [r[0] for r in rows]
    by_key.add_many(keys, *(list(c) for c in list(zip(*rows, strict=True))[1:]))
    by_fp.add_many_fp(
        np.array([fp(k) for k in keys], np.uint64),
        *(np.array(c) for c in list(zip(*rows, strict=True))[1:]),
        keys=keys.__getitem__,
    )
    assert len(by_key) == len(by_fp)
    for key, ph, _, _, ms in rows[::5]:
        for probe in ((key, ph, 9, 1, ms), (key, ph + 1, 9, 2, ms)):
            assert by_key.check(*probe) is by_fp.check(*probe)


def test_memory_stays_about_thirty_bytes_a_key_when_filled_by_batches() -> None:
    index = DedupIndex()
    rng = np.random.default_rng(1)
    n, size = 300_000, 10_000
    for start in range(0, n, size):
        fps = rng.integers(0, 1 << 63, size, dtype=np.int64).astype(np.uint64) * np.uint64(2)
        offs = np.arange(start, start + size)
        got = index.check_many(fps, offs, np.zeros(size, np.int64), offs, np.full(size, T))
        assert not got.any()  # all new
    assert len(index) == n
    assert index.nbytes / n <= 32


def test_forget_fp_drops_the_entry_at_its_position_or_the_verified_key() -> None:
    log = {(0, 1): "a", (0, 2): "b"}
    index = DedupIndex(fingerprint=tiny(1), verify=lambda key, pos: log.get(pos) == key)
    fps = np.zeros(2, np.uint64)  # one fingerprint for both keys
    cols = (np.array([1, 2]), np.zeros(2, np.int64), np.array([1, 2]), np.full(2, T))
    got = index.check_many(fps, *cols, keys=["a", "b"].__getitem__)
    assert got.tolist() == [Decision.NEW, Decision.NEW]  # verify: two keys
    with pytest.raises(ValueError, match="key"):
        index.forget_fp(0)  # which of the two? verify needs the key
    index.forget_fp(0, 0, 2)
    assert len(index) == 1
    index.forget_fp(0, key="a")
    assert len(index) == 0
    again = index.check_many(fps, *cols, keys=["a", "b"].__getitem__)
    assert again.tolist() == [Decision.NEW, Decision.NEW]
    assert len(index) == 2
