"""Warehouse outage: the sink's writes fail for a while. The worker holds its offsets,
keeps its memory bounded, retries with backoff, resumes by itself, and the totals are
exact afterwards."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

from pipeline.lag import LagReader
from tests.integration.harness import Harness

pytestmark = pytest.mark.integration


def test_sink_failure_holds_offsets_and_recovers(harness: Harness, tmp_path: Path) -> None:
    switch = tmp_path / "warehouse-down"
    harness.env["TOKENMETER_FAULT_FILE"] = str(switch)
    harness.start_worker()
    truth_path = tmp_path / "truth.json"
    harness.cli(
        "simulate", "--events", "4000", "--seed", "21", "--dup-rate", "0.05",
        "--bad-rate", "0.02", "--truth", str(truth_path),
    )  # fmt: skip
    harness.cli("wait", "--idle", "1", "--timeout", "180")
    first = json.loads(truth_path.read_text())
    assert harness.scalar("SELECT count() FROM usage_events") == first["unique_valid"]

    switch.touch()  # the warehouse refuses writes from now on
    truth2 = tmp_path / "truth2.json"
    harness.cli(
        "simulate", "--events", "20000", "--seed", "22", "--dup-rate", "0.05",
        "--bad-rate", "0.02", "--truth", str(truth2),
    )  # fmt: skip
    assert harness.worker is not None
    proc = psutil.Process(harness.worker.pid)
    reader = LagReader(harness.settings)
    rss = []
    try:
        for _ in range(20):  # ~10 s of outage, sampled
            rss.append(proc.memory_info().rss)
            time.sleep(0.5)
        lag = sum(p.lag for p in reader.read() if p.topic == harness.settings.topic_usage)
    finally:
        reader.close()
    assert lag >= 20000 * 0.5, "offsets must not be committed while nothing is stored"
    assert harness.status()["sink_errors"] > 0
    assert harness.worker.poll() is None, "the worker keeps running during the outage"

    switch.unlink()  # the warehouse is back
    harness.cli("wait", "--idle", "2", "--timeout", "300")
    second = json.loads(truth2.read_text())
    assert harness.scalar("SELECT count() FROM usage_events") == (
        first["unique_valid"] + second["unique_valid"]
    )
    reasons = {
        r["reason"]: int(r["n"])
        for r in harness.sql("SELECT reason, count() AS n FROM dead_letters GROUP BY reason")
    }
    expected = dict(first["dead_letters"])
    for reason, n in second["dead_letters"].items():
        expected[reason] = expected.get(reason, 0) + n
    assert reasons == expected
    print(f"\nworker RSS during the outage: max {max(rss) / 2**20:.0f} MiB")
