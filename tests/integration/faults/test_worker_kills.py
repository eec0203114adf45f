"""Worker crashes: SIGKILL the worker at random points while it meters a run, restart it
each time; afterwards every table equals the ground truth exactly.

CI runs 20,000 events with 10 kills; the full-size variant (1,000,000 events) is marked
slow: `pytest -m slow tests/integration/faults`.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from tests.integration.harness import Harness

pytestmark = pytest.mark.integration


def _run_with_kills(harness: Harness, tmp_path: Path, events: int, kills: int) -> None:
    truth_path = tmp_path / "truth.json"
    harness.cli(
        "simulate", "--events", str(events), "--seed", "99", "--dup-rate", "0.05",
        "--bad-rate", "0.01", "--truth", str(truth_path), timeout=3600,
    )  # fmt: skip
    truth = json.loads(truth_path.read_text())
    rng = random.Random(7)
    done_kills = 0
    harness.start_worker()
    while done_kills < kills:
        start = harness.status()["consumed"]
        time.sleep(rng.uniform(0.5, 3.0))  # let it get into a batch, then kill it
        if harness.status()["consumed"] == start and start >= events:
            break
        harness.kill_worker()
        done_kills += 1
        harness.start_worker()
    harness.cli("wait", "--idle", "2", "--timeout", "3600")
    assert done_kills == kills, f"the run ended after {done_kills} kills; make it longer"

    assert harness.scalar("SELECT count() FROM usage_events") == truth["unique_valid"]
    sums = harness.sql(
        "SELECT sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, "
        "sum(cached_tokens) AS cached_tokens, sum(reasoning_tokens) AS reasoning_tokens "
        "FROM usage_events"
    )[0]
    assert {k: int(v) for k, v in sums.items()} == truth["tokens"]
    reasons = {
        r["reason"]: int(r["n"])
        for r in harness.sql("SELECT reason, count() AS n FROM dead_letters GROUP BY reason")
    }
    assert reasons == truth["dead_letters"]
    # rated_usage and every rollup agree with each other exactly
    rated = harness.sql(
        "SELECT count() AS events, sum(token_units) AS tu, sum(amount) AS amount FROM rated_usage"
    )[0]
    assert int(rated["events"]) == truth["unique_valid"]
    for table in ("usage_minute", "usage_hour", "usage_day"):
        rollup = harness.sql(
            f"SELECT sum(events) AS events, sum(token_units) AS tu, sum(amount) AS amount "
            f"FROM {table}"
        )[0]
        assert rollup == rated, table
    late = harness.scalar("SELECT count() FROM usage_corrections")
    assert late == harness.scalar("SELECT sum(events) FROM usage_minute WHERE kind = 'late'")


def test_ten_sigkills_leave_exact_totals(harness: Harness, tmp_path: Path) -> None:
    _run_with_kills(harness, tmp_path, events=20_000, kills=10)


@pytest.mark.slow
def test_ten_sigkills_full_size(harness: Harness, tmp_path: Path) -> None:
    _run_with_kills(harness, tmp_path, events=1_000_000, kills=10)
