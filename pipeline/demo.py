"""``tokenmeter demo``: the whole pipeline on the embedded default, end to end.

Starts what is not running (broker, worker), sends simulated carrier traffic with
duplicates and bad records, waits until the worker has committed all of it, and
prints what was metered next to what the simulation says should have been. Only
this run's events are counted (by their Kafka offsets), so the demo can be run again
on the same data directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.lag import LagReader, wait_caught_up
from pipeline.query import query_worker
from pipeline.settings import Settings, private_dir
from pipeline.simulate_run import run_simulation
from pipeline.worker_state import running_worker


class DemoError(Exception):
    """The demo could not run; the message says which part failed."""


def _health(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v1/health", timeout=2) as response:
            return bool(json.loads(response.read()).get("pipeline"))
    except (urllib.error.URLError, OSError, ValueError):
        return False


def start_worker(
    settings: Settings, console: Console, timeout_s: float = 120
) -> subprocess.Popen[bytes]:
    """Start ``tokenmeter worker`` in the background and wait until it answers."""
    log_path = settings.data_path / "worker.log"
    private_dir(log_path.parent)
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "--data-dir",
        str(settings.data_path),
        "--bootstrap",
        settings.kafka_bootstrap,
        "worker",
    ]
    log_file = os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    with console.status("starting the worker"):
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DemoError(f"the worker exited with code {proc.returncode}; see {log_path}")
            if _health(settings.web_url):
                return proc
            time.sleep(0.5)
    proc.terminate()
    raise DemoError(f"the worker did not become ready in {timeout_s:.0f} s; see {log_path}")


def stop_worker(proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """SIGTERM the worker (it commits and closes cleanly); SIGKILL if it hangs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def wait_processed(
    settings: Settings, console: Console, idle_s: float = 2.0, timeout_s: float = 900
) -> None:
    """Block until the worker's committed offsets reach the end of its topics."""
    with console.status("metering") as status:
        lags = wait_caught_up(settings, idle_s, timeout_s, status.update, poll_s=0.3)
    if lags is not None:
        raise DemoError(f"the worker did not catch up within {timeout_s:.0f} s")


def offset_filter(ranges: dict[int, tuple[int, int]]) -> str:
    """SQL condition selecting rows whose (partition, offset) fall in this run."""
    parts = [
        f"(partition = {p} AND offset >= {lo} AND offset < {hi})"
        for p, (lo, hi) in sorted(ranges.items())
        if hi > lo
    ]
    return "(" + " OR ".join(parts) + ")" if parts else "0"


def run_demo(
    settings: Settings,
    events: int,
    seed: int | None,
    keep_running: bool,
    console: Console,
    err_console: Console,
) -> None:
    """The demo, start to summary."""
    from pipeline import stack

    started_stack = False
    if not stack.stack_status(settings).running:
        stack.stack_up(settings, console=err_console)
        started_stack = True
    worker_proc = None
    if running_worker(settings) is None:
        worker_proc = start_worker(settings, err_console)
    try:
        url = settings.web_url
        reader = LagReader(settings, [settings.topic_usage])
        before = reader.end_offsets(settings.topic_usage)
        seed = seed if seed is not None else int(time.time()) % 100_000
        started = time.monotonic()
        truth = run_simulation(
            settings,
            events,
            seed,
            0.03,
            0.01,
            200,
            None,
            err_console,
            live_rate=10_000.0,
            late_share=0.02,
        )
        wait_processed(settings, err_console)
        elapsed = time.monotonic() - started
        after = reader.end_offsets(settings.topic_usage)
        reader.close()
        ranges = {p: (before.get(p, 0), after[p]) for p in after}
        _summary(url, settings, ranges, truth, seed, elapsed, console)
    finally:
        if not keep_running:
            if worker_proc is not None:
                with err_console.status("stopping the worker"):
                    stop_worker(worker_proc)
            if started_stack:
                stack.stack_down(settings, console=err_console)
        else:
            err_console.print(
                f"left running: worker at {settings.web_url}, broker at {settings.kafka_bootstrap}"
            )


_TOKEN_SUMS = (
    "count() AS events, sum(input_tokens) AS input, sum(output_tokens) AS output, "
    "sum(cached_tokens) AS cached, sum(reasoning_tokens) AS reasoning"
)


def _q(url: str, sql: str) -> list[dict[str, Any]]:
    columns, rows = query_worker(url, sql)
    return [dict(zip(columns, row, strict=True)) for row in rows]


def _summary(
    url: str,
    settings: Settings,
    ranges: dict[int, tuple[int, int]],
    truth: dict[str, Any],
    seed: int,
    elapsed: float,
    console: Console,
) -> None:
    where = f"topic = '{settings.topic_usage}' AND {offset_filter(ranges)}"
    accepted = int(_q(url, f"SELECT count() AS n FROM usage_events WHERE {where}")[0]["n"])
    letters = _q(
        url,
        f"SELECT reason, count() AS n FROM dead_letters WHERE {where} "
        "GROUP BY reason ORDER BY n DESC, reason",
    )
    dead = sum(int(r["n"]) for r in letters)
    produced = sum(hi - lo for lo, hi in ranges.values())
    dropped = produced - accepted - dead

    head = Table(title=f"tokenmeter demo (seed {seed})", show_header=True)
    head.add_column("")
    head.add_column("metered", justify="right")
    head.add_column("expected", justify="right")
    head.add_column("")

    def row(label: str, got: int, want: int) -> None:
        head.add_row(
            label, f"{got:,}", f"{want:,}", "[green]ok[/]" if got == want else "[red]DIFF[/]"
        )

    row("events produced", produced, int(truth["messages"]))
    row("events accepted", accepted, int(truth["unique_valid"]))
    row("duplicates dropped", dropped, int(truth["exact_duplicates"]))
    row("dead letters", dead, int(truth["dead_letters_total"]))
    head.caption = f"{produced / elapsed:,.0f} events/s end to end, {elapsed:.1f} s"
    console.print(head)

    reasons = Table(title="dead letters by reason")
    reasons.add_column("reason")
    reasons.add_column("count", justify="right")
    reasons.add_column("expected", justify="right")
    expected = truth["dead_letters"]
    for r in letters:
        reasons.add_row(r["reason"], f"{int(r['n']):,}", f"{int(expected.get(r['reason'], 0)):,}")
    console.print(reasons)

    by_carrier = _q(
        url,
        "SELECT reporting_carrier AS carrier, "
        f"{_TOKEN_SUMS} FROM usage_events WHERE {where} GROUP BY carrier ORDER BY carrier",
    )
    _tokens_table("tokens by reporting carrier", "carrier", by_carrier, console)
    by_model = _q(
        url,
        "SELECT model_id AS model, "
        f"{_TOKEN_SUMS} FROM usage_events WHERE {where} GROUP BY model "
        "ORDER BY input + output DESC",
    )
    _tokens_table("tokens by model", "model", by_model, console)
    console.print(
        f'Query it yourself: [bold]tokenmeter sql "SELECT model_id, sum(output_tokens) '
        f'FROM usage_events GROUP BY model_id"[/] (data in {settings.data_path})'
    )


def _tokens_table(title: str, key: str, rows: list[dict[str, Any]], console: Console) -> None:
    table = Table(title=title)
    table.add_column(key)
    for col in ("events", "input", "output", "cached", "reasoning"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r[key]),
            *(f"{int(r[c]):,}" for c in ("events", "input", "output", "cached", "reasoning")),
        )
    console.print(table)
