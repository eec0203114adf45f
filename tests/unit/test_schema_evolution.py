"""Schema evolution: a v2 event schema with a new optional field, read by a v1 worker
and the other way round, in both wire formats (built-in fingerprints and Confluent
framing with a Schema Registry, here its in-process mock:// registry)."""

from __future__ import annotations

import copy
import uuid
from typing import Any

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from pipeline.events import Reason, Rules, check_record, now_ms
from pipeline.serde import AvroCodec, DecodeError

NOW = now_ms()


def _v2_schema() -> dict[str, Any]:
    schema = copy.deepcopy(AvroCodec().schema("v1"))
    schema["fields"].append(
        {"name": "tool_calls", "type": ["null", "int"], "default": None, "doc": "new in v2"}
    )
    return schema


def _record(**extra: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "event_id": "ev-1", "event_time": NOW, "source": "gateway", "source_id": "gw-1",
        "reporting_carrier": "CMCC", "home_carrier": "CMCC", "serving_carrier": "CMCC",
        "transaction_id": None, "tenant_id": "tn-1", "subscriber_id": "sub_" + "0" * 32,
        "channel": "app", "model_id": "qwen-max", "provider": "Alibaba", "input_tokens": 10,
        "output_tokens": 5, "cached_tokens": 0, "reasoning_tokens": 0, "status": "ok",
        "routing_policy": None, "latency_ms": None, "region": None, "attributes": {},
    }  # fmt: skip
    rec.update(extra)
    return rec


def _registry() -> Any:
    return SchemaRegistryClient.new_client({"url": f"mock://{uuid.uuid4().hex}"})


def test_v1_worker_reads_v2_events_through_the_registry() -> None:
    registry = _registry()
    producer = AvroCodec(extra_schemas={"v2": _v2_schema()}, write_version="v2")
    producer.use_registry(registry, "usage-events-value")
    worker = AvroCodec()  # knows v1 only
    worker.use_registry(registry, "usage-events-value")

    data = producer.encode_confluent(_record(tool_calls=3))
    assert data[0] == 0  # Confluent framing
    decoded = worker.decode(data)
    assert "tool_calls" not in decoded  # the v1 reader drops the field it does not know
    assert decoded == _record()
    assert check_record(decoded, now_ms(), Rules()) is None


def test_v2_worker_reads_v1_events_in_both_framings() -> None:
    registry = _registry()
    old = AvroCodec()
    old.use_registry(registry, "usage-events-value")
    new = AvroCodec(extra_schemas={"v2": _v2_schema()}, write_version="v2")
    new.use_registry(registry, "usage-events-value")
    for data in (old.encode(_record()), old.encode_confluent(_record())):
        decoded = new.decode(data)
        assert decoded["tool_calls"] is None  # the default fills the new field
        assert {k: v for k, v in decoded.items() if k != "tool_calls"} == _record()


def test_builtin_framing_needs_the_schema_file_before_producers_upgrade() -> None:
    v2_event = AvroCodec(extra_schemas={"v2": _v2_schema()}, write_version="v2").encode(
        _record(tool_calls=1)
    )
    with pytest.raises(DecodeError) as err:  # a v1 worker without the file: dead letter
        AvroCodec().decode(v2_event)
    assert err.value.reason is Reason.UNKNOWN_SCHEMA
    upgraded = AvroCodec(extra_schemas={"v2": _v2_schema()})  # schema file deployed, v1 reader
    upgraded_reader = AvroCodec(extra_schemas={"v2": _v2_schema()}, write_version="v1")
    assert upgraded_reader.decode(v2_event) == _record()
    assert upgraded.decode(v2_event)["tool_calls"] == 1


def test_unknown_registry_id_is_a_dead_letter_not_a_crash() -> None:
    worker = AvroCodec()
    worker.use_registry(_registry(), "usage-events-value")
    with pytest.raises(DecodeError) as err:
        worker.decode(b"\x00\x00\x00\x30\x39" + b"\x02")
    assert err.value.reason is Reason.UNKNOWN_SCHEMA
