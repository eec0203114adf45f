"""pipeline.stages.ingest: raw Kafka messages to accepted records and dead letters.

Messages are real Avro bytes from the real codec; nothing is mocked. Each test checks
what ends up where: accepted rows, dead letters (reason, stage, payload, position) and
the duplicate count, and that no input is lost.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.events import (
    Reason,
    Rules,
    dedup_key,
    parse_event_time,
    payload_hash,
    pseudonymise,
)
from pipeline.metering.dedup import DedupIndex
from pipeline.serde import MAGIC, AvroCodec
from pipeline.stages.ingest import IngestStage, RawMessage

CODEC = AvroCodec()
KEY = b"unit-test-pseudonym-key"
NOW = 1_795_852_800_000  # 2026-11-28T08:00:00Z, the broker's receive time
PHONE = "13800138000"
TOPIC = "usage-events"


def record(**changes: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "event_id": "evt-1",
        "event_time": NOW - 60_000,
        "source": "gateway",
        "source_id": "gw-1",
        "reporting_carrier": "CMCC",
        "home_carrier": "CMCC",
        "serving_carrier": "CMCC",
        "transaction_id": None,
        "tenant_id": "tenant-a",
        "subscriber_id": PHONE,
        "channel": "app",
        "model_id": "deepseek-v3",
        "provider": "deepseek",
        "input_tokens": 100,
        "output_tokens": 50,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "status": "ok",
        "routing_policy": None,
        "latency_ms": 120,
        "region": None,
        "attributes": {"app": "x"},
    }
    rec.update(changes)
    return rec


def message(
    value: bytes | dict[str, Any], offset: int, partition: int = 0, at: int = NOW
) -> RawMessage:
    data = CODEC.encode(value) if isinstance(value, dict) else value
    return RawMessage(TOPIC, partition, offset, at, b"tenant-a", data)


def stage(rules: Rules | None = None) -> IngestStage:
    return IngestStage(CODEC, rules or Rules(), KEY, DedupIndex())


def test_a_valid_event_is_accepted_with_its_position_and_a_pseudonym() -> None:
    result = stage().process([message(record(), offset=7, partition=2, at=NOW + 5)])
    assert result.dead_letters == [] and result.duplicates == 0
    [acc] = result.accepted
    assert (acc.topic, acc.partition, acc.offset, acc.arrived_ms) == (TOPIC, 2, 7, NOW + 5)
    assert acc.record["subscriber_id"] == pseudonymise(PHONE, KEY)
    assert acc.record == record(subscriber_id=pseudonymise(PHONE, KEY))
    # the hash is of what is stored (pseudonym included), so the warehouse can reload it
    assert acc.payload_hash == payload_hash(acc.record)


def test_undecodable_bytes_become_a_raw_dead_letter() -> None:
    junk = b"\x00\x01 not avro"
    result = stage().process([message(junk, offset=3, partition=1)])
    assert result.accepted == []
    [dl] = result.dead_letters
    assert (dl.reason, dl.stage, dl.payload_format) == ("undecodable", "decode", "raw")
    assert dl.payload == junk
    assert (dl.topic, dl.partition, dl.offset, dl.failed_at_ms) == (TOPIC, 1, 3, NOW)
    assert dl.event_id is None and dl.tenant_id is None and dl.event_time_ms is None


def test_an_unknown_schema_fingerprint_is_its_own_reason() -> None:
    body = CODEC.encode(record())[10:]
    result = stage().process([message(MAGIC + b"\x01" * 8 + body, offset=0)])
    assert [d.reason for d in result.dead_letters] == ["unknown_schema"]


def test_an_invalid_event_is_dead_lettered_as_json_without_the_raw_subscriber() -> None:
    result = stage().process([message(record(input_tokens=-5), offset=9)])
    assert result.accepted == []
    [dl] = result.dead_letters
    assert (dl.reason, dl.stage, dl.payload_format) == ("negative_tokens", "validate", "json")
    assert dl.detail.startswith("input_tokens:")
    assert (dl.event_id, dl.reporting_carrier, dl.tenant_id) == ("evt-1", "CMCC", "tenant-a")
    assert dl.event_time_ms == NOW - 60_000
    payload = json.loads(dl.payload)
    assert payload["subscriber_id"] == pseudonymise(PHONE, KEY)
    assert payload["input_tokens"] == -5
    assert payload["event_time"] == "2026-11-28T07:59:00.000+00:00"
    assert PHONE.encode() not in dl.payload


def test_a_blank_subscriber_is_refused_not_hashed_into_a_valid_pseudonym() -> None:
    result = stage().process([message(record(subscriber_id="  "), offset=0)])
    assert result.accepted == []
    [dl] = result.dead_letters
    assert dl.reason == "invalid_value"
    assert dl.detail == "subscriber_id: must not be empty"


def test_time_rules_use_the_broker_time_not_the_wall_clock() -> None:
    # The same message gives the same answer whenever it is (re)processed.
    old = record(event_time=NOW - 36 * 86_400_000)
    assert [d.reason for d in stage().process([message(old, 0)]).dead_letters] == ["too_late"]
    later = message(old, 0, at=NOW - 2 * 86_400_000)  # received long ago: it was on time
    assert len(stage().process([later]).accepted) == 1
    ahead = record(event_time=NOW + 301_000)
    assert [d.reason for d in stage().process([message(ahead, 0)]).dead_letters] == [
        "future_event_time"
    ]


def test_rules_from_settings_are_applied() -> None:
    result = stage(Rules(max_tokens=10)).process([message(record(input_tokens=11), 0)])
    assert [d.reason for d in result.dead_letters] == ["too_many_tokens"]


def test_missing_transaction_id_on_a_cross_carrier_event() -> None:
    cross = record(home_carrier="CTCC", serving_carrier="CMCC")
    result = stage().process(
        [
            message(cross, 0),
            message(
                record(
                    event_id="evt-2",
                    home_carrier="CTCC",
                    serving_carrier="CMCC",
                    transaction_id="tx",
                ),
                1,
            ),
        ]
    )
    assert [d.reason for d in result.dead_letters] == ["missing_transaction_id"]
    assert [a.record["event_id"] for a in result.accepted] == ["evt-2"]


def test_exact_copy_counts_once_and_a_conflicting_copy_is_dead_lettered() -> None:
    first = record()
    conflicting = record(output_tokens=51)
    result = stage().process(
        [message(first, 0), message(first, 1), message(conflicting, 2), message(first, 3)]
    )
    assert [a.offset for a in result.accepted] == [0]
    assert result.duplicates == 2
    [dl] = result.dead_letters
    assert (dl.reason, dl.stage, dl.offset) == ("conflicting_duplicate", "dedup", 2)
    assert "evt-1" in dl.detail and "CMCC" in dl.detail
    assert json.loads(dl.payload)["output_tokens"] == 51  # the refused copy, kept whole


def test_the_same_event_id_from_another_carrier_is_another_event() -> None:
    result = stage().process([message(record(), 0), message(record(reporting_carrier="CTCC"), 1)])
    assert len(result.accepted) == 2


def test_a_duplicate_across_batches_and_partitions_is_still_a_duplicate() -> None:
    ingest = stage()
    ingest.process([message(record(), 0, partition=0)])
    later = ingest.process([message(record(), 5, partition=3)])
    assert later.accepted == [] and later.duplicates == 1


def test_replaying_a_batch_gives_the_same_result() -> None:
    # After a crash the worker re-reads its uncommitted batch with the same index.
    batch = [
        message(record(), 0),
        message(record(), 1),
        message(record(output_tokens=1), 2),
        message(record(event_id="evt-2"), 3),
        message(b"junk", 4),
    ]
    ingest = stage()
    first = ingest.process(batch)
    again = ingest.process(batch)
    assert [a.offset for a in again.accepted] == [a.offset for a in first.accepted] == [0, 3]
    assert again.duplicates == first.duplicates == 1
    assert (
        [(d.reason, d.offset) for d in again.dead_letters]
        == [(d.reason, d.offset) for d in first.dead_letters]
        == [("conflicting_duplicate", 2), ("undecodable", 4)]
    )


def test_an_index_filled_from_the_warehouse_keeps_the_first_one() -> None:
    index = DedupIndex()
    stored = record(subscriber_id=pseudonymise(PHONE, KEY))
    index.add(dedup_key(stored), payload_hash(stored), 0, 100, stored["event_time"])
    ingest = IngestStage(CODEC, Rules(), KEY, index)
    result = ingest.process(
        [message(record(), 100), message(record(), 200), message(record(input_tokens=1), 201)]
    )
    assert [a.offset for a in result.accepted] == [100]  # its own position: the sink skips it
    assert result.duplicates == 1
    assert [d.reason for d in result.dead_letters] == ["conflicting_duplicate"]


def ms(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp() * 1000)  # type: ignore[misc]


def test_event_times_outside_datetime64_stay_in_the_payload_only() -> None:
    # DateTime64(3) holds 1900-01-01 .. 2299-12-31 23:59:59; a hostile time outside it
    # must not break the dead_letters insert.
    cases = {
        ms(2299, 12, 31, 23, 59, 59): ms(2299, 12, 31, 23, 59, 59),
        ms(2300, 1, 1): None,
        ms(1900, 1, 1): ms(1900, 1, 1),
        ms(1899, 12, 31, 23, 59, 59): None,
        -(2**62): None,
    }
    messages = [message(record(event_id=f"e{i}", event_time=t), i) for i, t in enumerate(cases)]
    result = stage().process(messages)
    assert [d.reason for d in result.dead_letters] == [
        "future_event_time",
        "future_event_time",
        "too_late",
        "too_late",
        "too_late",
    ]
    assert [d.event_time_ms for d in result.dead_letters] == list(cases.values())
    # the payload keeps the time as sent (as text; beyond datetime's range as "<n> ms")
    for d, t in zip(result.dead_letters, cases, strict=True):
        text = json.loads(d.payload)["event_time"]
        assert (parse_event_time(text) if text[0] != "-" else int(text.split()[0])) == t


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.builds(
                lambda i, tokens, carrier: record(
                    event_id=f"evt-{i}", input_tokens=tokens, reporting_carrier=carrier
                ),
                st.integers(0, 5),
                st.integers(-2, 3),
                st.sampled_from(["CMCC", "CTCC", "XX"]),
            ),
        ),
        max_size=30,
    )
)
def test_every_message_has_exactly_one_outcome(values: list[Any]) -> None:
    # Accepted, duplicate or dead letter: never dropped, never two outcomes.
    messages = [message(v, i) for i, v in enumerate(values)]
    result = stage().process(messages)
    positions = [a.offset for a in result.accepted] + [d.offset for d in result.dead_letters]
    assert len(positions) == len(set(positions))
    assert len(positions) + result.duplicates == len(messages)
    for acc in result.accepted:
        assert acc.record["subscriber_id"] != PHONE
    for dl in result.dead_letters:
        assert dl.reason in {r.value for r in Reason}
        if dl.payload_format == "json":
            assert PHONE.encode() not in dl.payload


def test_copies_resent_by_a_replayed_batch_are_dropped_within_a_batch() -> None:
    from pipeline.dead_letters import DeadLetter, first_copies

    def letter(partition: int, offset: int) -> DeadLetter:
        return DeadLetter("bad_json", "decode", "x", b"", "raw", "usage", partition, offset, 0)

    # worker A sent letters for offsets 50 and 95 of partition 1 and 7 of partition 2,
    # died before committing; worker B replayed and sent 50 and 95 again; then 120 is new
    batch = [letter(1, 50), letter(2, 7), letter(1, 95), letter(1, 50), letter(1, 95)]
    batch += [letter(2, 7), letter(1, 120)]
    kept = first_copies(batch)
    assert [(d.partition, d.offset) for d in kept] == [(1, 50), (2, 7), (1, 95), (1, 120)]
    # A died after sending only 50: B's 50 is a copy, B's 95 is not
    kept = first_copies([letter(1, 50), letter(1, 50), letter(1, 95)])
    assert [d.offset for d in kept] == [50, 95]
