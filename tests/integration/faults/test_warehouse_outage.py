"""Warehouse outage: the sink's writes fail for 60 s while traffic keeps coming. The
worker commits no offsets, keeps its memory bounded, retries with backoff, resumes by
itself, and the totals are exact afterwards.

The 60 s are two faults back to back (pipeline/warehouse/faults.py): 30 s refused by the
warehouse layer, then 30 s in which the ClickHouse engine itself cannot write (its
table directories made read-only; where that is not permitted, its own "too many
parts" refusal). CI size: 100,000 simulated messages sent at 2,500 msg/s (5 %
duplicates, 2 % bad).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest
from confluent_kafka import KafkaException

from pipeline.lag import LagReader
from pipeline.warehouse.faults import release_directories
from tests.integration.harness import Harness

pytestmark = pytest.mark.integration

EVENTS = 100_000
RATE = 2_500
PHASE_S = 30  # each of the two faults
RSS_BOUND = 1 << 30  # the worker's memory while the sink is down stays under 1 GiB


@pytest.mark.long
def test_sink_failure_holds_offsets_and_recovers(harness: Harness, tmp_path: Path) -> None:
    h = harness
    switch = tmp_path / "warehouse-down"
    h.env["TOKENMETER_FAULT_FILE"] = str(switch)
    h.env["TOKENMETER_SINK_RETRY_MAX_S"] = "8"  # backoff capped lower than the default
    h.start_worker()
    assert h.worker is not None
    worker = psutil.Process(h.worker.pid)
    truth_path = tmp_path / "truth.json"
    sim = h.spawn_cli(
        "simulate", "--events", str(EVENTS), "--rate", str(RATE), "--seed", "22",
        "--dup-rate", "0.05", "--bad-rate", "0.02", "--truth", str(truth_path),
    )  # fmt: skip
    reader = LagReader(h.settings)

    def committed() -> int:
        return sum(p.committed for p in reader.read() if p.topic == h.settings.topic_usage)

    def committed_yet() -> int:
        try:
            return committed()
        except KafkaException:  # the group's coordinator is not ready yet
            return 0

    try:
        deadline = time.monotonic() + 120
        while committed_yet() <= 0:  # some batches stored and committed first
            assert time.monotonic() < deadline, h.log_tail()
            time.sleep(0.5)
        switch.write_text("")  # phase 1: the warehouse layer refuses every insert
        started = time.monotonic()
        time.sleep(3)  # a batch already past its writes may still commit
        held = committed()
        before = h.scalar("SELECT count() FROM usage_events")
        assert before > 0, h.log_tail()
        rss: list[int] = []
        errors_at_switch = 0
        while (elapsed := time.monotonic() - started) < 2 * PHASE_S:
            if elapsed >= PHASE_S and not switch.read_text():
                errors_at_switch = h.status()["sink_errors"]
                switch.write_text("engine")  # phase 2: the engine cannot write
            rss.append(worker.memory_info().rss)
            time.sleep(0.5)
        status = h.status()
        assert committed() == held, "offsets were committed while nothing could be stored"
        assert h.scalar("SELECT count() FROM usage_events") == before
        assert 0 < errors_at_switch < status["sink_errors"], "both faults made writes fail"
        assert h.worker.poll() is None, "the worker keeps running during the outage"
        log = h.worker_log.read_text(errors="replace")
        assert "fault injected: writes refused" in log
        assert "Operation not permitted" in log or "Too many parts" in log, h.log_tail()

        switch.unlink()  # the warehouse is back
        assert sim.wait(timeout=600) == 0, sim.stdout.read() if sim.stdout else ""
        h.cli("wait", "--idle", "2", "--timeout", "600")
    finally:
        reader.close()
        if sim.poll() is None:
            sim.kill()
        if switch.exists():  # failed mid-outage: stop the worker, make the directories writable
            switch.unlink()
            if h.worker is not None:
                h.kill_worker()
            release_directories(switch)

    truth = json.loads(truth_path.read_text())
    assert h.scalar("SELECT count() FROM usage_events") == truth["unique_valid"]
    assert h.token_sums() == truth["tokens"]
    reasons = h.dead_letter_reasons()
    assert reasons == truth["dead_letters"]
    rated = h.sql("SELECT count() AS events, sum(amount) AS amount FROM rated_usage")[0]
    for table in ("usage_minute", "usage_hour", "usage_day"):
        rollup = h.sql(f"SELECT sum(events) AS events, sum(amount) AS amount FROM {table}")[0]
        assert rollup == rated, table
    peak = max(rss)
    print(
        f"\nworker RSS during the {2 * PHASE_S} s outage: first {rss[0] / 2**20:.0f} MiB, "
        f"max {peak / 2**20:.0f} MiB; sink errors {h.status()['sink_errors']}"
    )
    assert peak < RSS_BOUND
