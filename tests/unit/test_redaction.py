"""One redaction for every string that leaves the producer or the worker for storage."""

from __future__ import annotations

import json

from pipeline.dead_letters import (
    DeadLetter,
    prepare_dead_letter,
    redact_json,
    redact_phone_numbers,
    redact_record,
    redact_text,
)
from pipeline.events import pseudonymise

KEY = b"redaction-test-key"
SUB = pseudonymise("13600136000", KEY)


def test_numbers_in_every_written_form_become_the_same_pseudonym() -> None:
    for text in (
        "13600136000",
        "136 0013 6000",
        "136-0013-6000",
        "+8613600136000",
        "+86-136-0013-6000",
        "008613600136000",
        "１３６００１３６０００",
    ):
        assert redact_text(text, KEY) == SUB, text
    assert redact_text("call 136 0013 6000 now", KEY) == f"call {SUB} now"


def test_other_digits_and_pseudonyms_are_kept() -> None:
    for text in ("event_time 1796692082977 ms", "2026-11-28", "10086", SUB, "gw-01"):
        assert redact_text(text, KEY) == text
    # raw bytes: a number inside a longer run (an Avro length beside it) still goes
    assert redact_phone_numbers(b"\x0213600136000\xff7", KEY) == b"\x02" + SUB.encode() + b"\xff7"


def test_json_values_numbers_and_keys() -> None:
    value = {"subscriber_id": 13600136000, "ids": ["136 0013 6000"], "13600136000": 1, "n": 7}
    assert redact_json(value, KEY) == {"subscriber_id": SUB, "ids": [SUB], SUB: 1, "n": 7}


def test_a_record_keeps_its_identity_fields() -> None:
    rec = {
        "event_id": "13600136000-1",
        "tenant_id": "13600136000",
        "source_id": "gw 13600136000",
        "region": "136-0013-6000",
        "attributes": {"msisdn": "13600136000"},
    }
    redact_record(rec, KEY)
    assert rec == {
        "event_id": "13600136000-1",
        "tenant_id": "13600136000",
        "source_id": f"gw {SUB}",
        "region": SUB,
        "attributes": {"msisdn": SUB},
    }


def test_a_json_dead_letter_is_redacted_everywhere() -> None:
    letter = DeadLetter(
        reason="unknown_enum",
        stage="validate",
        detail="reporting_carrier: '15800158000' is not one of CMCC, CTCC, CUCC",
        payload=json.dumps({"reporting_carrier": "15800158000", "x": 13600136000}).encode(),
        payload_format="json",
        topic="t",
        partition=0,
        offset=1,
        failed_at_ms=0,
        reporting_carrier="15800158000",
    )
    prepare_dead_letter(letter, KEY)
    other = pseudonymise("15800158000", KEY)
    assert json.loads(letter.payload) == {"reporting_carrier": other, "x": SUB}
    assert other in letter.detail and "15800158000" not in letter.detail
    assert letter.reporting_carrier == other
