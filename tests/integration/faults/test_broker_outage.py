"""Broker outage: Kafka stops while producers keep sending. Producers spool to disk, the
worker reconnects by itself, and the totals are exact afterwards.

This test runs its own broker (its own ports and data directory), because it stops it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipeline import stack
from pipeline.settings import load_settings
from tests.integration.harness import Harness, free_port

pytestmark = pytest.mark.integration


def _lines(n: int, prefix: str) -> str:
    now = int(time.time() * 1000)
    rows = []
    for i in range(n):
        rows.append(json.dumps({
            "event_id": f"{prefix}-{i}", "event_time": now, "source": "terminal",
            "source_id": "term-1", "reporting_carrier": "CUCC", "home_carrier": "CUCC",
            "serving_carrier": "CUCC", "tenant_id": f"tn-outage-{i % 7}",
            "subscriber_id": f"1860000{i:04d}", "channel": "home_terminal",
            "model_id": "glm-4.6", "provider": "Zhipu", "input_tokens": 100 + i,
            "output_tokens": 20, "cached_tokens": 0, "reasoning_tokens": 0, "status": "ok",
        }))  # fmt: skip
    return "\n".join(rows) + "\n"


def test_broker_outage_spools_and_recovers_exactly(tmp_path: Path) -> None:
    port = free_port()
    broker = load_settings(
        data_dir=tmp_path / "broker",
        kafka_port=port,
        kafka_controller_port=free_port(),
        kafka_bootstrap=f"127.0.0.1:{port}",
    )
    stack.stack_up(broker)
    h = Harness(broker.kafka_bootstrap, tmp_path)
    h.env["TOKENMETER_SPOOL_AFTER_S"] = "3"
    try:
        h.start_worker()
        before = tmp_path / "before.jsonl"
        before.write_text(_lines(300, "before"))
        h.cli("produce", "--file", str(before))
        h.cli("wait", "--idle", "1", "--timeout", "120")
        assert h.scalar("SELECT count() FROM usage_events") == 300

        stack.stack_down(broker)  # the outage starts
        during = tmp_path / "during.jsonl"
        during.write_text(_lines(500, "during"))
        out = h.cli("produce", "--file", str(during)).stdout
        assert "spooled (Kafka unreachable)" in out and "500" in out
        status = h.cli("spool", "status").stdout
        assert status.startswith("500 message(s)")
        time.sleep(10)  # the worker keeps running without a broker

        stack.stack_up(broker)  # the outage ends
        assert h.worker is not None and h.worker.poll() is None, h.log_tail()
        drained = h.cli("spool", "drain").stdout
        assert "re-sent 500 message(s); 0 left" in drained
        h.cli("wait", "--idle", "2", "--timeout", "180")
        assert h.scalar("SELECT count() FROM usage_events") == 800
        assert h.scalar("SELECT sum(input_tokens) FROM usage_events") == sum(
            100 + i for i in range(300)
        ) + sum(100 + i for i in range(500))
        assert h.scalar("SELECT count() FROM dead_letters") == 0
    finally:
        h.close()
        stack.stack_down(broker)
