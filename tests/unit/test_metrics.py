"""The worker's Prometheus metrics (pipeline/metrics.py): names, values, lag thread."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

import pytest
from confluent_kafka import KafkaException
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.events import Reason
from pipeline.lag import PartitionLag
from pipeline.metrics import SINK_TABLES, WorkerMetrics
from pipeline.runtime import BatchReport

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: WorkerMetrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def test_batches_are_counted() -> None:
    m = WorkerMetrics()
    m.observe_batch(
        BatchReport(
            consumed=100,
            accepted=90,
            inserted=90,
            duplicates=4,
            dead_letters=Counter({"too_late": 5, Reason.UNKNOWN_ENUM: 1}),
        ),
        0.2,
    )
    m.observe_batch(BatchReport(consumed=10, accepted=10, inserted=10), 0.05)
    m.observe_dead_letter_batch(6, 0.01)
    s = scrape(m)
    assert value(s, "tokenmeter_events_consumed_total") == 110
    assert value(s, "tokenmeter_events_accepted_total") == 100
    assert value(s, "tokenmeter_duplicates_dropped_total") == 4
    assert value(s, "tokenmeter_dead_letters_total", reason="too_late") == 5
    assert value(s, "tokenmeter_dead_letters_total", reason="unknown_enum") == 1
    assert value(s, "tokenmeter_dead_letters_stored_total") == 6
    assert value(s, "tokenmeter_batch_duration_seconds_count", agent="ingest") == 2
    assert value(s, "tokenmeter_batch_duration_seconds_sum", agent="ingest") == pytest.approx(0.25)
    assert value(s, "tokenmeter_batch_duration_seconds_bucket", agent="ingest", le="0.1") == 1
    assert value(s, "tokenmeter_batch_duration_seconds_count", agent="dead_letters") == 1


def test_known_label_values_start_at_zero() -> None:
    s = scrape(WorkerMetrics())
    for reason in Reason:
        assert value(s, "tokenmeter_dead_letters_total", reason=reason.value) == 0
    for table in SINK_TABLES:
        assert value(s, "tokenmeter_sink_errors_total", table=table) == 0
        assert value(s, "tokenmeter_sink_retries_total", table=table) == 0
        assert value(s, "tokenmeter_sink_consecutive_failures", table=table) == 0
        assert value(s, "tokenmeter_sink_flush_duration_seconds_count", table=table) == 0
    for outcome in ("granted", "partial", "denied", "error"):
        assert value(s, "tokenmeter_quota_reservations_total", outcome=outcome) == 0
    for outcome in ("ok", "retry", "failed"):
        assert value(s, "tokenmeter_webhook_deliveries_total", outcome=outcome) == 0


def test_sink_flushes_errors_and_retries() -> None:
    m = WorkerMetrics()
    m.observe_flush("usage_events", 0.03, rows=250)
    m.observe_sink_retry("usage_hour")
    m.observe_sink_retry("usage_hour")
    s = scrape(m)
    assert value(s, "tokenmeter_sink_flush_duration_seconds_count", table="usage_events") == 1
    assert value(s, "tokenmeter_sink_rows_inserted_total", table="usage_events") == 250
    assert value(s, "tokenmeter_sink_errors_total", table="usage_hour") == 2
    assert value(s, "tokenmeter_sink_retries_total", table="usage_hour") == 2
    assert value(s, "tokenmeter_sink_consecutive_failures", table="usage_hour") == 2
    m.observe_flush("usage_hour", 1.5, rows=10)  # the retry went through
    s = scrape(m)
    assert value(s, "tokenmeter_sink_consecutive_failures", table="usage_hour") == 0
    assert value(s, "tokenmeter_sink_errors_total", table="usage_hour") == 2


def test_quota_and_webhook_outcomes() -> None:
    m = WorkerMetrics()
    for outcome in ("granted", "granted", "partial", "denied"):
        m.observe_quota_reservation(outcome)
    m.observe_webhook_delivery("ok")
    m.observe_webhook_delivery("failed")
    s = scrape(m)
    assert value(s, "tokenmeter_quota_reservations_total", outcome="granted") == 2
    assert value(s, "tokenmeter_quota_reservations_total", outcome="denied") == 1
    assert value(s, "tokenmeter_webhook_deliveries_total", outcome="failed") == 1


def test_each_worker_has_its_own_registry() -> None:
    a, b = WorkerMetrics(), WorkerMetrics()
    a.observe_batch(BatchReport(consumed=7, accepted=7), 0.1)
    assert value(scrape(a), "tokenmeter_events_consumed_total") == 7
    assert value(scrape(b), "tokenmeter_events_consumed_total") == 0
    assert REGISTRY.get_sample_value("tokenmeter_events_consumed_total") is None


def test_names_follow_prometheus_conventions() -> None:
    m = WorkerMetrics(lag_source=lambda: [PartitionLag("usage-events", 0, 5, 2)])
    m.refresh_lag()
    body, _ = m.render()
    families = list(text_string_to_metric_families(body.decode()))
    names = {f.name: f.type for f in families}
    for name, kind in names.items():
        assert name.startswith("tokenmeter_")
        if kind == "counter":  # the parser strips _total from a counter family's name
            assert f"# TYPE {name}_total counter" in body.decode() or name.endswith("_total")
        if kind == "histogram":
            assert name.endswith("_seconds"), name
    assert names["tokenmeter_consumer_lag_messages"] == "gauge"
    assert names["tokenmeter_batch_duration_seconds"] == "histogram"
    assert names["tokenmeter_sink_flush_duration_seconds"] == "histogram"
    for f in families:
        if f.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in f.samples), f.name


class FakeLag:
    """A lag source: end and committed offsets per partition; can fail or block."""

    def __init__(self) -> None:
        self.rows: list[PartitionLag] = []
        self.calls = 0
        self.fail = False
        self.gate: threading.Event | None = None

    def __call__(self) -> Sequence[PartitionLag]:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            raise KafkaException("broker unreachable")
        return list(self.rows)


def test_lag_is_read_on_a_background_thread() -> None:
    source = FakeLag()
    source.rows = [
        PartitionLag("usage-events", 0, end=120, committed=100),
        PartitionLag("usage-events", 1, end=50, committed=-1001),  # nothing committed yet
        PartitionLag("usage-dead-letters", 0, end=3, committed=3),
    ]
    m = WorkerMetrics(lag_source=source, lag_interval_s=0.05)
    try:
        before = generate_latest(m.registry).decode()  # collects without starting the thread
        assert "tokenmeter_consumer_lag_age_seconds NaN" in before
        assert "tokenmeter_consumer_lag_messages{" not in before
        scrape(m)  # the first scrape starts the thread
        wait_for(lambda: len(m.lag) == 3)
        s = scrape(m)
        assert (
            value(s, "tokenmeter_consumer_lag_messages", topic="usage-events", partition="0") == 20
        )
        assert (
            value(s, "tokenmeter_consumer_lag_messages", topic="usage-events", partition="1") == 50
        )
        lag_dl = value(
            s, "tokenmeter_consumer_lag_messages", topic="usage-dead-letters", partition="0"
        )
        assert lag_dl == 0
        assert 0 <= value(s, "tokenmeter_consumer_lag_age_seconds") < 5
        source.rows = [PartitionLag("usage-events", 0, end=130, committed=130)]
        wait_for(lambda: len(m.lag) == 1)
        s = scrape(m)
        assert (
            value(s, "tokenmeter_consumer_lag_messages", topic="usage-events", partition="0") == 0
        )
        assert (
            "tokenmeter_consumer_lag_messages",
            frozenset({("topic", "usage-events"), ("partition", "1")}),
        ) not in s
    finally:
        m.close()
    calls = source.calls
    time.sleep(0.2)
    assert source.calls == calls  # the thread has stopped


def test_a_failed_lag_read_keeps_the_last_reading() -> None:
    source = FakeLag()
    source.rows = [PartitionLag("usage-events", 0, end=10, committed=4)]
    m = WorkerMetrics(lag_source=source)
    assert m.refresh_lag()
    source.fail = True
    assert not m.refresh_lag()
    s = scrape(m)
    assert value(s, "tokenmeter_consumer_lag_messages", topic="usage-events", partition="0") == 6
    # (the scrape started the lag thread, whose first read failed too)
    assert value(s, "tokenmeter_consumer_lag_read_errors_total") >= 1
    m.close()


def test_a_scrape_never_waits_for_kafka() -> None:
    source = FakeLag()
    source.gate = threading.Event()  # Kafka hangs
    m = WorkerMetrics(lag_source=source, lag_interval_s=0.05)
    try:
        m.start()
        wait_for(lambda: source.calls == 1)
        started = time.monotonic()
        body, _ = m.render()
        assert time.monotonic() - started < 0.5
        assert b"tokenmeter_events_consumed_total" in body
    finally:
        source.gate.set()
        m.close()


def test_without_settings_or_source_no_thread_starts() -> None:
    m = WorkerMetrics()
    m.render()
    assert m._thread is None
    assert not m.refresh_lag()


def test_openmetrics_on_request() -> None:
    m = WorkerMetrics()
    body, content_type = m.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
