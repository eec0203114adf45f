"""Dead letters: every rejected input, built, redacted and cut in one place.

A dead letter carries the reason, the stage, a sentence naming the field, the input
(the decoded record as JSON with the subscriber pseudonymised, or the raw bytes with
anything that looks like a mobile number pseudonymised) and the input's source position
(topic, partition, offset). The worker sends letters to the dead-letter topic, and
mirrors that topic into the ``dead_letters`` table exactly once (``first_copies`` and
the sink's marks by source position).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.events import Rejection, is_pseudonym, pseudonymise, record_to_json


class Source(Protocol):
    """Where an input came from (``RawMessage`` is one): its position and bytes."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp_ms(self) -> int: ...
    @property
    def value(self) -> bytes: ...


@dataclass(slots=True)
class DeadLetter:
    """A rejected input, ready for the dead-letter topic and table."""

    reason: str
    stage: str
    detail: str
    payload: bytes
    payload_format: str  # "json" or "raw"
    topic: str
    partition: int
    offset: int
    failed_at_ms: int
    event_id: str | None = None
    reporting_carrier: str | None = None
    tenant_id: str | None = None
    event_time_ms: int | None = None

    def to_avro(self) -> dict[str, Any]:
        """The record for ``schemas/avro/dead_letter.v1.avsc``."""
        return {
            "reason": self.reason,
            "stage": self.stage,
            "detail": self.detail,
            "event_id": self.event_id,
            "reporting_carrier": self.reporting_carrier,
            "tenant_id": self.tenant_id,
            "event_time": self.event_time_ms,
            "payload": self.payload,
            "payload_format": self.payload_format,
            "source_topic": self.topic,
            "source_partition": self.partition,
            "source_offset": self.offset,
            "failed_at": self.failed_at_ms,
        }


def _str_or_none(value: Any) -> str | None:
    return value[:256] if isinstance(value, str) else None


# DateTime64(3) holds 1900-01-01 .. 2299-12-31; a hostile timestamp outside stays in the
# payload but not in the event_time column.
_MIN_MS, _MAX_MS = -2_208_988_800_000, 10_413_791_999_000


def _storable_time(value: Any) -> bool:
    return isinstance(value, int) and _MIN_MS <= value <= _MAX_MS


def dead_letter_for(msg: Source, rejection: Rejection, record: dict[str, Any] | None) -> DeadLetter:
    """Build the dead letter for a message; a decoded record is kept as JSON (already
    pseudonymised by the caller), undecodable bytes as they came."""
    if record is None:
        payload, fmt = msg.value, "raw"
    else:
        payload = json.dumps(record_to_json(record), ensure_ascii=False, default=str).encode()
        fmt = "json"
    event_time = record.get("event_time") if record else None
    return DeadLetter(
        reason=rejection.reason.value,
        stage=rejection.stage.value,
        detail=rejection.detail,
        payload=payload,
        payload_format=fmt,
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        failed_at_ms=msg.timestamp_ms,
        event_id=_str_or_none(record.get("event_id")) if record else None,
        reporting_carrier=_str_or_none(record.get("reporting_carrier")) if record else None,
        tenant_id=_str_or_none(record.get("tenant_id")) if record else None,
        event_time_ms=event_time if _storable_time(event_time) else None,
    )


def letter_from_rejection(msg: Source, rejection: Rejection) -> DeadLetter:
    return DeadLetter(
        reason=rejection.reason.value,
        stage=rejection.stage.value,
        detail=rejection.detail,
        payload=msg.value,
        payload_format="raw",
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        failed_at_ms=msg.timestamp_ms,
    )


# Chinese mobile numbers, also behind the country code (+86, 0086, 86); a raw payload kept
# for a dead letter has them pseudonymised. No digit boundaries: in Avro bytes the next
# field's length or text may be a digit, and a longer digit run that happens to contain
# such a number is better over-redacted than leaked (found by the hostile-input fuzz).
_PHONE = re.compile(r"(?:\+?86|0086)?(1[3-9]\d{9})")
# A run of digits (ASCII or full-width), single spaces or hyphens between them, an
# optional leading + : how a mobile number is written by people and gateways
# (13600136000, 136 0013 6000, +86-136-0013-6001, full-width digits).
_DIGITS = "0-9\uff10-\uff19"
_RUN = re.compile(f"[+\uff0b]?[{_DIGITS}](?:[{_DIGITS}]|[ -](?=[{_DIGITS}])){{10,}}")
_FOLD = {0xFF10 + d: ord("0") + d for d in range(10)} | {0xFF0B: ord("+")}  # full width
# what a phone-like run looks like to Arrow's RE2 (the columnar path's first filter)
PHONE_LIKE = "[0-9\uff10-\uff19]([ -]?[0-9\uff10-\uff19]){10}"


def redact_text(text: str, key: bytes, within_runs: bool = False) -> str:
    """Every mobile number in ``text`` (with its country code, separators or full-width
    digits) replaced by the pseudonym of its 11 digits. A run of digits must be a number
    as a whole (an epoch time in a sentence is not one), unless ``within_runs``: in Avro
    bytes the next field's length may be a digit, and there a longer run that contains a
    number is better over-redacted than leaked. Pseudonyms are kept."""
    if is_pseudonym(text):
        return text

    def run(m: re.Match[str]) -> str:
        plain = m.group(0).translate(_FOLD).replace(" ", "").replace("-", "")
        if not within_runs:
            whole = _PHONE.fullmatch(plain)
            return pseudonymise(whole.group(1), key) if whole else m.group(0)
        done = _PHONE.sub(lambda p: pseudonymise(p.group(1), key), plain)
        return m.group(0) if done == plain else done

    return _RUN.sub(run, text)


def redact_phone_numbers(payload: bytes, key: bytes) -> bytes:
    """``redact_text`` for raw bytes (not UTF-8 bytes pass through unchanged)."""
    text = payload.decode("utf-8", "surrogateescape")
    return redact_text(text, key, within_runs=True).encode("utf-8", "surrogateescape")


# Free-text fields a gateway fills as it likes; ids that carry identity (event_id: the
# dedup key; tenant_id: the account quotas and bills are kept under) are left as sent.
FREE_TEXT = ("source_id", "transaction_id", "channel", "provider", "region")


def redact_record(record: dict[str, Any], key: bytes) -> None:
    """``redact_text`` on a record's free-text fields and attributes, in place (what a
    producer sends and what the worker stores)."""
    for name in FREE_TEXT:
        value = record.get(name)
        if isinstance(value, str):
            record[name] = redact_text(value, key)
    attributes = record.get("attributes")
    if isinstance(attributes, dict):
        record["attributes"] = {
            redact_text(k, key): redact_text(v, key) if isinstance(v, str) else v
            for k, v in attributes.items()
        }


def redact_json(value: Any, key: bytes) -> Any:
    """``redact_text`` on every string of a decoded JSON value (keys included), and a
    whole number that reads as a mobile number replaced by its pseudonym."""
    if isinstance(value, str):
        return redact_text(value, key)
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        text = str(value)
        done = redact_text(text, key)
        return value if done == text else done
    if isinstance(value, list):
        return [redact_json(v, key) for v in value]
    if isinstance(value, dict):
        return {redact_json(k, key): redact_json(v, key) for k, v in value.items()}
    return value


# A dead letter is one Kafka message, and librdkafka refuses a message over its
# message.max.bytes (1,000,000 by default) at once: a batch with such a letter could never
# be stored, and the worker would stop on it at every replay. An input near the usage
# topic's own limit, or one whose JSON form is longer than its Avro (a NUL is one byte in
# Avro and six in JSON), would not fit, so a longer payload is cut to this many bytes.
MAX_DEAD_LETTER_PAYLOAD = 900_000


def prepare_dead_letter(letter: DeadLetter, key: bytes) -> DeadLetter:
    """Make ``letter`` ready for the dead-letter topic, in place: every mobile number
    pseudonymised (``redact_text``) in its payload, raw or JSON, its detail and its
    event_id/carrier/tenant fields; and a payload over ``MAX_DEAD_LETTER_PAYLOAD`` bytes
    cut to that, which its detail then says (the whole input stays at its source
    position)."""
    raw = letter.payload_format == "raw"
    if raw:
        letter.payload = redact_phone_numbers(letter.payload, key)
    elif _RUN.search(letter.payload.decode("utf-8", "surrogateescape")):
        try:
            decoded = json.loads(letter.payload)
        except ValueError:  # not JSON after all: redact it as text
            letter.payload = redact_phone_numbers(letter.payload, key)
        else:
            letter.payload = json.dumps(redact_json(decoded, key), ensure_ascii=False).encode()
    letter.detail = redact_text(letter.detail, key)
    for name in ("event_id", "reporting_carrier", "tenant_id"):
        value = getattr(letter, name)
        if value is not None:
            setattr(letter, name, redact_text(value, key))
    size = len(letter.payload)
    if size > MAX_DEAD_LETTER_PAYLOAD:
        letter.payload = letter.payload[:MAX_DEAD_LETTER_PAYLOAD]
        if raw:  # the cut may have left the first 11 digits of a longer number
            letter.payload = redact_phone_numbers(letter.payload, key)
        letter.detail += (
            f" (payload cut to its first {MAX_DEAD_LETTER_PAYLOAD:,} of {size:,} bytes)"
        )
    return letter


def first_copies(letters: list[DeadLetter]) -> list[DeadLetter]:
    """The letters of a batch read back from the dead-letter topic, without the copies a
    replayed upstream batch sent again.

    One source partition's letters share one dead-letter partition (keyed by source
    position), so they arrive in source order, and a copy always comes after letters
    at a later or equal source offset: keep a letter only if its source offset is above
    every offset of its source already kept in this batch. (The sink's marks drop the
    copies of what earlier batches stored; this drops those within one batch. A copy
    within one batch made ``dead_letters`` count a letter twice after a SIGKILL:
    tests/integration/faults/test_worker_kills.py.)"""
    highest: dict[tuple[str, int], int] = {}
    kept = []
    for letter in letters:
        pos = (letter.topic, letter.partition)
        if letter.offset <= highest.get(pos, -1):
            continue
        highest[pos] = letter.offset
        kept.append(letter)
    return kept
