"""Types of the compiled decoder (pipeline/_avrocol.c); used through pipeline.serde_columnar."""

from collections.abc import Sequence
from typing import Any

# (address, size, owner): memory filled by the C side, freed with owner
_Foreign = tuple[int, int, object]
# strings: (offsets: bytes, data: _Foreign, validity: bytes | None);
# longs: (values: bytes, validity: bytes | None)
_Column = tuple[Any, ...]
_MapColumns = tuple[bytes, _Foreign, _Foreign, _Foreign, _Foreign, int]
_StringBuffers = tuple[object, ...]

def decode(
    values: Sequence[bytes | None],
    fingerprint: bytes,
    confluent_ids: Sequence[int],
    hash_key: bytes,
) -> tuple[bytearray, bytearray, bytearray, tuple[_Column, ...], _MapColumns]: ...
def key_fingerprints(
    n: int, carriers: _StringBuffers, event_ids: _StringBuffers, hash_key: bytes
) -> bytearray: ...
def siphash24(hash_key: bytes, data: bytes) -> int: ...
