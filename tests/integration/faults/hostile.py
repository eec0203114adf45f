"""Hostile inputs for the decoder and validator, and what the contract says becomes of them.

Shared by the hypothesis properties and the Kafka corpus in ``test_hostile_input.py``.
Every input is one valid event with one thing made hostile (or bytes that are no event
at all), so its fate is known from the contract alone: ``expected_reason`` restates
contract section 1 for one changed field, independently of ``pipeline.events``.
"""

from __future__ import annotations

import copy
import io
import random
import struct
from collections.abc import Callable
from typing import Any

import fastavro

from pipeline.serde import MAGIC, AvroCodec, schema_fingerprint

CODEC = AvroCodec()
V1: dict[str, Any] = CODEC.schema("v1")
PHONE = "13900139000"  # the raw subscriber number that must never be stored
SUBSCRIBERS = (PHONE, "+86" + PHONE, "0086" + PHONE, "86" + PHONE)  # as gateways write it
MAX_TOKENS = 10_000_000
LATENESS_MS = 35 * 86_400_000
SKEW_MS = 5 * 60_000
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# DateTime64(3) as ClickHouse stores it: 1900-01-01 .. 2299-12-31 23:59:59.999
DT64_MIN_MS, DT64_MAX_MS = -2_208_988_800_000, 10_413_792_000_000 - 1

CARRIERS = ("CMCC", "CTCC", "CUCC")
ENUMS: dict[str, frozenset[str]] = {
    "source": frozenset({"gateway", "terminal"}),
    "reporting_carrier": frozenset(CARRIERS),
    "home_carrier": frozenset(CARRIERS),
    "serving_carrier": frozenset(CARRIERS),
    "status": frozenset({"ok", "timeout", "rate_limited", "error", "failover"}),
    "routing_policy": frozenset({"cost_first", "quality_first", "balanced"}),
}
STRING_FIELDS = (
    "event_id", "source", "source_id", "reporting_carrier", "home_carrier",
    "serving_carrier", "transaction_id", "tenant_id", "subscriber_id", "channel",
    "model_id", "provider", "status", "routing_policy", "region",
)  # fmt: skip
TOKEN_FIELDS = ("input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens")
# models with a price line on every carrier in config/price_cards
PRICED_MODELS = ("deepseek-v3", "qwen-max", "doubao-pro", "kimi-k2", "glm-4.6")

# Strings that break naive text handling. None is over 256 characters unless named so.
UNICODE_EDGES: tuple[str, ...] = (
    "\x00",
    "id\x00with\x00nul",
    "\u200f\u202eevil-rtl\u202c",  # RTL mark, right-to-left override
    "e" + "\u0301" * 60,  # one grapheme cluster of 61 code points
    "e" + "\u0301" * 300,  # one grapheme cluster longer than any field allows
    "\U0001f469\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466",  # ZWJ family emoji
    "\U0001f1e8\U0001f1f3" * 20,  # flags
    "\ufeffbom",
    "\uffff\U0010ffff",
    "\u2028\u2029\x85",
    "\u3000",  # ideographic space only
    " \t\n",
    '"quoted\\back\\slash"',
    "NaN",
    "-inf",
    "中国移动",
    "\x1f\x1e",  # the separators used inside dedup keys and payload hashes
)
# Byte sequences that are not UTF-8, put inside an Avro string: the decoder must refuse.
INVALID_UTF8: tuple[bytes, ...] = (
    b"\xed\xa0\x80",  # a UTF-16 surrogate encoded as if it were a character
    b"\xed\xbf\xbf",
    b"\xc0\xaf",  # overlong '/'
    b"\xff",
    b"\x80",
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\xe4\xb8",  # cut in the middle of a character
)
EXTREME_TIMES_ABS: tuple[int, ...] = (
    INT64_MIN, INT64_MIN + 1, INT64_MAX, 0, -1, 1,
    DT64_MIN_MS, DT64_MIN_MS - 1, DT64_MAX_MS, DT64_MAX_MS + 1,
    253_402_300_799_999, 253_402_300_800_000,  # Python datetime's year 9999 limit
    -62_135_596_800_000, -62_135_596_800_001,  # year 1
    10**15, -(10**15), 2**53, -(2**53),
)  # fmt: skip
EXTREME_INTS: tuple[int, ...] = (
    INT64_MIN, INT64_MIN + 1, -(2**31), -1, 0, 1, MAX_TOKENS, MAX_TOKENS + 1,
    2**31 - 1, 2**32, INT64_MAX - 1, INT64_MAX,
)  # fmt: skip


def valid_record(i: int, now_ms: int, **changes: Any) -> dict[str, Any]:
    """A valid, priced event with every optional field set; ``changes`` override fields."""
    home = CARRIERS[i % 3]
    serving = CARRIERS[(i // 3) % 3]
    rec: dict[str, Any] = {
        "event_id": f"hostile-{i}",
        "event_time": now_ms - 60_000 - i % 1000,
        "source": "gateway" if i % 2 else "terminal",
        "source_id": f"gw-{i % 7}",
        "reporting_carrier": home if i % 2 else serving,
        "home_carrier": home,
        "serving_carrier": serving,
        "transaction_id": f"tx-{i}",
        "tenant_id": f"tenant-{i % 5}",
        "subscriber_id": PHONE,
        "channel": "app",
        "model_id": PRICED_MODELS[i % len(PRICED_MODELS)],
        "provider": "p",
        "input_tokens": 100 + i % 50,
        "output_tokens": 20 + i % 30,
        "cached_tokens": i % 10,
        "reasoning_tokens": i % 3,
        "status": "ok",
        "routing_policy": "balanced",
        "latency_ms": 100 + i % 200,
        "region": "beijing",
        "attributes": {"app": "10086", "phone": "masked"},
    }
    rec.update(changes)
    return rec


def expected_reason(field: str, value: Any, now_ms: int) -> str | None:
    """The dead-letter reason contract section 1 gives a valid event whose ``field`` is
    set to ``value`` (``None``: accepted by validation). ``field`` may be ``attributes``
    (a dict) or an ``attributes.key`` / ``attributes.value`` string."""
    if field in ENUMS:
        return None if value in ENUMS[field] else "unknown_enum"
    if field in STRING_FIELDS or field.startswith("attributes."):
        if not value.strip():
            return None if field.startswith("attributes.") else "invalid_value"
        limit = 128 if field == "event_id" else 256
        return "invalid_value" if len(value) > limit else None
    if field in TOKEN_FIELDS:
        if value < 0:
            return "negative_tokens"
        return "too_many_tokens" if value > MAX_TOKENS else None
    if field == "latency_ms":
        return "invalid_value" if value < 0 else None
    if field == "event_time":
        if value > now_ms + SKEW_MS:
            return "future_event_time"
        return "too_late" if value < now_ms - LATENESS_MS else None
    if field == "attributes":
        return "invalid_value" if len(value) > 64 else None
    raise ValueError(field)


def with_field(rec: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
    """``rec`` with one field (or one attribute's key or value) set to ``value``."""
    out = dict(rec)
    if field == "attributes.key":
        out["attributes"] = {value: "v"}
    elif field == "attributes.value":
        out["attributes"] = {"k": value}
    else:
        out[field] = value
    return out


# ---- wrong-schema Avro --------------------------------------------------------------


def _v2_extra() -> dict[str, Any]:
    schema = copy.deepcopy(V1)
    schema["fields"] += [
        {"name": "cost_hint", "type": ["null", "double"], "default": None},
        {"name": "trace", "type": "string", "default": ""},
    ]
    return schema


def _wrong_types() -> dict[str, Any]:
    schema = copy.deepcopy(V1)
    retype = {"event_time": "string", "input_tokens": "double", "attributes": "string"}
    for f in schema["fields"]:
        if f["name"] in retype:
            f["type"] = retype[f["name"]]
            f.pop("default", None)
    return schema


PING = {
    "type": "record",
    "name": "Ping",
    "namespace": "elsewhere",
    "fields": [{"name": "id", "type": "string"}, {"name": "n", "type": "double"}],
}

# name -> (writer schema, record builder from a valid record, decodes to a v1 event by
# schema resolution?)
WRONG_SCHEMAS: dict[str, tuple[dict[str, Any], Callable[[dict[str, Any]], dict[str, Any]], bool]]
WRONG_SCHEMAS = {
    "other_record": (PING, lambda r: {"id": r["event_id"], "n": float("nan")}, False),
    "dead_letter": (
        AvroCodec("dead_letter").schema(),
        lambda r: {
            "reason": "undecodable",
            "stage": "decode",
            "detail": "x",
            "payload": b"\x00",
            "payload_format": "raw",
            "source_topic": "t",
            "source_partition": 0,
            "source_offset": 1,
            "failed_at": r["event_time"],
        },  # fmt: skip
        False,
    ),
    "v2_extra_fields": (_v2_extra(), lambda r: {**r, "cost_hint": float("inf")}, True),
    "wrong_types": (
        _wrong_types(),
        lambda r: {
            **r,
            "event_time": "2026-11-28T08:00:00+08:00",
            "input_tokens": float("nan"),
            "attributes": "NaN",
        },
        False,
    ),
}


def avro_body(schema: dict[str, Any], rec: dict[str, Any]) -> bytes:
    """``rec`` as an Avro binary body written with ``schema``."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(copy.deepcopy(schema)), rec)
    return buf.getvalue()


def single_object(schema: dict[str, Any], body: bytes) -> bytes:
    """Our framing (C3 01 + fingerprint) around ``body``, naming ``schema``."""
    return MAGIC + schema_fingerprint(schema) + body


def confluent(schema_id: int, body: bytes) -> bytes:
    """Confluent framing: 00 + 4-byte big-endian schema id + body."""
    return b"\x00" + struct.pack(">I", schema_id) + body


def with_invalid_utf8(rec: dict[str, Any], field: str, bad: bytes, around: str = "") -> bytes:
    """``rec`` encoded with ``bad`` (not UTF-8) inside string ``field``, after ``around``."""
    marker = "<\x01" + "\x02" * len(bad) + "\x01>"
    data = CODEC.encode(with_field(rec, field, around + marker))
    assert data.count(marker.encode()) == 1
    return data.replace(marker.encode(), b"<\x01" + bad + b"\x01>")


# ---- the deterministic corpus for Kafka ---------------------------------------------


def corpus(now_ms: int, seed: int = 7, huge: int = 900_000) -> list[tuple[bytes, str | None, str]]:
    """A mixed hostile corpus: ``(value, expected, category)`` per message, in send order.

    ``expected`` is ``"accepted"``, ``"duplicate"``, a dead-letter reason, or ``None``
    for "a dead letter, reason not predicted" (foreign bytes that may decode into
    nonsense before the validator refuses them). Events are valid at ``now_ms`` (the
    broker's receive time; event times sit a minute before it). ``huge`` is the size of
    the big strings (the broker refuses messages over about 1 MB).
    """
    rng = random.Random(seed)
    out: list[tuple[bytes, str | None, str]] = []
    n = 0

    def event(**changes: Any) -> dict[str, Any]:
        nonlocal n
        n += 1
        return valid_record(n, now_ms, **changes)

    # valid events, and exact copies of some of them
    valid = [event() for _ in range(600)]
    for rec in valid:
        out.append((CODEC.encode(rec), "accepted", "valid"))
    for rec in valid[:100]:
        out.append((CODEC.encode(rec), "duplicate", "valid"))
    # random bytes: no marker, our marker with junk, our full header with a junk body
    for i in range(400):
        junk = rng.randbytes(rng.randrange(0, 300))
        if i % 4 == 0:
            out.append((b"\x7f" + junk, "undecodable", "random_bytes"))
        elif i % 4 == 1:
            out.append((MAGIC + junk[:7], "undecodable", "random_bytes"))  # shorter than header
        elif i % 4 == 2:
            out.append((MAGIC + b"\xff" * 8 + junk, "unknown_schema", "random_bytes"))
        else:
            out.append((MAGIC + CODEC.fingerprint + junk, None, "random_bytes"))
    # valid events truncated at every length
    for rec, subscriber in zip(valid, SUBSCRIBERS, strict=False):
        data = CODEC.encode(dict(rec, subscriber_id=subscriber))
        for cut in range(len(data)):
            out.append((data[:cut], "undecodable", "truncated"))
    # wrong schemas, framed by their own fingerprint, by ours, and Confluent-style (the
    # worker has no registry: a Confluent frame is not our encoding)
    for name, (schema, build, _) in WRONG_SCHEMAS.items():
        for i in range(20):
            body = avro_body(schema, build(event()))
            out.append((single_object(schema, body), "unknown_schema", f"schema_{name}"))
            out.append((MAGIC + CODEC.fingerprint + body, None, f"schema_{name}"))
            out.append((confluent(i + 1, body), "undecodable", f"schema_{name}"))
    # huge strings in every string field and in attributes
    for field in (*STRING_FIELDS, "attributes.key", "attributes.value"):
        for char in ("x", "\x00", "\U0001f600"):
            value = char * (huge // len(char.encode()) - 1000)
            reason = expected_reason(field, value, now_ms)
            out.append((CODEC.encode(with_field(event(), field, value)), reason, "huge"))
    many = {f"k{i}": "v" for i in range(20_000)}
    out.append((CODEC.encode(event(attributes=many)), "invalid_value", "huge"))
    # extreme numbers
    for field in (*TOKEN_FIELDS, "latency_ms"):
        for value in EXTREME_INTS:
            rec = event(**{field: value})
            if field == "input_tokens" and value >= 0:
                rec["cached_tokens"] = 0  # cached above input is unpriced (see pricing)
            reason = expected_reason(field, value, now_ms)
            if field == "cached_tokens" and reason is None and value > rec["input_tokens"]:
                reason = "unpriced"
            out.append((CODEC.encode(rec), reason or "accepted", "numbers"))
    for field in ("event_id", "tenant_id", "source_id", "region"):
        for text in ("NaN", "inf", "-Infinity", "1e309"):
            out.append((CODEC.encode(event(**{field: text + str(n)})), "accepted", "numbers"))
    # unicode edge cases in every string field and in attributes; invalid UTF-8 too
    for field in (*STRING_FIELDS, "attributes.key", "attributes.value"):
        for text in UNICODE_EDGES:
            rec = with_field(event(), field, text)
            reason = expected_reason(field, text, now_ms)
            if reason is None and field == "model_id":
                reason = "unpriced"  # validation passes; no price line for that model
            if field == "event_id" and reason is None:
                rec["event_id"] = f"{text}{n}"  # keep ids unique
            out.append((CODEC.encode(rec), reason or "accepted", "unicode"))
        for bad in INVALID_UTF8:
            out.append((with_invalid_utf8(event(), field, bad), "undecodable", "invalid_utf8"))
    # extreme timestamps; those near the limits with a margin, as the broker's receive
    # time is a little after now_ms (the properties check the exact limits in process)
    margin = 120_000
    near = {
        -1: "accepted",
        SKEW_MS - 1_000: "accepted",
        SKEW_MS + margin: "future_event_time",
        -LATENESS_MS + margin: "accepted",
        -LATENESS_MS - 1: "too_late",
    }
    for rel, outcome in near.items():
        out.append((CODEC.encode(event(event_time=now_ms + rel)), outcome, "time"))
    for t in EXTREME_TIMES_ABS:
        reason = expected_reason("event_time", t, now_ms)
        out.append((CODEC.encode(event(event_time=t)), reason or "accepted", "time"))
    rng.shuffle(out)
    # of two equal copies the first one sent is counted, the other is the duplicate
    seen: set[bytes] = set()
    for i, (value, _, category) in enumerate(out):
        if category == "valid":
            out[i] = (value, "duplicate" if value in seen else "accepted", category)
            seen.add(value)
    return out
