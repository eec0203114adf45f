"""Hostile input: random bytes, truncated Avro, Avro of the wrong schema, huge strings,
extreme numbers and timestamps, unicode edge cases. Nothing crashes the worker, and every
input is accepted, counted once as an exact copy, or lands in the dead letters with a
reason (issue 7, item 4).

The properties run the real decoder and validator (``IngestStage.process``) in process
and need no broker; the last test sends a fixed hostile corpus through Kafka to the real
worker and checks the warehouse.
"""

from __future__ import annotations

import json
import re
import zlib
from collections import Counter
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.schema_registry import Schema as RegistrySchema
from confluent_kafka.schema_registry import SchemaRegistryClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.dead_letters import MAX_DEAD_LETTER_PAYLOAD, prepare_dead_letter
from pipeline.events import Reason, Rules, Stage, now_ms, pseudonymise
from pipeline.metering.dedup import DedupIndex
from pipeline.produce import producer_config
from pipeline.serde import MAGIC, AvroCodec
from pipeline.stages.ingest import IngestResult, IngestStage, RawMessage
from tests.integration.faults import hostile
from tests.integration.faults.hostile import (
    CODEC,
    DT64_MAX_MS,
    DT64_MIN_MS,
    EXTREME_INTS,
    EXTREME_TIMES_ABS,
    INT64_MAX,
    INT64_MIN,
    INVALID_UTF8,
    LATENESS_MS,
    MAX_TOKENS,
    PHONE,
    SKEW_MS,
    STRING_FIELDS,
    TOKEN_FIELDS,
    UNICODE_EDGES,
    WRONG_SCHEMAS,
    expected_reason,
    valid_record,
    with_field,
)
from tests.integration.harness import Harness

NOW = 1_795_852_800_000  # 2026-11-28T08:00:00Z, the broker's receive time
KEY = b"hostile-input-pseudonym-key"
TOPIC = "usage-events"
DL_CODEC = AvroCodec("dead_letter")
KAFKA_MESSAGE_MAX = 1_000_000  # librdkafka's default message.max.bytes (our producers)
REASONS = {r.value for r in Reason}
PSEUDONYM = re.compile(r"sub_[0-9a-f]{32}")
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))

# A codec that also reads Confluent framing, with the wrong schemas registered.
REGISTRY = SchemaRegistryClient.new_client({"url": "mock://hostile-input"})
REGISTRY_CODEC = AvroCodec()
REGISTRY_CODEC.use_registry(REGISTRY, "hostile-value")
SCHEMA_IDS = {
    name: int(REGISTRY.register_schema(f"hostile-{name}", RegistrySchema(json.dumps(s), "AVRO")))
    for name, (s, _, _) in WRONG_SCHEMAS.items()
}


def messages(values: list[bytes], at: int = NOW) -> list[RawMessage]:
    return [RawMessage(TOPIC, i % 4, i, at, b"k", v) for i, v in enumerate(values)]


def run(values: list[bytes], codec: AvroCodec = CODEC) -> IngestResult:
    """Process ``values`` as one batch and check what must hold for any input."""
    batch = messages(values)
    result = IngestStage(codec, Rules(), KEY, DedupIndex()).process(batch)
    check_outcomes(batch, result)
    return result


def check_outcomes(
    batch: list[RawMessage], result: IngestResult, phone_elsewhere: bool = False
) -> None:
    """What must hold for any batch. ``phone_elsewhere``: inputs may carry PHONE in
    fields other than subscriber_id, or inside other numbers (a fuzzer copies bytes
    around); only the subscriber and phone numbers in raw payloads are pseudonymised."""
    # exactly one outcome per message: accepted, exact copy, or dead letter
    positions = [(a.partition, a.offset) for a in result.accepted]
    positions += [(d.partition, d.offset) for d in result.dead_letters]
    assert len(positions) == len(set(positions))
    assert len(positions) + result.duplicates == len(batch)
    by_pos = {(m.partition, m.offset): m for m in batch}
    for acc in result.accepted:
        check_contract(acc.record, acc.arrived_ms)
    for dl in result.dead_letters:
        msg = by_pos[(dl.partition, dl.offset)]
        assert dl.reason in REASONS
        assert dl.stage in {s.value for s in Stage} and dl.detail.strip()
        assert dl.event_time_ms is None or DT64_MIN_MS <= dl.event_time_ms <= DT64_MAX_MS
        for text in (dl.event_id, dl.tenant_id, dl.reporting_carrier):
            assert text is None or len(text) <= 256
        if dl.payload_format == "raw":
            assert dl.stage == "decode" and dl.payload == msg.value
        else:
            assert dl.payload_format == "json"
            assert PSEUDONYM.fullmatch(json.loads(dl.payload)["subscriber_id"])
        # as the worker sends it to the dead-letter topic: no phone number, and a
        # message that Kafka takes
        prepare_dead_letter(dl, KEY)
        if not phone_elsewhere:
            assert PHONE.encode() not in dl.payload
        elif dl.payload_format == "raw":  # may hold it inside a longer run of digits
            assert not re.search(rb"(?<!\d)(\+?86|0086)?%b(?!\d)" % PHONE.encode(), dl.payload)
        assert len(DL_CODEC.encode(dl.to_avro())) <= KAFKA_MESSAGE_MAX - 1024


def check_contract(rec: dict[str, Any], received_ms: int) -> None:
    """An accepted record as contract section 1 describes it."""
    assert list(rec) == CODEC.field_names
    assert 1 <= len(rec["event_id"]) <= 128
    for name in STRING_FIELDS:
        value = rec[name]
        assert value is None or (isinstance(value, str) and value.strip() and len(value) <= 256)
    for name, allowed in hostile.ENUMS.items():
        assert rec[name] in allowed or (name == "routing_policy" and rec[name] is None)
    for name in TOKEN_FIELDS:
        assert 0 <= rec[name] <= MAX_TOKENS
    assert rec["latency_ms"] is None or 0 <= rec["latency_ms"] <= INT64_MAX
    assert received_ms - LATENESS_MS <= rec["event_time"] <= received_ms + SKEW_MS
    if rec["home_carrier"] != rec["serving_carrier"]:
        assert rec["transaction_id"]
    assert PSEUDONYM.fullmatch(rec["subscriber_id"])
    assert len(rec["attributes"]) <= 64
    assert all(len(k) <= 256 and len(v) <= 256 for k, v in rec["attributes"].items())


def outcome(result: IngestResult) -> str:
    """The single message's outcome: ``accepted`` or its dead-letter reason."""
    if result.accepted:
        return "accepted"
    [dl] = result.dead_letters
    return dl.reason


# ---- strategies ---------------------------------------------------------------------

event_ints = st.integers(0, 10_000)
records = st.builds(
    lambda i, subscriber: valid_record(i, NOW, subscriber_id=subscriber),
    event_ints,
    st.sampled_from(hostile.SUBSCRIBERS),
)
garbage = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda b: MAGIC + b),
    st.binary(max_size=200).map(lambda b: MAGIC + CODEC.fingerprint + b),
    st.binary(max_size=200).map(lambda b: b"\x00" + b),
)
nasty_text = st.one_of(st.sampled_from(UNICODE_EDGES), st.text(max_size=300))
string_fields = st.sampled_from((*STRING_FIELDS, "attributes.key", "attributes.value"))


# ---- properties ---------------------------------------------------------------------


@FAST
@given(st.lists(garbage, min_size=1, max_size=20))
def test_random_bytes_are_dead_letters_with_their_bytes(values: list[bytes]) -> None:
    result = run(values)
    for dl in result.dead_letters:
        assert dl.reason in {"undecodable", "unknown_schema"} or dl.stage == "validate"
    unframed = [m for m in messages(values) if not m.value.startswith(MAGIC) or len(m.value) < 10]
    letters = {(d.partition, d.offset): d for d in result.dead_letters}
    for m in unframed:  # not our framing at all: undecodable, whatever follows
        assert letters[(m.partition, m.offset)].reason == "undecodable"


@settings(max_examples=40, deadline=None)
@given(records, string_fields, nasty_text)
def test_a_valid_event_truncated_at_every_length_is_undecodable(
    rec: dict[str, Any], field: str, text: str
) -> None:
    data = CODEC.encode(with_field(rec, field, text))
    result = run([data[:cut] for cut in range(len(data))])
    assert result.accepted == [] and result.duplicates == 0
    assert [d.reason for d in result.dead_letters] == ["undecodable"] * len(data)
    assert outcome(run([data])) == (expected_reason(field, text, NOW) or "accepted")


@FAST
@given(
    records,
    st.sampled_from(sorted(WRONG_SCHEMAS)),
    st.sampled_from(["own_fingerprint", "our_fingerprint", "confluent", "confluent_unknown"]),
)
def test_avro_of_a_wrong_schema_is_refused_or_resolved(
    rec: dict[str, Any], name: str, framing: str
) -> None:
    schema, build, resolves = WRONG_SCHEMAS[name]
    body = hostile.avro_body(schema, build(rec))
    value = {
        "own_fingerprint": hostile.single_object(schema, body),
        "our_fingerprint": MAGIC + CODEC.fingerprint + body,
        "confluent": hostile.confluent(SCHEMA_IDS[name], body),
        "confluent_unknown": hostile.confluent(999_999, body),
    }[framing]
    got = outcome(run([value], REGISTRY_CODEC))
    if framing in ("own_fingerprint", "confluent_unknown"):
        assert got == "unknown_schema"
    elif framing == "confluent":
        # a newer version of our record resolves to v1 (extra fields dropped); any other
        # record does not
        assert got == ("accepted" if resolves else "undecodable")
    else:
        assert got != "accepted"
        if name == "v2_extra_fields":
            assert got == "undecodable"  # the extra fields are trailing bytes to v1


@SLOW
@given(
    records,
    st.sampled_from((*STRING_FIELDS, "attributes.key", "attributes.value")),
    st.sampled_from(["x", "\x00", '"', "\U0001f600", "中"]),
    st.sampled_from([129, 257, 65_536, 1 << 20, 3 << 20]),
)
def test_huge_strings_are_refused_and_their_dead_letter_fits_in_kafka(
    rec: dict[str, Any], field: str, char: str, size: int
) -> None:
    value = char * size
    expected = expected_reason(field, value, NOW)
    assert outcome(run([CODEC.encode(with_field(rec, field, value))])) == (expected or "accepted")


def test_a_dead_letter_whose_json_outgrows_a_kafka_message_is_cut_and_says_so() -> None:
    # Regression: a 900 kB string of NULs is 5.4 MB as JSON; its dead letter was refused
    # by the producer (MSG_SIZE_TOO_LARGE) and the worker stopped on it at every replay.
    rec = valid_record(1, NOW, tenant_id="\x00" * 900_000)
    [dl] = run([CODEC.encode(rec)]).dead_letters  # run() prepares it as the worker does
    assert dl.reason == "invalid_value" and dl.detail.startswith("tenant_id: longer than 256")
    stored = dict(rec, subscriber_id=pseudonymise(PHONE, KEY))
    stored["event_time"] = "2026-11-28T07:58:59.999+00:00"
    whole = json.dumps(stored, ensure_ascii=False).encode()
    assert len(whole) > 5_400_000
    assert dl.detail.endswith(f"(payload cut to its first 900,000 of {len(whole):,} bytes)")
    assert len(dl.payload) == MAX_DEAD_LETTER_PAYLOAD
    assert dl.payload == whole[:MAX_DEAD_LETTER_PAYLOAD]


@pytest.mark.parametrize("subscriber", hostile.SUBSCRIBERS)
def test_a_subscriber_number_with_a_country_code_is_redacted_from_raw_payloads(
    subscriber: str,
) -> None:
    # Regression: "+8613900139000" in a truncated event reached dead_letters as it was.
    data = CODEC.encode(valid_record(1, NOW, subscriber_id=subscriber))
    [dl] = run([data[:-20]]).dead_letters  # run() prepares it as the worker does
    assert dl.reason == "undecodable" and dl.payload_format == "raw"
    assert PHONE.encode() not in dl.payload
    assert pseudonymise(PHONE, KEY).encode() in dl.payload


@SLOW
@given(records, st.integers(65, 50_000))
def test_too_many_attributes(rec: dict[str, Any], labels: int) -> None:
    rec["attributes"] = {f"k{i}": "\x00" * 200 for i in range(labels)}
    assert outcome(run([CODEC.encode(rec)])) == "invalid_value"


@FAST
@given(
    records,
    st.sampled_from((*TOKEN_FIELDS, "latency_ms")),
    st.one_of(st.sampled_from(EXTREME_INTS), st.integers(INT64_MIN, INT64_MAX)),
)
def test_extreme_numbers(rec: dict[str, Any], field: str, value: int) -> None:
    rec[field] = value
    assert outcome(run([CODEC.encode(rec)])) == (expected_reason(field, value, NOW) or "accepted")


@FAST
@given(records, string_fields, nasty_text)
def test_unicode_edge_cases_in_every_string_field(
    rec: dict[str, Any], field: str, text: str
) -> None:
    result = run([CODEC.encode(with_field(rec, field, text))])
    assert outcome(result) == (expected_reason(field, text, NOW) or "accepted")
    for acc in result.accepted:  # kept exactly as sent (the subscriber as its pseudonym)
        sent = with_field(rec, field, text)
        sent["subscriber_id"] = pseudonymise(sent["subscriber_id"], KEY)
        assert acc.record == sent


@FAST
@given(records, string_fields, st.sampled_from(INVALID_UTF8), st.text(max_size=5))
def test_invalid_utf8_inside_avro_strings_is_undecodable(
    rec: dict[str, Any], field: str, bad: bytes, around: str
) -> None:
    value = hostile.with_invalid_utf8(rec, field, bad, around)
    assert outcome(run([value])) == "undecodable"


@FAST
@given(
    records,
    st.one_of(
        st.sampled_from(EXTREME_TIMES_ABS),
        st.sampled_from([0, -1, SKEW_MS, SKEW_MS + 1, -LATENESS_MS, -LATENESS_MS - 1]).map(
            lambda rel: NOW + rel
        ),
        st.integers(INT64_MIN, INT64_MAX),
    ),
)
def test_extreme_timestamps(rec: dict[str, Any], event_time: int) -> None:
    rec["event_time"] = event_time
    result = run([CODEC.encode(rec)])
    assert outcome(result) == (expected_reason("event_time", event_time, NOW) or "accepted")
    for dl in result.dead_letters:  # the time is kept where the table can hold it
        if DT64_MIN_MS <= event_time <= DT64_MAX_MS - 999:
            assert dl.event_time_ms == event_time
        elif not DT64_MIN_MS <= event_time <= DT64_MAX_MS:
            assert dl.event_time_ms is None
        else:  # the last second of 2299: kept, or (the ingest rounds its bound) not
            assert dl.event_time_ms in (event_time, None)


@FAST
@given(
    st.lists(
        st.one_of(
            garbage,
            records.map(CODEC.encode),
            st.builds(
                lambda r, f, t: CODEC.encode(with_field(r, f, t)),
                records,
                string_fields,
                nasty_text,
            ),
            st.builds(
                lambda r, t: CODEC.encode({**r, "event_time": t}),
                records,
                st.integers(INT64_MIN, INT64_MAX),
            ),
        ),
        min_size=1,
        max_size=40,
    ),
)
def test_mixed_batches_have_one_outcome_per_message_and_replay_the_same(
    values: list[bytes],
) -> None:
    batch = messages(values)
    stage = IngestStage(CODEC, Rules(), KEY, DedupIndex())
    first = stage.process(batch)
    check_outcomes(batch, first)
    again = stage.process(batch)  # a replay after a crash, with the same index
    assert [a.offset for a in again.accepted] == [a.offset for a in first.accepted]
    assert [(d.offset, d.reason) for d in again.dead_letters] == [
        (d.offset, d.reason) for d in first.dead_letters
    ]


# ---- through Kafka, into the real worker --------------------------------------------


@pytest.mark.integration
def test_a_hostile_corpus_through_the_worker(harness: Harness) -> None:
    h = harness
    sent_at = now_ms()
    corpus = hostile.corpus(sent_at)
    producer = Producer(producer_config(h.settings))
    failures: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    for value, _, _ in corpus:
        key = b"k%d" % (zlib.crc32(value) % 16)  # equal copies share a partition: in order
        while True:
            try:
                producer.produce(h.settings.topic_usage, value, key, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0 and failures == []

    h.start_worker()
    assert h.worker is not None
    pid = h.worker.pid
    h.cli("wait", "--idle", "2", "--timeout", "120")
    assert h.worker is not None and h.worker.pid == pid
    assert h.worker.poll() is None, h.log_tail()  # never crashed

    expected = Counter(outcome for _, outcome, _ in corpus)
    status = h.status()  # one process saw every message
    assert status["consumed"] == len(corpus)
    assert status["duplicates"] == expected["duplicate"]
    stored = h.sql("SELECT hex(event_id) AS h, subscriber_id AS s FROM usage_events")
    assert len(stored) == expected["accepted"]
    accepted_ids = {
        CODEC.decode(v)["event_id"].encode().hex().upper()
        for v, outcome, _ in corpus
        if outcome == "accepted"
    }
    assert {r["h"] for r in stored} == accepted_ids  # hostile text stored exactly as sent
    assert all(PSEUDONYM.fullmatch(r["s"]) for r in stored)

    rows = h.sql(
        "SELECT reason, count() AS n, countIf(detail = '') AS blank, "
        f"countIf(position(payload, '{PHONE}') > 0) AS phone FROM dead_letters GROUP BY reason"
    )
    reasons = {r["reason"]: int(r["n"]) for r in rows}
    assert set(reasons) <= REASONS
    assert sum(int(r["blank"]) for r in rows) == 0  # every letter says why
    assert sum(int(r["phone"]) for r in rows) == 0  # the subscriber's number never stored
    dead = len(corpus) - expected["accepted"] - expected["duplicate"]
    # nothing lost, nothing twice (an unpriced letter used to be dropped by the mirror as
    # a copy when the batch had a later letter from its partition: sent out of order)
    assert sum(reasons.values()) == dead
    unpredicted = expected[None]
    for reason, n in expected.items():
        if reason not in (None, "accepted", "duplicate"):
            # the unpredicted ones (foreign bytes behind our header) may add to any reason
            assert n <= reasons.get(reason, 0) <= n + unpredicted, reason
