"""pipeline.metering.dedup: the first event wins; replays give the same answers."""

from __future__ import annotations

from pipeline.metering.dedup import Decision, DedupIndex

KEY = "CMCC\x1fevt-1"
T = 1_795_852_800_000


def test_first_occurrence_is_new_and_an_exact_copy_is_a_duplicate() -> None:
    index = DedupIndex()
    assert index.check(KEY, 111, 0, 10, T) is Decision.NEW
    assert index.check(KEY, 111, 0, 11, T) is Decision.DUPLICATE
    assert index.check(KEY, 111, 2, 5, T) is Decision.DUPLICATE  # any other position
    assert len(index) == 1


def test_same_key_different_content_is_a_conflict_and_the_first_stands() -> None:
    index = DedupIndex()
    assert index.check(KEY, 111, 0, 10, T) is Decision.NEW
    assert index.check(KEY, 222, 0, 11, T) is Decision.CONFLICT
    # the conflicting copy did not replace the first: its exact copy is still a duplicate
    assert index.check(KEY, 111, 0, 12, T) is Decision.DUPLICATE
    assert index.check(KEY, 222, 0, 13, T) is Decision.CONFLICT


def test_replaying_the_log_gives_the_same_decisions() -> None:
    log = [
        ("CMCC\x1fa", 1, 0, 0),
        ("CMCC\x1fb", 2, 0, 1),
        ("CMCC\x1fa", 1, 0, 2),  # duplicate
        ("CMCC\x1fb", 9, 0, 3),  # conflict
        ("CTCC\x1fa", 1, 0, 4),  # same event_id, other carrier: a different event
    ]
    index = DedupIndex()
    first = [index.check(k, h, p, o, T) for k, h, p, o in log]
    again = [index.check(k, h, p, o, T) for k, h, p, o in log]
    assert first == [
        Decision.NEW,
        Decision.NEW,
        Decision.DUPLICATE,
        Decision.CONFLICT,
        Decision.NEW,
    ]
    # the first occurrence seen again at its own position is NEW again (the sink's
    # offset filter keeps it from being stored twice); everything else is unchanged
    assert again == first


def test_an_index_loaded_from_the_warehouse_decides_like_the_original() -> None:
    index = DedupIndex()
    index.add(KEY, 111, 1, 40, T)
    assert index.check(KEY, 111, 1, 40, T) is Decision.NEW  # replay of the stored one
    assert index.check(KEY, 111, 1, 41, T) is Decision.DUPLICATE
    assert index.check(KEY, 333, 1, 42, T) is Decision.CONFLICT


def test_add_keeps_the_first_entry() -> None:
    index = DedupIndex()
    index.add(KEY, 111, 0, 1, T)
    index.add(KEY, 222, 0, 2, T)  # a later copy must not take over
    assert index.check(KEY, 111, 0, 3, T) is Decision.DUPLICATE


def test_forget_makes_a_key_new_again() -> None:
    index = DedupIndex()
    index.check(KEY, 111, 0, 1, T)
    index.forget(KEY)
    index.forget("never-seen")  # no error
    assert len(index) == 0
    assert index.check(KEY, 222, 0, 2, T) is Decision.NEW


def test_prune_drops_only_events_older_than_the_horizon() -> None:
    index = DedupIndex()
    index.check("CMCC\x1fold", 1, 0, 0, T - 1)
    index.check("CMCC\x1fedge", 2, 0, 1, T)
    index.check("CMCC\x1fnew", 3, 0, 2, T + 1)
    assert index.prune(T) == 1
    assert len(index) == 2
    assert index.check("CMCC\x1fedge", 2, 0, 9, T) is Decision.DUPLICATE
    assert index.check("CMCC\x1fold", 9, 0, 9, T - 1) is Decision.NEW
    assert index.prune(T) == 1  # the re-added old one
