"""`make test`: check the Go code (gofmt, go vet, go test), start a dedicated Kafka
broker, run the whole test suite, stop the broker.

The broker gets its own data directory (.tokenmeter-test/) and ports (19092/19093 by
default), so a `tokenmeter demo` broker on 9092 is never touched. If the broker cannot
start, the run fails loudly: integration tests never skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_DATA = ROOT / ".tokenmeter-test"
PORT = int(os.environ.get("TOKENMETER_TEST_KAFKA_PORT", "19092"))


def check_go() -> bool:
    """The Go code: the quota server (quotad/) and the quota benchmark's load generator
    (tests/perf/quotaload/) formatted and vetted; the quota server's own tests passing."""
    print("== Go code (quotad/, tests/perf/quotaload/): gofmt, go vet, go test", flush=True)
    for module, cmds in (
        (ROOT / "quotad", (["go", "vet", "./..."], ["go", "test", "./..."])),
        (ROOT / "tests" / "perf" / "quotaload", (["go", "vet", "./..."],)),
    ):
        unformatted = subprocess.run(
            ["gofmt", "-l", "."], cwd=module, capture_output=True, text=True
        ).stdout.split()
        if unformatted:
            print(f"== FAILED: gofmt would change {', '.join(unformatted)} in {module}", flush=True)
            return False
        for cmd in cmds:
            if subprocess.run(cmd, cwd=module).returncode != 0:
                print(f"== FAILED: {' '.join(cmd)} in {module.relative_to(ROOT)}", flush=True)
                return False
    return True


def main() -> int:
    bench = "--bench" in sys.argv[1:]
    if not bench and not check_go():
        return 1
    extra = [a for a in sys.argv[1:] if a != "--bench"]
    env = dict(os.environ)
    env.update(
        {
            "TOKENMETER_DATA_DIR": str(TEST_DATA / "stack"),
            "TOKENMETER_KAFKA_PORT": str(PORT),
            "TOKENMETER_KAFKA_CONTROLLER_PORT": str(PORT + 1),
            "TOKENMETER_KAFKA_BOOTSTRAP": f"127.0.0.1:{PORT}",
        }
    )
    shutil.rmtree(TEST_DATA, ignore_errors=True)
    tokenmeter = [sys.executable, "-m", "pipeline.cli"]
    print(f"== starting the test Kafka broker on 127.0.0.1:{PORT}", flush=True)
    up = subprocess.run([*tokenmeter, "stack", "up"], env=env, cwd=ROOT)
    if up.returncode != 0:
        print("== FAILED: the test Kafka broker did not start (see above)", flush=True)
        return 1
    try:
        if bench:
            # the end-to-end benchmark (tests/perf/bench_pipeline.py), N from BENCH_EVENTS
            events = os.environ.get("BENCH_EVENTS", "200000")
            stamp = time.strftime("%Y%m%d-%H%M%S")
            out = ROOT / "bench-results" / f"bench-{stamp}-{events}.json"
            cmd = [sys.executable, "tests/perf/bench_pipeline.py", "--events", events]
            cmd += ["--out", str(out), *extra]
        else:
            # Parallel pytest processes: much of an integration test is waiting (a worker
            # starting, an outage lasting its 30 or 60 s), which the others fill.
            # One file stays on one process (--dist loadfile); each test has its own
            # topics, consumer group, data directory and ports, so they never meet.
            # Tests marked `long` come first (tests/conftest.py), one per process.
            workers = os.environ.get("TOKENMETER_TEST_PROCESSES", "3")
            cmd = [sys.executable, "-m", "pytest", "tests", "-m", "not slow"]
            if workers not in ("0", "1"):
                cmd += ["-n", workers, "--dist", "loadfile", "--no-loadscope-reorder"]
            cmd += extra
        return subprocess.run(cmd, env=env, cwd=ROOT).returncode
    finally:
        print("== stopping the test Kafka broker", flush=True)
        subprocess.run([*tokenmeter, "stack", "down"], env=env, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
