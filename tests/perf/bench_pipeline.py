"""End-to-end benchmark of the worker, with two references run on the same events.

    TOKENMETER_KAFKA_BOOTSTRAP=127.0.0.1:19092 \\
        .venv/bin/python tests/perf/bench_pipeline.py --events 200000 --out bench-results/b.json

(``make bench`` starts a broker and runs this.) Steps, each on its own topics, consumer
group, data directory and web port, so nothing is shared with other runs:

1. pre-produce N simulated events (history mode, small duplicate and bad rates) with
   confluent-kafka at full speed, keyed by tenant with the ``murmur2_random`` partitioner;
   subscribers stay raw, the worker pseudonymises them;
2. ceiling: ``tests/perf/ceiling.py``, a confluent-kafka batch consumer that decodes the
   Avro and discards it;
3. pipeline: ``python -m pipeline.cli worker`` started cold; every 0.5 s the group's
   committed offsets (they move only after the sink's write) and the worker's RSS and
   CPU time (children included) are sampled. Sustained events/s = events committed
   between 10 % and 90 % of N over the time that took (interpolated);
4. naive: ``tests/perf/naive_faust.py``, per-event faust with two table updates, measured
   the same way on the same events;
5. latency: a new topic set and a warm worker; a producer sends live traffic at 50 % of
   the pipeline's sustained rate plus marker events (a dedicated tenant, a few per
   second) stamped with their produce time; a poller asks the worker's ``/v1/query``
   for ``sum(events)`` of that tenant per minute in ``usage_minute``. Markers of one
   tenant share one partition and are processed in order, so when a minute's sum
   reaches k, its first k markers are queryable: latency = time of the first answer
   showing it - produce time (an upper bound; the poll interval is the resolution).

Writes JSON (``--out``) and prints a table. The headline is the ratio pipeline / ceiling
and pipeline / naive, because absolute figures are noisy on shared machines; load
averages at start and end are recorded for that reason. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient  # noqa: E402

from pipeline.events import Rules, check_record, now_ms  # noqa: E402
from pipeline.produce import producer_config  # noqa: E402
from pipeline.serde import AvroCodec  # noqa: E402
from pipeline.settings import Settings, load_settings  # noqa: E402
from pipeline.simulate import Simulation  # noqa: E402
from pipeline.stack import ensure_topics  # noqa: E402
from pipeline.topics import dead_letters, quota_events, usage_events  # noqa: E402
from tests.integration.harness import free_port  # noqa: E402

PARTITIONS = 4
SAMPLE_S = 0.5
MARKER_TENANT = "tn-bench-latency"
PYSPY = Path(sys.executable).with_name("py-spy")


# ---- small helpers ---------------------------------------------------------------------


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in ("faust-streaming", "aiokafka", "confluent-kafka", "chdb", "fastavro", "pyarrow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def steady_rate(
    samples: list[tuple[float, int]], total: int, lo: float = 0.1, hi: float = 0.9
) -> tuple[float | None, float | None, float | None]:
    """Events/s between ``lo`` and ``hi`` of ``total`` done, from (t, done) samples,
    linearly interpolated. Returns (rate, t_lo, t_hi); None where not reached."""

    def when(target: float) -> float | None:
        prev_t, prev_n = 0.0, 0
        for t, n in samples:
            if n >= target:
                if n == prev_n:
                    return t
                return prev_t + (t - prev_t) * (target - prev_n) / (n - prev_n)
            prev_t, prev_n = t, n
        return None

    t_lo, t_hi = when(lo * total), when(hi * total)
    if t_lo is None or t_hi is None or t_hi <= t_lo:
        return None, t_lo, t_hi
    return (hi - lo) * total / (t_hi - t_lo), t_lo, t_hi


def interpolate(samples: list[tuple[float, float]], t: float) -> float:
    """Value of a (t, value) series at time t (linear; clamped at the ends)."""
    prev_t, prev_v = samples[0]
    for st, sv in samples:
        if st >= t:
            if st == prev_t:
                return sv
            return prev_v + (sv - prev_v) * (t - prev_t) / (st - prev_t)
        prev_t, prev_v = st, sv
    return prev_v


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    f = int(k)
    c = min(f + 1, len(ordered) - 1)
    return ordered[f] + (ordered[c] - ordered[f]) * (k - f)


# ---- topics, producing, progress -------------------------------------------------------


@dataclass
class TopicSet:
    """One isolated set of names for a worker run."""

    tag: str
    usage: str = ""
    dead: str = ""
    quota: str = ""
    group: str = ""

    def __post_init__(self) -> None:
        self.usage = f"bench-usage-events-{self.tag}"
        self.dead = f"bench-usage-dead-letters-{self.tag}"
        self.quota = f"bench-quota-events-{self.tag}"
        self.group = f"bench-worker-{self.tag}"

    def create(self, settings: Settings) -> None:
        s = settings.model_copy(
            update={
                "topic_usage": self.usage,
                "topic_dead_letters": self.dead,
                "topic_quota_events": self.quota,
            }
        )
        specs = [usage_events(s), dead_letters(s), quota_events(s)]
        ensure_topics(s, {t.name: t.config for t in specs}, partitions=PARTITIONS)


def preproduce(
    bootstrap: str, topic: str, n: int, seed: int, dup_rate: float, bad_rate: float
) -> dict[str, Any]:
    """Send ``n`` simulated messages as fast as confluent-kafka takes them."""
    settings = load_settings(kafka_bootstrap=bootstrap)
    producer = Producer(producer_config(settings))
    sim = Simulation(seed=seed, now_ms=now_ms())
    failures: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    started = time.monotonic()
    for i, msg in enumerate(sim.messages(n, dup_rate=dup_rate, bad_rate=bad_rate)):
        while True:
            try:
                producer.produce(topic, msg.value, msg.key, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10_000 == 0:
            producer.poll(0)
    remaining = producer.flush(120)
    seconds = time.monotonic() - started
    if remaining or failures:
        raise RuntimeError(f"pre-produce failed: {remaining} unsent, {failures[:3]}")
    truth = sim.truth
    return {
        "events": n,
        "seconds": round(seconds, 2),
        "events_per_s": round(n / seconds),
        "unique_valid": truth.unique_valid,
        "exact_duplicates": truth.exact_duplicates,
        "dead_letters": truth.dead_letters_total,
        "dead_letter_reasons": dict(truth.dead_letters),
    }


class GroupProgress:
    """Committed offsets of a consumer group (it never joins the group); or, with
    ``end_of``, the end offsets of another topic (the naive app's table changelog)."""

    def __init__(self, bootstrap: str, group: str, topic: str, end_of: str | None = None) -> None:
        self.parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        self.end_of = [TopicPartition(end_of, p) for p in range(PARTITIONS)] if end_of else []
        self.consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}
        )

    def committed(self) -> int:
        if self.end_of:
            with contextlib.suppress(Exception):  # the changelog may not exist yet
                return sum(
                    self.consumer.get_watermark_offsets(tp, timeout=5, cached=False)[1]
                    for tp in self.end_of
                )
            return 0
        return sum(max(tp.offset, 0) for tp in self.consumer.committed(self.parts, timeout=10))

    def end(self) -> int:
        return sum(
            self.consumer.get_watermark_offsets(tp, timeout=10, cached=False)[1]
            for tp in self.parts
        )

    def close(self) -> None:
        self.consumer.close()


def tree_usage(proc: psutil.Process) -> tuple[int, float]:
    """RSS (bytes) and CPU seconds of a process and its children."""
    rss = 0
    cpu = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            rss += p.memory_info().rss
            t = p.cpu_times()
            cpu += t.user + t.system
    return rss, cpu


# ---- processes -------------------------------------------------------------------------


@dataclass
class Child:
    """A subprocess this bench started (stopped by its own pid only)."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    ps: psutil.Process = field(init=False)

    def __post_init__(self) -> None:
        self.ps = psutil.Process(self.popen.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 60) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        return int(self.popen.returncode)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def start(name: str, cmd: list[str], env: dict[str, str], log: Path) -> Child:
    out = log.open("ab")
    popen = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    out.close()
    return Child(name, popen, log)


def worker_env(bootstrap: str, topics: TopicSet, data_dir: Path, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "TOKENMETER_DATA_DIR": str(data_dir),
            "TOKENMETER_KAFKA_BOOTSTRAP": bootstrap,
            "TOKENMETER_TOPIC_USAGE": topics.usage,
            "TOKENMETER_TOPIC_DEAD_LETTERS": topics.dead,
            "TOKENMETER_TOPIC_QUOTA_EVENTS": topics.quota,
            "TOKENMETER_CONSUMER_GROUP": topics.group,
            "TOKENMETER_WEB_PORT": str(port),
            "TOKENMETER_WEB_HOST": "127.0.0.1",
        }
    )
    return env


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 10) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"} if data else {}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_healthy(child: Child, port: int, timeout: float = 120) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited {child.popen.returncode}:\n{child.tail()}")
        with contextlib.suppress(OSError, ValueError):
            if http_json(f"http://127.0.0.1:{port}/v1/health", timeout=1).get("pipeline"):
                return time.monotonic() - started
        time.sleep(0.2)
    raise RuntimeError(f"{child.name} not healthy after {timeout} s:\n{child.tail()}")


def query(port: int, sql: str) -> list[list[Any]]:
    rows: list[list[Any]] = http_json(f"http://127.0.0.1:{port}/v1/query", {"sql": sql})["rows"]
    return rows


# ---- one measured consumer run ------------------------------------------------------------


def measure_consumer(
    child: Child,
    progress: GroupProgress,
    total: int,
    timeout: float,
    profile: tuple[Path, float] | None = None,
) -> dict[str, Any]:
    """Sample a consumer process until its group committed ``total`` events."""
    t0 = time.monotonic()
    done: list[tuple[float, int]] = [(0.0, 0)]
    cpu: list[tuple[float, float]] = [(0.0, 0.0)]
    peak_rss = 0
    first_commit: float | None = None
    spy: subprocess.Popen[bytes] | None = None
    try:
        while True:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited {child.popen.returncode}:\n{child.tail()}")
            n = progress.committed()
            rss, cpu_s = tree_usage(child.ps)
            t = time.monotonic() - t0
            done.append((t, n))
            cpu.append((t, cpu_s))
            peak_rss = max(peak_rss, rss)
            if n and first_commit is None:
                first_commit = t
            if profile is not None and spy is None and n >= 0.1 * total:
                out, seconds = profile
                spy = subprocess.Popen(
                    [str(PYSPY), "record", "-p", str(child.popen.pid), "-f", "raw", "-r", "50"]
                    + ["-d", str(int(seconds)), "--threads", "--nonblocking", "-o", str(out)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            if n >= total:
                break
            if t > timeout:
                raise RuntimeError(f"{child.name}: only {n}/{total} committed after {timeout} s")
            time.sleep(SAMPLE_S)
    finally:
        if spy is not None:
            try:
                spy.wait(profile[1] + 30 if profile else 30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait(5)
    rate, t_lo, t_hi = steady_rate(done, total)
    steady_cpu = None
    if rate and t_lo is not None and t_hi is not None:
        steady_cpu = interpolate(cpu, t_hi) - interpolate(cpu, t_lo)
    return {
        "events": total,
        "events_per_s": round(rate) if rate else None,
        "overall_events_per_s": round(total / done[-1][0]),
        "seconds_to_first_commit": round(first_commit, 1) if first_commit else None,
        "seconds_total": round(done[-1][0], 1),
        "steady_window_s": [round(t_lo, 1), round(t_hi, 1)] if t_lo and t_hi else None,
        "cpu_seconds_steady": round(steady_cpu, 1) if steady_cpu else None,
        "events_per_cpu_s": round(0.8 * total / steady_cpu) if steady_cpu else None,
        "peak_rss_mib": round(peak_rss / 2**20, 1),
        "samples": len(done),
    }


# ---- the runs ------------------------------------------------------------------------------


def run_ceiling(bootstrap: str, topic: str, total: int) -> dict[str, Any]:
    say(f"ceiling: confluent-kafka batch consume + fastavro decode of {total:,} events")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests/perf/ceiling.py"), bootstrap, topic, str(total)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    samples = [(float(t), int(n)) for t, n in out.pop("samples")]
    rate, _, _ = steady_rate([(0.0, 0), *samples], total)
    out["events_per_s"] = round(rate) if rate else None
    out["overall_events_per_s"] = round(out["events"] / out["seconds"])
    out["events_per_cpu_s"] = round(out["events"] / out["cpu_seconds"])
    return out


def run_pipeline(
    bootstrap: str,
    topics: TopicSet,
    work: Path,
    total: int,
    truth: dict[str, Any],
    timeout: float,
    profile: tuple[Path, float] | None,
) -> dict[str, Any]:
    port = free_port()
    data = work / f"worker-{topics.tag}"
    env = worker_env(bootstrap, topics, data, port)
    say(f"pipeline: worker started cold on {total:,} events (group {topics.group})")
    child = start(
        "worker", [sys.executable, "-m", "pipeline.cli", "worker"], env, work / "worker.log"
    )
    progress = GroupProgress(bootstrap, topics.group, topics.usage)
    try:
        result = measure_consumer(child, progress, total, timeout, profile)
        stored = query(port, "SELECT count() FROM usage_events")[0][0]
        # dead letters reach their table through the dead-letter topic: give it a moment
        letters = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            letters = query(port, "SELECT count() FROM dead_letters")[0][0]
            if letters >= truth["dead_letters"]:
                break
            time.sleep(1)
        result["usage_events_rows"] = stored
        result["dead_letter_rows"] = letters
        result["exact"] = stored == truth["unique_valid"] and letters == truth["dead_letters"]
        result["throughput_log"] = [
            line.split("throughput: ", 1)[1]
            for line in (work / "worker.log").read_text(errors="replace").splitlines()
            if "throughput: " in line
        ][-6:]
    finally:
        progress.close()
        result_code = child.stop()
    if result_code not in (0, None):
        say(f"worker exit code {result_code}")
    return result


def run_naive(
    bootstrap: str, topic: str, tag: str, work: Path, total: int, timeout: float
) -> dict[str, Any]:
    app_id = f"bench-naive-{tag}"
    env = dict(os.environ)
    env.update(
        {
            "NAIVE_BOOTSTRAP": bootstrap,
            "NAIVE_TOPIC": topic,
            "NAIVE_APP_ID": app_id,
            "NAIVE_DATA_DIR": str(work / app_id),
        }
    )
    say(f"naive: per-event faust with two table updates on {total:,} events")
    child = start(
        "naive faust",
        [sys.executable, str(ROOT / "tests/perf/naive_faust.py"), "worker"],
        env,
        work / "naive.log",
    )
    # faust commits a table's source offsets only after flushing its changelog, in
    # large late steps; the events table's changelog (one message per decoded event)
    # shows the durable progress as it happens
    progress = GroupProgress(bootstrap, app_id, topic, end_of=f"{app_id}-events-changelog")
    try:
        return measure_consumer(child, progress, total, timeout)
    finally:
        progress.close()
        child.stop()


def marker_record(i: int, tag: str, at_ms: int) -> dict[str, Any]:
    return {
        "event_id": f"lat-{tag}-{i}",
        "event_time": at_ms,
        "source": "gateway",
        "source_id": "gw-bench-latency",
        "reporting_carrier": "CMCC",
        "home_carrier": "CMCC",
        "serving_carrier": "CMCC",
        "transaction_id": None,
        "tenant_id": MARKER_TENANT,
        "subscriber_id": "sub_" + "0" * 32,
        "channel": "api",
        "model_id": "deepseek-v3",
        "provider": "DeepSeek",
        "input_tokens": 100,
        "output_tokens": 50,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "status": "ok",
        "routing_policy": None,
        "latency_ms": 200,
        "region": None,
        "attributes": {},
    }


@dataclass
class Markers:
    """Produce times of marker events per minute, and when each became queryable."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    by_minute: dict[int, list[tuple[float, bool]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    seen: dict[int, int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    warm_seen: int = 0
    query_s: list[float] = field(default_factory=list)

    def produced(self, minute: int, at: float, warmup: bool) -> None:
        with self.lock:
            self.by_minute[minute].append((at, warmup))

    def observe(self, counts: dict[int, int], t_seen: float) -> None:
        with self.lock:
            for minute, n in counts.items():
                sent = self.by_minute.get(minute, [])
                while self.seen[minute] < min(n, len(sent)):
                    at, warmup = sent[self.seen[minute]]
                    self.seen[minute] += 1
                    if warmup:
                        self.warm_seen += 1
                    else:
                        self.latencies.append(t_seen - at)

    def pending(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.by_minute.values()) - sum(self.seen.values())


def run_latency(
    bootstrap: str,
    settings: Settings,
    tag: str,
    work: Path,
    rate: float,
    seconds: float,
    markers_per_s: float,
    poll_s: float,
    dup_rate: float,
    bad_rate: float,
) -> dict[str, Any]:
    topics = TopicSet(f"{tag}-lat")
    topics.create(settings)
    port = free_port()
    env = worker_env(bootstrap, topics, work / f"worker-{topics.tag}", port)
    say(f"latency: warm worker, live traffic at {rate:,.0f} events/s for {seconds:.0f} s")
    child = start(
        "latency worker", [sys.executable, "-m", "pipeline.cli", "worker"], env, work / "lat.log"
    )
    codec = AvroCodec()
    rules = Rules()
    sample = marker_record(0, tag, now_ms())
    problem = check_record(sample, now_ms(), rules)
    if problem is not None:
        raise RuntimeError(f"marker event is invalid: {problem}")
    marks = Markers()
    stop = threading.Event()
    sql = (
        "SELECT toUnixTimestamp(period_start) AS m, sum(events) AS n FROM usage_minute "
        f"WHERE tenant_id = '{MARKER_TENANT}' GROUP BY m"
    )

    def poller() -> None:
        while not stop.is_set():
            sent = time.time()
            with contextlib.suppress(OSError, ValueError, KeyError):
                rows = query(port, sql)
                t_seen = time.time()
                marks.query_s.append(t_seen - sent)
                marks.observe({int(m): int(n) for m, n in rows}, t_seen)
            stop.wait(max(0.0, poll_s - (time.time() - sent)))

    producer = Producer(producer_config(load_settings(kafka_bootstrap=bootstrap)))
    count = 0

    def send_marker(warmup: bool) -> None:
        nonlocal count
        at = time.time()
        at_ms = int(at * 1000)
        marks.produced(at_ms // 60_000 * 60, at, warmup)
        value = codec.encode(marker_record(count, tag, at_ms))
        producer.produce(topics.usage, value, MARKER_TENANT.encode())
        count += 1

    poll_thread = threading.Thread(target=poller, daemon=True)
    try:
        wait_healthy(child, port)
        poll_thread.start()
        warm_deadline = time.monotonic() + 120
        while marks.warm_seen == 0:  # the whole path is up and hot
            if time.monotonic() > warm_deadline:
                raise RuntimeError(f"no marker became visible in 120 s:\n{child.tail()}")
            send_marker(warmup=True)
            producer.poll(0)
            time.sleep(0.5)
        sim = Simulation(seed=7, now_ms=now_ms(), live_rate=rate)
        stream = sim.messages(
            int(rate * seconds * 1.5) + 1000, dup_rate=dup_rate, bad_rate=bad_rate
        )
        started = time.monotonic()
        sent = 0
        next_marker = started
        while (elapsed := time.monotonic() - started) < seconds:
            target = int(elapsed * rate)
            while sent < target:
                msg = next(stream)
                try:
                    producer.produce(topics.usage, msg.value, msg.key)
                    sent += 1
                except BufferError:
                    producer.poll(0.01)
            if time.monotonic() >= next_marker:
                send_marker(warmup=False)
                next_marker += 1.0 / markers_per_s
            producer.poll(0)
            time.sleep(0.002)
        producer.flush(60)
        produce_s = time.monotonic() - started
        deadline = time.monotonic() + 120
        while marks.pending() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        if poll_thread.is_alive():
            poll_thread.join(10)
        child.stop()
    lat = marks.latencies
    return {
        "target_events_per_s": round(rate),
        "produced_events_per_s": round(sent / produce_s),
        "seconds": round(produce_s, 1),
        "markers": len(lat),
        "markers_missing": marks.pending(),
        "p50_ms": round(1000 * percentile(lat, 0.5)) if lat else None,
        "p99_ms": round(1000 * percentile(lat, 0.99)) if lat else None,
        "max_ms": round(1000 * max(lat)) if lat else None,
        "poll_interval_ms": round(1000 * poll_s),
        "query_p50_ms": round(1000 * percentile(marks.query_s, 0.5)) if marks.query_s else None,
    }


# ---- profile summary ----------------------------------------------------------------------

# inclusive sample share of the pipeline's parts: (function, file fragment) on the stack
STAGES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("faust -> RawMessage (_raw)", (("_raw", "pipeline/app.py"),)),
    ("decode (fastavro)", (("decode", "pipeline/serde.py"),)),
    ("validate (check_record)", (("check_record", "pipeline/events.py"),)),
    ("pseudonymise (HMAC)", (("pseudonymise", "pipeline/events.py"),)),
    ("payload_hash", (("payload_hash", "pipeline/events.py"),)),
    ("dedup check", (("check", "metering/dedup.py"),)),
    ("rate (pricing)", (("rate", "stages/rate.py"),)),
    ("usage_events Arrow batch", (("usage_events_table", "arrow_rows.py"),)),
    ("window rollups", (("rollup_table", "stages/window.py"), ("corrections_table", "window"))),
    ("sink writes (chdb insert)", (("insert_arrow", "warehouse/"),)),
    ("dead letters to Kafka", (("send_dead_letters", "pipeline/runtime.py"),)),
    ("dead-letter mirror", (("process_dead_letters", "pipeline/runtime.py"),)),
)
# py-spy names each stack's thread: "thread (tid): name"
THREADS = (
    ("pipeline thread", "pipeline_"),
    ("event loop (faust, aiokafka, web)", "MainThread"),
)


def _frame(f: str) -> tuple[str, str]:
    """'func (path/file.py:123)' -> ('func', 'path/file.py')."""
    name, _, rest = f.partition(" (")
    return name, rest.rsplit(":", 1)[0]


def summarise_profile(path: Path, top: int = 20) -> dict[str, Any]:
    """Aggregate py-spy's raw (collapsed) output: self and inclusive time per function,
    per thread kind, and per pipeline stage (percent of all samples)."""
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        thread, *rest = stack.split(";")
        frames = [_frame(f) for f in rest]
        total += count
        thread_name = thread.partition(": ")[2]
        kinds[next((k for k, prefix in THREADS if thread_name.startswith(prefix)), "other")] += (
            count
        )
        labels = [f"{fn} ({'/'.join(file.split('/')[-2:])})" for fn, file in frames]
        if labels:
            self_t[labels[-1]] += count
        for label in set(labels):
            incl[label] += count
        for stage, needles in STAGES:
            if any(
                (fn == want or fn.endswith("." + want)) and frag in file
                for fn, file in frames
                for want, frag in needles
            ):
                stages[stage] += count
    pct = 100.0 / total if total else 0.0
    return {
        "samples": total,
        "threads_pct": {k: round(v * pct, 1) for k, v in kinds.most_common()},
        "stages_pct": {k: round(stages[k] * pct, 1) for k, _ in STAGES},
        "self_pct": [(k, round(v * pct, 1)) for k, v in self_t.most_common(top)],
        "inclusive_pct": [(k, round(v * pct, 1)) for k, v in incl.most_common(top)],
    }


# ---- report ---------------------------------------------------------------------------------


def ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 3) if a and b else None


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    p, c, nv = result.get("pipeline", {}), result.get("ceiling", {}), result.get("naive", {})
    lat = result.get("latency", {})
    table = Table(title=f"tokenmeter bench: {result['events']:,} events", show_lines=False)
    for col in ("run", "events/s (steady)", "events/CPU-s", "peak RSS MiB", "notes"):
        table.add_column(col, justify="right" if col != "run" and col != "notes" else "left")

    def fmt(v: Any) -> str:
        return f"{v:,}" if isinstance(v, int | float) else "-"

    if c:
        table.add_row(
            "ceiling",
            fmt(c.get("events_per_s")),
            fmt(c.get("events_per_cpu_s")),
            "-",
            "confluent-kafka batch consume + fastavro decode",
        )
    if p:
        note = f"exact={p.get('exact')}, first commit {p.get('seconds_to_first_commit')} s"
        table.add_row(
            "pipeline",
            fmt(p.get("events_per_s")),
            fmt(p.get("events_per_cpu_s")),
            fmt(p.get("peak_rss_mib")),
            note,
        )
    if nv:
        table.add_row(
            "naive faust",
            fmt(nv.get("events_per_s")),
            fmt(nv.get("events_per_cpu_s")),
            fmt(nv.get("peak_rss_mib")),
            "per-event agent, 2 table updates/event",
        )
    r = result.get("ratios", {})
    table.add_row(
        "pipeline/ceiling",
        fmt(r.get("pipeline_over_ceiling")),
        fmt(r.get("pipeline_over_ceiling_cpu")),
        "",
        "",
    )
    table.add_row(
        "pipeline/naive",
        fmt(r.get("pipeline_over_naive")),
        fmt(r.get("pipeline_over_naive_cpu")),
        "",
        "",
    )
    if lat:
        table.add_row(
            "latency",
            f"p50 {fmt(lat.get('p50_ms'))} ms",
            f"p99 {fmt(lat.get('p99_ms'))} ms",
            "",
            f"{lat.get('markers')} markers at {fmt(lat.get('produced_events_per_s'))} "
            f"events/s (50 %), poll {lat.get('poll_interval_ms')} ms",
        )
    Console(width=130).print(table)
    load = result.get("load_average", {})
    print(
        f"load average at start {load.get('start')}, at end {load.get('end')} "
        f"on {result['machine']['cpus']} CPUs ({result['machine']['cpu_model']})"
    )


# ---- main -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description="tokenmeter end-to-end benchmark")
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--dup-rate", type=float, default=0.01)
    parser.add_argument("--bad-rate", type=float, default=0.001)
    parser.add_argument("--latency-seconds", type=float, default=30.0)
    parser.add_argument(
        "--latency-rate",
        type=float,
        default=None,
        help="events/s of the latency run (default: 50 %% of the pipeline's)",
    )
    parser.add_argument("--markers-per-s", type=float, default=4.0)
    parser.add_argument("--poll-ms", type=float, default=200.0)
    parser.add_argument(
        "--naive-events",
        type=int,
        default=None,
        help="events the naive reference processes (default: all)",
    )
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["ceiling", "pipeline", "naive", "latency"]
    )
    parser.add_argument(
        "--profile-seconds",
        type=float,
        default=0.0,
        help="py-spy the worker for this long during the steady part",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--summarise", type=Path, help="only summarise a py-spy raw file")
    args = parser.parse_args()
    if args.summarise:
        print(json.dumps(summarise_profile(args.summarise, top=30), indent=1))
        return 0

    settings = load_settings()
    bootstrap = settings.kafka_bootstrap
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        admin.list_topics(timeout=10)
    except Exception as exc:  # noqa: BLE001 - any failure means no broker
        print(f"no Kafka broker at {bootstrap} ({exc}); start one: tokenmeter stack up")
        return 2
    tag = uuid.uuid4().hex[:8]
    work = Path(tempfile.mkdtemp(prefix=f"tokenmeter-bench-{tag}-"))
    n = args.events
    result: dict[str, Any] = {
        "events": n,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "load_average": {"start": [round(x, 2) for x in os.getloadavg()]},
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "work_dir": str(work),
    }
    timeout = max(600.0, n / 200)
    try:
        topics = TopicSet(tag)
        topics.create(settings)
        say(f"pre-producing {n:,} events to {topics.usage} ({PARTITIONS} partitions)")
        result["produce"] = preproduce(
            bootstrap, topics.usage, n, args.seed, args.dup_rate, args.bad_rate
        )
        say(f"produced at {result['produce']['events_per_s']:,} events/s")
        if "ceiling" not in args.skip:
            result["ceiling"] = run_ceiling(bootstrap, topics.usage, n)
            say(f"ceiling: {result['ceiling']['events_per_s']:,} events/s")
        if "pipeline" not in args.skip:
            profile = None
            if args.profile_seconds > 0:
                profile = (work / "pyspy.raw", args.profile_seconds)
            result["pipeline"] = run_pipeline(
                bootstrap, topics, work, n, result["produce"], timeout, profile
            )
            say(
                f"pipeline: {result['pipeline']['events_per_s']:,} events/s, "
                f"exact={result['pipeline']['exact']}"
            )
            if profile is not None and profile[0].exists():
                result["profile"] = summarise_profile(profile[0])
                if args.out:
                    shutil.copy(profile[0], args.out.with_suffix(".pyspy.raw"))
        if "naive" not in args.skip:
            reasons = result["produce"]["dead_letter_reasons"]
            decodable = n - reasons.get("undecodable", 0) - reasons.get("unknown_schema", 0)
            m = min(decodable, args.naive_events or decodable)
            result["naive"] = run_naive(bootstrap, topics.usage, tag, work, m, timeout)
            say(f"naive: {result['naive']['events_per_s']:,} events/s")
        p = result.get("pipeline", {})
        c = result.get("ceiling", {})
        nv = result.get("naive", {})
        result["ratios"] = {
            "pipeline_over_ceiling": ratio(p.get("events_per_s"), c.get("events_per_s")),
            "pipeline_over_naive": ratio(p.get("events_per_s"), nv.get("events_per_s")),
            "pipeline_over_ceiling_cpu": ratio(
                p.get("events_per_cpu_s"), c.get("events_per_cpu_s")
            ),
            "pipeline_over_naive_cpu": ratio(p.get("events_per_cpu_s"), nv.get("events_per_cpu_s")),
        }
        if "latency" not in args.skip:
            rate = args.latency_rate or 0.5 * (p.get("events_per_s") or 0)
            if rate <= 0:
                raise RuntimeError("latency run needs --latency-rate or a pipeline run")
            result["latency"] = run_latency(
                bootstrap,
                settings,
                tag,
                work,
                rate,
                args.latency_seconds,
                args.markers_per_s,
                args.poll_ms / 1000,
                args.dup_rate,
                args.bad_rate,
            )
    finally:
        result["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
        with contextlib.suppress(Exception):
            names = [t for t in admin.list_topics(timeout=10).topics if tag in t]
            if names:
                for fut in admin.delete_topics(names, operation_timeout=30).values():
                    with contextlib.suppress(Exception):
                        fut.result(30)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
            for log in ("worker.log", "naive.log", "lat.log"):
                if (work / log).exists():
                    shutil.copy(work / log, args.out.with_suffix(f".{log}"))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(result)
    if args.out:
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
