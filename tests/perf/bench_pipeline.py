"""End-to-end benchmark of the worker (``make bench``), with references run on the same events.

    TOKENMETER_KAFKA_BOOTSTRAP=127.0.0.1:19092 \\
        .venv/bin/python tests/perf/bench_pipeline.py --events 200000 --out bench-results/b.json

(``make bench`` starts a broker and runs this.) Each step has its own topics (4
partitions), consumer group, data directory (its own embedded ClickHouse) and web port,
so nothing is shared with other runs; topics are deleted and every process it started is
stopped at the end. Steps:

1. backlog: N live-shaped events from ``Simulation`` (event times spread over the last
   N / ``--backlog-rate`` seconds, as gateways send them; 1 % exact duplicates, 0.1 %
   bad), generated first, then sent with confluent-kafka at full speed, keyed by tenant
   with the ``murmur2_random`` partitioner; subscribers stay raw (the worker
   pseudonymises them);
2. ceiling (``tests/perf/ceiling.py``): batch consume (``consume(num_messages=10000)``)
   + decode + discard, with the compiled columnar decoder if ``pipeline.serde_columnar``
   imports, else fastavro per message;
3. pipeline: ``python -m pipeline.cli worker`` started cold on the backlog; every 0.25 s
   the group's committed offsets (they move only after the sink's write) and the
   worker's RSS and CPU time (psutil, all threads) are sampled. Sustained events/s =
   events committed from the first commit to the last over that time; CPU per event =
   the worker process's CPU seconds over the same span / those events. Per-stage CPU
   comes from the worker's ``GET /v1/status`` (``stage_cpu_us`` / ``consumed``) when it
   reports it. The stored rows are then checked against the simulation's truth;
4. garbage mix: the same on a second backlog with 10 % bad input (``--garbage-rate``);
5. latency: a warm worker on new topics; a producer offers live traffic at
   ``--latency-rate`` (default 25,000 events/s, pre-generated, event times = send
   times) for ``--latency-seconds``, plus marker events of a dedicated tenant (a few a
   second) stamped with their produce time; a poller asks the worker's ``/v1/query`` for
   ``sum(events)`` of that tenant per minute in ``usage_minute``. Markers of one tenant
   share one partition and are stored in order, so when a minute's sum reaches k, its
   first k markers are queryable: latency = time of the first answer showing it -
   produce time (an upper bound; the poll interval is the resolution). Markers not
   visible ``--latency-drain-s`` after the traffic ends count as "slower than that":
   a percentile they decide is reported as null, with a lower bound beside it;
6. optional (``--soak-s S``): a worker under live traffic for S seconds, its RSS sampled
   every 10 s, to show whether memory stays flat;
7. optional (``--naive``): ``tests/perf/naive_faust.py``, per-event faust with two table
   updates, on the same backlog.

Writes JSON (``--out``) whose top-level keys are the headline figures (``HEADLINE``),
with each step's details beside them, and prints them as a table with the machine's
cores and load averages (shared machines: read the figures with the load). Not
collected by pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
from confluent_kafka import (  # noqa: E402
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
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
SAMPLE_S = 0.25
SOAK_SAMPLE_S = 10.0
MARKER_TENANT = "tn-bench-latency"
PYSPY = Path(sys.executable).with_name("py-spy")

# the JSON's top-level figures, in the table's order: (key, unit, what it is)
HEADLINE: tuple[tuple[str, str, str], ...] = (
    ("events", "events", "backlog of the main run"),
    ("pipeline_events_per_s", "events/s", "worker, first to last commit"),
    ("pipeline_cpu_us_per_event", "us CPU", "worker process, all threads, same span"),
    ("ceiling_events_per_s", "events/s", "batch consume + decode + discard"),
    ("ceiling_ratio", "", "pipeline / ceiling"),
    ("garbage_mix_events_per_s", "events/s", "worker on a backlog with 10 % bad"),
    ("latency_p50_ms", "ms", "produce -> queryable in usage_minute"),
    ("latency_p99_ms", "ms", "produce -> queryable in usage_minute"),
    ("latency_rate_events_per_s", "events/s", "live rate offered during the latency run"),
    ("peak_rss_mib", "MiB", "worker process, highest over the runs"),
)
# ---- small helpers ---------------------------------------------------------------------


def num(v: Any) -> str:
    """A figure for a progress line: thousands separated, '-' for none."""
    return f"{v:,}" if isinstance(v, int | float) else "-"


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


def span_rate(samples: list[tuple[float, int]], total: int) -> tuple[float | None, float, float]:
    """Events/s from the first sample showing a commit to the first showing ``total``,
    from (t, done) samples: (rate, t_first, t_last); rate is None when both are the
    same sample (the whole backlog landed between two samples)."""
    first = next(((t, n) for t, n in samples if n > 0), None)
    last = next(((t, n) for t, n in samples if n >= total), None)
    if first is None or last is None or last[0] <= first[0]:
        return None, first[0] if first else 0.0, last[0] if last else 0.0
    return (last[1] - first[1]) / (last[0] - first[0]), first[0], last[0]


def censored_percentile(
    seen: list[float], unseen_at_least: list[float], q: float
) -> tuple[float | None, float | None]:
    """Percentile ``q`` of latencies where some were never observed (``unseen_at_least``:
    how long each had waited when we gave up). Returns (value, lower_bound): value is
    None when an unobserved latency decides it; lower_bound counts the unobserved ones
    at the time waited (what the percentile is at least)."""
    if not seen and not unseen_at_least:
        return None, None
    bound = percentile(seen + unseen_at_least, q)
    if not unseen_at_least:
        return bound, bound
    ordered = sorted(seen) + [math.inf] * len(unseen_at_least)
    k = (len(ordered) - 1) * q
    f = int(k)
    c = f if k == f else min(f + 1, len(ordered) - 1)
    if math.isinf(ordered[c]):
        return None, bound
    return ordered[f] + (ordered[c] - ordered[f]) * (k - f), bound


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


Message = tuple[bytes, bytes]  # (key, value), already Avro-encoded


def generate(
    sim: Simulation, n: int, dup_rate: float, bad_rate: float
) -> tuple[list[Message], float]:
    """``n`` messages of ``sim`` as (key, value) pairs in memory, and the seconds it took:
    generating is per-event Python, so it is done before the clock of a send starts."""
    started = time.monotonic()
    msgs = [(m.key, m.value) for m in sim.messages(n, dup_rate=dup_rate, bad_rate=bad_rate)]
    return msgs, time.monotonic() - started


def send(producer: Producer, topic: str, msgs: Iterator[Message], count: int) -> int:
    """Hand up to ``count`` messages of ``msgs`` to the producer (waiting for room in
    its queue); returns how many it took (fewer only when ``msgs`` ran out)."""
    produce, poll = producer.produce, producer.poll
    sent = 0
    for key, value in msgs:
        while True:
            try:
                produce(topic, value, key)
                break
            except BufferError:
                poll(0.05)
        sent += 1
        if sent % 20_000 == 0:
            poll(0)
        if sent >= count:
            break
    return sent


def preproduce(
    bootstrap: str,
    topic: str,
    n: int,
    seed: int,
    dup_rate: float,
    bad_rate: float,
    backlog_rate: float,
) -> dict[str, Any]:
    """Generate ``n`` live-shaped messages (event times over the last ``n / backlog_rate``
    seconds, ending now) and send them as fast as confluent-kafka takes them."""
    settings = load_settings(kafka_bootstrap=bootstrap)
    span_ms = int(n * 1000 / backlog_rate)
    sim = Simulation(seed=seed, now_ms=now_ms() - span_ms, live_rate=backlog_rate)
    msgs, gen_s = generate(sim, n, dup_rate, bad_rate)
    failures: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    producer = Producer({**producer_config(settings), "on_delivery": on_delivery})
    started = time.monotonic()
    send(producer, topic, iter(msgs), n)
    remaining = producer.flush(120)
    seconds = time.monotonic() - started
    if remaining or failures:
        raise RuntimeError(f"pre-produce failed: {remaining} unsent, {failures[:3]}")
    truth = sim.truth
    return {
        "events": n,
        "bad_rate": bad_rate,
        "dup_rate": dup_rate,
        "event_time_span_s": round(span_ms / 1000, 1),
        "generate_seconds": round(gen_s, 2),
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
        for attempt in range(20):
            try:
                return sum(
                    max(tp.offset, 0) for tp in self.consumer.committed(self.parts, timeout=10)
                )
            except KafkaException as exc:
                # a fresh broker answers NOT_COORDINATOR until the group's coordinator
                # is loaded (seen when the first run of a bench is the garbage mix)
                if exc.args[0].code() != KafkaError.NOT_COORDINATOR or attempt == 19:
                    raise
                time.sleep(0.5)
        return 0

    def end(self) -> int:
        return sum(
            self.consumer.get_watermark_offsets(tp, timeout=10, cached=False)[1]
            for tp in self.parts
        )

    def close(self) -> None:
        self.consumer.close()


def usage(proc: psutil.Process) -> tuple[int, float, int, float]:
    """RSS (bytes) and CPU seconds (all threads) of a process, then the same with its
    children added (the worker runs the quota server as a child)."""
    rss = cpu = 0.0
    tree_rss = tree_cpu = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            r = p.memory_info().rss
            t = p.cpu_times()
            c = t.user + t.system
            if p.pid == proc.pid:
                rss, cpu = r, c
            tree_rss += r
            tree_cpu += c
    return int(rss), cpu, int(tree_rss), tree_cpu


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


def worker_status(port: int) -> dict[str, Any]:
    """The worker's ``GET /v1/status`` JSON ({} when it does not answer)."""
    with contextlib.suppress(OSError, ValueError):
        status: dict[str, Any] = http_json(f"http://127.0.0.1:{port}/v1/status", timeout=5)
        return status
    return {}


def stage_cpu(status: dict[str, Any]) -> dict[str, Any]:
    """CPU microseconds per consumed event for each stage, from the worker's status
    (cumulative ``stage_cpu_us`` / ``consumed``); empty when the worker does not report
    stages."""
    stages = status.get("stage_cpu_us")
    consumed = status.get("consumed") or 0
    if not isinstance(stages, dict) or not consumed:
        return {}
    return {str(k): round(float(v) / consumed, 2) for k, v in stages.items()}


class RssWatch:
    """Samples a process's RSS (and its children's) on a thread while it runs."""

    def __init__(self, child: Child, every_s: float) -> None:
        self.child = child
        self.every_s = every_s
        self.samples: list[tuple[float, float]] = []  # (s since start, process RSS MiB)
        self.peak = 0  # bytes, the process alone
        self.peak_tree = 0  # bytes, with its children
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssWatch:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set() and self.child.alive():
            with contextlib.suppress(psutil.Error):
                rss, _, tree_rss, _ = usage(self.child.ps)
                self.peak = max(self.peak, rss)
                self.peak_tree = max(self.peak_tree, tree_rss)
                self.samples.append((round(time.monotonic() - self._t0, 1), mib(rss)))
            self._stop.wait(self.every_s)


def mib(n: float) -> float:
    return round(n / 2**20, 1)


# ---- one measured consumer run ------------------------------------------------------------


def measure_consumer(
    child: Child,
    progress: GroupProgress,
    total: int,
    timeout: float,
    profile: tuple[Path, float] | None = None,
) -> dict[str, Any]:
    """Sample a consumer process until its group committed ``total`` events: the rate
    from first to last commit (and between 10 % and 90 % of ``total``), the process's
    CPU per event over the same span and its peak RSS."""
    t0 = time.monotonic()
    done: list[tuple[float, int]] = [(0.0, 0)]
    cpu: list[tuple[float, float]] = [(0.0, 0.0)]
    tree_cpu: list[tuple[float, float]] = [(0.0, 0.0)]
    peak_rss = peak_tree_rss = 0
    spy: subprocess.Popen[bytes] | None = None
    try:
        while True:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited {child.popen.returncode}:\n{child.tail()}")
            n = progress.committed()
            rss, cpu_s, tree_rss, tree_cpu_s = usage(child.ps)
            t = time.monotonic() - t0
            done.append((t, n))
            cpu.append((t, cpu_s))
            tree_cpu.append((t, tree_cpu_s))
            peak_rss = max(peak_rss, rss)
            peak_tree_rss = max(peak_tree_rss, tree_rss)
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
    rate, t_first, t_last = span_rate(done, total)
    n_first = next(n for _, n in done if n > 0)
    span_events = total - n_first
    span_cpu = interpolate(cpu, t_last) - interpolate(cpu, t_first)
    span_tree_cpu = interpolate(tree_cpu, t_last) - interpolate(tree_cpu, t_first)
    steady, t_lo, t_hi = steady_rate(done, total)
    return {
        "events": total,
        "events_per_s": round(rate) if rate else None,
        "span_s": [round(t_first, 2), round(t_last, 2)],
        "span_events": span_events,
        "cpu_us_per_event": round(1e6 * span_cpu / span_events, 1) if rate else None,
        "cpu_us_per_event_with_children": (
            round(1e6 * span_tree_cpu / span_events, 1) if rate else None
        ),
        "cores_used": round(span_cpu / (t_last - t_first), 2) if rate else None,
        "events_per_s_10_to_90": round(steady) if steady else None,
        "steady_window_s": [round(t_lo, 1), round(t_hi, 1)] if t_lo and t_hi else None,
        "overall_events_per_s": round(total / done[-1][0]),
        "seconds_to_first_commit": round(t_first, 1),
        "seconds_total": round(done[-1][0], 1),
        "cpu_seconds_total": round(cpu[-1][1], 1),
        "peak_rss_mib": mib(peak_rss),
        "peak_rss_with_children_mib": mib(peak_tree_rss),
        "samples": len(done),
    }


# ---- the runs ------------------------------------------------------------------------------


def run_ceiling(bootstrap: str, topic: str, total: int, fastavro: bool) -> dict[str, Any]:
    say(f"ceiling: confluent-kafka batch consume + decode + discard of {total:,} events")
    cmd = [sys.executable, str(ROOT / "tests/perf/ceiling.py"), bootstrap, topic, str(total)]
    proc = subprocess.run(
        cmd + (["--fastavro"] if fastavro else []),
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=900,
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    samples = [(float(t), int(n)) for t, n in out.pop("samples")]
    rate, t_first, t_last = span_rate([(0.0, 0), *samples], total)
    if rate is None:  # the whole topic came in one batch: time it from the start
        rate, t_first = out["events"] / max(t_last, 1e-3), 0.0
    out["events_per_s"] = round(rate)
    out["span_s"] = [round(t_first, 2), round(t_last, 2)]
    out["overall_events_per_s"] = round(out["events"] / out["seconds"])
    out["cpu_us_per_event"] = round(1e6 * out["cpu_seconds"] / out["events"], 2)
    return out


def start_worker(
    label: str, bootstrap: str, topics: TopicSet, work: Path, log: str
) -> tuple[int, Child]:
    """A `tokenmeter worker` on ``topics`` with a data dir of its own under ``work``;
    returns its web port and the child."""
    port = free_port()
    env = worker_env(bootstrap, topics, work / f"worker-{topics.tag}", port)
    child = start(label, [sys.executable, "-m", "pipeline.cli", "worker"], env, work / log)
    return port, child


def run_pipeline(
    label: str,
    bootstrap: str,
    topics: TopicSet,
    work: Path,
    total: int,
    truth: dict[str, Any],
    timeout: float,
    profile: tuple[Path, float] | None = None,
) -> dict[str, Any]:
    """A cold worker on a pre-produced backlog of ``total`` events: measured, its
    per-stage CPU read from its status, its stored rows checked against ``truth``."""
    say(f"{label}: worker started cold on {total:,} events (group {topics.group})")
    log = work / f"{label}.log"
    port, child = start_worker(label, bootstrap, topics, work, log.name)
    progress = GroupProgress(bootstrap, topics.group, topics.usage)
    try:
        result = measure_consumer(child, progress, total, timeout, profile)
        status = worker_status(port)
        result["status"] = status
        result["stage_cpu_us"] = stage_cpu(status)
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
            for line in log.read_text(errors="replace").splitlines()
            if "throughput: " in line
        ][-6:]
    finally:
        progress.close()
        result_code = child.stop()
    if result_code not in (0, None):
        say(f"{label}: worker exit code {result_code}")
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

    def unseen(self, now: float) -> list[float]:
        """How long each marker not yet seen has waited by ``now`` (warm-up ones aside)."""
        with self.lock:
            return [
                now - at
                for minute, sent in self.by_minute.items()
                for at, warmup in sent[self.seen[minute] :]
                if not warmup
            ]


def offer_live(
    producer: Producer,
    topic: str,
    stream: Iterator[Message],
    rate: float,
    seconds: float,
    tick: Callable[[float], None],
) -> tuple[int, float]:
    """Send ``stream`` at ``rate`` messages/s for ``seconds`` (calling ``tick(elapsed)``
    between sends); returns (messages sent, seconds it took)."""
    started = time.monotonic()
    sent = 0
    while (elapsed := time.monotonic() - started) < seconds:
        want = int(elapsed * rate) - sent
        if want > 0:
            got = send(producer, topic, stream, want)
            sent += got
            if got < want:
                break  # the stream ran out
        tick(elapsed)
        producer.poll(0)
        time.sleep(0.002)
    return sent, time.monotonic() - started


def live_stream(sim: Simulation, dup_rate: float, bad_rate: float) -> Iterator[Message]:
    """An endless live stream of ``sim`` in chunks (``messages`` plans a chunk at once)."""
    while True:
        for m in sim.messages(100_000, dup_rate=dup_rate, bad_rate=bad_rate):
            yield m.key, m.value


def run_latency(
    bootstrap: str,
    settings: Settings,
    tag: str,
    work: Path,
    rate: float,
    seconds: float,
    markers_per_s: float,
    poll_s: float,
    drain_s: float,
    dup_rate: float,
    bad_rate: float,
) -> dict[str, Any]:
    topics = TopicSet(f"{tag}-lat")
    topics.create(settings)
    say(f"latency: warm worker, live traffic at {rate:,.0f} events/s for {seconds:.0f} s")
    port, child = start_worker("latency worker", bootstrap, topics, work, "lat.log")
    codec = AvroCodec()
    problem = check_record(marker_record(0, tag, now_ms()), now_ms(), Rules())
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

    next_marker = 0.0

    def tick(elapsed: float) -> None:
        nonlocal next_marker
        if elapsed >= next_marker:
            send_marker(warmup=False)
            next_marker += 1.0 / markers_per_s

    poll_thread = threading.Thread(target=poller, daemon=True)
    watch = RssWatch(child, 1.0)
    unseen: list[float] = []
    try:
        with watch:
            # generated while the worker starts; event times ~ send times (the start
            # estimate is rough: a few seconds either way is still live traffic)
            sim = Simulation(seed=7, now_ms=now_ms() + 15_000, live_rate=rate)
            msgs, gen_s = generate(sim, int(rate * seconds * 1.05) + 1000, dup_rate, bad_rate)
            wait_healthy(child, port)
            poll_thread.start()
            warm_deadline = time.monotonic() + 120
            while marks.warm_seen == 0:  # the whole path is up and hot
                if time.monotonic() > warm_deadline:
                    raise RuntimeError(f"no marker became visible in 120 s:\n{child.tail()}")
                send_marker(warmup=True)
                producer.poll(0)
                time.sleep(0.5)
            sent, produce_s = offer_live(producer, topics.usage, iter(msgs), rate, seconds, tick)
            del msgs
            producer.flush(60)
            deadline = time.monotonic() + drain_s
            while marks.pending() and time.monotonic() < deadline:
                time.sleep(0.2)
            unseen = marks.unseen(time.time())
    finally:
        stop.set()
        if poll_thread.is_alive():
            poll_thread.join(10)
        child.stop()
    lat = marks.latencies
    p50, p50_bound = censored_percentile(lat, unseen, 0.5)
    p99, p99_bound = censored_percentile(lat, unseen, 0.99)

    def ms(v: float | None) -> int | None:
        return None if v is None else round(1000 * v)

    return {
        "target_events_per_s": round(rate),
        "produced_events_per_s": round(sent / produce_s),
        "seconds": round(produce_s, 1),
        "generate_seconds": round(gen_s, 1),
        "markers": len(lat) + len(unseen),
        "markers_unseen": len(unseen),
        "drain_limit_s": drain_s,
        "p50_ms": ms(p50),
        "p99_ms": ms(p99),
        "p50_at_least_ms": ms(p50_bound),
        "p99_at_least_ms": ms(p99_bound),
        "max_ms": ms(max(lat)) if lat else None,
        "poll_interval_ms": round(1000 * poll_s),
        "query_p50_ms": ms(percentile(marks.query_s, 0.5)) if marks.query_s else None,
        "peak_rss_mib": mib(watch.peak),
        "peak_rss_with_children_mib": mib(watch.peak_tree),
    }


def run_soak(
    bootstrap: str,
    settings: Settings,
    tag: str,
    work: Path,
    rate: float,
    seconds: float,
    dup_rate: float,
    bad_rate: float,
) -> dict[str, Any]:
    """A worker under live traffic at ``rate`` for ``seconds``, its RSS sampled every
    ``SOAK_SAMPLE_S``: does memory stay flat?"""
    topics = TopicSet(f"{tag}-soak")
    topics.create(settings)
    say(f"soak: live traffic at {rate:,.0f} events/s for {seconds:.0f} s, RSS every 10 s")
    port, child = start_worker("soak worker", bootstrap, topics, work, "soak.log")
    producer = Producer(producer_config(load_settings(kafka_bootstrap=bootstrap)))
    progress = GroupProgress(bootstrap, topics.group, topics.usage)
    watch = RssWatch(child, SOAK_SAMPLE_S)
    try:
        wait_healthy(child, port)
        sim = Simulation(seed=11, now_ms=now_ms(), live_rate=rate)
        with watch:
            sent, produce_s = offer_live(
                producer,
                topics.usage,
                live_stream(sim, dup_rate, bad_rate),
                rate,
                seconds,
                lambda _elapsed: None,
            )
            producer.flush(60)
            committed = progress.committed()
            status = worker_status(port)
    finally:
        progress.close()
        child.stop()
    samples = watch.samples
    after_2min = [rss for t, rss in samples if t >= 120.0]
    return {
        "seconds": round(produce_s, 1),
        "target_events_per_s": round(rate),
        "produced_events_per_s": round(sent / produce_s),
        "events_sent": sent,
        "events_committed": committed,
        "consumed": status.get("consumed"),
        "rss_samples_mib": samples,
        "rss_growth_mib": round(after_2min[-1] - after_2min[0], 1) if len(after_2min) > 1 else None,
        "peak_rss_mib": mib(watch.peak),
        "peak_rss_with_children_mib": mib(watch.peak_tree),
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


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The top-level figures (``HEADLINE`` keys and ``stage_cpu_us``) from the runs'
    details; None for a figure whose run was skipped or gave none."""
    p, c = result.get("pipeline", {}), result.get("ceiling", {})
    g, lat = result.get("garbage", {}), result.get("latency", {})
    peaks = [r.get("peak_rss_mib") for r in (p, g, lat, result.get("soak", {}))]
    return {
        "events": result["events"],
        "pipeline_events_per_s": p.get("events_per_s"),
        "pipeline_cpu_us_per_event": p.get("cpu_us_per_event"),
        "ceiling_events_per_s": c.get("events_per_s"),
        "ceiling_decoder": c.get("decoder"),
        "ceiling_ratio": ratio(p.get("events_per_s"), c.get("events_per_s")),
        "garbage_mix_events_per_s": g.get("events_per_s"),
        "latency_p50_ms": lat.get("p50_ms"),
        "latency_p99_ms": lat.get("p99_ms"),
        "latency_rate_events_per_s": lat.get("produced_events_per_s"),
        "peak_rss_mib": max((x for x in peaks if x is not None), default=None),
        "stage_cpu_us": p.get("stage_cpu_us", {}),
    }


def print_table(result: dict[str, Any]) -> None:
    """The headline figures as an aligned table (numbers never wrapped nor cut), then
    per-stage CPU and the machine's facts."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(120, shutil.get_terminal_size((120, 40)).columns))
    p, c, lat = result.get("pipeline", {}), result.get("ceiling", {}), result.get("latency", {})
    table = Table(title=f"tokenmeter bench: {result['events']:,} events")
    table.add_column("figure", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("unit", no_wrap=True)
    table.add_column("what", overflow="fold")

    def fmt(v: Any) -> str:  # the JSON's value, digit for digit, thousands separated
        if isinstance(v, bool) or v is None:
            return "-" if v is None else str(v)
        return f"{v:,}" if isinstance(v, int | float) else str(v)

    notes: dict[str, str] = {
        "pipeline_events_per_s": f"exact={p.get('exact')}" if p else "not run",
        "ceiling_events_per_s": f"decoder: {c.get('decoder')}" if c else "not run",
        "garbage_mix_events_per_s": (
            f"exact={result['garbage'].get('exact')}" if result.get("garbage") else "not run"
        ),
    }
    if lat:
        for q in ("p50", "p99"):
            if lat.get(f"{q}_ms") is None and lat.get(f"{q}_at_least_ms") is not None:
                notes[f"latency_{q}_ms"] = (
                    f"not reached: {lat['markers_unseen']} of {lat['markers']} markers unseen "
                    f"{lat['drain_limit_s']:.0f} s after the traffic; at least "
                    f"{lat[f'{q}_at_least_ms']:,} ms"
                )
        notes["latency_rate_events_per_s"] = (
            f"target {lat['target_events_per_s']:,}, for {lat['seconds']} s"
        )
    else:
        notes["latency_p50_ms"] = "not run"
    for key, unit, what in HEADLINE:
        note = notes.get(key)
        table.add_row(key, fmt(result.get(key)), unit, f"{what}; {note}" if note else what)
    stages = result.get("stage_cpu_us") or {}
    if stages:
        for stage, us in stages.items():
            table.add_row(f"stage_cpu_us.{stage}", fmt(us), "us CPU", "per consumed event")
        table.add_row("stage_cpu_us (sum)", fmt(round(sum(stages.values()), 2)), "us CPU", "")
    else:
        table.add_row(
            "stage_cpu_us", "-", "", "the worker's /v1/status has no stage_cpu_us: not measured"
        )
    soak = result.get("soak")
    if soak:
        table.add_row(
            "rss_growth_mib",
            fmt(soak.get("rss_growth_mib")),
            "MiB",
            f"soak: from minute 2 to the end of {soak['seconds']} s at "
            f"{soak['produced_events_per_s']:,} events/s",
        )
    console.print(table)
    m, load = result["machine"], result.get("load_average", {})
    console.print(
        f"machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB; load average "
        f"(1, 5, 15 min) before {load.get('start')}, after {load.get('end')}",
        soft_wrap=True,
    )


# ---- main -----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="tokenmeter end-to-end benchmark")
    add = parser.add_argument
    add(
        "--events",
        type=int,
        default=int(os.environ.get("BENCH_EVENTS", "200000")),
        help="backlog of the main run (default: $BENCH_EVENTS or 200,000)",
    )
    add("--out", type=Path, default=None, help="write the JSON here (logs beside it)")
    add("--seed", type=int, default=42)
    add("--dup-rate", type=float, default=0.01)
    add("--bad-rate", type=float, default=0.001)
    add(
        "--backlog-rate",
        type=float,
        default=50_000.0,
        help="events/s the backlog's event times are spread at (live-shaped: they end now)",
    )
    add("--garbage-rate", type=float, default=0.10, help="bad share of the garbage-mix run")
    add("--garbage-events", type=int, default=None, help="its backlog (default: --events)")
    add("--latency-seconds", type=float, default=30.0)
    add("--latency-rate", type=float, default=25_000.0, help="events/s offered live")
    add(
        "--latency-drain-s",
        type=float,
        default=60.0,
        help="how long after the traffic markers may still become visible",
    )
    add("--markers-per-s", type=float, default=4.0)
    add("--poll-ms", type=float, default=200.0)
    add(
        "--soak-s",
        type=float,
        default=0.0,
        help="also run a worker under live traffic this long, RSS every 10 s (e.g. 600)",
    )
    add("--soak-rate", type=float, default=None, help="its events/s (default: --latency-rate)")
    add("--naive", action="store_true", help="also run the naive per-event faust reference")
    add("--naive-events", type=int, default=None, help="events it processes (default: all)")
    add(
        "--fastavro-ceiling",
        action="store_true",
        help="decode the ceiling with fastavro even if the columnar decoder imports",
    )
    add(
        "--skip",
        nargs="*",
        default=[],
        choices=["ceiling", "pipeline", "garbage", "latency", "naive"],
    )
    add(
        "--profile-seconds",
        type=float,
        default=0.0,
        help="py-spy the main run's worker for this long from 10 %% of the backlog",
    )
    add("--keep", action="store_true", help="keep the work directory")
    add("--summarise", type=Path, help="only summarise a py-spy raw file")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
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
    timeout = max(600.0, n / 200)  # no run waits for ever, even at 200 events/s
    code = 0
    try:
        topics = TopicSet(tag)
        topics.create(settings)
        say(f"pre-producing {n:,} live-shaped events to {topics.usage} ({PARTITIONS} partitions)")
        result["produce"] = preproduce(
            bootstrap, topics.usage, n, args.seed, args.dup_rate, args.bad_rate, args.backlog_rate
        )
        say(f"produced at {num(result['produce']['events_per_s'])} events/s")
        if "ceiling" not in args.skip:
            result["ceiling"] = run_ceiling(bootstrap, topics.usage, n, args.fastavro_ceiling)
            say(f"ceiling: {num(result['ceiling']['events_per_s'])} events/s")
        if "pipeline" not in args.skip:
            profile = None
            if args.profile_seconds > 0:
                profile = (work / "pyspy.raw", args.profile_seconds)
            result["pipeline"] = run_pipeline(
                "worker", bootstrap, topics, work, n, result["produce"], timeout, profile
            )
            say(
                f"pipeline: {num(result['pipeline']['events_per_s'])} events/s, "
                f"exact={result['pipeline']['exact']}"
            )
            if profile is not None and profile[0].exists():
                result["profile"] = summarise_profile(profile[0])
                if args.out:
                    shutil.copy(profile[0], args.out.with_suffix(".pyspy.raw"))
        if args.naive and "naive" not in args.skip:
            reasons = result["produce"]["dead_letter_reasons"]
            decodable = n - reasons.get("undecodable", 0) - reasons.get("unknown_schema", 0)
            m = min(decodable, args.naive_events or decodable)
            result["naive"] = run_naive(bootstrap, topics.usage, tag, work, m, timeout)
            say(f"naive: {num(result['naive']['events_per_s'])} events/s")
        if "garbage" not in args.skip:
            gn = args.garbage_events or n
            garbage = TopicSet(f"{tag}-garbage")
            garbage.create(settings)
            say(f"garbage mix: pre-producing {gn:,} events, {args.garbage_rate:.0%} bad")
            truth = preproduce(
                bootstrap,
                garbage.usage,
                gn,
                args.seed + 1,
                args.dup_rate,
                args.garbage_rate,
                args.backlog_rate,
            )
            result["garbage"] = {"produce": truth}
            result["garbage"].update(
                run_pipeline("garbage", bootstrap, garbage, work, gn, truth, max(600.0, gn / 200))
            )
            say(f"garbage mix: {num(result['garbage']['events_per_s'])} events/s")
        if "latency" not in args.skip:
            result["latency"] = run_latency(
                bootstrap,
                settings,
                tag,
                work,
                args.latency_rate,
                args.latency_seconds,
                args.markers_per_s,
                args.poll_ms / 1000,
                args.latency_drain_s,
                args.dup_rate,
                args.bad_rate,
            )
        if args.soak_s > 0:
            result["soak"] = run_soak(
                bootstrap,
                settings,
                tag,
                work,
                args.soak_rate or args.latency_rate,
                args.soak_s,
                args.dup_rate,
                args.bad_rate,
            )
    except Exception as exc:  # noqa: BLE001 - reported, and the partial results kept
        result["error"] = f"{type(exc).__name__}: {exc}"
        say(f"FAILED: {result['error']}")
        code = 1
    finally:
        result["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
        with contextlib.suppress(Exception):
            names = [t for t in admin.list_topics(timeout=10).topics if tag in t]
            if names:
                for fut in admin.delete_topics(names, operation_timeout=30).values():
                    with contextlib.suppress(Exception):
                        fut.result(30)
        p, nv = result.get("pipeline", {}), result.get("naive", {})
        if nv:
            result["naive_ratio"] = ratio(p.get("events_per_s"), nv.get("events_per_s"))
        result = {**headline(result), **result}
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
            for log in ("worker.log", "garbage.log", "naive.log", "lat.log", "soak.log"):
                if (work / log).exists():
                    shutil.copy(work / log, args.out.with_suffix(f".{log}"))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(result)
    if args.out:
        print(f"results: {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
