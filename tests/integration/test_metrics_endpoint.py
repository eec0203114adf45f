"""The worker's /metrics after a simulated run: real Kafka, real worker, real ClickHouse
engine. Counters must equal what the warehouse holds, and the simulator's truth."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import Harness

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(h: Harness) -> Samples:
    """GET /metrics (what `curl 127.0.0.1:<port>/metrics` shows), parsed."""
    with urllib.request.urlopen(f"http://127.0.0.1:{h.port}/metrics", timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(labels)[label]: v for (n, labels), v in samples.items() if n == name and v != 0}


def test_metrics_equal_the_warehouse_after_a_simulated_run(
    harness: Harness, tmp_path: Path
) -> None:
    harness.start_worker()
    truth_path = tmp_path / "truth.json"
    harness.cli(
        "simulate",
        "--events",
        "4000",
        "--seed",
        "23",
        "--dup-rate",
        "0.05",
        "--bad-rate",
        "0.05",
        "--truth",
        str(truth_path),
    )
    harness.cli("wait", "--idle", "1", "--timeout", "300")
    truth = json.loads(truth_path.read_text())
    usage_topic = harness.env["TOKENMETER_TOPIC_USAGE"]
    dl_topic = harness.env["TOKENMETER_TOPIC_DEAD_LETTERS"]

    # Consumer lag is read on the metrics thread every few seconds: wait until it has
    # seen every partition of both topics caught up.
    deadline = time.monotonic() + 60
    while True:
        m = scrape(harness)
        lag = {
            (dict(labels)["topic"], dict(labels)["partition"]): v
            for (name, labels), v in m.items()
            if name == "tokenmeter_consumer_lag_messages"
        }
        wanted = {(t, str(p)) for t in (usage_topic, dl_topic) for p in range(4)}
        if set(lag) >= wanted and all(lag[k] == 0 for k in wanted):
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"lag never read as caught up: {lag}")
        time.sleep(0.5)

    stored = int(harness.scalar("SELECT count() FROM usage_events"))
    stored_dead = harness.dead_letter_reasons()
    assert stored == truth["unique_valid"]

    # what the issue asks: accepted and dead-letter counters equal the warehouse counts
    assert m[("tokenmeter_events_accepted_total", frozenset())] == stored
    assert by_label(m, "tokenmeter_dead_letters_total", "reason") == stored_dead
    assert stored_dead == truth["dead_letters"]

    assert m[("tokenmeter_events_consumed_total", frozenset())] == truth["messages"]
    assert m[("tokenmeter_duplicates_dropped_total", frozenset())] == truth["exact_duplicates"]
    assert m[("tokenmeter_dead_letters_stored_total", frozenset())] == sum(stored_dead.values())
    rows = by_label(m, "tokenmeter_sink_rows_inserted_total", "table")
    assert rows["usage_events"] == stored
    assert rows["dead_letters"] == sum(stored_dead.values())
    assert m[("tokenmeter_batch_duration_seconds_count", frozenset({("agent", "ingest")}))] > 0
    flushes = by_label(m, "tokenmeter_sink_flush_duration_seconds_count", "table")
    assert flushes["usage_events"] > 0 and flushes["usage_minute"] > 0
    assert by_label(m, "tokenmeter_sink_errors_total", "table") == {}  # a healthy run
    # defined for the quota service, present at zero until it reports
    assert ("tokenmeter_quota_reservations_total", frozenset({("outcome", "granted")})) in m
    assert ("tokenmeter_webhook_deliveries_total", frozenset({("outcome", "ok")})) in m
