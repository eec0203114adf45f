"""pipeline.serde: Avro single-object encoding of usage events.

The wire bytes are checked against the Avro specification with fastavro's own readers
and fingerprint (an implementation independent of ours), so a producer in another
language that follows the spec interoperates.
"""

from __future__ import annotations

import copy
import io
import struct
from typing import Any

import fastavro
import pytest
from fastavro.schema import fingerprint, to_parsing_canonical_form
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.dead_letters import DeadLetter
from pipeline.events import Reason
from pipeline.serde import MAGIC, AvroCodec, DecodeError, rabin_fingerprint, schema_fingerprint

CODEC = AvroCodec()


def record(**changes: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "event_id": "evt-0001",
        "event_time": 1_795_852_740_000,
        "source": "gateway",
        "source_id": "gw-bj-01",
        "reporting_carrier": "CMCC",
        "home_carrier": "CTCC",
        "serving_carrier": "CMCC",
        "transaction_id": "tx-1",
        "tenant_id": "tenant-a",
        "subscriber_id": "sub_" + "0" * 32,
        "channel": "new_calling",
        "model_id": "jiutian-13b",
        "provider": "cmcc",
        "input_tokens": 1200,
        "output_tokens": 300,
        "cached_tokens": 100,
        "reasoning_tokens": 7,
        "status": "failover",
        "routing_policy": "cost_first",
        "latency_ms": 850,
        "region": "beijing",
        "attributes": {"app": "10086", "ab": "b"},
    }
    rec.update(changes)
    return rec


# ---- fingerprints -------------------------------------------------------------------


def test_rabin_fingerprint_matches_the_avro_spec() -> None:
    # Empty input leaves the algorithm's initial value; '"null"' is the Avro
    # interoperability suite's first schema (7195948357588979594).
    assert rabin_fingerprint(b"") == 0xC15D213AA4D7A795
    assert rabin_fingerprint(b'"null"') == 7195948357588979594


@pytest.mark.parametrize("name", ["usage_event", "dead_letter"])
def test_schema_fingerprint_agrees_with_fastavro(name: str) -> None:
    codec = AvroCodec(name)
    canonical = to_parsing_canonical_form(codec.schema())
    theirs = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
    assert codec.fingerprint == theirs
    # on the wire as a little-endian 64-bit number
    assert struct.unpack("<Q", codec.fingerprint)[0] == rabin_fingerprint(canonical.encode())


def test_docs_do_not_change_the_fingerprint() -> None:
    schema = copy.deepcopy(CODEC.schema())
    schema["doc"] = "reworded"
    schema["fields"][0]["doc"] = "reworded too"
    assert schema_fingerprint(schema) == CODEC.fingerprint


# ---- encoding -----------------------------------------------------------------------


def test_encoding_is_single_object_encoding() -> None:
    data = CODEC.encode(record())
    assert data[:2] == b"\xc3\x01" == MAGIC
    assert data[2:10] == CODEC.fingerprint
    # the body is plain Avro binary: fastavro reads it with the raw schema file
    body = fastavro.schemaless_reader(
        io.BytesIO(data[10:]), fastavro.parse_schema(CODEC.schema()), None
    )
    assert isinstance(body, dict)
    assert body["event_id"] == "evt-0001"
    assert body["attributes"] == {"app": "10086", "ab": "b"}
    assert int(body["event_time"].timestamp() * 1000) == 1_795_852_740_000


def test_round_trip_keeps_every_field_and_time_as_epoch_ms() -> None:
    for rec in (
        record(),
        record(
            transaction_id=None, routing_policy=None, latency_ms=None, region=None, attributes={}
        ),
    ):
        decoded = CODEC.decode(CODEC.encode(rec))
        assert decoded == rec
        assert isinstance(decoded["event_time"], int)


def test_optional_fields_may_be_left_out_when_encoding() -> None:
    rec = record()
    for name in ("transaction_id", "routing_policy", "latency_ms", "region", "attributes"):
        del rec[name]
    decoded = CODEC.decode(CODEC.encode(rec))
    assert decoded["transaction_id"] is None and decoded["attributes"] == {}


@pytest.mark.parametrize(
    "rec",
    [
        {k: v for k, v in record().items() if k != "tenant_id"},
        record(input_tokens="1200"),
        record(attributes={"a": 1}),
        record(latency_ms=2**64),
    ],
    ids=["missing", "mistyped", "bad-map", "overflow"],
)
def test_encode_refuses_records_that_do_not_fit_with_value_error(rec: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the documented error type is the point
        CODEC.encode(rec)


# ---- decoding failures ----------------------------------------------------------------

GOOD = CODEC.encode(record())


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", Reason.UNDECODABLE),
        (b"\xc3", Reason.UNDECODABLE),
        (b'{"event_id": "evt-0001"}', Reason.UNDECODABLE),  # JSON, not Avro
        (b"\x00\x00\x00\x00\x01" + GOOD[10:], Reason.UNDECODABLE),  # Confluent framing
        (MAGIC + b"\x00" * 8 + GOOD[10:], Reason.UNKNOWN_SCHEMA),
        (GOOD[:-3], Reason.UNDECODABLE),  # truncated
        (GOOD + b"\x00", Reason.UNDECODABLE),  # trailing byte
        (GOOD[:10] + b"\xff" * 40, Reason.UNDECODABLE),
    ],
    ids=["empty", "short", "json", "confluent", "unknown-fp", "truncated", "trailing", "junk"],
)
def test_bad_bytes_raise_decode_error_with_a_reason(data: bytes, reason: Reason) -> None:
    with pytest.raises(DecodeError) as caught:
        CODEC.decode(data)
    assert caught.value.reason is reason
    assert caught.value.detail.startswith("payload:")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_body_after_a_known_header_decodes_or_raises_decode_error(body: bytes) -> None:
    # The worker must never crash on a payload: only DecodeError may escape.
    try:
        result = CODEC.decode(GOOD[:10] + body)
    except DecodeError as exc:
        assert exc.reason is Reason.UNDECODABLE
    else:
        assert isinstance(result, dict)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=len(GOOD) - 1), st.integers(0, 255))
def test_a_flipped_byte_never_escapes_as_another_exception(at: int, value: int) -> None:
    data = bytearray(GOOD)
    data[at] = value
    try:
        CODEC.decode(bytes(data))
    except DecodeError:
        pass


# ---- schema versions ---------------------------------------------------------------


def v2_schema() -> dict[str, Any]:
    """A hypothetical v2: one new optional field, with a default (a compatible change)."""
    schema = copy.deepcopy(CODEC.schema("v1"))
    schema["fields"].append({"name": "session_id", "type": ["null", "string"], "default": None})
    return schema


def test_a_newer_reader_fills_the_default_for_old_writers() -> None:
    old = AvroCodec()  # writes v1 (the only shipped version)
    new = AvroCodec(extra_schemas={"v2": v2_schema()})
    assert new.write_version == "v2" and new.fingerprint != old.fingerprint
    decoded = new.decode(old.encode(record()))
    assert decoded["session_id"] is None
    assert decoded["event_id"] == "evt-0001"


def test_an_older_reader_that_knows_v2_drops_the_new_field() -> None:
    new = AvroCodec(extra_schemas={"v2": v2_schema()})
    old_reader = AvroCodec(write_version="v1", extra_schemas={"v2": v2_schema()})
    decoded = old_reader.decode(new.encode(record(session_id="s-1")))
    assert "session_id" not in decoded
    assert decoded == record()


def test_a_reader_that_does_not_know_v2_says_unknown_schema() -> None:
    new = AvroCodec(extra_schemas={"v2": v2_schema()})
    with pytest.raises(DecodeError) as caught:
        CODEC.decode(new.encode(record(session_id="s-1")))
    assert caught.value.reason is Reason.UNKNOWN_SCHEMA
    assert new.fingerprint.hex() in caught.value.detail


def test_write_version_selects_the_written_schema() -> None:
    codec = AvroCodec(write_version="v1", extra_schemas={"v2": v2_schema()})
    assert codec.encode(record())[2:10] == schema_fingerprint(CODEC.schema("v1"))
    with pytest.raises(KeyError):
        codec.schema("v9")


def test_missing_schema_family_is_reported(tmp_path: Any) -> None:
    with pytest.raises(FileNotFoundError):
        AvroCodec("usage_event", schema_dir=tmp_path)


# ---- dead letters --------------------------------------------------------------------


def test_dead_letters_round_trip_through_their_schema() -> None:
    codec = AvroCodec("dead_letter")
    letter = DeadLetter(
        reason="negative_tokens",
        stage="validate",
        detail="input_tokens: -1 is negative",
        payload=b'{"event_id": "evt-0001"}',
        payload_format="json",
        topic="usage-events",
        partition=3,
        offset=12345,
        failed_at_ms=1_795_852_800_000,
        event_id="evt-0001",
        reporting_carrier="CMCC",
        tenant_id="tenant-a",
        event_time_ms=1_795_852_740_000,
    )
    assert codec.decode(codec.encode(letter.to_avro())) == letter.to_avro()
    raw = DeadLetter(
        "undecodable",
        "decode",
        "payload: junk",
        b"\xff\x00",
        "raw",
        "usage-events",
        0,
        1,
        1_795_852_800_000,
    )
    assert codec.decode(codec.encode(raw.to_avro()))["event_time"] is None
