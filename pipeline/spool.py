"""A bounded on-disk spool for the producer SDK: what Kafka could not take, kept safe.

When the broker is unreachable, ``UsageProducer.flush`` writes the messages it could not
deliver to the spool (fsynced) instead of failing, and reports them as accepted. The
spool is drained back to Kafka as soon as the broker answers again, by the same producer
or by the next process that opens the same spool directory. Nothing reported as
accepted is lost when the process is killed: it is either acknowledged by Kafka or on
disk. Draining may re-send a message whose acknowledgement was lost; the worker's
deduplication (same event id, same content) drops such copies.

Format: segment files ``<seq>.spool`` of records ``[u32 key length][key][u32 value
length][value]``; a segment is deleted once every record in it was acknowledged.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

from pipeline.settings import private_dir

_LEN = struct.Struct(">I")
_NO_KEY = 0xFFFFFFFF


class SpoolFullError(Exception):
    """The spool reached its size limit: the caller must slow down (nothing is dropped)."""


class Spool:
    """Append-only segments of (key, value) records under ``directory``."""

    def __init__(self, directory: Path, max_bytes: int = 1 << 30) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        private_dir(directory)  # raw usage events

    def segments(self) -> list[Path]:
        """Segment files, oldest first."""
        return sorted(self.directory.glob("*.spool"), key=lambda p: int(p.stem))

    def size(self) -> int:
        """Bytes on disk."""
        return sum(p.stat().st_size for p in self.segments())

    def __len__(self) -> int:
        return sum(1 for seg in self.segments() for _ in self.read(seg))

    def append(self, records: list[tuple[bytes | None, bytes]]) -> Path:
        """Write records as one new segment and fsync it. Raises ``SpoolFullError``."""
        body = bytearray()
        for key, value in records:
            body += _LEN.pack(_NO_KEY) if key is None else _LEN.pack(len(key)) + key
            body += _LEN.pack(len(value)) + value
        with self._lock:
            if self.size() + len(body) > self.max_bytes:
                raise SpoolFullError(
                    f"the producer spool at {self.directory} is full ({self.max_bytes:,} bytes); "
                    "Kafka has been unreachable for too long"
                )
            existing = self.segments()
            seq = int(existing[-1].stem) + 1 if existing else 1
            tmp = self.directory / f"{seq}.tmp"
            # raw usage events: owner-only whatever the producer's umask
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(body)
                fh.flush()
                os.fsync(fh.fileno())
            path = self.directory / f"{seq}.spool"
            os.replace(tmp, path)  # a segment appears whole or not at all
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return path

    @staticmethod
    def read(segment: Path) -> Iterator[tuple[bytes | None, bytes]]:
        """The records of one segment."""
        data = segment.read_bytes()
        pos = 0
        while pos < len(data):
            (klen,) = _LEN.unpack_from(data, pos)
            pos += 4
            key = None if klen == _NO_KEY else data[pos : pos + klen]
            pos += 0 if klen == _NO_KEY else klen
            (vlen,) = _LEN.unpack_from(data, pos)
            pos += 4
            yield key, data[pos : pos + vlen]
            pos += vlen

    def remove(self, segment: Path) -> None:
        """Delete a segment whose records were all acknowledged."""
        with self._lock:
            segment.unlink(missing_ok=True)
