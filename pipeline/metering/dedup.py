"""The deduplication index: exact, keyed on (reporting_carrier, event_id).

Pure logic, no I/O. The worker fills it from ``usage_events`` when it takes a
partition (so the warehouse is its durable copy, and the index never disagrees with
what was stored), then consults it for every accepted-so-far event.
"""

from __future__ import annotations

from enum import IntEnum


class Decision(IntEnum):
    """What to do with an event."""

    NEW = 0  # first time seen (or a replay of that first occurrence): count it
    DUPLICATE = 1  # same key, same content, seen before: drop quietly
    CONFLICT = 2  # same key, different content: dead-letter as conflicting_duplicate


class DedupIndex:
    """key -> (payload hash, partition, offset, event_time ms) of the first occurrence."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[str, tuple[int, int, int, int]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, key: str, payload_hash: int, partition: int, offset: int, event_ms: int) -> None:
        """Record a stored event (used when loading from the warehouse)."""
        self._entries.setdefault(key, (payload_hash, partition, offset, event_ms))

    def check(
        self, key: str, payload_hash: int, partition: int, offset: int, event_ms: int
    ) -> Decision:
        """Decide about one event and remember it if it is new.

        The decision depends only on what came first, so a replay of the same log gives
        the same answers: the first occurrence, seen again at its own position, is
        ``NEW`` again (and the sink's offset filter keeps it from being stored twice).
        """
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = (payload_hash, partition, offset, event_ms)
            return Decision.NEW
        if entry[1] == partition and entry[2] == offset:
            return Decision.NEW
        return Decision.DUPLICATE if entry[0] == payload_hash else Decision.CONFLICT

    def forget(self, key: str) -> None:
        """Drop a key (used when a batch that added it is abandoned)."""
        self._entries.pop(key, None)

    def prune(self, older_than_ms: int) -> int:
        """Forget events older than the lateness limit: any copy of them arriving now is
        rejected as too_late before dedup. Returns how many were dropped."""
        stale = [k for k, v in self._entries.items() if v[3] < older_than_ms]
        for key in stale:
            del self._entries[key]
        return len(stale)
