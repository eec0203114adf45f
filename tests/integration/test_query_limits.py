"""An analyst's query through a real worker (issue 14, item 3): limits the analyst cannot
lift, no hold on ingestion, and a worker that stops on SIGTERM whatever a query does.

Real broker, real worker, real engine; the queries go through `tokenmeter sql` and the
worker's public port (the quota server, which forwards /v1/query to faust's pages).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

import psutil
import pytest

from tests.integration.harness import Harness

pytestmark = pytest.mark.integration

MAX_SECONDS = 15
# a query that runs far longer than MAX_SECONDS on this machine (the issue saw 36 s
# for a tenth of it) and reads no more rows than the default read limit
HEAVY = "SELECT count() FROM numbers(10000000000) WHERE sipHash64(number) % 7 = 3"


def post_query(h: Harness, body: bytes, timeout: float = 120) -> tuple[int, dict[str, Any]]:
    """POST ``body`` to the worker's /v1/query; (status, JSON answer)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{h.port}/v1/query",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def usage_rows(h: Harness) -> int:
    return int(h.scalar("SELECT count() AS n FROM usage_events"))


def test_query_limits_hold_and_ingestion_goes_on(harness: Harness) -> None:
    harness.env.update(
        {
            "TOKENMETER_QUERY_MAX_SECONDS": str(MAX_SECONDS),
            "TOKENMETER_QUERY_MAX_RESULT_ROWS": "1000",
        }
    )
    harness.start_worker()

    # a query that never ends by itself ends within the time limit, with an error naming
    # the limit it met (the engine counts ~1e9 rows/s here: the read limit may come first)
    started = time.monotonic()
    proc = harness.cli("sql", "SELECT count() FROM system.numbers LIMIT 5", check=False)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "limit exceeded (TOKENMETER_QUERY_MAX_" in " ".join(proc.stderr.split())
    assert elapsed < MAX_SECONDS + 15

    # too many result rows: an error, not a worker filling its memory
    status, body = post_query(
        harness, json.dumps({"sql": "SELECT number FROM numbers(5000)"}).encode()
    )
    assert status == 400
    assert "limit exceeded" in body["error"] and "MAX_RESULT_ROWS" in body["error"]
    assert post_query(harness, b'{"sql": "SELECT number FROM numbers(1000)"}')[0] == 200

    # the analyst cannot lift a limit: neither on the statement nor in a subquery
    status, body = post_query(
        harness, b'{"sql": "SELECT number FROM numbers(5000) SETTINGS max_result_rows = 0"}'
    )
    assert status == 400 and "readonly" in body["error"].lower()
    status, body = post_query(
        harness,
        b'{"sql": "SELECT count() FROM (SELECT number FROM numbers(5000) '
        b'SETTINGS max_result_rows = 0, max_execution_time = 0)"}',
    )
    assert status == 200 and body["rows"] == [[5000]]  # the inner setting did not count...
    status, body = post_query(
        harness,
        b'{"sql": "SELECT * FROM (SELECT number FROM numbers(5000) SETTINGS max_result_rows = 0)"}',
    )
    assert status == 400 and "MAX_RESULT_ROWS" in body["error"]  # ...nor does it here

    # text that is not Unicode: a 400 that says so, and the SQL never reaches the log
    status, body = post_query(harness, b'{"sql": "SELECT \'tm-secret-text\\udcff\'"}')
    assert status == 400 and "not valid Unicode" in body["error"]
    assert "tm-secret-text" not in harness.worker_log.read_text(errors="replace")

    # a heavy query does not hold an event produced meanwhile
    before = usage_rows(harness)
    heavy = harness.spawn_cli("sql", HEAVY)
    time.sleep(2)
    assert heavy.poll() is None, heavy.communicate()
    harness.cli("simulate", "--events", "20", "--seed", "5")
    produced = time.monotonic()
    while usage_rows(harness) < before + 20:  # `tokenmeter sql` answers meanwhile too
        assert heavy.poll() is None, "the heavy query ended before the events landed"
        assert time.monotonic() - produced < MAX_SECONDS - 3, harness.log_tail()
        time.sleep(0.3)
    assert heavy.poll() is None  # the events landed while the query ran
    out, _ = heavy.communicate(timeout=MAX_SECONDS + 30)
    assert heavy.returncode == 2 and "TOKENMETER_QUERY_MAX_SECONDS" in out
    assert harness.stop_worker() == 0


def faust_port(h: Harness) -> int:
    """The private port of the worker's faust pages (the public one is the quota
    server's, which forwards to it)."""
    assert h.worker is not None
    ports = {
        c.laddr.port
        for c in psutil.Process(h.worker.pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.ip == "127.0.0.1"
    }
    ports.discard(h.port)
    assert len(ports) == 1, ports
    return ports.pop()


def worker_cpu(h: Harness, seconds: float = 1.0) -> float:
    """The worker process's CPU use over ``seconds`` (1.0 = one core busy). Analysts may
    not read system.processes, so a running query shows as the engine's work."""
    assert h.worker is not None
    proc = psutil.Process(h.worker.pid)
    before = proc.cpu_times()
    time.sleep(seconds)
    after = proc.cpu_times()
    return (after.user + after.system - before.user - before.system) / seconds


def test_a_query_whose_client_goes_away_is_cancelled(harness: Harness) -> None:
    harness.start_worker()  # the default limit: 60 s
    body = json.dumps({"sql": HEAVY}).encode()
    with socket.create_connection(("127.0.0.1", faust_port(harness))) as client:
        client.sendall(
            b"POST /v1/query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        time.sleep(2)
        assert worker_cpu(harness) > 0.5  # the heavy query runs
    gone = time.monotonic()
    while worker_cpu(harness) > 0.25:
        assert time.monotonic() - gone < 15, "the query runs on after its client left"
    assert harness.stop_worker() == 0


def test_sigterm_during_a_long_query_stops_the_worker(harness: Harness) -> None:
    harness.start_worker()  # the default limit: 60 s
    heavy = harness.spawn_cli("sql", HEAVY)
    time.sleep(3)
    assert heavy.poll() is None, heavy.communicate()
    # meanwhile the worker consumes and commits: `tokenmeter wait` sees it catch up
    harness.cli("simulate", "--events", "20", "--seed", "6")
    harness.cli("wait", "--idle", "1", "--timeout", "30")
    assert heavy.poll() is None, heavy.communicate()
    assert harness.worker is not None
    stopping = time.monotonic()
    harness.worker.send_signal(signal.SIGTERM)
    try:
        code = harness.worker.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not stop within 30 s of SIGTERM:\n{harness.log_tail()}")
    harness.worker = None
    assert code == 0, harness.log_tail()
    assert time.monotonic() - stopping < 30
    out, _ = heavy.communicate(timeout=30)
    assert heavy.returncode != 0 and "Traceback" not in out
