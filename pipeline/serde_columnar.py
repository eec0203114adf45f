"""Batch decode of usage events straight into Arrow columns (the worker's hot path).

``ColumnarDecoder.decode(values)`` takes a batch of Kafka message values and returns one
``DecodedBatch``: a ``pa.Table`` with one row per message (the 22 v1 fields in schema
order), a status per row, the payload hash and the dedup-key fingerprint, all from one
pass of compiled code (``pipeline._avrocol``, plain C against CPython's API).

What the fast path decodes, exactly: messages framed as Avro single-object encoding with
the codec's v1 fingerprint (``C3 01`` + fingerprint + body), or Confluent-framed (``00`` +
4-byte big-endian schema id + body) with an id registered by ``register_confluent_id``,
whose body is one complete v1 record (no trailing bytes, strict UTF-8 in every string,
union indexes 0/1, no negative lengths, varints of at most 10 bytes that fit int64; map
blocks with a negative count carry their byte size, which must match; no map key twice,
as fastavro keeps only the last of repeated keys). Such a row is
``OK`` and equal, field by field, to what ``AvroCodec.decode`` returns for it. Every other
row is ``FALLBACK`` (another writer schema, unregistered ids, truncated or hostile
bytes, a value that is not ``bytes``): the caller sends it through ``AvroCodec.decode``,
which gives the exact dead-letter reason. A FALLBACK row holds empty strings, zeros,
nulls and an empty map in the table.

Payload hash, definition version 2 (``PAYLOAD_HASH_VERSION``): keyed SipHash-2-4 (the
16-byte ``hash_key``) of the Avro body bytes (after the framing header), as a signed
int64 (two's complement of the 64-bit value). The same content written with the v1
schema gives the same hash in both framings; map entry order is part of the content.
Rows the scalar path decodes get theirs from ``ColumnarDecoder.scalar_hashes`` (the hash
of the record's v1 body as the codec writes it).

Key fingerprint: keyed SipHash-2-4 (same key) of ``utf8(reporting_carrier) + b"\\x1f" +
utf8(event_id)``, as uint64; ``key_fingerprints`` computes the same from Arrow columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.serde import V1_LAYOUT, AvroCodec, writer_layout

try:
    from pipeline import _avrocol
except ImportError as exc:  # a checkout used without installing: say how to build it
    raise ImportError(
        "pipeline._avrocol (the compiled decoder, pipeline/_avrocol.c) is not built: run "
        "`make setup`, or `pip install -e .` (needs a C compiler)"
    ) from exc

OK, FALLBACK = 0, 1
PAYLOAD_HASH_VERSION = 2
_NULLABLE = frozenset(name for name, ftype in V1_LAYOUT if isinstance(ftype, list))
_ARROW_TYPE: dict[str, pa.DataType] = {
    "string": pa.string(),
    "long": pa.int64(),
    "map": pa.map_(pa.string(), pa.string()),
}


def _arrow_type(ftype: object) -> pa.DataType:
    if isinstance(ftype, list):  # ["null", T]
        return _ARROW_TYPE[ftype[1]]
    if isinstance(ftype, dict):
        return _ARROW_TYPE[ftype["type"]]
    return _ARROW_TYPE[str(ftype)]


SCHEMA = pa.schema(
    [pa.field(name, _arrow_type(ftype), nullable=name in _NULLABLE) for name, ftype in V1_LAYOUT]
)


def _check_key(hash_key: bytes) -> bytes:
    if not isinstance(hash_key, bytes) or len(hash_key) != 16:
        raise ValueError("hash_key must be 16 bytes (the SipHash-2-4 key)")
    return hash_key


@dataclass(frozen=True)
class DecodedBatch:
    """The decoded batch, one row per input message, in input order.

    ``table``: the 22 v1 fields (``SCHEMA``); ``status``: uint8, ``OK`` or ``FALLBACK``;
    ``payload_hash``: int64 (0 for FALLBACK rows); ``key_fp``: uint64 fingerprint of the
    dedup key (0 for FALLBACK rows). The numpy arrays are writable (e.g. to fill in the
    FALLBACK rows once the scalar path has decoded them).
    """

    table: pa.Table
    status: np.ndarray
    payload_hash: np.ndarray
    key_fp: np.ndarray


class ColumnarDecoder:
    """Decodes batches of usage events written with ``codec``'s writer schema (which
    must have the v1 layout) into Arrow columns. ``hash_key``: 16 bytes, the SipHash
    key of the payload hash and the key fingerprint. Raises ``ValueError`` for another
    layout or key size."""

    def __init__(self, codec: AvroCodec, hash_key: bytes) -> None:
        if writer_layout(codec) != V1_LAYOUT:
            raise ValueError(
                f"ColumnarDecoder: the codec writes usage_event {codec.write_version}, whose "
                "layout is not v1's; only the v1 layout is compiled"
            )
        self._codec = codec
        self._fingerprint = codec.fingerprint
        self._key = _check_key(hash_key)
        self._confluent_ids: tuple[int, ...] = ()

    def register_confluent_id(self, schema_id: int) -> None:
        """Accept Confluent-framed messages with ``schema_id`` (a registry id whose schema
        has v1's parsing canonical form). Raises ``ValueError`` outside 0..2**32-1."""
        if not 0 <= schema_id < 2**32:
            raise ValueError(f"Confluent schema id {schema_id} is outside 0..2**32-1")
        if schema_id not in self._confluent_ids:
            self._confluent_ids = (*self._confluent_ids, schema_id)

    def decode(self, values: Sequence[bytes]) -> DecodedBatch:
        """Decode ``values`` (message bytes) in one compiled pass; see the module doc."""
        n = len(values)
        status, phash, kfp, cols, mapcols = _avrocol.decode(
            values, self._fingerprint, self._confluent_ids, self._key
        )
        arrays: list[pa.Array] = []
        for field, col in zip(SCHEMA, cols, strict=False):
            if field.type == pa.string():
                offsets, data, valid = col
                arrays.append(
                    pa.Array.from_buffers(
                        pa.string(), n, [_buf(valid), pa.py_buffer(offsets), _foreign(data)]
                    )
                )
            else:
                values_buf, valid = col
                arrays.append(
                    pa.Array.from_buffers(pa.int64(), n, [_buf(valid), pa.py_buffer(values_buf)])
                )
        moffsets, koffsets, kdata, voffsets, vdata, entries = mapcols
        keys = pa.Array.from_buffers(
            pa.string(), entries, [None, _foreign(koffsets), _foreign(kdata)]
        )
        items = pa.Array.from_buffers(
            pa.string(), entries, [None, _foreign(voffsets), _foreign(vdata)]
        )
        offsets = pa.Array.from_buffers(pa.int32(), n + 1, [None, pa.py_buffer(moffsets)])
        arrays.append(pa.MapArray.from_arrays(offsets, keys, items, type=SCHEMA[-1].type))
        return DecodedBatch(
            table=pa.Table.from_arrays(arrays, schema=SCHEMA),
            status=np.frombuffer(status, dtype=np.uint8),
            payload_hash=np.frombuffer(phash, dtype=np.int64),
            key_fp=np.frombuffer(kfp, dtype=np.uint64),
        )

    def scalar_hashes(self, record: dict[str, Any]) -> tuple[int, int]:
        """``(payload_hash, key_fp)`` of a record the scalar path decoded (a FALLBACK row
        that ``AvroCodec.decode`` accepted), by the same definitions as the fast path: the
        payload hash of the record's v1 body as the codec writes it, so an event sent with
        another schema version or framing hashes like the same content sent as v1.
        Raises ``ValueError`` for a record that does not fit the v1 schema."""
        phash = _avrocol.siphash24(self._key, self._codec.encode_body(record))
        key = f"{record['reporting_carrier']}\x1f{record['event_id']}".encode()
        return phash - (1 << 64 if phash >> 63 else 0), _avrocol.siphash24(self._key, key)


def _buf(data: bytes | None) -> pa.Buffer | None:
    return None if data is None else pa.py_buffer(data)


def _foreign(spec: tuple[int, int, object]) -> pa.Buffer:
    """An Arrow buffer over memory the C side filled: (address, size, owner), no copy;
    ``owner`` frees it when the buffer goes."""
    address, size, owner = spec
    return pa.foreign_buffer(address, size, base=owner) if size else pa.py_buffer(b"")


def _string_buffers(array: pa.Array | pa.ChunkedArray, name: str) -> tuple[object, ...]:
    """(validity, offsets, data, offset) of a utf8 array, for the C side."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if array.type != pa.string():
        if not pa.types.is_large_string(array.type):
            raise TypeError(f"{name}: expected an Arrow string array, got {array.type}")
        array = array.cast(pa.string())
    validity, offsets, data = array.buffers()
    return (validity, offsets, data, array.offset)


def key_fingerprints(
    carriers: pa.Array | pa.ChunkedArray, event_ids: pa.Array | pa.ChunkedArray, hash_key: bytes
) -> np.ndarray:
    """uint64 per row: the key fingerprint ``ColumnarDecoder`` gives ``key_fp``, from
    the ``reporting_carrier`` and ``event_id`` string columns (0 where either is null).
    Raises ``ValueError`` for arrays of different lengths or a key that is not 16 bytes."""
    if len(carriers) != len(event_ids):
        raise ValueError(
            f"key_fingerprints: {len(carriers)} carriers but {len(event_ids)} event ids"
        )
    out = _avrocol.key_fingerprints(
        len(carriers),
        _string_buffers(carriers, "carriers"),
        _string_buffers(event_ids, "event_ids"),
        _check_key(hash_key),
    )
    return np.frombuffer(out, dtype=np.uint64)
