"""The compiled columnar decoder against fastavro (``AvroCodec.decode``), the reference.

The property everywhere: a row the fast path marks OK is a message fastavro accepts, and
equals fastavro's record field by field (attribute order included); anything else is
FALLBACK, and nothing crashes. Valid v1 events must be OK, or the fast path is useless.
"""

from __future__ import annotations

import random
import struct
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import _avrocol
from pipeline.serde import MAGIC, SCHEMA_DIR, AvroCodec
from pipeline.serde_columnar import (
    FALLBACK,
    OK,
    SCHEMA,
    ColumnarDecoder,
    DecodedBatch,
    key_fingerprints,
)
from pipeline.simulate import Simulation, _varint
from tests.integration.faults import hostile
from tests.unit.test_schema_evolution import _record, _v2_schema

CODEC = AvroCodec()
KEY = bytes(range(16))
DECODER = ColumnarDecoder(CODEC, KEY)
NOW = 1_795_852_800_000
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
M64 = 2**64 - 1


# ---- a reference SipHash-2-4 in Python (the paper's algorithm, written independently) ----


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & M64


def siphash24(key: bytes, data: bytes) -> int:
    k0, k1 = struct.unpack("<QQ", key)
    v = [k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D]
    v += [k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573]

    def rounds(count: int) -> None:
        for _ in range(count):
            v[0] = (v[0] + v[1]) & M64
            v[1] = _rotl(v[1], 13) ^ v[0]
            v[0] = _rotl(v[0], 32)
            v[2] = (v[2] + v[3]) & M64
            v[3] = _rotl(v[3], 16) ^ v[2]
            v[0] = (v[0] + v[3]) & M64
            v[3] = _rotl(v[3], 21) ^ v[0]
            v[2] = (v[2] + v[1]) & M64
            v[1] = _rotl(v[1], 17) ^ v[2]
            v[2] = _rotl(v[2], 32)

    tail = len(data) % 8
    padded = data[: len(data) - tail] + data[len(data) - tail :].ljust(7, b"\x00")
    words = [*struct.unpack(f"<{len(data) // 8}Q", padded[: len(data) - tail])]
    words.append(int.from_bytes(padded[len(data) - tail :], "little") | (len(data) % 256) << 56)
    for m in words:
        v[3] ^= m
        rounds(2)
        v[0] ^= m
    v[2] ^= 0xFF
    rounds(4)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def test_reference_siphash_matches_the_papers_vectors() -> None:
    # SipHash paper, appendix A: key 00..0f; message 00..0e; and the empty message
    assert siphash24(bytes(range(16)), bytes(range(15))) == 0xA129CA6149BE45E5
    assert siphash24(bytes(range(16)), b"") == 0x726FDB47DD0E0E31


def test_compiled_siphash_matches_the_reference() -> None:
    rng = random.Random(1)
    for n in [*range(70), 1000, 4097]:
        key, data = rng.randbytes(16), rng.randbytes(n)
        assert _avrocol.siphash24(key, data) == siphash24(key, data)


# ---- helpers ------------------------------------------------------------------------


def body_of(value: bytes) -> bytes:
    return value[10:] if value[:2] == MAGIC else value[5:]


def rows_of(batch: DecodedBatch) -> list[dict[str, Any]]:
    rows = batch.table.to_pylist()
    for row in rows:
        row["attributes"] = dict(row["attributes"])
    return rows


def check_against_fastavro(
    values: Sequence[bytes | None],
    decoder: ColumnarDecoder = DECODER,
    codec: AvroCodec = CODEC,
) -> DecodedBatch:
    """Decode ``values`` both ways; every OK row must be fastavro's record exactly, with
    the documented payload hash and key fingerprint. Returns the batch."""
    batch = decoder.decode(values)
    batch.table.validate(full=True)
    assert batch.table.schema == SCHEMA
    assert batch.table.num_rows == len(values)
    assert batch.status.dtype == np.uint8 and set(batch.status) <= {OK, FALLBACK}
    assert batch.payload_hash.dtype == np.int64 and batch.key_fp.dtype == np.uint64
    assert batch.status.flags.writeable and batch.key_fp.flags.writeable
    table_rows = batch.table.to_pylist()
    fps = key_fingerprints(batch.table["reporting_carrier"], batch.table["event_id"], KEY)
    for i, value in enumerate(values):
        if batch.status[i] == FALLBACK:
            assert batch.payload_hash[i] == 0 and batch.key_fp[i] == 0
            continue
        assert value is not None
        expected = codec.decode(value)  # raises if the fast path accepted a bad message
        row = table_rows[i]
        # attribute order is content (it is hashed): compare it as a list of pairs
        assert row.pop("attributes") == list(expected.pop("attributes").items())
        assert row == expected
        phash = _avrocol.siphash24(KEY, body_of(value))  # checked against the reference below
        assert int(batch.payload_hash[i]) == phash - (1 << 64 if phash >> 63 else 0)
        key = (row["reporting_carrier"] + "\x1f" + row["event_id"]).encode()
        assert int(batch.key_fp[i]) == _avrocol.siphash24(KEY, key) == int(fps[i])
    return batch


# ---- valid events ---------------------------------------------------------------------


def test_every_shipped_schema_version_is_read_as_fastavro_reads_it() -> None:
    versions = [p.stem.split(".")[-1] for p in SCHEMA_DIR.glob("usage_event.v*.avsc")]
    assert "v1" in versions
    for version in versions:
        codec = AvroCodec(write_version=version)
        values = [codec.encode(hostile.valid_record(i, NOW)) for i in range(50)]
        batch = check_against_fastavro(values, ColumnarDecoder(codec, KEY), codec)
        assert list(batch.status) == [OK] * len(values)


def test_simulated_traffic_is_all_ok_but_undecodable_garbage() -> None:
    sim = Simulation(seed=3, now_ms=NOW)
    messages = list(sim.messages(3000, dup_rate=0.02, bad_rate=0.05))
    batch = check_against_fastavro([m.value for m in messages])
    for m, status in zip(messages, batch.status, strict=True):
        assert (status == FALLBACK) == (m.reason in ("undecodable", "unknown_schema"))


_text = st.text(st.characters(codec="utf-8"), max_size=40)  # astral chars, NUL, empty
_long = st.one_of(st.integers(INT64_MIN, INT64_MAX), st.sampled_from(hostile.EXTREME_INTS))


@st.composite
def records(draw: st.DrawFn) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    for name, ftype in [(f["name"], f["type"]) for f in hostile.V1["fields"]]:
        if name == "attributes":
            rec[name] = draw(st.dictionaries(_text, _text, max_size=70))
        elif isinstance(ftype, list):
            inner = _text if ftype[1] == "string" else _long
            rec[name] = draw(st.one_of(st.none(), inner))
        elif ftype == "string":
            rec[name] = draw(_text)
        else:
            rec[name] = draw(_long)
    return rec


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records(), min_size=1, max_size=8))
def test_random_valid_records_decode_exactly(recs: list[dict[str, Any]]) -> None:
    values = [CODEC.encode(r) for r in recs]
    batch = check_against_fastavro(values)
    assert list(batch.status) == [OK] * len(values)
    # the payload hash follows the bytes: equal for identical bodies, else different
    for i in range(len(values)):
        for j in range(len(values)):
            same = values[i] == values[j]
            assert (batch.payload_hash[i] == batch.payload_hash[j]) == same


def test_map_entry_order_is_content_and_repeated_keys_go_to_fastavro() -> None:
    a = CODEC.encode(hostile.valid_record(1, NOW, attributes={"x": "1", "y": "2"}))
    b = CODEC.encode(hostile.valid_record(1, NOW, attributes={"y": "2", "x": "1"}))
    batch = check_against_fastavro([a, b])
    assert list(batch.status) == [OK, OK]
    assert batch.payload_hash[0] != batch.payload_hash[1]
    assert batch.key_fp[0] == batch.key_fp[1]  # same dedup key
    # a map that names a key twice: fastavro keeps the last value, the fast path declines
    for n in (2, 40):
        entries = b"".join(_str(f"k{i}") + _str("v") for i in range(n - 1)) + _str("k0")
        entries += _str("last")
        value = _with_map(_long_bytes(n) + entries + b"\x00")
        assert list(check_against_fastavro([value]).status) == [FALLBACK]
        assert CODEC.decode(value)["attributes"]["k0"] == "last"


# ---- framing ----------------------------------------------------------------------------


def test_confluent_framing_for_registered_ids_only() -> None:
    registry = SchemaRegistryClient.new_client({"url": f"mock://{uuid.uuid4().hex}"})
    codec = AvroCodec()
    codec.use_registry(registry, "usage-events-value")
    framed = codec.encode_confluent(_record())
    plain = codec.encode(_record())
    schema_id = struct.unpack(">I", framed[1:5])[0]
    decoder = ColumnarDecoder(codec, KEY)
    before = check_against_fastavro([framed, plain], decoder, codec)
    assert list(before.status) == [FALLBACK, OK]  # the id is not known to be v1 yet
    decoder.register_confluent_id(schema_id)
    after = check_against_fastavro(
        [framed, plain, b"\x00" + struct.pack(">I", schema_id + 1) + framed[5:]], decoder, codec
    )
    assert list(after.status) == [OK, OK, FALLBACK]
    # the same content hashes the same in both framings
    assert after.payload_hash[0] == after.payload_hash[1]
    with pytest.raises(ValueError, match="schema id"):
        decoder.register_confluent_id(2**32)


def test_a_v2_event_falls_back_and_the_scalar_path_reads_it() -> None:
    worker = AvroCodec(extra_schemas={"v2": _v2_schema()}, write_version="v1")
    decoder = ColumnarDecoder(worker, KEY)
    producer = AvroCodec(extra_schemas={"v2": _v2_schema()}, write_version="v2")
    v2_event = producer.encode(_record(tool_calls=3))
    v1_event = CODEC.encode(_record())
    batch = check_against_fastavro([v2_event, v1_event], decoder, worker)
    assert list(batch.status) == [FALLBACK, OK]
    assert worker.decode(v2_event) == _record()  # the v1 reader drops tool_calls
    with pytest.raises(ValueError, match="layout"):
        ColumnarDecoder(producer, KEY)  # it writes v2: not the compiled layout


def test_scalar_rows_hash_like_the_fast_path() -> None:
    values = [CODEC.encode(hostile.valid_record(i, NOW)) for i in range(20)]
    batch = check_against_fastavro(values)
    for i, value in enumerate(values):
        expected = (int(batch.payload_hash[i]), int(batch.key_fp[i]))
        assert DECODER.scalar_hashes(CODEC.decode(value)) == expected
    # the same content from a v2 producer: the v1 reader's record hashes as the v1 event
    worker = AvroCodec(extra_schemas={"v2": _v2_schema()}, write_version="v1")
    producer = AvroCodec(extra_schemas={"v2": _v2_schema()}, write_version="v2")
    v1_event = ColumnarDecoder(worker, KEY).decode([CODEC.encode(_record())])
    from_v2 = worker.decode(producer.encode(_record(tool_calls=3)))
    scalar = ColumnarDecoder(worker, KEY).scalar_hashes(from_v2)
    assert scalar == (int(v1_event.payload_hash[0]), int(v1_event.key_fp[0]))


def test_values_that_are_not_bytes_fall_back() -> None:
    batch = DECODER.decode([None, CODEC.encode(_record()), bytearray(b"x")])  # type: ignore[list-item]
    assert list(batch.status) == [FALLBACK, OK, FALLBACK]
    assert DECODER.decode([]).table.num_rows == 0


def test_a_hash_key_must_be_16_bytes() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        ColumnarDecoder(CODEC, b"short")
    with pytest.raises(ValueError, match="16 bytes"):
        key_fingerprints(pa.array(["CMCC"]), pa.array(["e"]), b"x" * 17)


# ---- hostile bytes ----------------------------------------------------------------------


def _long_bytes(n: int) -> bytes:
    """An Avro long (zig-zag varint), also for values fastavro would not write."""
    return _varint(((n << 1) ^ (n >> 63)) & M64)


def _str(text: str) -> bytes:
    raw = text.encode()
    return _long_bytes(len(raw)) + raw


def _with_map(map_bytes: bytes) -> bytes:
    """A valid v1 event whose attributes (the last field) are ``map_bytes``."""
    value = CODEC.encode(hostile.valid_record(5, NOW, attributes={}))
    assert value.endswith(b"\x00")
    return value[:-1] + map_bytes


def test_negative_block_counts_with_their_byte_size() -> None:
    block = _str("k1") + _str("v1") + _str("k2") + _str("v2")
    good = _with_map(_long_bytes(-2) + _long_bytes(len(block)) + block + b"\x00")
    two_blocks = _with_map(
        _long_bytes(-1) + _long_bytes(6) + block[:6] + _long_bytes(1) + block[6:] + b"\x00"
    )
    batch = check_against_fastavro([good, two_blocks])
    assert list(batch.status) == [OK, OK]
    assert rows_of(batch)[0]["attributes"] == {"k1": "v1", "k2": "v2"}
    wrong_size = _with_map(_long_bytes(-2) + _long_bytes(len(block) + 1) + block + b"\x00")
    assert list(check_against_fastavro([wrong_size]).status) == [FALLBACK]


@pytest.mark.parametrize(
    "map_bytes",
    [
        _long_bytes(2**62) + _str("k") + _str("v") + b"\x00",  # huge count
        _long_bytes(INT64_MIN) + _long_bytes(4) + b"\x00",  # -count overflows
        _long_bytes(-(2**40)) + _long_bytes(2**40) + b"\x00",  # huge count and size
        _long_bytes(-1) + _long_bytes(-4) + _str("k") + _str("v") + b"\x00",  # negative size
        _long_bytes(1) + _long_bytes(2**62) + b"k" + _str("v") + b"\x00",  # huge key length
        _long_bytes(1) + _long_bytes(-1) + _str("v") + b"\x00",  # negative key length
        _long_bytes(1) + _str("k") + _long_bytes(INT64_MAX) + b"\x00",  # huge value length
        b"\x80" * 10 + b"\x00",  # an 11-byte varint
        b"\xff" * 9 + b"\x02",  # 10 bytes, but above 64 bits
        _long_bytes(1) + _str("k") + _str("v"),  # no closing block
    ],
)
def test_hostile_maps_fall_back_without_reading_or_allocating(map_bytes: bytes) -> None:
    batch = check_against_fastavro([_with_map(map_bytes)])
    assert list(batch.status) == [FALLBACK]


def test_hostile_string_lengths_and_unions_fall_back() -> None:
    value = CODEC.encode(hostile.valid_record(9, NOW))
    header_and_id = value[:10]
    rest = value[10 + len(_str("hostile-9")) :]
    cases = [
        header_and_id + _long_bytes(2**62) + b"x",  # event_id length far past the end
        header_and_id + _long_bytes(-3) + rest,  # negative length
        header_and_id + _long_bytes(INT64_MAX),
    ]
    # union branch 2 (or -1) for transaction_id
    rec = hostile.valid_record(9, NOW, transaction_id=None)
    plain = CODEC.encode(rec)
    cut = plain.index(b"\x00" + _str(rec["tenant_id"]))
    cases += [plain[:cut] + b"\x04" + plain[cut + 1 :], plain[:cut] + b"\x01" + plain[cut + 1 :]]
    batch = check_against_fastavro(cases)
    assert list(batch.status) == [FALLBACK] * len(cases)
    assert check_against_fastavro([plain]).status[0] == OK  # the unchanged event is fine


@pytest.mark.parametrize(
    ("varint", "status"),
    [
        (b"\xff" * 9 + b"\x01", OK),  # ten bytes for INT64_MIN: the longest valid varint
        (b"\xfe" + b"\xff" * 8 + b"\x01", OK),  # INT64_MAX
        (b"\x80\x00", OK),  # zero in two bytes: not minimal, still a valid varint
        (b"\xff" * 9 + b"\x02", FALLBACK),  # ten bytes, but above 64 bits
        (b"\x80" * 10 + b"\x00", FALLBACK),  # eleven bytes
    ],
)
def test_varint_limits(varint: bytes, status: int) -> None:
    rec = hostile.valid_record(3, NOW)
    value = CODEC.encode(rec)
    head = 10 + len(_str(rec["event_id"]))
    rest = value[head + len(_long_bytes(rec["event_time"])) :]
    batch = check_against_fastavro([value[:head] + varint + rest])
    assert list(batch.status) == [status]


def test_the_hostile_corpus() -> None:
    corpus = hostile.corpus(NOW, huge=200_000)
    values = [value for value, _, _ in corpus]
    batch = check_against_fastavro(values)
    for (_, expected, category), status in zip(corpus, batch.status, strict=True):
        if category in ("valid", "huge", "numbers", "unicode", "time"):
            assert status == OK, category  # valid Avro: the fast path must take it
        if expected in ("undecodable", "unknown_schema") or category == "invalid_utf8":
            assert status == FALLBACK, category


GOOD = [
    CODEC.encode(hostile.valid_record(i, NOW, attributes=attrs))
    for i, attrs in enumerate([{}, {"a": "b"}, {f"k{j}": "\U0001f600" * j for j in range(5)}])
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=6), st.sampled_from([b"", MAGIC]))
def test_random_bytes_never_crash(junk: list[bytes], prefix: bytes) -> None:
    framed = [prefix + CODEC.fingerprint + j if prefix else j for j in junk]
    check_against_fastavro(framed)


def test_truncation_at_every_length() -> None:
    for value in GOOD:
        cuts = [value[:n] for n in range(len(value))]
        batch = check_against_fastavro(cuts + [value + b"\x00"])  # and one trailing byte
        assert set(batch.status) == {FALLBACK}


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(range(len(GOOD))),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 7)), min_size=1, max_size=3),
)
def test_bit_flips_of_valid_messages(which: int, flips: list[tuple[int, int]]) -> None:
    value = bytearray(GOOD[which])
    for pos, bit in flips:
        value[10 + pos % (len(value) - 10)] ^= 1 << bit  # flip inside the body
    check_against_fastavro([bytes(value), GOOD[which]])


def test_random_bit_flips_in_bulk() -> None:
    rng = random.Random(5)
    values = []
    for _ in range(20_000):
        value = bytearray(rng.choice(GOOD))
        for _ in range(rng.randint(1, 3)):
            value[rng.randrange(len(value))] ^= 1 << rng.randrange(8)
        values.append(bytes(value))
    batch = check_against_fastavro(values)
    assert FALLBACK in batch.status and OK in batch.status


# ---- key fingerprints from Arrow columns -------------------------------------------------


def test_key_fingerprints_handle_slices_chunks_and_nulls() -> None:
    carriers = pa.array(["CMCC", None, "CTCC", "", "CUCC", "中国移动"])
    ids = pa.array(["e1", "e2", None, "", "\U0001f600", "e6"])
    fps = key_fingerprints(carriers, ids, KEY)
    assert fps.dtype == np.uint64
    for i, (c, e) in enumerate(zip(carriers.to_pylist(), ids.to_pylist(), strict=True)):
        want = 0 if c is None or e is None else siphash24(KEY, f"{c}\x1f{e}".encode())
        assert int(fps[i]) == want
    assert list(key_fingerprints(carriers[2:5], ids[2:5], KEY)) == list(fps[2:5])
    chunked = pa.chunked_array([carriers[:3], carriers[3:]])
    assert list(key_fingerprints(chunked, ids.cast(pa.large_string()), KEY)) == list(fps)
    assert len(key_fingerprints(pa.array([], pa.string()), pa.array([], pa.string()), KEY)) == 0
    with pytest.raises(ValueError, match="carriers"):
        key_fingerprints(carriers, ids[:2], KEY)
    with pytest.raises(TypeError, match="string"):
        key_fingerprints(pa.array([1]), pa.array(["e"]), KEY)
