"""Bad lines refused by ``tokenmeter produce`` still become dead letters.

They go to the dead-letter topic like every other rejected input, positioned at
``file:<content hash>:<file name>``, partition 0, offset = line number. Sending the
same file twice therefore yields the same positions, and the table mirror stores each
bad line once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.dead_letters import DeadLetter, prepare_dead_letter
from pipeline.events import is_pseudonym, now_ms, pseudonymise
from pipeline.produce import LineProblem
from pipeline.serde import AvroCodec
from pipeline.settings import Settings


def file_position(path: Path) -> str:
    """The pseudo-topic naming a file by its content."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return f"file:{digest.hexdigest()[:12]}:{path.name}"


class FileRejects:
    """Collects a file's bad lines and sends them to the dead-letter topic."""

    def __init__(self, settings: Settings, path: Path) -> None:
        from confluent_kafka import Producer

        from pipeline.produce import producer_config

        self.settings = settings
        self.path = path
        self.position = file_position(path)
        self.key = settings.pseudonym_secret()
        self.codec = AvroCodec("dead_letter")
        self._lines: dict[int, bytes] = {}
        self._letters: list[DeadLetter] = []
        self._producer = Producer(producer_config(settings))
        self._size_read = 0

    def bytes_read(self) -> int:
        """Progress helper: bytes of the file seen so far (approximate)."""
        return self._size_read

    def add(self, problem: LineProblem) -> None:
        """Record one bad line (its text is read back from the file at flush)."""
        self._letters.append(
            DeadLetter(
                reason=problem.reason,
                stage="produce",
                detail=f"line {problem.line}: {problem.detail}",
                payload=b"",
                payload_format="raw",
                topic=self.position,
                partition=0,
                offset=problem.line,
                failed_at_ms=now_ms(),
            )
        )

    def _payloads(self) -> dict[int, bytes]:
        wanted = {d.offset for d in self._letters}
        found: dict[int, bytes] = {}
        with self.path.open("rb") as fh:
            for number, line in enumerate(fh, start=1):
                if number in wanted:
                    found[number] = line.rstrip(b"\r\n")
        return found

    def _clean(self, line: bytes) -> tuple[bytes, str]:
        try:
            obj = json.loads(line)
        except ValueError:
            return line, "raw"
        if isinstance(obj, dict):
            sub = obj.get("subscriber_id")
            if isinstance(sub, str) and not is_pseudonym(sub):
                obj["subscriber_id"] = pseudonymise(sub, self.key)
            return json.dumps(obj, ensure_ascii=False).encode(), "json"
        return line, "raw"

    def flush(self) -> int:
        """Send the collected dead letters and wait for the broker. Returns how many."""
        if not self._letters:
            return 0
        payloads = self._payloads()
        for letter in self._letters:
            letter.payload, letter.payload_format = self._clean(payloads.get(letter.offset, b""))
            prepare_dead_letter(letter, self.key)  # numbers in detail and fields too
            self._producer.produce(
                self.settings.topic_dead_letters,
                self.codec.encode(letter.to_avro()),
                f"{letter.topic}:0".encode(),
            )
        remaining = self._producer.flush(60)
        if remaining:
            from pipeline.produce import DeliveryError

            raise DeliveryError([f"{remaining} dead letter(s) not delivered"])
        return len(self._letters)
