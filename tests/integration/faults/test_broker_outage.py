"""Broker outage: Kafka stops for 30 s while producers keep sending. Producers spool to
disk and drain when it returns, a producer killed while spooling loses nothing it
reported as accepted, the worker reconnects by itself, and the totals are exact.

CI size: 100,000 simulated messages sent at 2,500 msg/s (5 % duplicates, 1 % bad), the
broker down from the 8th to the 38th second. This test runs its own broker (its own
ports and data directory), because it stops it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline import stack
from pipeline.settings import load_settings
from tests.integration.harness import ROOT, Harness, free_port

pytestmark = pytest.mark.integration

EVENTS = 100_000
RATE = 2_500
OUTAGE_S = 30

# A gateway that flushes every 200 events and then says how many it has accepted: the
# SDK's flush returns once Kafka acknowledged them or they are fsynced in the spool.
GATEWAY = """
import sys, time
from datetime import UTC, datetime
from pipeline.events import UsageEvent
from pipeline.produce import UsageProducer
from pipeline.settings import load_settings

producer = UsageProducer.from_settings(load_settings())
for i in range(1_000_000):
    producer.send(UsageEvent(
        event_id=f"gw-{i}", event_time=datetime.now(tz=UTC), source="gateway",
        source_id="gw-outage", reporting_carrier="CTCC", home_carrier="CTCC",
        serving_carrier="CTCC", tenant_id=f"tn-gw-{i % 5}", subscriber_id="13300000000",
        channel="api", model_id="deepseek-v3", provider="deepseek",
        input_tokens=1000 + i % 7, output_tokens=10,
    ))
    if (i + 1) % 200 == 0:
        producer.flush()
        print(f"accepted {i + 1}", flush=True)
"""


def _follow(proc: subprocess.Popen[str], lines: list[str]) -> threading.Thread:
    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader


@pytest.mark.long
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
    gateway_env = dict(h.env, TOKENMETER_DATA_DIR=str(tmp_path / "gateway"))
    truth_path = tmp_path / "truth.json"
    sim: subprocess.Popen[str] | None = None
    gateway: subprocess.Popen[str] | None = None
    try:
        h.start_worker()
        worker_pid = h.worker.pid if h.worker else None
        sim = h.spawn_cli(
            "simulate", "--events", str(EVENTS), "--rate", str(RATE), "--seed", "31",
            "--dup-rate", "0.05", "--bad-rate", "0.01", "--truth", str(truth_path),
        )  # fmt: skip
        sim_out: list[str] = []
        _follow(sim, sim_out)
        time.sleep(8)

        stack.stack_down(broker)  # the outage starts; the simulated fleet keeps sending
        outage_started = time.monotonic()
        gateway = subprocess.Popen(
            [sys.executable, "-c", GATEWAY],
            env=gateway_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        said: list[str] = []
        _follow(gateway, said)
        while sum(line.startswith("accepted") for line in said) < 2:
            assert gateway.poll() is None, said
            assert time.monotonic() - outage_started < OUTAGE_S - 2, said
            time.sleep(0.2)
        os.kill(gateway.pid, signal.SIGKILL)  # killed while spooling
        gateway.wait()
        accepted = max(int(line.split()[1]) for line in said if line.startswith("accepted"))
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage_started)))
        assert h.worker is not None and h.worker.poll() is None, h.log_tail()

        stack.stack_up(broker)  # the outage ends
        assert sim.wait(timeout=600) == 0, "\n".join(sim_out[-30:])
        summary = " ".join(sim_out)
        assert "spooled (Kafka unreachable)" in summary, summary
        spooled = int(summary.split("spooled (Kafka unreachable)")[1].split()[0].replace(",", ""))
        # whatever the simulator's last flush could not drain, an operator drains
        h.cli("spool", "drain")
        drained = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "spool", "drain"],
            env=gateway_env, cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert drained.returncode == 0, drained.stdout + drained.stderr
        assert "0 left in the spool" in drained.stdout
        h.cli("wait", "--idle", "2", "--timeout", "600")

        # the worker rode out the outage in the same process, and nothing was lost
        assert h.worker.poll() is None and h.worker.pid == worker_pid
        truth = json.loads(truth_path.read_text())
        sim_events = h.scalar("SELECT count() FROM usage_events WHERE source_id != 'gw-outage'")
        assert sim_events == truth["unique_valid"]
        assert h.token_sums("source_id != 'gw-outage'") == truth["tokens"]
        # Every rejected input has its dead letter. A rejected message whose first send
        # reached Kafka unacknowledged is sent again from the spool and rejected again:
        # that copy is its own input (same payload, another position), so count payloads
        letters = h.sql(
            "SELECT reason, uniqExact(payload) AS inputs, count() AS letters "
            "FROM dead_letters GROUP BY reason"
        )
        assert {r["reason"]: int(r["inputs"]) for r in letters} == truth["dead_letters"]
        copies = sum(int(r["letters"]) - int(r["inputs"]) for r in letters)
        assert copies <= spooled, (copies, spooled)
        # every event the killed gateway reported as accepted is there, once
        got = h.sql(
            "SELECT count() AS n, uniqExact(event_id) AS ids, "
            "countIf(toUInt64(substring(event_id, 4)) < "
            f"{accepted}) AS reported FROM usage_events WHERE source_id = 'gw-outage'"
        )[0]
        assert int(got["reported"]) == accepted
        assert int(got["n"]) == int(got["ids"])
        print(
            f"\ngateway: {accepted:,} reported accepted before SIGKILL, {int(got['n']):,} "
            f"stored; simulator: {truth['unique_valid']:,} unique events stored"
        )
    finally:
        for proc in (sim, gateway):
            if proc is not None and proc.poll() is None:
                proc.kill()
        h.close()
        stack.stack_down(broker)
