"""Worker crashes: SIGKILL the worker at random points while it meters a run, restart it
each time; afterwards every table, the quota usage and the threshold alerts equal the
ground truth exactly.

CI runs 100,000 events (5 % duplicates, 1 % bad) with 10 kills; the full-size variant
(1,000,000 events) is marked slow: `pytest -m slow tests/integration/faults`.
"""

from __future__ import annotations

import json
import random
import time
import urllib.request
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from pipeline.lag import LagReader
from pipeline.quota.definitions import read_topic
from tests.integration.harness import Harness

pytestmark = pytest.mark.integration

# Quotas on the three busiest tenants, as multiples of their raw token count (a Token
# Unit is about 2.3 tokens in the shipped cards): roughly 150 %, 90 % and 65 % used, so
# the run crosses every threshold of the first, two of the second, one of the third.
QUOTA_FACTORS = (1.5, 2.5, 3.5)
THRESHOLDS = (50, 80, 100)


def _quota(h: Harness, tenant: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{h.port}/v1/quotas/{tenant}"
    with urllib.request.urlopen(url, timeout=10) as r:
        body: dict[str, Any] = json.loads(r.read())
    return body


def _set_quotas(h: Harness, truth: dict[str, Any]) -> dict[str, int]:
    """Month quotas on the busiest tenants; returns tenant -> limit in TU."""
    busiest = sorted(truth["by_tenant"].items(), key=lambda kv: -kv[1]["events"])[:3]
    limits = {}
    for (tenant, sums), factor in zip(busiest, QUOTA_FACTORS, strict=True):
        tokens = sums["input_tokens"] + sums["output_tokens"] + sums["reasoning_tokens"]
        limits[tenant] = int(tokens * factor)
        h.cli(
            "quota", "set", "--tenant", tenant, "--period", "month",
            "--limit-tu", str(limits[tenant]), "--thresholds", "50,80,100",
        )  # fmt: skip
    return limits


def _run_with_kills(harness: Harness, tmp_path: Path, events: int, kills: int) -> None:
    h = harness
    truth_path = tmp_path / "truth.json"
    h.cli(
        "simulate", "--events", str(events), "--seed", "99", "--dup-rate", "0.05",
        "--bad-rate", "0.01", "--truth", str(truth_path), timeout=3600,
    )  # fmt: skip
    truth = json.loads(truth_path.read_text())
    limits = _set_quotas(h, truth)

    # kill points spread over the run: when the committed progress passes each of ten
    # random marks, wait a random moment more (mid-batch, mid-write, mid-commit), kill
    rng = random.Random(7)
    total = truth["messages"]
    marks = sorted(rng.uniform(0.03, 0.92) * total for _ in range(kills))
    killed_at: list[int] = []  # messages committed when each kill came
    reader = LagReader(h.settings)

    def committed() -> int:
        return total - sum(p.lag for p in reader.read() if p.topic == h.settings.topic_usage)

    # Small batches: the batch consumer commits 50,000 messages at a time by default,
    # which would pass several kill marks at once; a kill must land mid-run.
    h.env["TOKENMETER_BATCH_MAX"] = "1000"
    h.start_worker()
    try:
        for mark in marks:
            while (done := committed()) < mark:
                assert h.worker is not None and h.worker.poll() is None, h.log_tail()
                time.sleep(0.2)
            time.sleep(rng.uniform(0.0, 1.5))
            h.kill_worker()
            killed_at.append(done)
            h.start_worker()
    finally:
        reader.close()
    h.cli("wait", "--idle", "2", "--timeout", "3600")
    print(f"\nSIGKILLed after {killed_at} of {total:,} messages were committed")
    assert len(killed_at) == kills and max(killed_at) < total

    # usage_events, rated_usage and the rollups equal the truth
    assert h.scalar("SELECT count() FROM usage_events") == truth["unique_valid"]
    assert h.token_sums() == truth["tokens"]
    per_tenant = {
        r["tenant_id"]: int(r["n"])
        for r in h.sql("SELECT tenant_id, count() AS n FROM usage_events GROUP BY tenant_id")
    }
    assert per_tenant == {t: s["events"] for t, s in truth["by_tenant"].items()}
    reasons = h.dead_letter_reasons()
    assert reasons == truth["dead_letters"]
    rated = h.sql(
        "SELECT count() AS events, sum(token_units) AS tu, sum(amount) AS amount FROM rated_usage"
    )[0]
    assert int(rated["events"]) == truth["unique_valid"]
    for table in ("usage_minute", "usage_hour", "usage_day"):
        rollup = h.sql(
            f"SELECT sum(events) AS events, sum(token_units) AS tu, sum(amount) AS amount "
            f"FROM {table}"
        )[0]
        assert rollup == rated, table
    late = h.scalar("SELECT count() FROM usage_corrections")
    assert late == h.scalar("SELECT sum(events) FROM usage_minute WHERE kind = 'late'")

    # quota usage equals the rated, billable usage of the month; every threshold reached
    # was alerted exactly once, on the topic and in the table, and no other
    month = (
        "toStartOfMonth(toTimeZone(event_time, 'Asia/Shanghai')) "
        "= toStartOfMonth(now('Asia/Shanghai'))"
    )
    topic, _ = read_topic(h.settings, h.env["TOKENMETER_TOPIC_QUOTA_EVENTS"], 30.0, "kills")
    on_topic = Counter(
        (a["tenant_id"], int(a["threshold"]))
        for a in (json.loads(m.value()) for m in topic)
        if a["tenant_id"] in limits
    )
    in_table = Counter(
        (r["tenant_id"], int(r["t"]))
        for r in h.sql(
            "SELECT tenant_id, toUInt32(threshold) AS t FROM quota_events "
            f"WHERE tenant_id IN ({', '.join(repr(t) for t in limits)})"
        )
    )
    reached_any = set()
    for tenant, limit in limits.items():
        used = Decimal(
            str(
                h.scalar(
                    f"SELECT sumIf(token_units, billable) FROM rated_usage "
                    f"WHERE tenant_id = '{tenant}' AND {month}"
                )
            )
        )
        assert Decimal(_quota(h, tenant)["used"]) == used, tenant
        reached = {t for t in THRESHOLDS if used * 100 >= limit * t}
        reached_any |= reached
        for t in THRESHOLDS:
            expected = 1 if t in reached else 0
            assert on_topic[(tenant, t)] == expected, (tenant, t, used, limit)
            assert in_table[(tenant, t)] == expected, (tenant, t, used, limit)
    assert reached_any == set(THRESHOLDS), "the quotas should exercise every threshold"


@pytest.mark.long
def test_ten_sigkills_leave_exact_totals(harness: Harness, tmp_path: Path) -> None:
    _run_with_kills(harness, tmp_path, events=100_000, kills=10)


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_ten_sigkills_full_size(harness: Harness, tmp_path: Path) -> None:
    _run_with_kills(harness, tmp_path, events=1_000_000, kills=10)
