"""The deduplication index: exact, keyed on (reporting_carrier, event_id), ~30 bytes a key.

Pure logic, no I/O. The worker fills it from ``usage_events`` when it takes a
partition (so the warehouse is its durable copy, and the index never disagrees with
what was stored), then consults it for every accepted-so-far event.

What is stored per key (28 bytes, in numpy arrays, no Python object per key):

- a 64-bit keyed fingerprint of the key (default: Python's ``hash`` of the string,
  SipHash-1-3 under the interpreter's random per-process secret; the index is rebuilt
  from the warehouse in every process, so the fingerprint never has to be stable);
- the event's 64-bit payload hash (``pipeline.events.payload_hash``);
- its position: partition (16 bits) and offset (48 bits) in one 64-bit word;
- its event time in whole seconds (32 bits; only ``prune`` reads it).

Layout. Most keys live in a *main* store: four arrays sorted by fingerprint plus a
directory of bucket starts over the fingerprint's top bits (8 to 16 keys a bucket, under
a byte a key), so a lookup is two directory reads and a short binary search. New keys go
to a *delta*: append-only chunks of the same four columns plus a small linear-probing
table of uint32 indices into them. When the delta holds a sixth of the main store's
size it is merged into the main store (vectorised: one sort of the delta, one pass over
the main arrays), so a key is moved about seven times in its life and the memory above
28 bytes a key stays under ~3 bytes. Forgotten keys are marked dead and dropped at the
next merge or prune.

Exactness. Fingerprints can collide: two different keys may share one (for 64-bit keyed
fingerprints, about n / 2**64 per event, n = keys held). A match is therefore resolved
like this, for an event with payload hash ``h`` at position ``p``:

1. an entry at position ``p`` is this very event (a replay): ``NEW`` again;
2. an entry with payload hash ``h`` is the same key with the same content: ``DUPLICATE``
   (the payload hash covers ``event_id`` and ``reporting_carrier``, so a different key
   would need a second, independent 64-bit collision at once: ~n / 2**128);
3. otherwise it is either the same key with other content (``CONFLICT``) or a collision
   with another key. ``verify(key, (partition, offset))`` decides: it must return True
   when the event stored at that position has this key. If no entry verifies, the event
   is a new key (``NEW``, stored beside the other). Without a ``verify`` callback such a
   match counts as the same key: ``CONFLICT``, i.e. the event is dead-lettered as
   ``conflicting_duplicate`` (visible, replayable), never dropped silently and never
   counted twice. ``add`` resolves the same way (unverifiable: keep the first).

``verify`` is called only in case 3, i.e. for true conflicting duplicates and for real
collisions, so a warehouse lookup behind it costs nothing on the normal path. It must
also know the events of the batch being processed (they are not stored yet).

A decision depends only on the live entries with the event's fingerprint, never on where
they sit (delta or main store) or in which order: the fast paths answer from the first
entry found only while a fingerprint has at most one live entry, and the fingerprints
that hold several (verified collisions) are kept in a small set and always go through
the full resolution above. (With a real log, where a position always holds the same
content, the first entry could not mislead anyway; the set makes it hold for any input.)
So merges never change an answer, and a batch may be decided in any order that keeps
the order of the events of one fingerprint.

Batches. ``check_many`` decides a whole batch with a few numpy passes (one sort of the
batch's fingerprints, one ``searchsorted`` in the main store, a vectorised walk of the
delta's probe table, one bulk append of the new keys), with exactly the decisions and the
resulting state of ``check`` called row by row. Rows that need ``verify`` (a fingerprint
match with another payload hash), and the later rows with the same fingerprint, go
through the scalar resolution; ``keys(row)`` supplies their key only then.

Two ways to key an index, never mixed. Either string keys (``check``, ``add``,
``add_many``, ``forget``; the fingerprint is ``fingerprint(key)``, by default Python's
``hash``), or fingerprints computed by the caller (``check_many``, ``add_many_fp``,
``forget_fp``; e.g. by the compiled decoder, from the same bytes). The string methods
fingerprint with ``fingerprint``, so on an index fed external fingerprints they would
look up other numbers and miss every key, unless ``fingerprint`` is given and computes
exactly the caller's fingerprint (as the tests do).
"""

from __future__ import annotations

import functools
from bisect import bisect_left
from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Literal

import numpy as np

Position = tuple[int, int]  # (partition, offset)
Verify = Callable[[str, Position], bool]

_M64 = (1 << 64) - 1
_DEAD = _M64  # position word of a forgotten entry
_OFFSET_BITS = 48
_OFFSET_MAX = (1 << _OFFSET_BITS) - 1
_PARTITION_MAX = (1 << 16) - 2  # 0xFFFF would make the DEAD word
_TS_MAX = (1 << 32) - 1
_EMPTY = 0xFFFF_FFFF  # empty slot of the delta's probe table
_CHUNK_BITS = 13
_CHUNK = 1 << _CHUNK_BITS  # delta entries per chunk
_CHUNK_MASK = _CHUNK - 1
_TAIL = 1024  # probe-table slots past the end (no wrap-around; the last stays empty)
_MIN_PROBE_BITS = 12
_MIN_DIR_BITS = 8
_BUCKET = 16  # the directory keeps main-store buckets at 8 to 16 keys
_DELTA_SHARE = 6  # merge when the delta holds a sixth of the main store
_FEW_WALKS = 32  # probe-table walks left to finish one by one in Python


class Decision(IntEnum):
    """What to do with an event."""

    NEW = 0  # first time seen (or a replay of that first occurrence): count it
    DUPLICATE = 1  # same key, same content, seen before: drop quietly
    CONFLICT = 2  # same key, different content: dead-letter as conflicting_duplicate


def _pack(partition: int, offset: int) -> int:
    if not (0 <= partition <= _PARTITION_MAX and 0 <= offset <= _OFFSET_MAX):
        raise ValueError(
            f"position ({partition}, {offset}) out of range: partition 0..{_PARTITION_MAX}, "
            f"offset 0..2**48-1"
        )
    return (partition << _OFFSET_BITS) | offset


def _unpack(pos: int) -> Position:
    return pos >> _OFFSET_BITS, pos & _OFFSET_MAX


def _seconds(event_ms: int) -> int:
    s = event_ms // 1000
    return 0 if s < 0 else (_TS_MAX if s > _TS_MAX else s)


@functools.cache
def _malloc_trim() -> Callable[[], object]:
    try:
        import ctypes

        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return lambda: None
    return lambda: trim(0)


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS after a merge (glibc's ``malloc_trim``).

    A merge frees tens of MB of temporaries; glibc keeps such blocks in the heap once
    its dynamic mmap threshold has grown, which left the process ~20 bytes a key above
    the index's own size. Elsewhere this is a no-op."""
    _malloc_trim()()


def _view(arr: np.ndarray, fmt: Literal["Q", "q", "I"]) -> memoryview:
    """A flat memoryview with a native one-letter format (fast item access)."""
    return arr.data.cast("B").cast(fmt)


_FP, _PH, _POS, _TS = np.uint64, np.int64, np.uint64, np.uint32


def _group(fp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows grouped by fingerprint: (order, fingerprints in that order, first of its
    group), each group's rows in their original order. Like a stable argsort, but the
    quick one plus a fix-up of the (few) repeated fingerprints, several times faster."""
    order = np.argsort(fp)
    sfp = fp[order]
    lead = np.empty(len(fp), bool)
    lead[:1] = True
    np.not_equal(sfp[1:], sfp[:-1], out=lead[1:])
    repeated = ~lead
    repeated[:-1] |= ~lead[1:]  # the first row of a group of several, too
    rows = np.flatnonzero(repeated)
    if len(rows):
        order[rows] = order[rows][np.lexsort((order[rows], sfp[rows]))]
    return order, sfp, lead


def _gather(chunks: list[np.ndarray], idx: np.ndarray) -> np.ndarray:
    """``column[idx]`` for a delta column held as chunks, without joining the chunks
    when only a few of them are read."""
    if len(chunks) == 1:
        return chunks[0][idx]
    if len(idx) * 4 > len(chunks) * _CHUNK:  # dense: one join is cheaper
        return np.concatenate(chunks)[idx]
    which = idx >> _CHUNK_BITS
    out = np.empty(len(idx), chunks[0].dtype)
    for c in np.unique(which).tolist():
        sel = which == c
        out[sel] = chunks[c][idx[sel] & _CHUNK_MASK]
    return out


class DedupIndex:
    """key -> (payload hash, partition, offset, event time) of the first occurrence.

    ``verify(key, (partition, offset)) -> bool`` resolves fingerprint matches that the
    payload hash cannot (see the module docstring); ``fingerprint(key) -> int`` replaces
    the default keyed 64-bit hash (tests inject tiny ones to force collisions);
    ``delta_min`` is the delta's size before its first merge (tuning and tests).
    """

    __slots__ = (
        "_cfp",
        "_cph",
        "_cpos",
        "_cts",
        "_d_len",
        "_d_limit",
        "_dfp",
        "_dfpv",
        "_dir",
        "_dirv",
        "_dph",
        "_dphv",
        "_dpos",
        "_dposv",
        "_dshift",
        "_dts",
        "_fingerprint",
        "_live",
        "_m_dead",
        "_multi",
        "_mfp",
        "_mph",
        "_mphv",
        "_mpos",
        "_mposv",
        "_mts",
        "_mfpv",
        "_delta_min",
        "_scap",
        "_slot_limit",
        "_grow_at",
        "_sp",
        "_spv",
        "_sshift",
        "verify",
    )
    _d_len: int
    _slot_limit: int
    _grow_at: int
    _d_limit: int
    _m_dead: int
    _live: int

    def __init__(
        self,
        *,
        verify: Verify | None = None,
        fingerprint: Callable[[str], int] | None = None,
        delta_min: int = 1 << 14,
    ) -> None:
        self.verify = verify
        self._fingerprint: Callable[[str], int] = fingerprint if fingerprint is not None else hash
        self._delta_min = max(1, delta_min)
        self._live = 0
        # fingerprints with several live entries (verified collisions; see the module
        # docstring): their lookups always take the full resolution in _decide
        self._multi: set[int] = set()
        self._set_main(
            np.empty(0, _FP), np.empty(0, _PH), np.empty(0, _POS), np.empty(0, _TS), rebuild=True
        )
        self._reset_delta()

    # ---- sizes -------------------------------------------------------------------
    def __len__(self) -> int:
        return self._live

    @property
    def nbytes(self) -> int:
        """Bytes held in the index's arrays (capacity, not just the used part)."""
        arrays = [self._mfp, self._mph, self._mpos, self._mts, self._dir, self._sp]
        arrays += self._dfp + self._dph + self._dpos + self._dts
        return sum(a.nbytes for a in arrays)

    # ---- the hot path ------------------------------------------------------------
    def check(
        self, key: str, payload_hash: int, partition: int, offset: int, event_ms: int
    ) -> Decision:
        """Decide about one event and remember it if it is new.

        The decision depends only on what came first, so a replay of the same log gives
        the same answers: the first occurrence, seen again at its own position, is
        ``NEW`` again (and the sink's offset filter keeps it from being stored twice).
        Raises ``ValueError`` for a position outside partition 0..65534, offset 0..2**48-1.
        """
        fp = self._fingerprint(key) & _M64
        spv = self._spv
        i = fp >> self._sshift
        slot = spv[i]
        if slot != _EMPTY:
            dfpv = self._dfpv
            while slot != _EMPTY:
                c = slot >> _CHUNK_BITS
                o = slot & _CHUNK_MASK
                if dfpv[c][o] == fp:
                    # the common cases inline; collisions and conflicts in _decide
                    pos = self._dposv[c][o]
                    if pos == (partition << _OFFSET_BITS) | offset:
                        return Decision.NEW
                    if pos != _DEAD and self._dphv[c][o] == payload_hash and fp not in self._multi:
                        return Decision.DUPLICATE
                    return self._decide(key, fp, payload_hash, partition, offset, event_ms, False)
                i += 1
                slot = spv[i]
        dirv = self._dirv
        j = fp >> self._dshift
        hi = dirv[j + 1]
        lo = dirv[j]
        if lo != hi:
            mfpv = self._mfpv
            k = bisect_left(mfpv, fp, lo, hi)
            if k != hi and mfpv[k] == fp:
                pos = self._mposv[k]
                if pos == (partition << _OFFSET_BITS) | offset:
                    return Decision.NEW
                if pos != _DEAD and self._mphv[k] == payload_hash and fp not in self._multi:
                    return Decision.DUPLICATE
                return self._decide(key, fp, payload_hash, partition, offset, event_ms, False)
        # new: append to the delta (inlined _append: this is most events' path)
        if partition < 0 or partition > _PARTITION_MAX or offset < 0 or offset > _OFFSET_MAX:
            _pack(partition, offset)  # raises
        n = self._d_len
        o = n & _CHUNK_MASK
        if not o:
            self._new_chunk()
        self._cfp[o] = fp
        self._cph[o] = payload_hash
        self._cpos[o] = (partition << _OFFSET_BITS) | offset
        s = event_ms // 1000
        self._cts[o] = s if 0 <= s <= _TS_MAX else (0 if s < 0 else _TS_MAX)
        self._d_len = n + 1
        self._live += 1
        if i < self._slot_limit and n < self._grow_at:
            spv[i] = n
        else:
            self._build_probe_table()
        if n + 1 >= self._d_limit:
            self._merge()
        return Decision.NEW

    def check_many(
        self,
        fps: np.ndarray,
        payload_hashes: np.ndarray,
        partitions: np.ndarray,
        offsets: np.ndarray,
        event_ms: np.ndarray,
        keys: Callable[[int], str] | None = None,
    ) -> np.ndarray:
        """``check`` for a whole batch, vectorised: returns a uint8 array of ``Decision``
        values, one a row, and leaves the index as ``check`` called row by row in order
        would (the first copy of a key within the batch decides its later copies).

        ``fps`` are the caller's 64-bit fingerprints of the keys (uint64; int64 is read
        as the same bits); the other columns are as ``check``'s arguments. ``keys(row)``
        returns row ``row``'s key string; it is called only for the rare rows whose
        fingerprint matches an entry with another payload hash while ``verify`` is set,
        and is required then. Raises ``ValueError`` before changing anything for columns
        of different lengths, a position out of range (anywhere in the batch: the batch
        is refused whole), or a ``verify`` case without ``keys``.
        """
        fp = np.asarray(fps).astype(_FP, copy=False)
        ph, pos, ms, ts = self._columns(len(fp), payload_hashes, partitions, offsets, event_ms)
        n = len(fp)
        out = np.zeros(n, np.uint8)
        if not n:
            return out
        # group the rows by fingerprint, each group in batch order
        order, sfp, lead = _group(fp)
        group = np.cumsum(lead) - 1
        lead_rows = order[lead]
        held, ref_ph, ref_pos, scalar = self._lookup_many(sfp[lead])
        # a group without a live entry: its first row is new and decides the later ones
        fresh = ~held & ~scalar
        ref_ph[fresh] = ph[lead_rows[fresh]]
        ref_pos[fresh] = pos[lead_rows[fresh]]
        spos, sph = pos[order], ph[order]
        again = spos == ref_pos[group]  # the reference event itself: NEW, nothing stored
        same = ~again & (sph == ref_ph[group])
        other = ~again & ~same  # another payload hash: conflict, or a collision
        decided = np.where(same, np.uint8(Decision.DUPLICATE), np.uint8(Decision.NEW))
        decided[other] = Decision.CONFLICT  # without verify, final (see _decide)
        slow = scalar[group]
        if self.verify is not None and other.any():
            # verify may add an entry for the fingerprint: that row and the group's
            # later rows are decided one by one, in order, after the bulk append
            seen = np.cumsum(other & ~slow)
            before = (seen - (other & ~slow))[lead]
            slow |= seen > before[group]
        out[order] = decided
        slow_rows = np.sort(order[slow])
        if len(slow_rows) and self.verify is not None and keys is None:
            raise ValueError(
                "check_many: a fingerprint match with another payload hash needs verify, "
                "so keys (row -> key string) must be given"
            )
        new_rows = np.sort(lead_rows[fresh])
        self._append_many(fp[new_rows], ph[new_rows], pos[new_rows], ts[new_rows])
        for row in slow_rows.tolist():
            key: str | Callable[[], str] = "" if keys is None else functools.partial(keys, row)
            partition, offset = _unpack(int(pos[row]))
            out[row] = self._decide(
                key, int(fp[row]), int(ph[row]), partition, offset, int(ms[row]), False
            )
        return out

    def add(self, key: str, payload_hash: int, partition: int, offset: int, event_ms: int) -> None:
        """Record a stored event (used when loading from the warehouse); the first entry
        of a key stays."""
        self._add_fp(key, self._fingerprint(key) & _M64, payload_hash, partition, offset, event_ms)

    def add_many(
        self,
        keys: Sequence[str],
        payload_hashes: Sequence[int],
        partitions: Sequence[int],
        offsets: Sequence[int],
        event_ms: Sequence[int],
    ) -> None:
        """``add`` for many stored events at once (a partition's keys from the
        warehouse), vectorised: the same result as calling ``add`` row by row."""
        fpfn = self._fingerprint
        fps = np.fromiter((fpfn(k) & _M64 for k in keys), _FP, count=len(keys))
        self.add_many_fp(fps, payload_hashes, partitions, offsets, event_ms, keys.__getitem__)

    def add_many_fp(
        self,
        fps: np.ndarray,
        payload_hashes: np.ndarray | Sequence[int],
        partitions: np.ndarray | Sequence[int],
        offsets: np.ndarray | Sequence[int],
        event_ms: np.ndarray | Sequence[int],
        keys: Callable[[int], str] | None = None,
    ) -> None:
        """``add_many`` with the caller's fingerprints (see ``check_many``): the same
        result as ``add`` row by row. ``keys(row)`` is asked only for a row whose
        fingerprint is already held with another payload hash while ``verify`` is set
        (a ``ValueError`` if it is missing then, before anything is added)."""
        fp = np.asarray(fps).astype(_FP, copy=False)
        ph, pos, ms, ts = self._columns(len(fp), payload_hashes, partitions, offsets, event_ms)
        n = len(fp)
        if not n:
            return
        self._merge()  # everything in the main store: one place to look for clashes
        # rows whose fingerprint is already held, or occurs twice here, go through _add_fp
        held = np.zeros(n, bool)
        if len(self._mfp):
            where = np.minimum(np.searchsorted(self._mfp, fp), len(self._mfp) - 1)
            held = self._mfp[where] == fp
        _uniq, inverse, counts = np.unique(fp, return_inverse=True, return_counts=True)
        suspect = held | (counts[inverse] > 1)
        if keys is None and self.verify is not None and suspect.any():
            raise ValueError(
                "add_many_fp: a fingerprint already held needs verify, so keys "
                "(row -> key string) must be given"
            )
        clean = ~suspect
        self._merge_arrays(fp[clean], ph[clean], pos[clean], ts[clean])
        self._live += int(clean.sum())
        self._d_limit = max(self._delta_min, len(self._mfp) // _DELTA_SHARE)
        for row in np.flatnonzero(suspect).tolist():
            key: str | Callable[[], str] = "" if keys is None else functools.partial(keys, row)
            partition, offset = _unpack(int(pos[row]))
            self._add_fp(key, int(fp[row]), int(ph[row]), partition, offset, int(ms[row]))

    def forget(self, key: str, partition: int | None = None, offset: int | None = None) -> None:
        """Drop a key (used when a batch that added it is abandoned).

        With its position the right entry is dropped even under a fingerprint
        collision; without, ``verify`` picks the entries that are this key (all entries
        with its fingerprint when there is no ``verify``)."""
        self.forget_fp(self._fingerprint(key) & _M64, partition, offset, key)

    def forget_fp(
        self, fp: int, partition: int | None = None, offset: int | None = None, key: str = ""
    ) -> None:
        """``forget`` by the caller's fingerprint (see ``check_many``). Without a position
        and with ``verify`` set, ``key`` must be the key string (``verify`` is asked)."""
        found = self._candidates(int(fp) & _M64)
        if not found:
            return
        if partition is not None and offset is not None:
            pos = _pack(partition, offset)
            found = [c for c in found if c[2] == pos]
        elif self.verify is not None:
            if not key:
                raise ValueError("forget_fp without a position needs key for verify")
            verify = self.verify
            found = [c for c in found if verify(key, _unpack(c[2]))]
        for in_delta, idx, _pos, _ph in found:
            if in_delta:
                self._dposv[idx >> _CHUNK_BITS][idx & _CHUNK_MASK] = _DEAD
            else:
                self._mposv[idx] = _DEAD
                self._m_dead += 1
            self._live -= 1

    def prune(self, older_than_ms: int) -> int:
        """Forget events older than the lateness limit: any copy of them arriving now is
        rejected as too_late before dedup. Returns how many were dropped.

        Event times are kept in whole seconds, so an event is dropped when its whole
        second lies before ``older_than_ms``; one within that second stays until the
        next prune (keeping a key longer is always safe)."""
        self._merge()
        cut = older_than_ms // 1000
        if cut <= 0 or not len(self._mfp):
            return 0
        alive = self._mpos != np.uint64(_DEAD)
        old = self._mts < cut if cut <= _TS_MAX else np.ones(len(self._mts), bool)
        dropped = int(np.count_nonzero(old & alive))
        keep = alive & ~old
        if dropped or self._m_dead:
            self._set_main(
                self._mfp[keep], self._mph[keep], self._mpos[keep], self._mts[keep], rebuild=True
            )
            self._m_dead = 0
            self._live -= dropped
            # all live entries are in the main store now: the fingerprints still held twice
            twice = self._mfp[1:][self._mfp[1:] == self._mfp[:-1]]
            self._multi = set(np.unique(twice).tolist())
        return dropped

    # ---- lookups ---------------------------------------------------------------------
    def _seek(self, fp: int) -> int:
        """The probe-table slot where ``fp`` would go, or -1 if an entry has ``fp``."""
        spv = self._spv
        i = fp >> self._sshift
        slot = spv[i]
        while slot != _EMPTY:
            if self._dfpv[slot >> _CHUNK_BITS][slot & _CHUNK_MASK] == fp:
                return -1
            i += 1
            slot = spv[i]
        j = fp >> self._dshift
        lo, hi = self._dirv[j], self._dirv[j + 1]
        if lo != hi:
            k = bisect_left(self._mfpv, fp, lo, hi)
            if k != hi and self._mfpv[k] == fp:
                return -1
        return i

    def holds(self, fp: int, payload_hash: int) -> bool:
        """Is there a live entry with this fingerprint and payload hash? (For a payload
        hash of another definition than the batch's: see ``Pipeline.prepare_usage``.)"""
        return any(ph == payload_hash for _, _, _, ph in self._candidates(int(fp) & _M64))

    def _candidates(self, fp: int) -> list[tuple[bool, int, int, int]]:
        """Every live entry with fingerprint ``fp``: (in delta, index, position, hash)."""
        out: list[tuple[bool, int, int, int]] = []
        spv = self._spv
        i = fp >> self._sshift
        slot = spv[i]
        while slot != _EMPTY:
            c, o = slot >> _CHUNK_BITS, slot & _CHUNK_MASK
            if self._dfpv[c][o] == fp:
                pos = self._dposv[c][o]
                if pos != _DEAD:
                    out.append((True, slot, pos, self._dphv[c][o]))
            i += 1
            slot = spv[i]
        j = fp >> self._dshift
        lo, hi = self._dirv[j], self._dirv[j + 1]
        mfpv = self._mfpv
        k = bisect_left(mfpv, fp, lo, hi)
        while k < hi and mfpv[k] == fp:
            pos = self._mposv[k]
            if pos != _DEAD:
                out.append((False, k, pos, self._mphv[k]))
            k += 1
        return out

    def _lookup_many(
        self, fps: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For distinct fingerprints: (held by a live entry, its payload hash, its
        position, must be resolved row by row). The last is set for the fingerprints that
        may hold several live entries (``_multi``, or several in the main store)."""
        k = len(fps)
        live = np.zeros(k, np.int64)
        ref_ph, ref_pos = np.zeros(k, _PH), np.zeros(k, _POS)
        scalar = np.zeros(k, bool)
        nm = len(self._mfp)
        if nm:
            lo = self._lower_bound(fps)
            at = np.minimum(lo, nm - 1)
            hit = self._mfp[at] == fps
            scalar |= hit & (self._mfp[np.minimum(lo + 1, nm - 1)] == fps) & (lo + 1 < nm)
            rows = np.flatnonzero(hit)
            pos = self._mpos[at[rows]]
            rows = rows[pos != np.uint64(_DEAD)]
            live[rows] += 1
            ref_ph[rows] = self._mph[at[rows]]
            ref_pos[rows] = self._mpos[at[rows]]
        if self._d_len:
            rows, slots = self._probe_many(fps)
            pos = _gather(self._dpos, slots)
            alive = pos != np.uint64(_DEAD)
            rows, slots = rows[alive], slots[alive]
            np.add.at(live, rows, 1)
            ref_ph[rows] = _gather(self._dph, slots)
            ref_pos[rows] = pos[alive]
        scalar |= live > 1
        if self._multi:
            scalar |= np.isin(fps, np.fromiter(self._multi, _FP, len(self._multi)))
        return live > 0, ref_ph, ref_pos, scalar

    def _lower_bound(self, fps: np.ndarray) -> np.ndarray:
        """``np.searchsorted(main fingerprints, fps)``, via the directory: each key starts
        where its bucket's range puts it (fingerprints are uniform) and walks the few
        steps to its place, so it touches about one cache line instead of ~20."""
        j = (fps >> np.uint64(self._dshift)).astype(np.intp)
        lo = self._dir[j].astype(np.intp)
        hi = self._dir[j + 1].astype(np.intp)
        if not len(fps) or int((hi - lo).max()) > 8 * _BUCKET:  # skewed (tests' tiny ones)
            return np.searchsorted(self._mfp, fps)
        mfp = self._mfp
        frac = (fps & np.uint64((1 << self._dshift) - 1)).astype(np.float64)
        k = lo + (frac * (1.0 / (1 << self._dshift)) * (hi - lo)).astype(np.intp)
        act = np.flatnonzero(k > lo)
        while len(act):  # left while the one before is not smaller
            act = act[mfp[k[act] - 1] >= fps[act]]
            k[act] -= 1
            act = act[k[act] > lo[act]]
        act = np.flatnonzero(k < hi)
        while len(act):  # right while this one is smaller
            act = act[mfp[k[act]] < fps[act]]
            k[act] += 1
            act = act[k[act] < hi[act]]
        return k

    def _probe_many(self, fps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every delta entry with one of ``fps``: (index into ``fps``, delta index), found
        by walking the probe table for all of them at once."""
        dfp = self._dfp[0] if len(self._dfp) == 1 else np.concatenate(self._dfp)
        sp = self._sp
        todo = np.arange(len(fps))
        at = (fps >> np.uint64(self._sshift)).astype(np.intp)
        found_rows, found_slots = [np.empty(0, np.intp)], [np.empty(0, np.uint32)]
        while len(todo) > _FEW_WALKS:
            slot = sp[at]
            busy = slot != _EMPTY
            todo, at, slot = todo[busy], at[busy], slot[busy]
            match = dfp[slot] == fps[todo]
            if match.any():
                found_rows.append(todo[match])
                found_slots.append(slot[match])
            at += 1
        # the few longest walks one by one: cheaper than a dozen more rounds of numpy calls
        spv, dfpv = self._spv, self._dfpv
        rows, slots = [], []
        for row, home in zip(todo.tolist(), at.tolist(), strict=True):
            f = int(fps[row])
            i = home
            slot = spv[i]
            while slot != _EMPTY:
                if dfpv[slot >> _CHUNK_BITS][slot & _CHUNK_MASK] == f:
                    rows.append(row)
                    slots.append(slot)
                i += 1
                slot = spv[i]
        found_rows.append(np.array(rows, np.intp))
        found_slots.append(np.array(slots, np.uint32))
        return np.concatenate(found_rows), np.concatenate(found_slots)

    def _add_fp(
        self,
        key: str | Callable[[], str],
        fp: int,
        payload_hash: int,
        partition: int,
        offset: int,
        event_ms: int,
    ) -> None:
        slot = self._seek(fp)
        if slot < 0:
            self._decide(key, fp, payload_hash, partition, offset, event_ms, True)
        else:
            self._append(fp, payload_hash, _pack(partition, offset), _seconds(event_ms), slot)

    @staticmethod
    def _columns(
        n: int,
        payload_hashes: np.ndarray | Sequence[int],
        partitions: np.ndarray | Sequence[int],
        offsets: np.ndarray | Sequence[int],
        event_ms: np.ndarray | Sequence[int],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """A batch's columns checked and converted: (payload hashes, packed positions,
        event ms, event seconds). ``ValueError`` names what is wrong."""
        ph = np.asarray(payload_hashes).astype(_PH, copy=False)
        parts = np.asarray(partitions).astype(np.int64, copy=False)
        offs = np.asarray(offsets).astype(np.int64, copy=False)
        ms = np.asarray(event_ms).astype(np.int64, copy=False)
        for name, col in (
            ("payload_hashes", ph),
            ("partitions", parts),
            ("offsets", offs),
            ("event_ms", ms),
        ):
            if col.shape != (n,):
                raise ValueError(f"{name}: {col.shape[0] if col.ndim else 0} values for {n} keys")
        if n and (
            parts.min() < 0
            or parts.max() > _PARTITION_MAX
            or offs.min() < 0
            or offs.max() > _OFFSET_MAX
        ):
            raise ValueError("a position is out of range: partition 0..65534, offset 0..2**48-1")
        pos = (parts.astype(_POS) << np.uint64(_OFFSET_BITS)) | offs.astype(_POS)
        ts = np.clip(ms // 1000, 0, _TS_MAX).astype(_TS)
        return ph, pos, ms, ts

    def _decide(
        self,
        key: str | Callable[[], str],
        fp: int,
        payload_hash: int,
        partition: int,
        offset: int,
        event_ms: int,
        adding: bool,
    ) -> Decision:
        """The slow path: ``fp`` is held by at least one entry (maybe a dead one).
        ``key`` is the key, or a function returning it (asked only if ``verify`` is)."""
        pos = _pack(partition, offset)
        found = self._candidates(fp)
        if found:
            if any(c[2] == pos for c in found):
                return Decision.NEW  # this very event again (a replay)
            if any(c[3] == payload_hash for c in found):
                return Decision.DUPLICATE
            verify = self.verify
            if verify is None:
                return Decision.CONFLICT  # unverifiable: same key (see module docstring)
            if not isinstance(key, str):
                key = key()
            if any(verify(key, _unpack(c[2])) for c in found):
                return Decision.CONFLICT
            self._multi.add(fp)  # a second live key with this fingerprint
        # all dead, or only other keys with this fingerprint: a new key
        spv = self._spv
        i = fp >> self._sshift
        while spv[i] != _EMPTY:
            i += 1
        self._append(fp, payload_hash, pos, _seconds(event_ms), i)
        return Decision.NEW

    # ---- the delta -------------------------------------------------------------------
    def _append(self, fp: int, payload_hash: int, pos: int, ts: int, slot: int) -> None:
        n = self._d_len
        o = n & _CHUNK_MASK
        if o == 0:
            self._new_chunk()
        self._cfp[o] = fp
        self._cph[o] = payload_hash
        self._cpos[o] = pos
        self._cts[o] = ts
        self._d_len = n + 1
        self._live += 1
        if slot < self._slot_limit and n < self._grow_at:
            self._spv[slot] = n
        else:
            self._build_probe_table()  # the new entry is in the chunks: rebuilt with it
        if n + 1 >= self._d_limit:
            self._merge()

    def _append_many(self, fp: np.ndarray, ph: np.ndarray, pos: np.ndarray, ts: np.ndarray) -> None:
        """``_append`` for many new entries (distinct fingerprints, none live)."""
        m = len(fp)
        if not m:
            return
        start = n = self._d_len
        done = 0
        while done < m:
            o = n & _CHUNK_MASK
            if not o:
                self._new_chunk()
            take = min(m - done, _CHUNK - o)
            for chunks, col in ((self._dfp, fp), (self._dph, ph), (self._dpos, pos)):
                chunks[-1][o : o + take] = col[done : done + take]
            self._dts[-1][o : o + take] = ts[done : done + take]
            n += take
            done += take
        self._d_len = n
        self._live += m
        if n >= self._d_limit:
            self._merge()
        elif n > self._grow_at:
            self._build_probe_table()  # larger, with the new entries
        else:
            self._probe_insert(fp, np.arange(start, n, dtype=np.uint32))

    def _probe_insert(self, fp: np.ndarray, idx: np.ndarray) -> None:
        """Put delta entries ``idx`` (fingerprints ``fp``) into the probe table, each at the
        first free slot from its home, all at once: per round, each free slot taken goes
        to one of the entries aiming at it, the others move one slot on."""
        sp, limit = self._sp, self._slot_limit
        at = (fp >> np.uint64(self._sshift)).astype(np.intp)
        while len(at):
            if int(at.max()) >= limit:  # ran into the tail: rebuild (the entries are in)
                self._build_probe_table()
                return
            free = np.flatnonzero(sp[at] == _EMPTY)
            sp[at[free]] = idx[free]  # of several writers to a slot, one is left there
            rest = np.ones(len(at), bool)
            rest[free[sp[at[free]] == idx[free]]] = False
            at, idx = at[rest] + 1, idx[rest]

    def _new_chunk(self) -> None:
        fp, ph = np.zeros(_CHUNK, _FP), np.zeros(_CHUNK, _PH)
        pos, ts = np.zeros(_CHUNK, _POS), np.zeros(_CHUNK, _TS)
        self._dfp.append(fp)
        self._dph.append(ph)
        self._dpos.append(pos)
        self._dts.append(ts)
        self._cfp, self._cph, self._cpos, self._cts = (
            _view(fp, "Q"),
            _view(ph, "q"),
            _view(pos, "Q"),
            _view(ts, "I"),
        )
        self._dfpv.append(self._cfp)
        self._dphv.append(self._cph)
        self._dposv.append(self._cpos)

    def _reset_delta(self) -> None:
        self._dfp: list[np.ndarray] = []
        self._dph: list[np.ndarray] = []
        self._dpos: list[np.ndarray] = []
        self._dts: list[np.ndarray] = []
        self._dfpv: list[memoryview] = []
        self._dphv: list[memoryview] = []
        self._dposv: list[memoryview] = []
        self._d_len = 0
        self._d_limit = max(self._delta_min, len(self._mfp) // _DELTA_SHARE)
        self._set_probe_table(_MIN_PROBE_BITS, np.empty(0, np.int64), np.empty(0, np.uint32))

    def _delta_columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        n = self._d_len
        if not n:
            return np.empty(0, _FP), np.empty(0, _PH), np.empty(0, _POS), np.empty(0, _TS)
        cols = []
        for chunks in (self._dfp, self._dph, self._dpos, self._dts):
            cols.append(np.concatenate(chunks)[:n] if len(chunks) > 1 else chunks[0][:n].copy())
        return cols[0], cols[1], cols[2], cols[3]

    def _build_probe_table(self) -> None:
        """Rebuild the delta's probe table from the chunks (load 1/4 to 1/2), vectorised:
        entries sorted by home slot take the first free slot at or after it."""
        fp, _ph, pos, _ts = self._delta_columns()
        live = np.flatnonzero(pos != np.uint64(_DEAD)).astype(np.uint64)
        bits = max(_MIN_PROBE_BITS, (2 * len(live)).bit_length())
        while True:
            # sorted by home slot: one sort of (home, index) packed in a word (bits <= 32)
            word = np.sort((fp[live] >> np.uint64(64 - bits) << np.uint64(32)) | live)
            homes = (word >> np.uint64(32)).astype(np.int64)
            idx = (word & np.uint64(0xFFFF_FFFF)).astype(np.uint32)
            if self._set_probe_table(bits, homes, idx):
                return
            bits += 1

    def _set_probe_table(self, bits: int, homes: np.ndarray, idx: np.ndarray) -> bool:
        cap = 1 << bits
        if len(idx):
            r = np.arange(len(idx), dtype=np.int64)
            slots = r + np.maximum.accumulate(homes - r)
            if int(slots[-1]) >= cap + _TAIL - 1:
                return False
        table = np.full(cap + _TAIL, _EMPTY, np.uint32)
        if len(idx):
            table[slots] = idx
        self._sp, self._spv = table, _view(table, "I")
        self._scap, self._sshift = cap, 64 - bits
        # a write must leave the last slot empty (the probe loops' sentinel), and the
        # table is rebuilt larger once it is half full
        self._slot_limit, self._grow_at = cap + _TAIL - 1, cap // 2
        return True

    # ---- the main store ------------------------------------------------------------
    def _set_main(
        self, fp: np.ndarray, ph: np.ndarray, pos: np.ndarray, ts: np.ndarray, *, rebuild: bool
    ) -> None:
        self._mfp, self._mph, self._mpos, self._mts = fp, ph, pos, ts
        self._mfpv, self._mphv, self._mposv = _view(fp, "Q"), _view(ph, "q"), _view(pos, "Q")
        if not rebuild:
            return
        self._m_dead = int(np.count_nonzero(pos == np.uint64(_DEAD)))
        bits = max(_MIN_DIR_BITS, (len(fp) // _BUCKET).bit_length())
        shift = 64 - bits
        counts = np.bincount((fp >> np.uint64(shift)).astype(np.intp), minlength=1 << bits)
        directory = np.zeros((1 << bits) + 1, np.uint32)
        directory[1:] = np.cumsum(counts)
        self._dir, self._dirv, self._dshift = directory, _view(directory, "I"), shift

    def _merge(self) -> None:
        """Move the delta into the main store."""
        if not self._d_len:
            return
        fp, ph, pos, ts = self._delta_columns()
        live = pos != np.uint64(_DEAD)
        if not live.all():
            fp, ph, pos, ts = fp[live], ph[live], pos[live], ts[live]
        self._reset_delta_storage()
        self._merge_arrays(fp, ph, pos, ts)
        del fp, ph, pos, ts, live
        self._reset_delta()
        _release_freed_memory()

    def _reset_delta_storage(self) -> None:
        for views in (self._dfpv, self._dphv, self._dposv):
            for v in views:
                v.release()
        for v in (self._cfp, self._cph, self._cpos, self._cts):
            v.release()
        self._dfp, self._dph, self._dpos, self._dts = [], [], [], []
        self._dfpv, self._dphv, self._dposv = [], [], []

    def _merge_arrays(
        self, fp: np.ndarray, ph: np.ndarray, pos: np.ndarray, ts: np.ndarray
    ) -> None:
        """Insert sorted-or-not new entries into the main store (one pass over it)."""
        if not len(fp):
            return
        order = np.argsort(fp)  # entries of one fingerprint: any order (module docstring)
        fp, ph, pos, ts = fp[order], ph[order], pos[order], ts[order]
        old = [self._mfp, self._mph, self._mpos, self._mts]
        for v in (self._mfpv, self._mphv, self._mposv):
            v.release()
        # from here on ``old`` holds the only references, so each old column is freed
        # as soon as its merged copy exists (peak: one column, not the whole store)
        self._set_main(
            np.empty(0, _FP), np.empty(0, _PH), np.empty(0, _POS), np.empty(0, _TS), rebuild=False
        )
        if self._m_dead:
            keep = old[2] != np.uint64(_DEAD)
            old = [col[keep] for col in old]
        n_old = len(old[0])
        dest = np.searchsorted(old[0], fp, side="right") + np.arange(len(fp))
        rest = np.ones(n_old + len(fp), bool)
        rest[dest] = False
        merged = []
        for i, new in enumerate((fp, ph, pos, ts)):
            out = np.empty(n_old + len(fp), new.dtype)
            out[rest] = old[i]  # first the sequential fill of the fresh pages (~30 % faster)
            out[dest] = new
            old[i] = np.empty(0, new.dtype)  # release the old column before the next one
            merged.append(out)
        del rest, dest
        total = len(merged[0])
        bits = max(_MIN_DIR_BITS, (total // _BUCKET).bit_length())
        if not self._m_dead and 64 - bits == self._dshift:
            # same directory shape: add the new keys' bucket counts
            counts = np.bincount(
                (fp >> np.uint64(self._dshift)).astype(np.intp), minlength=1 << bits
            )
            directory = self._dir
            self._dirv.release()
            directory[1:] += np.cumsum(counts).astype(np.uint32)
            self._set_main(merged[0], merged[1], merged[2], merged[3], rebuild=False)
            self._dirv = _view(directory, "I")
        else:
            self._set_main(merged[0], merged[1], merged[2], merged[3], rebuild=True)
