"""Types of the compiled decoder (pipeline/_avrocol.c); used through pipeline.serde_columnar."""

from collections.abc import Sequence

# strings: (offsets, data, validity or None); longs: (values, validity or None)
_Column = tuple[bytes | None, ...]
_MapColumns = tuple[bytes, bytes, bytes, bytes, bytes, int]
_StringBuffers = tuple[object, ...]

def decode(
    values: Sequence[bytes | None],
    fingerprint: bytes,
    confluent_ids: Sequence[int],
    hash_key: bytes,
) -> tuple[bytes, bytes, bytes, tuple[_Column, ...], _MapColumns]: ...
def key_fingerprints(
    n: int, carriers: _StringBuffers, event_ids: _StringBuffers, hash_key: bytes
) -> bytes: ...
def siphash24(hash_key: bytes, data: bytes) -> int: ...
