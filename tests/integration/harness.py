"""Runs the real `tokenmeter` CLI and worker as subprocesses against the real broker.

Each harness has unique topic names, a unique consumer group, its own data directory
(so its own embedded warehouse) and a free web port; tests never share state.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from pipeline.settings import load_settings
from pipeline.stack import ensure_topics
from pipeline.topics import dead_letters, usage_events

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# librdkafka's own lines ("%3|...|FAIL|...") and aiokafka's retries while a broker is away
_RETRY_NOISE = (
    "Unable connect to node",
    "Unable to update metadata",
    "Failed fetch messages",
    "Connect call failed",
    "Marking the coordinator dead",
)


def _retry_noise(line: str) -> bool:
    return line.startswith("%") or any(marker in line for marker in _RETRY_NOISE)


class Harness:
    """One isolated pipeline: topics + worker + CLI."""

    def __init__(self, bootstrap: str, tmp: Path) -> None:
        run = uuid.uuid4().hex[:8]
        self.data_dir = tmp / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.env = dict(os.environ)
        self.env.update(
            {
                "TOKENMETER_DATA_DIR": str(self.data_dir),
                "TOKENMETER_KAFKA_BOOTSTRAP": bootstrap,
                "TOKENMETER_TOPIC_USAGE": f"usage-events-{run}",
                "TOKENMETER_TOPIC_DEAD_LETTERS": f"usage-dead-letters-{run}",
                "TOKENMETER_TOPIC_QUOTA_EVENTS": f"quota-events-{run}",
                "TOKENMETER_CONSUMER_GROUP": f"tokenmeter-test-{run}",
                "TOKENMETER_WEB_PORT": str(self.port),
                "TOKENMETER_BATCH_WITHIN_S": "0.2",
            }
        )
        self.settings = load_settings(
            data_dir=self.data_dir,
            kafka_bootstrap=bootstrap,
            topic_usage=self.env["TOKENMETER_TOPIC_USAGE"],
            topic_dead_letters=self.env["TOKENMETER_TOPIC_DEAD_LETTERS"],
            topic_quota_events=self.env["TOKENMETER_TOPIC_QUOTA_EVENTS"],
            consumer_group=self.env["TOKENMETER_CONSUMER_GROUP"],
        )
        topics = [usage_events(self.settings), dead_letters(self.settings)]
        ensure_topics(self.settings, {t.name: t.config for t in topics}, partitions=4)
        self.worker: subprocess.Popen[bytes] | None = None
        self.worker_log = self.data_dir / "worker.log"

    # ---- CLI ------------------------------------------------------------------
    def cli(
        self, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """Run `tokenmeter ARGS` and return the completed process (text)."""
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"tokenmeter {' '.join(args)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
            )
        return proc

    def sql(self, query: str) -> list[dict[str, Any]]:
        """Rows of a read-only query, via `tokenmeter sql --format json`."""
        out = self.cli("sql", "--format", "json", query).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def token_sums(self, where: str = "") -> dict[str, int]:
        """The four token sums over ``usage_events`` (``where``: an optional filter), keyed
        like a truth file's ``tokens``."""
        row = self.sql(
            "SELECT sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, "
            "sum(cached_tokens) AS cached_tokens, sum(reasoning_tokens) AS reasoning_tokens "
            "FROM usage_events" + (f" WHERE {where}" if where else "")
        )[0]
        return {k: int(v) for k, v in row.items()}

    def dead_letter_reasons(self) -> dict[str, int]:
        """Rows of ``dead_letters`` per reason, keyed like a truth file's ``dead_letters``."""
        rows = self.sql("SELECT reason, count() AS n FROM dead_letters GROUP BY reason")
        return {r["reason"]: int(r["n"]) for r in rows}

    def spawn_cli(self, *args: str) -> subprocess.Popen[str]:
        """Start `tokenmeter ARGS` in the background; its output (text) on ``stdout``."""
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args],
            env=self.env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def scalar(self, query: str) -> Any:
        rows = self.sql(query)
        assert len(rows) == 1 and len(rows[0]) == 1, rows
        return next(iter(rows[0].values()))

    # ---- worker ---------------------------------------------------------------
    def start_worker(self, timeout: float = 90) -> None:
        """Start the worker and wait until its pipeline answers on /v1/health."""
        log = self.worker_log.open("ab")
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "worker"],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.worker.poll() is not None:
                raise AssertionError(f"worker exited {self.worker.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.port}/v1/health", timeout=1
                ) as r:
                    if json.loads(r.read()).get("pipeline"):
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"worker not ready after {timeout} s:\n{self.log_tail()}")

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/status", timeout=5) as r:
            result: dict[str, Any] = json.loads(r.read())
            return result

    def kill_worker(self) -> None:
        """SIGKILL: no shutdown code runs, nothing is committed on the way out."""
        assert self.worker is not None
        os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait(30)
        self.worker = None

    def stop_worker(self) -> int:
        """SIGTERM and wait for a clean exit; returns the exit code."""
        if self.worker is None:
            return 0
        self.worker.send_signal(signal.SIGTERM)
        try:
            code = self.worker.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.worker.pid, signal.SIGKILL)
            code = self.worker.wait(10)
        self.worker = None
        return code

    def rewind_group(self) -> None:
        """Set the worker group's committed offsets back to 0 (worker must be stopped)."""
        from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.env["TOKENMETER_KAFKA_BOOTSTRAP"]})
        group = self.env["TOKENMETER_CONSUMER_GROUP"]
        topics = [self.env["TOKENMETER_TOPIC_USAGE"], self.env["TOKENMETER_TOPIC_DEAD_LETTERS"]]
        parts = [TopicPartition(t, p, 0) for t in topics for p in range(4)]
        deadline = time.monotonic() + 60
        while True:  # the group must be empty (the old member's session must end)
            futures = admin.alter_consumer_group_offsets(
                [ConsumerGroupTopicPartitions(group, parts)]
            )
            try:
                futures[group].result(10)
                return
            except Exception:  # noqa: BLE001 - retried until the group is empty
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def log_tail(self, lines: int = 60) -> str:
        """The worker log's last ``lines`` lines, without the clients' connection retries
        (while Kafka is down they fill any tail and hide why a worker stopped)."""
        try:
            text = self.worker_log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no worker log)"
        kept = [line for line in text.splitlines() if not _retry_noise(line)]
        left_out = len(text.splitlines()) - len(kept)
        note = f"(worker log; {left_out} connection-retry lines left out)\n" if left_out else ""
        return note + "\n".join(kept[-lines:])

    def close(self) -> None:
        if self.worker is not None:
            try:
                os.killpg(self.worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.worker.wait(10)
            self.worker = None
