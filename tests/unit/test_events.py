"""pipeline.events: the usage event's shape and the contract's validation rules.

Every rejection is checked by its machine-readable reason (what analysts filter
``dead_letters`` on) and by the field its detail names.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from pipeline.events import (
    FIELD_NAMES,
    TOKEN_FIELDS,
    Reason,
    Rules,
    Stage,
    UsageEvent,
    check_record,
    dedup_key,
    format_ms,
    is_pseudonym,
    parse_event_time,
    payload_hash,
    pseudonymise,
    record_from_json,
    record_to_json,
)

NOW = 1_795_852_800_000  # 2026-11-28T08:00:00Z
RULES = Rules()
MINUTE = 60_000
DAY = 86_400_000


def record(**changes: Any) -> dict[str, Any]:
    """A valid record (Avro shape), with ``changes`` applied."""
    rec: dict[str, Any] = {
        "event_id": "evt-0001",
        "event_time": NOW - MINUTE,
        "source": "gateway",
        "source_id": "gw-bj-01",
        "reporting_carrier": "CMCC",
        "home_carrier": "CMCC",
        "serving_carrier": "CMCC",
        "transaction_id": None,
        "tenant_id": "tenant-a",
        "subscriber_id": "13800138000",
        "channel": "app",
        "model_id": "deepseek-v3",
        "provider": "deepseek",
        "input_tokens": 1200,
        "output_tokens": 300,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "status": "ok",
        "routing_policy": None,
        "latency_ms": 850,
        "region": None,
        "attributes": {},
    }
    rec.update(changes)
    return rec


def test_a_valid_record_passes() -> None:
    assert check_record(record(), NOW, RULES) is None


def test_reason_codes_are_the_contract_strings() -> None:
    # Analysts filter dead_letters on these exact strings.
    assert Reason.CONFLICTING_DUPLICATE.value == "conflicting_duplicate"
    assert {r.value for r in Reason} >= {
        "undecodable",
        "unknown_schema",
        "missing_field",
        "invalid_type",
        "unknown_enum",
        "negative_tokens",
        "too_many_tokens",
        "future_event_time",
        "too_late",
        "missing_transaction_id",
        "conflicting_duplicate",
    }


REQUIRED = [
    "event_id",
    "event_time",
    "source",
    "source_id",
    "reporting_carrier",
    "home_carrier",
    "serving_carrier",
    "tenant_id",
    "subscriber_id",
    "channel",
    "model_id",
    "provider",
    *TOKEN_FIELDS,
    "status",
]


@pytest.mark.parametrize("name", REQUIRED)
def test_a_missing_required_field_is_named(name: str) -> None:
    rec = record()
    del rec[name]
    rejection = check_record(rec, NOW, RULES)
    assert rejection is not None
    assert rejection.reason is Reason.MISSING_FIELD
    assert rejection.stage is Stage.VALIDATE
    assert rejection.detail.startswith(f"{name}:")
    # a null is the same as absent
    rejection = check_record(record(**{name: None}), NOW, RULES)
    assert rejection is not None and rejection.reason is Reason.MISSING_FIELD


@pytest.mark.parametrize(
    "name", ["transaction_id", "routing_policy", "latency_ms", "region", "attributes"]
)
def test_optional_fields_may_be_absent(name: str) -> None:
    rec = record()
    del rec[name]
    assert check_record(rec, NOW, RULES) is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("event_id", 17),
        ("event_time", "2026-11-28T08:00:00Z"),  # records carry epoch ms
        ("tenant_id", ["tenant-a"]),
        ("input_tokens", "1200"),
        ("input_tokens", 12.0),
        ("output_tokens", True),  # a JSON true is not a count
        ("latency_ms", 1.5),
        ("attributes", [["k", "v"]]),
    ],
)
def test_a_mistyped_field_is_invalid_type(name: str, value: Any) -> None:
    rejection = check_record(record(**{name: value}), NOW, RULES)
    assert rejection is not None
    assert rejection.reason is Reason.INVALID_TYPE
    assert rejection.detail.startswith(f"{name}:")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("source", "router"),
        ("reporting_carrier", "ATT"),
        ("home_carrier", "cmcc"),  # enums are case-sensitive
        ("serving_carrier", ""),
        ("status", "cancelled"),
        ("routing_policy", "cheapest"),
    ],
)
def test_an_unknown_enum_value_is_unknown_enum(name: str, value: str) -> None:
    rejection = check_record(record(**{name: value}), NOW, RULES)
    assert rejection is not None
    assert rejection.reason is Reason.UNKNOWN_ENUM
    assert rejection.detail.startswith(f"{name}:")


def test_every_enum_value_of_the_contract_is_accepted() -> None:
    for carrier in ("CMCC", "CTCC", "CUCC"):
        rec = record(reporting_carrier=carrier, home_carrier=carrier, serving_carrier=carrier)
        assert check_record(rec, NOW, RULES) is None
    for status in ("ok", "timeout", "rate_limited", "error", "failover"):
        assert check_record(record(status=status), NOW, RULES) is None
    for policy in ("cost_first", "quality_first", "balanced", None):
        assert check_record(record(routing_policy=policy), NOW, RULES) is None
    assert check_record(record(source="terminal"), NOW, RULES) is None


@pytest.mark.parametrize("name", ["event_id", "tenant_id", "subscriber_id", "model_id"])
def test_blank_strings_are_invalid_values(name: str) -> None:
    rejection = check_record(record(**{name: "   "}), NOW, RULES)
    assert rejection is not None
    assert rejection.reason is Reason.INVALID_VALUE
    assert rejection.detail == f"{name}: must not be empty"


def test_event_id_is_1_to_128_characters() -> None:
    assert check_record(record(event_id="e" * 128), NOW, RULES) is None
    rejection = check_record(record(event_id="e" * 129), NOW, RULES)
    assert rejection is not None
    assert rejection.reason is Reason.INVALID_VALUE
    assert rejection.detail.startswith("event_id:")
    # other strings get the general 256 bound
    assert check_record(record(tenant_id="t" * 256), NOW, RULES) is None
    rejection = check_record(record(tenant_id="t" * 257), NOW, RULES)
    assert rejection is not None and rejection.reason is Reason.INVALID_VALUE


@pytest.mark.parametrize("name", TOKEN_FIELDS)
def test_token_counts_are_0_to_10_million(name: str) -> None:
    assert check_record(record(**{name: 0}), NOW, RULES) is None
    assert check_record(record(**{name: 10_000_000}), NOW, RULES) is None

    rejection = check_record(record(**{name: -1}), NOW, RULES)
    assert rejection is not None
    assert rejection.reason is Reason.NEGATIVE_TOKENS
    assert rejection.detail.startswith(f"{name}:")

    rejection = check_record(record(**{name: 10_000_001}), NOW, RULES)
    assert rejection is not None
    assert rejection.reason is Reason.TOO_MANY_TOKENS
    assert rejection.detail.startswith(f"{name}:")


def test_the_token_limit_comes_from_the_rules() -> None:
    rules = Rules(max_tokens=1000)
    rejection = check_record(record(input_tokens=1001), NOW, rules)
    assert rejection is not None and rejection.reason is Reason.TOO_MANY_TOKENS
    assert check_record(record(input_tokens=1000), NOW, rules) is None


def test_latency_must_be_a_non_negative_long() -> None:
    assert check_record(record(latency_ms=0), NOW, RULES) is None
    for bad in (-1, 2**63):  # 2**63 does not fit the Avro long it is sent as
        rejection = check_record(record(latency_ms=bad), NOW, RULES)
        assert rejection is not None
        assert rejection.reason is Reason.INVALID_VALUE
        assert rejection.detail.startswith("latency_ms:")


def test_attributes_are_a_bounded_string_map() -> None:
    assert check_record(record(attributes={f"k{i}": "v" for i in range(64)}), NOW, RULES) is None
    too_many = check_record(record(attributes={f"k{i}": "v" for i in range(65)}), NOW, RULES)
    assert too_many is not None and too_many.reason is Reason.INVALID_VALUE
    not_str = check_record(record(attributes={"k": 1}), NOW, RULES)
    assert not_str is not None and not_str.reason is Reason.INVALID_TYPE
    too_long = check_record(record(attributes={"k": "v" * 257}), NOW, RULES)
    assert too_long is not None and too_long.reason is Reason.INVALID_VALUE
    for rejection in (too_many, not_str, too_long):
        assert rejection.detail.startswith("attributes:")


def test_event_time_at_most_5_minutes_ahead() -> None:
    assert check_record(record(event_time=NOW + 5 * MINUTE), NOW, RULES) is None
    rejection = check_record(record(event_time=NOW + 5 * MINUTE + 1), NOW, RULES)
    assert rejection is not None
    assert rejection.reason is Reason.FUTURE_EVENT_TIME
    assert rejection.detail.startswith("event_time:")


def test_event_time_no_older_than_35_days_by_default() -> None:
    assert check_record(record(event_time=NOW - 35 * DAY), NOW, RULES) is None
    rejection = check_record(record(event_time=NOW - 35 * DAY - 1), NOW, RULES)
    assert rejection is not None
    assert rejection.reason is Reason.TOO_LATE
    assert "35 days" in rejection.detail


def test_the_lateness_limit_comes_from_the_rules() -> None:
    rules = Rules(lateness_limit_ms=DAY, future_skew_ms=0)
    late = check_record(record(event_time=NOW - DAY - 1), NOW, rules)
    assert late is not None and late.reason is Reason.TOO_LATE
    ahead = check_record(record(event_time=NOW + 1), NOW, rules)
    assert ahead is not None and ahead.reason is Reason.FUTURE_EVENT_TIME


def test_a_cross_carrier_event_needs_a_transaction_id() -> None:
    cross = {"home_carrier": "CTCC", "serving_carrier": "CMCC"}
    rejection = check_record(record(**cross), NOW, RULES)
    assert rejection is not None
    assert rejection.reason is Reason.MISSING_TRANSACTION_ID
    assert rejection.detail.startswith("transaction_id:")
    assert check_record(record(**cross, transaction_id="tx-9"), NOW, RULES) is None
    # the reporting carrier does not matter: only home vs serving
    assert check_record(record(reporting_carrier="CUCC"), NOW, RULES) is None


def test_the_first_problem_in_contract_order_is_reported() -> None:
    rec = record(event_id="", input_tokens=-5, status="weird")
    rejection = check_record(rec, NOW, RULES)
    assert rejection is not None
    assert rejection.detail.startswith("event_id:")  # event_id comes first
    rejection = check_record(record(input_tokens=-5, status="weird"), NOW, RULES)
    assert rejection is not None and rejection.reason is Reason.UNKNOWN_ENUM


# ---- event_time parsing ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-28T08:00:00Z", datetime(2026, 11, 28, 8, tzinfo=UTC)),
        ("2026-11-28T16:00:00+08:00", datetime(2026, 11, 28, 8, tzinfo=UTC)),
        ("2026-11-28T03:00:00-05:00", datetime(2026, 11, 28, 8, tzinfo=UTC)),
        ("2026-11-28t08:00:00z", datetime(2026, 11, 28, 8, tzinfo=UTC)),
        ("2026-11-28 08:00:00+00:00", datetime(2026, 11, 28, 8, tzinfo=UTC)),
        ("2026-11-28T08:00:00.5Z", datetime(2026, 11, 28, 8, 0, 0, 500_000, tzinfo=UTC)),
        # nanoseconds: truncated to the millisecond, never rounded up
        ("2026-11-28T08:00:00.123999999Z", datetime(2026, 11, 28, 8, 0, 0, 123_000, tzinfo=UTC)),
        ("1795852800000", datetime(2026, 11, 28, 8, tzinfo=UTC)),
    ],
)
def test_rfc3339_and_epoch_text_parse_to_utc_ms(text: str, expected: datetime) -> None:
    assert parse_event_time(text) == int(expected.timestamp() * 1000)


def test_epoch_numbers_are_milliseconds() -> None:
    assert parse_event_time(1_795_852_800_000) == 1_795_852_800_000
    assert parse_event_time(1_795_852_800_000.0) == 1_795_852_800_000
    assert format_ms(1_795_852_800_000) == "2026-11-28T08:00:00.000+00:00"


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-28T08:00:00",  # no offset: the instant is unknown
        "2026-11-28",
        "yesterday",
        "2026-13-01T00:00:00Z",  # well-formed, impossible
        "2026-02-30T00:00:00Z",
        "2026-11-28T08:00:00+24:00",
        float("nan"),
        float("inf"),
        True,
        None,
        [2026, 11, 28],
    ],
)
def test_unusable_event_times_raise_a_message_naming_the_field(value: Any) -> None:
    with pytest.raises(ValueError, match=r"^event_time: "):
        parse_event_time(value)


# ---- JSON lines ---------------------------------------------------------------------


def test_record_from_json_fills_optional_fields_and_converts_time() -> None:
    obj = {k: v for k, v in record().items() if v is not None and k != "attributes"}
    obj["event_time"] = "2026-11-28T15:59:00+08:00"
    rec, rejection = record_from_json(obj)
    assert rejection is None and rec is not None
    assert rec["event_time"] == NOW - MINUTE
    assert rec["transaction_id"] is None and rec["region"] is None
    assert rec["attributes"] == {}
    assert set(rec) == set(FIELD_NAMES)
    assert check_record(rec, NOW, RULES) is None


def test_record_to_json_round_trips() -> None:
    original = record(attributes={"app": "x"}, transaction_id="tx")
    as_json = record_to_json(original)
    assert as_json["event_time"] == "2026-11-28T07:59:00.000+00:00"
    rec, rejection = record_from_json(as_json)
    assert rejection is None
    assert rec == original


def test_record_from_json_refuses_unknown_fields_and_non_objects() -> None:
    rec, rejection = record_from_json({**record(), "msisdn": "13800138000"})
    assert rec is None and rejection is not None
    assert rejection.reason is Reason.INVALID_VALUE
    assert rejection.detail.startswith("msisdn:")

    rec, rejection = record_from_json([record()])
    assert rec is None and rejection is not None
    assert rejection.reason is Reason.INVALID_TYPE


def test_record_from_json_reports_a_bad_time_as_invalid_type() -> None:
    rec, rejection = record_from_json(record(event_time="2026-11-28T08:00:00"))
    assert rec is None and rejection is not None
    assert rejection.reason is Reason.INVALID_TYPE
    assert rejection.detail.startswith("event_time:")


# ---- pseudonymisation ---------------------------------------------------------------

KEY = b"k" * 32


def test_pseudonym_is_keyed_hmac_sha256_truncated_to_128_bits() -> None:
    # The documented construction: an operator can recompute a subscriber's pseudonym
    # (e.g. for a data-subject request) with nothing but the key.
    expected = "sub_" + hmac.new(KEY, b"13800138000", hashlib.sha256).hexdigest()[:32]
    assert pseudonymise("13800138000", KEY) == expected
    assert is_pseudonym(expected)
    assert "13800138000" not in expected


def test_pseudonyms_depend_on_id_and_key_and_are_idempotent() -> None:
    a = pseudonymise("13800138000", KEY)
    assert pseudonymise("13800138000", KEY) == a
    assert pseudonymise("13800138001", KEY) != a
    assert pseudonymise("13800138000", b"another-key") != a
    assert pseudonymise(a, KEY) == a  # producer SDK and worker may both apply it
    assert pseudonymise(a, b"another-key") == a


@pytest.mark.parametrize(
    "value",
    [
        "13800138000",
        "sub_",
        "sub_" + "A" * 32,
        "sub_" + "0" * 31,
        "sub_" + "0" * 33,
        "x" + "0" * 32,
    ],
)
def test_is_pseudonym_recognises_only_the_exact_form(value: str) -> None:
    assert not is_pseudonym(value)


# ---- identity -----------------------------------------------------------------------


def test_dedup_key_is_reporting_carrier_and_event_id() -> None:
    assert dedup_key(record()) == dedup_key(record(tenant_id="other", input_tokens=1))
    assert dedup_key(record()) != dedup_key(record(reporting_carrier="CTCC"))
    assert dedup_key(record()) != dedup_key(record(event_id="evt-0002"))


def test_payload_hash_sees_every_field_but_not_attribute_order() -> None:
    base = record(attributes={"a": "1", "b": "2"})
    assert payload_hash(base) == payload_hash(record(attributes={"b": "2", "a": "1"}))
    assert payload_hash(record(attributes=None)) == payload_hash(record(attributes={}))
    changed = {
        "event_id": "evt-0002",
        "event_time": NOW - MINUTE + 1,
        "source": "terminal",
        "source_id": "gw-2",
        "reporting_carrier": "CTCC",
        "home_carrier": "CTCC",
        "serving_carrier": "CUCC",
        "transaction_id": "tx",
        "tenant_id": "tenant-b",
        "subscriber_id": "13800138001",
        "channel": "api",
        "model_id": "qwen-max",
        "provider": "alibaba",
        "input_tokens": 1201,
        "output_tokens": 301,
        "cached_tokens": 1,
        "reasoning_tokens": 1,
        "status": "error",
        "routing_policy": "balanced",
        "latency_ms": 851,
        "region": "bj",
        "attributes": {"a": "1", "b": "3"},
    }
    assert set(changed) == set(FIELD_NAMES)
    for name, value in changed.items():
        assert payload_hash(record(**{**base, name: value})) != payload_hash(base), name


def test_payload_hash_is_a_stable_signed_64_bit_value() -> None:
    # Stored in usage_events.payload_hash (Int64) and compared with the hash of later
    # copies, possibly computed by a newer release: it must not change between versions,
    # or an exact duplicate replayed after an upgrade would count as a conflict.
    value = payload_hash(record())
    assert -(2**63) <= value < 2**63
    assert value == payload_hash(dict(reversed(list(record().items()))))
    assert value == PINNED_HASH


PINNED_HASH = 1_408_936_578_075_447_191  # payload_hash(record()) as of this release


# ---- the typed model --------------------------------------------------------------


def usage_event(**changes: Any) -> UsageEvent:
    fields: dict[str, Any] = {
        "event_id": "evt-0001",
        "event_time": datetime(2026, 11, 28, 15, 59, tzinfo=timezone(timedelta(hours=8))),
        "source": "terminal",
        "source_id": "stb-77",
        "reporting_carrier": "CUCC",
        "home_carrier": "CUCC",
        "serving_carrier": "CTCC",
        "transaction_id": "tx-1",
        "tenant_id": "tenant-a",
        "subscriber_id": "13800138000",
        "channel": "home_terminal",
        "model_id": "qwen-max",
        "provider": "alibaba",
        "input_tokens": 10,
        "output_tokens": 20,
    }
    fields.update(changes)
    return UsageEvent(**fields)


def test_usage_event_to_record_is_a_valid_record_in_utc_ms() -> None:
    rec = usage_event().to_record()
    assert rec["event_time"] == NOW - MINUTE
    assert rec["cached_tokens"] == 0 and rec["reasoning_tokens"] == 0
    assert rec["status"] == "ok" and rec["attributes"] == {}
    assert set(rec) == set(FIELD_NAMES)
    assert check_record(rec, NOW, RULES) is None


@pytest.mark.parametrize(
    "changes",
    [
        {"event_time": datetime(2026, 11, 28, 8)},  # noqa: DTZ001 - naive on purpose
        {"event_id": ""},
        {"event_id": "e" * 129},
        {"input_tokens": -1},
        {"reporting_carrier": "ATT"},
        {"status": "cancelled"},
        {"latency_ms": -5},
        {"msisdn": "13800138000"},
    ],
)
def test_usage_event_refuses_what_the_contract_refuses(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        usage_event(**changes)


def test_usage_event_is_immutable() -> None:
    event = usage_event()
    with pytest.raises(ValidationError):
        event.input_tokens = 99  # type: ignore[misc]


def test_pseudonyms_are_hmac_sha256_of_the_id() -> None:
    """The precomputed-pad HMAC gives the standard library's HMAC-SHA256, for short,
    block-sized and long keys."""
    import hashlib
    import hmac

    from pipeline.events import pseudonymise

    for key in (b"k" * 16, b"x" * 64, b"long key " * 20, bytes(range(40))):
        for sub in ("13800138000", "+8613900139000", "subscriber-7", "é"):
            want = hmac.new(key, sub.encode(), hashlib.sha256).hexdigest()[:32]
            assert pseudonymise(sub, key) == "sub_" + want
