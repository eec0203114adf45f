"""The data dir is its user's only (issue 14, low): the broker's log segments, the
warehouse, the spool and the keys hold raw usage events and secrets.

A real broker (`stack up`, free ports, its own data dir) and the real worker and CLI
as subprocesses; a data dir an older version left world-readable is tightened."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.harness import ROOT, Harness, free_port

pytestmark = pytest.mark.integration

NOTE = "group or others could read"


def _loose(data: Path) -> list[Path]:
    """Every entry under ``data`` (itself included) that group or others can use."""
    entries = [data, *data.rglob("*")]
    return [p for p in entries if not p.is_symlink() and p.lstat().st_mode & 0o077]


def test_the_data_dir_is_owner_only_after_the_stack_a_worker_and_the_cli(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    # what an older version left: world-readable directories and files
    (data / "warehouse").mkdir(parents=True)
    (data / "kafka").mkdir()
    old = data / "warehouse" / "left-by-an-older-version"
    old.write_text("raw events")
    for path, mode in ((data, 0o755), (data / "warehouse", 0o755), (data / "kafka", 0o755)):
        path.chmod(mode)
    old.chmod(0o644)

    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "TOKENMETER_DATA_DIR": str(data),
            "TOKENMETER_KAFKA_PORT": str(port),
            "TOKENMETER_KAFKA_CONTROLLER_PORT": str(free_port()),
            "TOKENMETER_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
            "TOKENMETER_KAFKA_HEAP_MB": "512",
        }
    )

    def stack(command: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "stack", command],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return " ".join((proc.stdout + proc.stderr).split())

    up = stack("up")
    harness: Harness | None = None
    try:
        assert up.count(NOTE) == 1, up  # said once, by the start that tightened
        assert _loose(data) == []
        assert stack("up").count(NOTE) == 0  # nothing left to say

        harness = Harness(f"127.0.0.1:{port}", tmp_path)
        assert harness.data_dir == data
        harness.worker_log = tmp_path / "worker.log"  # the test's file, not the project's
        (data / "warehouse").chmod(0o755)  # loosened again: the worker tightens it
        harness.cli("simulate", "--events", "40", "--seed", "7")
        harness.start_worker()
        harness.cli("wait", "--idle", "1", "--timeout", "120")
        assert int(harness.scalar("SELECT count() AS n FROM usage_events")) > 0
        assert harness.stop_worker() == 0
        # the CLI on the embedded warehouse itself (no worker): it writes there too
        assert int(harness.scalar("SELECT count() AS n FROM usage_events")) > 0
        assert " ".join(harness.worker_log.read_text().split()).count(NOTE) == 1
    finally:
        if harness is not None:
            harness.close()
        stack("down")

    loose = _loose(data)
    assert loose == [], [f"{p.relative_to(data)} {stat.filemode(p.lstat().st_mode)}" for p in loose]
    # the broker's log segments and the warehouse are there, and owner-only
    assert any((data / "kafka" / "logs").rglob("*.log"))
    assert any((data / "warehouse").rglob("*"))
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
