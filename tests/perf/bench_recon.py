"""Benchmark: reconcile ten million cross-carrier calls (records per side), then settle.

    .venv/bin/python tests/perf/bench_recon.py [--pairs 10000000] [--data-dir DIR] [--keep]

Not collected by pytest (its name does not start with ``test_``). Steps, each in its own
process (chdb holds one data directory per process, and a fresh process makes the
peak RSS of the step its own):

1. ``generate``: one month (November 2026, Beijing time) of ``--pairs`` calls written
   straight into ``usage_events`` by ``INSERT ... SELECT FROM numbers()``, both
   carriers' records; one call in 1000 of each discrepancy category (token_mismatch,
   amount_mismatch, missing_at_home, missing_at_serving, duplicate, period_boundary),
   the rest matched. Not timed as part of the result.
2. ``reconcile``: ``jobs.reconcile.reconcile`` for 2026-11: wall time and peak RSS; the
   counts per category are checked against the injected ones.
3. ``reconcile`` again: the same inputs, found and skipped (the idempotence check).
4. ``settle``: ``jobs.settle.settle`` with the shipped agreements: wall time, peak RSS.

Prints one line per step and a summary; exit code 1 if a count is off.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PERIOD = "2026-11"
FAULTS = (
    "token_mismatch",
    "amount_mismatch",
    "missing_at_home",
    "missing_at_serving",
    "duplicate",
    "period_boundary",
)
EVERY = 1000  # call n has fault FAULTS[n % EVERY] when n % EVERY < 6


def _generate_sql(pairs: int, start_ms: int, end_ms: int) -> str:
    body = end_ms - start_ms - 4 * 3_600_000
    category = (
        f"multiIf(n % {EVERY} = 0, 'token_mismatch', n % {EVERY} = 1, 'amount_mismatch',"
        f" n % {EVERY} = 2, 'missing_at_home', n % {EVERY} = 3, 'missing_at_serving',"
        f" n % {EVERY} = 4, 'duplicate', n % {EVERY} = 5, 'period_boundary', 'matched')"
    )
    models = (
        "['deepseek-v3','deepseek-r1','qwen-max','doubao-pro','kimi-k2','glm-4.6',"
        "'jiutian-13b','hunyuan-turbo','ernie-4.5']"
    )
    providers = (
        "['DeepSeek','DeepSeek','Alibaba','ByteDance','Moonshot','Zhipu','China Mobile',"
        "'Tencent','Baidu']"
    )
    return f"""
    INSERT INTO usage_events (event_id, event_time, source, source_id, reporting_carrier,
        home_carrier, serving_carrier, transaction_id, tenant_id, subscriber_id, channel,
        model_id, provider, input_tokens, output_tokens, cached_tokens, reasoning_tokens,
        status, routing_policy, latency_ms, region, attributes, payload_hash, topic,
        partition, offset, ingested_at)
    SELECT
        concat(lower(rep), '-bench-', toString(n), '-', toString(side)) AS event_id,
        multiIf(
            cat = 'period_boundary',
              fromUnixTimestamp64Milli(toInt64({end_ms}) + if(side = 0, -1500, 1500), 'UTC'),
            fromUnixTimestamp64Milli(
              toInt64({start_ms + 7_200_000}) + toInt64((n * 7919) % {body})
              + if(side = 1, toInt64(n % 1500), 0) + if(side = 2, 1000, 0), 'UTC')
        ) AS event_time,
        'gateway', concat('gw-', lower(rep), '-', toString(n % 40)), rep, home, serving,
        concat('tx-bench-', toString(n)),
        concat('tn-', lower(home), '-', leftPad(toString(1 + cityHash64(n, 't') % 400), 4, '0')),
        concat('sub_', lower(hex(cityHash64(n % 300000)))),
        ['app','api','new_calling','new_messaging','home_terminal','business_hall'][1 + n % 6],
        if(cat = 'amount_mismatch', if(side = 1, 'deepseek-r1', 'deepseek-v3'),
           {models}[1 + m]) AS model_id,
        if(cat = 'amount_mismatch', 'DeepSeek', {providers}[1 + m]),
        100 + cityHash64(n, 'i') % 5000 AS input_tokens,
        10 + cityHash64(n, 'o') % 2000 + if(cat = 'token_mismatch' AND side = 1, 7, 0),
        if(cityHash64(n, 'c') % 10 < 3, intDiv(input_tokens, 3), 0),
        if(model_id = 'deepseek-r1' AND cat != 'amount_mismatch',
           50 + cityHash64(n, 'r') % 3000, 0),
        if(cat != 'amount_mismatch' AND n % 37 = 0, 'timeout', 'ok'),
        NULL, 300 + n % 2000, NULL, map(),
        toInt64(cityHash64(n, side)), 'bench', 0, n, now64(3)
    FROM (
        SELECT number AS n, {category} AS cat, intDiv(number, 7) % 9 AS m,
            ['CMCC','CTCC','CUCC'][1 + n % 3] AS serving,
            ['CMCC','CTCC','CUCC'][1 + (n + 1 + intDiv(n, 3) % 2) % 3] AS home,
            arrayJoin(multiIf(cat = 'missing_at_home', [0], cat = 'missing_at_serving', [1],
                              cat = 'duplicate', [0, 1, 2], [0, 1])) AS side,
            if(side = 1, home, serving) AS rep
        FROM numbers({pairs})
    )
    """


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _step(name: str, data_dir: Path, pairs: int) -> dict[str, object]:
    from jobs.agreements import load_agreements
    from jobs.reconcile import Period, ReconParams, reconcile
    from jobs.settle import settle
    from pipeline.metering.pricing import load_cards
    from pipeline.settings import load_settings
    from pipeline.warehouse import open_warehouse, scalar

    wh = open_warehouse(load_settings(data_dir=data_dir))
    period = Period.parse(PERIOD)
    out: dict[str, object] = {"step": name}
    try:
        started = time.monotonic()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu0 = usage.ru_utime + usage.ru_stime
        if name == "generate":
            wh.execute(_generate_sql(pairs, period.start_ms, period.end_ms))
            out["records"] = scalar(wh.query_arrow("SELECT count() FROM usage_events"))
        elif name == "reconcile":
            run = reconcile(wh, ReconParams(period), load_cards(ROOT / "config" / "price_cards"))
            out.update(
                run_id=run.run_id,
                created=run.created,
                records=run.input_records,
                transactions=run.transactions,
                counts=run.counts(),
            )
        elif name == "settle":
            st = settle(wh, period, load_agreements(ROOT / "config" / "agreements"))
            out.update(
                settlement_id=st.settlement_id,
                created=st.created,
                items=st.items,
                amount=str(st.amount),
                multilateral=[(t.payer, t.payee, str(t.amount)) for t in st.multilateral],
            )
        out["seconds"] = round(time.monotonic() - started, 2)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime - cpu0, 1)
        out["load"] = round(os.getloadavg()[0], 2)
    finally:
        wh.close()
    out["peak_rss_mb"] = round(_rss_mb(), 1)
    return out


def _run_step(name: str, data_dir: Path, pairs: int) -> dict[str, object]:
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--step",
            name,
            "--data-dir",
            str(data_dir),
            "--pairs",
            str(pairs),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"step {name} failed")
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=10_000_000)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--keep", action="store_true", help="Keep the data directory.")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(_step(args.step, args.data_dir, args.pairs)))
        return 0

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="bench-recon-"))
    print(
        f"data dir {data_dir}; {args.pairs:,} calls; {os.cpu_count()} cores;"
        f" load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    try:
        gen = _run_step("generate", data_dir, args.pairs)
        print(f"generate: {gen['records']:,} records in {gen['seconds']} s", flush=True)
        first = _run_step("reconcile", data_dir, args.pairs)
        print(
            f"reconcile: {first['records']:,} records, {first['transactions']:,} transactions"
            f" in {first['seconds']} s (CPU {first['cpu_seconds']} s), peak RSS"
            f" {first['peak_rss_mb']} MB (load average at the end {first['load']})",
            flush=True,
        )
        again = _run_step("reconcile", data_dir, args.pairs)
        print(
            f"reconcile again: same run {again['run_id'] == first['run_id']},"
            f" created {again['created']}, {again['seconds']} s",
            flush=True,
        )
        st = _run_step("settle", data_dir, args.pairs)
        print(
            f"settle: {st['items']:,} settled transactions, CNY {st['amount']} in"
            f" {st['seconds']} s (CPU {st['cpu_seconds']} s), peak RSS {st['peak_rss_mb']} MB;"
            " multilateral"
            f" {st['multilateral']}",
            flush=True,
        )
    finally:
        if not args.keep and args.data_dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)

    expected = {f: len(range(i, args.pairs, EVERY)) for i, f in enumerate(FAULTS)}
    expected["matched"] = args.pairs - sum(expected.values())
    counts = first["counts"]
    assert isinstance(counts, dict)
    ok = all(counts[k] == v for k, v in expected.items()) and not again["created"]
    print(f"counts {'equal' if ok else 'DIFFER FROM'} the injected ones: {counts}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
