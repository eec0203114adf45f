"""The metered path end to end: real Kafka, the real worker, the real ClickHouse engine.

Every assertion compares the warehouse with the simulator's ground truth, exactly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.integration.harness import Harness, free_port

pytestmark = pytest.mark.integration


def _truth(path: Path) -> dict:
    return json.loads(path.read_text())


def _assert_matches_truth(h: Harness, truth: dict) -> None:
    assert h.scalar("SELECT count() FROM usage_events") == truth["unique_valid"]
    # every (reporting_carrier, event_id) is stored once
    assert (
        h.scalar(
            "SELECT count() FROM (SELECT reporting_carrier, event_id FROM usage_events "
            "GROUP BY reporting_carrier, event_id HAVING count() > 1)"
        )
        == 0
    )
    assert h.token_sums() == truth["tokens"]
    by_carrier = {
        r["c"]: int(r["n"])
        for r in h.sql("SELECT reporting_carrier AS c, count() AS n FROM usage_events GROUP BY c")
    }
    assert by_carrier == {c: v["events"] for c, v in truth["by_reporting_carrier"].items()}
    reasons = h.dead_letter_reasons()
    assert reasons == truth["dead_letters"]


def test_events_land_exactly_once_with_dead_letters(harness: Harness, tmp_path: Path) -> None:
    harness.start_worker()
    truth_path = tmp_path / "truth.json"
    harness.cli(
        "simulate",
        "--events",
        "6000",
        "--seed",
        "11",
        "--dup-rate",
        "0.05",
        "--bad-rate",
        "0.05",
        "--truth",
        str(truth_path),
    )
    harness.cli("wait", "--idle", "1", "--timeout", "300")
    truth = _truth(truth_path)
    assert truth["exact_duplicates"] == 300 and truth["dead_letters_total"] == 300
    _assert_matches_truth(harness, truth)

    # no raw subscriber id reaches the warehouse, in events or in dead letters
    assert (
        harness.scalar(
            "SELECT countIf(NOT match(subscriber_id, '^sub_[0-9a-f]{32}$')) FROM usage_events"
        )
        == 0
    )
    assert (
        harness.scalar(
            "SELECT countIf(payload_format = 'json' AND "
            "NOT match(JSONExtractString(payload, 'subscriber_id'), '^sub_[0-9a-f]{32}$')) "
            "FROM dead_letters"
        )
        == 0
    )
    assert (
        harness.scalar(
            "SELECT countIf(payload_format = 'raw' AND "
            "match(payload, '(^|[^0-9])1[3-9][0-9]{9}([^0-9]|$)')) FROM dead_letters"
        )
        == 0
    )
    # each dead letter says where it came from and why
    row = harness.sql(
        "SELECT topic, stage, detail FROM dead_letters WHERE reason = 'negative_tokens' LIMIT 1"
    )[0]
    assert row["topic"] == harness.env["TOKENMETER_TOPIC_USAGE"]
    assert row["stage"] == "validate" and "tokens" in row["detail"]

    # replay the whole topic from offset 0 (a new deployment, a lost commit): no total moves
    assert harness.stop_worker() == 0
    harness.rewind_group()
    harness.start_worker()
    harness.cli("wait", "--idle", "1", "--timeout", "300")
    _assert_matches_truth(harness, truth)


def test_produce_reports_bad_lines_and_sends_the_good(harness: Harness, tmp_path: Path) -> None:
    harness.start_worker()
    now = time.time()
    good = {
        "event_id": "gw-1",
        "event_time": int(now * 1000),
        "source": "gateway",
        "source_id": "gw-bj-01",
        "reporting_carrier": "CMCC",
        "home_carrier": "CMCC",
        "serving_carrier": "CMCC",
        "tenant_id": "t-1",
        "subscriber_id": "13800138000",
        "channel": "app",
        "model_id": "qwen-max",
        "provider": "Alibaba",
        "input_tokens": 120,
        "output_tokens": 30,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "status": "ok",
    }
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({**good, "event_id": "gw-2", "input_tokens": -5}),
        json.dumps({**good, "event_id": "gw-3", "event_time": "2026-11-28T08:00:00+08:00x"}),
        json.dumps({**good, "event_id": "gw-4", "home_carrier": "CUCC"}),  # no transaction_id
        "",
        json.dumps({**good, "event_id": "gw-5", "reporting_carrier": "CTCC"}),
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")
    proc = harness.cli("produce", "--file", str(path), check=False)
    assert proc.returncode == 1
    assert "line 2: invalid_json" in proc.stderr
    assert "line 3: negative_tokens: input_tokens" in proc.stderr
    assert "line 4: invalid_type: event_time" in proc.stderr
    assert "line 5: missing_transaction_id" in proc.stderr
    assert "line 1:" not in proc.stderr and "line 7:" not in proc.stderr

    harness.cli("wait", "--idle", "1", "--timeout", "120")
    ids = [
        r["event_id"] for r in harness.sql("SELECT event_id FROM usage_events ORDER BY event_id")
    ]
    assert ids == ["gw-1", "gw-5"]
    letters = harness.sql("SELECT reason, stage, offset, topic FROM dead_letters ORDER BY offset")
    assert [(r["reason"], r["offset"]) for r in letters] == [
        ("invalid_json", 2),
        ("negative_tokens", 3),
        ("invalid_type", 4),
        ("missing_transaction_id", 5),
    ]
    assert all(r["stage"] == "produce" and r["topic"].endswith("events.jsonl") for r in letters)

    # sending the same file again changes no total
    harness.cli("produce", "--file", str(path), check=False)
    harness.cli("wait", "--idle", "1", "--timeout", "120")
    assert harness.scalar("SELECT count() FROM usage_events") == 2
    assert harness.scalar("SELECT count() FROM dead_letters") == 4


def test_sql_is_read_only_and_errors_are_one_line(harness: Harness) -> None:
    harness.start_worker()
    proc = harness.cli("sql", "INSERT INTO usage_events (event_id) VALUES ('x')", check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "read-only" in proc.stderr
    proc = harness.cli("sql", "SELECT * FROM file('/etc/hostname', 'LineAsString')", check=False)
    assert proc.returncode == 2 and "readonly" in proc.stderr.lower()
    proc = harness.cli("sql", "SELECT nope FROM usage_events", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_a_worker_without_its_broker_or_topics_says_which_setting(harness: Harness) -> None:
    # a topic that does not exist: faust would run and consume nothing
    harness.env["TOKENMETER_TOPIC_USAGE"] = "usage-events-never-created"
    proc = harness.cli("worker", check=False, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "TOKENMETER_TOPIC_USAGE=usage-events-never-created: no such topic" in proc.stderr
    assert "tokenmeter stack up" in proc.stderr and "Traceback" not in proc.stderr

    # no broker at the address: aiokafka would end the worker with a traceback
    harness.env["TOKENMETER_KAFKA_BOOTSTRAP"] = f"127.0.0.1:{free_port()}"
    proc = harness.cli("worker", check=False, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "TOKENMETER_KAFKA_BOOTSTRAP: no Kafka broker answers at" in proc.stderr
    # one line for the user, not librdkafka's connection retries
    assert "Traceback" not in proc.stderr and "rdkafka" not in proc.stderr, proc.stderr
