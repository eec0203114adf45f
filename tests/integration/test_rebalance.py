"""Rebalances while batches are in flight: nothing lost, nothing counted twice.

The worker reads the usage topic with its own batch consumer on the partitions faust
assigns (pipeline/usage_reader.py). While simulated traffic arrives, a second worker of
the same group joins (the first loses partitions with batches prepared or being
stored), cannot store anything (its warehouse refuses every insert, so it holds its
partitions with a batch retrying), and is SIGKILLed (the first takes them back after the
session timeout, from the group's committed offsets). Totals must equal the truth.

The second worker has a warehouse of its own (an embedded one can be opened by one
process only), so its dead letters go to a topic of its own too: its dedup index, empty,
would not recognise the conflicting copies of events the first worker stored, and its
letters are not the first worker's to mirror. (Workers of one deployment share the
warehouse, and with it the index's contents.) The first worker's dead letters are
stored by the batch that made them, not only by the topic's mirror.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pipeline.stack import ensure_topics
from pipeline.topics import dead_letters
from tests.integration.harness import ROOT, Harness, free_port
from tests.integration.test_worker import _assert_matches_truth, _truth


def _partitions_of(port: int) -> int:
    """How many usage partitions the worker on ``port`` has taken (0 if not up)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=2) as r:
            return int(json.loads(r.read()).get("usage_partitions", 0))
    except OSError:
        return 0


def test_partitions_moving_mid_batch_change_no_total(harness: Harness, tmp_path: Path) -> None:
    h = harness
    h.start_worker()
    truth_path = tmp_path / "truth.json"
    sim = h.spawn_cli(
        "simulate", "--events", "40000", "--seed", "23", "--rate", "2000",
        "--dup-rate", "0.03", "--bad-rate", "0.02", "--truth", str(truth_path),
    )  # fmt: skip
    time.sleep(4)

    other = h.data_dir.parent / "data-2"
    (other / "secrets").mkdir(parents=True)
    (other / "secrets" / "pseudonym.key").write_text(
        (h.data_dir / "secrets" / "pseudonym.key").read_text()
    )
    switch = tmp_path / "refuse-inserts"
    port = free_port()
    own_letters = h.settings.model_copy(
        update={"topic_dead_letters": h.settings.topic_dead_letters + "-second"}
    )
    topic = dead_letters(own_letters)
    ensure_topics(own_letters, {topic.name: topic.config}, partitions=4)
    env = dict(
        h.env,
        TOKENMETER_DATA_DIR=str(other),
        TOKENMETER_WEB_PORT=str(port),
        TOKENMETER_FAULT_FILE=str(switch),
        TOKENMETER_TOPIC_DEAD_LETTERS=topic.name,
    )
    with (other / "worker.log").open("ab") as log:
        second = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "worker"],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while _partitions_of(port) == 0:
            assert second.poll() is None, (other / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the second worker never took a partition"
            time.sleep(0.3)
        switch.write_text("")  # from now on it stores nothing (and commits nothing)
        time.sleep(5)
        assert second.poll() is None
    finally:
        os.killpg(second.pid, signal.SIGKILL)
        second.wait(10)
    assert sim.wait(300) == 0, sim.stdout.read() if sim.stdout else ""
    h.cli("wait", "--idle", "1", "--timeout", "300")
    truth = _truth(truth_path)
    _assert_matches_truth(h, truth)
    # the first worker went through both rebalances without restarting
    assert h.worker is not None and h.worker.poll() is None
    log = h.worker_log.read_text(errors="replace")
    assert log.count("usage reader: released partitions") >= 2
