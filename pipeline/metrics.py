"""The worker's Prometheus metrics, served at ``GET /metrics`` on its web port.

``WorkerMetrics`` owns a registry of its own (never prometheus-client's global one), so
two workers in one process, or a test next to a worker, never share a counter.

What goes in: the pipeline reports each batch (``observe_batch``), each sink write
(``observe_flush``) and each failed insert attempt (``observe_sink_retry``); the quota
service reports webhook deliveries, and the quota server (another process) its
reservations and answer times (``observe_quota_server``, every half second). Consumer
lag is read from Kafka (end offset minus the group's committed offset, as ``tokenmeter
wait`` does) on a background thread every ``lag_interval_s`` seconds, so a scrape
never waits for Kafka and never blocks the worker's event loop. What comes out:
``render()``, the text exposition format.

Names follow Prometheus conventions: the unit in the name, ``_total`` on counters.
Label values that are known in advance (dead-letter reasons, sink tables, outcomes)
are created at zero, so ``rate()`` and alerts see a series from the first scrape.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from confluent_kafka import KafkaException
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from pipeline.events import Reason
from pipeline.lag import LagReader, PartitionLag

if TYPE_CHECKING:
    from pipeline.runtime import BatchReport
    from pipeline.settings import Settings

log = logging.getLogger(__name__)

LagSource = Callable[[], Sequence[PartitionLag]]

PREFIX = "tokenmeter"
# The tables the worker's sink writes (pipeline/runtime.py); series start at zero.
SINK_TABLES = (
    "usage_events",
    "dead_letters",
    "usage_minute",
    "usage_hour",
    "usage_day",
    "usage_corrections",
)
AGENTS = ("ingest", "dead_letters")
QUOTA_OUTCOMES = ("granted", "partial", "denied", "error")
WEBHOOK_OUTCOMES = ("ok", "retry", "failed")  # as webhook_deliveries.status
QUOTA_CALLS = ("status", "reserve", "commit", "release")
# quota calls take well under a millisecond; the target is p99 < 5 ms
QUOTA_DURATION_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class WorkerMetrics:
    """Every metric of one worker, in a registry of its own.

    ``settings``: where consumer lag is read from (the worker's Kafka, group and topics);
    without it, and without ``lag_source``, no lag is reported. ``lag_source``: a
    callable returning ``PartitionLag`` rows, for tests (default: ``LagReader.read``).
    ``lag_interval_s``: seconds between lag reads. The lag thread starts with
    ``start()`` (or at the first ``render()``) and stops with ``close()``.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        lag_source: LagSource | None = None,
        lag_interval_s: float = 5.0,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events_consumed = Counter(
            f"{PREFIX}_events_consumed_total",
            "Messages taken from the usage topic (valid, duplicate or rejected).",
            registry=r,
        )
        self.events_accepted = Counter(
            f"{PREFIX}_events_accepted_total",
            "Events accepted, deduplicated, rated and stored in usage_events.",
            registry=r,
        )
        self.duplicates_dropped = Counter(
            f"{PREFIX}_duplicates_dropped_total",
            "Exact duplicates (same reporting_carrier, event_id and content) dropped.",
            registry=r,
        )
        self.dead_letters = Counter(
            f"{PREFIX}_dead_letters_total",
            "Rejected inputs sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        self.dead_letters_stored = Counter(
            f"{PREFIX}_dead_letters_stored_total",
            "Dead letters stored in dead_letters (by the usage batch that made them, or"
            " mirrored from the dead-letter topic).",
            registry=r,
        )
        self.batch_duration = Histogram(
            f"{PREFIX}_batch_duration_seconds",
            "Wall time of one batch, from hand-over to the pipeline thread until stored.",
            ["agent"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.flush_duration = Histogram(
            f"{PREFIX}_sink_flush_duration_seconds",
            "Wall time of one sink write into a table, retries included.",
            ["table"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.rows_inserted = Counter(
            f"{PREFIX}_sink_rows_inserted_total",
            "Rows the sink inserted, by table.",
            ["table"],
            registry=r,
        )
        self.sink_errors = Counter(
            f"{PREFIX}_sink_errors_total",
            "Failed insert attempts, by table.",
            ["table"],
            registry=r,
        )
        self.sink_retries = Counter(
            f"{PREFIX}_sink_retries_total",
            "Insert attempts retried after a failure (the sink retries with backoff).",
            ["table"],
            registry=r,
        )
        self.sink_failing = Gauge(
            f"{PREFIX}_sink_consecutive_failures",
            "Failed insert attempts since the table's last successful write (0 = healthy).",
            ["table"],
            registry=r,
        )
        self.quota_reservations = Counter(
            f"{PREFIX}_quota_reservations_total",
            "Quota reservation requests, by outcome (granted, partial, denied, error).",
            ["outcome"],
            registry=r,
        )
        self.webhook_deliveries = Counter(
            f"{PREFIX}_webhook_deliveries_total",
            "Quota webhook delivery attempts, by outcome (ok, retry, failed).",
            ["outcome"],
            registry=r,
        )
        self.quota_durations = _QuotaDurations()
        r.register(self.quota_durations)
        self.lag_read_errors = Counter(
            f"{PREFIX}_consumer_lag_read_errors_total",
            "Consumer-lag reads that failed (Kafka unreachable, topic missing).",
            registry=r,
        )
        for reason in Reason:
            self.dead_letters.labels(reason.value)
        for agent in AGENTS:
            self.batch_duration.labels(agent)
        for table in SINK_TABLES:
            self.flush_duration.labels(table)
            self.rows_inserted.labels(table)
            self.sink_errors.labels(table)
            self.sink_retries.labels(table)
            self.sink_failing.labels(table).set(0)
        for outcome in QUOTA_OUTCOMES:
            self.quota_reservations.labels(outcome)
        for outcome in WEBHOOK_OUTCOMES:
            self.webhook_deliveries.labels(outcome)

        self._settings = settings
        self._lag_source = lag_source
        self._lag_interval_s = lag_interval_s
        self._lag: tuple[PartitionLag, ...] = ()
        self._lag_read_at: float | None = None  # time.time() of the last good read
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        r.register(_LagCollector(self))

    # ---- what the pipeline reports ---------------------------------------------------

    def observe_batch(self, report: BatchReport, seconds: float) -> None:
        """Count one usage batch (``Pipeline.process_usage``'s report) and its time."""
        self.events_consumed.inc(report.consumed)
        self.events_accepted.inc(report.accepted)
        self.duplicates_dropped.inc(report.duplicates)
        for reason, count in report.dead_letters.items():
            self.dead_letters.labels(str(reason)).inc(count)
        self.batch_duration.labels("ingest").observe(seconds)

    def observe_dead_letter_batch(self, stored: int, seconds: float) -> None:
        """Count one batch of the dead-letter mirror (rows stored) and its time."""
        self.dead_letters_stored.inc(stored)
        self.batch_duration.labels("dead_letters").observe(seconds)

    def observe_dead_letters_stored(self, stored: int) -> None:
        """Count dead letters a usage batch stored itself (the mirror drops its copies)."""
        self.dead_letters_stored.inc(stored)

    def observe_flush(self, table: str, seconds: float, rows: int = 0) -> None:
        """Record one successful sink write into ``table``: its time (retries included)
        and the rows it inserted. Clears the table's failure streak."""
        self.flush_duration.labels(table).observe(seconds)
        if rows:
            self.rows_inserted.labels(table).inc(rows)
        self.sink_failing.labels(table).set(0)

    def observe_sink_retry(self, table: str) -> None:
        """Record one failed insert attempt into ``table``; the sink retries it."""
        self.sink_errors.labels(table).inc()
        self.sink_retries.labels(table).inc()
        self.sink_failing.labels(table).inc()

    def observe_quota_reservation(self, outcome: str, count: int = 1) -> None:
        """Count reservation requests by outcome (granted, partial, denied, error)."""
        self.quota_reservations.labels(outcome).inc(count)

    def observe_quota_server(
        self, outcomes: dict[str, int], durations: dict[str, list[float]]
    ) -> None:
        """Add what the quota server answered since its last report: reservations by
        outcome, and per call (``QUOTA_CALLS``) the count of answers in each bucket of
        ``QUOTA_DURATION_BUCKETS`` (one more for slower ones), then their seconds."""
        for outcome, count in outcomes.items():
            self.observe_quota_reservation(outcome, count)
        self.quota_durations.add(durations)

    def observe_webhook_delivery(self, outcome: str) -> None:
        """Count one webhook delivery attempt by outcome: ``ok`` (2xx), ``retry`` (failed,
        will be retried) or ``failed`` (given up), as in ``webhook_deliveries.status``."""
        self.webhook_deliveries.labels(outcome).inc()

    # ---- consumer lag ----------------------------------------------------------------

    @property
    def lag(self) -> tuple[PartitionLag, ...]:
        """The partitions' lag at the last successful read (empty before it)."""
        return self._lag

    def refresh_lag(self) -> bool:
        """Read the lag once, now (blocking: call it off the event loop). Returns False
        if the read failed; the previous reading then stays."""
        source = self._lag_source
        if source is None:
            return False
        try:
            rows = tuple(source())
        except KafkaException as exc:
            self.lag_read_errors.inc()
            log.warning("metrics: cannot read consumer lag: %s", exc)
            return False
        self._lag = rows
        self._lag_read_at = time.time()
        return True

    def start(self) -> None:
        """Start the lag thread (idempotent; nothing to do without a lag source)."""
        with self._start_lock:
            if self._thread is not None or (self._lag_source is None and self._settings is None):
                return
            self._thread = threading.Thread(target=self._poll_lag, name="metrics-lag", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the lag thread and release its Kafka consumer."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=15)

    def _poll_lag(self) -> None:
        reader: LagReader | None = None
        if self._lag_source is None and self._settings is not None:
            reader = LagReader(self._settings)
            self._lag_source = reader.read
        try:
            while not self._stop.is_set():
                self.refresh_lag()
                self._stop.wait(self._lag_interval_s)
        finally:
            if reader is not None:
                reader.close()

    # ---- exposition ------------------------------------------------------------------

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The metrics in the exposition format the ``Accept`` header asks for (the
        Prometheus text format by default): ``(body, content type)``."""
        self.start()
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class _QuotaDurations(Collector):
    """``tokenmeter_quota_request_duration_seconds``: the quota server's answer times,
    by call. The server buckets them itself (it is another process) and reports
    deltas; this adds them up."""

    NAME = f"{PREFIX}_quota_request_duration_seconds"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        size = len(QUOTA_DURATION_BUCKETS) + 2  # the buckets, slower ones, the sum
        self._data = {call: [0.0] * size for call in QUOTA_CALLS}

    def add(self, durations: dict[str, list[float]]) -> None:
        with self._lock:
            for call, values in durations.items():
                mine = self._data.setdefault(call, [0.0] * len(values))
                for i, value in enumerate(values):
                    mine[i] += value

    def describe(self) -> Iterable[Metric]:
        return [self._family({})]

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            data = {call: list(values) for call, values in self._data.items()}
        yield self._family(data)

    def _family(self, data: dict[str, list[float]]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            self.NAME,
            "Time the quota server took to work out the answer of a quota call (request "
            "parsed to answer ready), by call.",
            labels=["call"],
        )
        for call, values in data.items():
            running = 0.0
            buckets = []
            for bound, count in zip((*QUOTA_DURATION_BUCKETS, math.inf), values, strict=False):
                running += count
                buckets.append(("+Inf" if bound == math.inf else repr(bound), running))
            family.add_metric([call], buckets, values[-1])
        return family


class _LagCollector(Collector):
    """Consumer lag per partition, from the last reading (a scrape never calls Kafka)."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return [self._lag_family([]), self._age_family(None)]

    def collect(self) -> Iterator[Metric]:
        yield self._lag_family(self._metrics.lag)
        yield self._age_family(self._metrics._lag_read_at)

    @staticmethod
    def _lag_family(rows: Sequence[PartitionLag]) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            f"{PREFIX}_consumer_lag_messages",
            "Messages not yet processed: end offset minus the group's committed offset.",
            labels=["topic", "partition"],
        )
        for row in rows:
            family.add_metric([row.topic, str(row.partition)], float(row.lag))
        return family

    @staticmethod
    def _age_family(read_at: float | None) -> GaugeMetricFamily:
        age = math.nan if read_at is None else max(0.0, time.time() - read_at)
        return GaugeMetricFamily(
            f"{PREFIX}_consumer_lag_age_seconds",
            "Seconds since consumer lag was last read successfully (NaN: not yet).",
            value=age,
        )


__all__ = ["SINK_TABLES", "LagSource", "WorkerMetrics"]
