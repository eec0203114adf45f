"""Quota service benchmark: reserve+commit round trips, and crossing-to-alert latency.

    TOKENMETER_KAFKA_BOOTSTRAP=127.0.0.1:19092 .venv/bin/python tests/perf/bench_quota.py \
        [--rate 2000] [--duration 20] [--connections 32] [--alert-tenants 200] [--out F.json] \
        [--client go|python] [--client-nice N] [--client-rtprio P]

Starts a real worker (subprocess, own topics and data dir, like the integration tests)
against the broker in TOKENMETER_KAFKA_BOOTSTRAP, then:

1. Round trips: an open-loop load of ``--rate`` reservations per second for
   ``--duration`` seconds over ``--connections`` keep-alive HTTP connections: each one
   is ``POST reservations`` then ``POST commit`` (with the event id), and the usage
   event is then produced to Kafka (from a separate process), so the pipeline runs with
   the same traffic (one event per reservation). Pair ``i`` is due at
   ``start + i / rate`` and starts then on an idle connection (or waits for one, first
   come first served); a warm-up of 400 pairs at up to 500/s comes first and is not
   counted. Reported, p50/p99/max: ``reserve_ms`` from the pair's due time to the
   reserve's answer, ``reserve_service_ms`` from sending the reserve to its answer,
   ``commit_ms`` from sending the commit to its answer, ``reserve_commit_ms`` from the
   due time to the commit's answer (due times, not send times, so a slow worker is not
   hidden by a slow client: no coordinated omission), and ``start_lag_ms`` from the due
   time to sending the reserve (waiting for a connection, and the client's own delay);
   achieved reservations/s; the CPU of the worker, its quota server, the load
   generator, the event producer, the broker and the machine (percent of one core: 200
   is both cores), and the load average.
2. Alert latency: ``--alert-tenants`` tenants get a hard quota of 1000 TU; one event of
   1000 TU each (20 tenants per second) crosses 50, 80 and 100 % at once. Reported: the
   time from producing the event to a consumer receiving its 100 % alert from
   ``quota-events`` (p50/p99/max).

The load generator runs on the same machine (and cores) as the worker, the broker and
the embedded ClickHouse engine, so the figures are an upper bound, and it must take
little of the CPU. By default (``--client go``) it is the Go program in
``tests/perf/quotaload`` (built here with ``go build``, so it needs the Go toolchain):
one goroutine running an epoll loop with raw system calls and a minimal HTTP/1.1
client, at GOMAXPROCS 1; it writes one ``tenant<TAB>event_id`` line per completed pair
to its stdout, which a thread of this process hands to the event producer, and its
figures to a JSON file. Its CPU is ``load_generator``; ``bench_process`` is this
process (the relay). ``--client python`` runs the former load generator instead, a
callback-only asyncio client in this process (``PairLoad``), which takes about twice
the CPU of the Go one (and adds about 0.5 ms to the median figures: it starts pairs on
a 1 ms grid, and it is slower). Not collected by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.events import UsageEvent, now_ms, pseudonymise  # noqa: E402
from pipeline.metering.quota import QuotaDefinition  # noqa: E402
from pipeline.produce import UsageProducer  # noqa: E402
from pipeline.quota.definitions import ensure_quota_topics, publish_definition  # noqa: E402
from pipeline.settings import load_settings  # noqa: E402
from tests.integration.harness import Harness  # noqa: E402


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def event(tenant: str, event_id: str, tu: int) -> UsageEvent:
    return UsageEvent(
        event_id=event_id,
        event_time=datetime.now(tz=UTC),
        source="gateway",
        source_id="bench",
        reporting_carrier="CMCC",
        home_carrier="CMCC",
        serving_carrier="CMCC",
        tenant_id=tenant,
        subscriber_id="13800138000",
        channel="api",
        model_id="deepseek-v3",
        provider="deepseek",
        input_tokens=tu,
        output_tokens=0,
    )


def _produce_events(settings_env: dict[str, str], q: Any) -> None:
    """Child process: turn (tenant, event_id, tu) items into usage events on Kafka.

    The first event of a tenant goes through the SDK's full path (validated,
    pseudonymised); the others reuse its record with their own id, time and tokens and
    are only Avro-encoded: the same bytes a gateway sends, at a fraction of the CPU (it
    shares the cores with the worker)."""
    os.environ.update(settings_env)
    producer = UsageProducer.from_settings(load_settings())
    templates: dict[str, dict[str, Any]] = {}
    while (item := q.get()) is not None:
        for tenant, event_id, tu in item:
            record = templates.get(tenant)
            if record is None:
                record = event(tenant, event_id, tu).to_record()
                producer.send_record(record)
                record["subscriber_id"] = pseudonymise(record["subscriber_id"], producer._key)
                templates[tenant] = record
                continue
            record = dict(record, event_id=event_id, input_tokens=tu, event_time=now_ms())
            producer.send_raw(tenant.encode(), producer.codec.encode(record))
    producer.flush()


class EventSender:
    """Produces the usage events in a child process, so the HTTP client's process (and
    its timings) carry none of the event validation and encoding."""

    def __init__(self, env: dict[str, str]) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.q: Any = ctx.Queue()
        self.proc = ctx.Process(target=_produce_events, args=(env, self.q), daemon=True)
        self.proc.start()
        self.buffer: list[tuple[str, str, int]] = []

    def put(self, tenant: str, event_id: str, tu: int) -> None:
        self.buffer.append((tenant, event_id, tu))
        if len(self.buffer) >= 50:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.q.put(self.buffer)
            self.buffer = []

    def close(self) -> None:
        self.flush()
        self.q.put(None)
        self.proc.join(120)


class PairClient(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection running reserve+commit pairs, one at a time,
    with callbacks only (no task, no future per request): the load generator shares the
    2 cores with the worker, so it must cost little. Speaks just enough HTTP for this API
    (Content-Length answers)."""

    def __init__(self, load: PairLoad) -> None:
        self.load = load
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.job: tuple[int, float, str] | None = None
        self.sent = 0.0
        self.reserved_at = 0.0
        self.event_id = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.job is not None:
            self.load.failed(self, f"connection lost: {exc}")

    def start(self, job: tuple[int, float, str]) -> None:
        assert self.transport is not None
        self.job = job
        self.reserved_at = 0.0
        self.sent = time.perf_counter()
        self.transport.write(self.load.reserve_request[job[2]])

    def data_received(self, data: bytes) -> None:
        self.buf += data
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        at = buf.find(b"Content-Length: ", 0, end)
        size = int(buf[at + 16 : buf.index(b"\r\n", at)])
        total = end + 4 + size
        if len(buf) < total:
            return
        now = time.perf_counter()
        status = int(buf[9:12])
        body = bytes(buf[end + 4 : total])
        del buf[:total]
        job = self.job
        assert job is not None and self.transport is not None
        if not self.reserved_at:
            if status != 201:
                self.load.failed(self, f"reserve: HTTP {status} {body[:80]!r}")
                return
            self.reserved_at = now
            at = body.index(b'"reservation_id":"') + 18
            rid = body[at : body.index(b'"', at)]
            self.event_id = f"b{self.load.run}-{self.load.first + job[0]}"
            commit = b'{"token_units": 800, "event_id": "%s"}' % self.event_id.encode()
            self.transport.write(
                b"POST /v1/reservations/%s/commit HTTP/1.1\r\nHost: bench\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (rid, len(commit), commit)
            )
            return
        if status != 200:
            self.load.failed(self, f"commit: HTTP {status} {body[:80]!r}")
            return
        self.load.done(self, job, self.sent, self.reserved_at, now)


class PairLoad:
    """Open-loop load: pair ``i`` is due at ``start + i / rate``; it starts then on an
    idle connection, or waits for one. Latencies count from the due time, so a slow
    worker is never hidden by a slow client (no coordinated omission)."""

    def __init__(self, tenants: list[str], sender: Any, record: bool = True) -> None:
        self.run = uuid.uuid4().hex[:6]
        self.first = 0  # event id number of pair 0 (the measured phase's follow the warm-up's)
        self.tenants = tenants
        self.sender = sender
        body = b'{"token_units": 1000, "ttl_s": 30}'
        self.reserve_request = {
            t: b"POST /v1/quotas/%s/reservations HTTP/1.1\r\nHost: bench\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (t.encode(), len(body), body)
            for t in tenants
        }
        self.idle: list[PairClient] = []
        self.waiting: collections.deque[tuple[int, float, str]] = collections.deque()
        self.reserve_ms: list[float] = []  # due -> reserve answered
        self.reserve_service_ms: list[float] = []  # reserve sent -> answered
        self.commit_ms: list[float] = []  # commit sent -> answered
        self.pair_ms: list[float] = []  # due -> commit answered
        self.lag_ms: list[float] = []  # due -> reserve sent
        self.errors: dict[str, int] = {}
        self.outstanding = 0

    def submit(self, i: int, due: float) -> None:
        job = (i, due, self.tenants[i % len(self.tenants)])
        self.outstanding += 1
        if self.idle:
            self.idle.pop().start(job)
        else:
            self.waiting.append(job)

    def _next(self, client: PairClient) -> None:
        client.job = None
        self.outstanding -= 1
        if self.waiting:
            client.start(self.waiting.popleft())
        else:
            self.idle.append(client)

    def done(self, client: PairClient, job: tuple[int, float, str], sent: float,
             reserved: float, committed: float) -> None:  # fmt: skip
        i, due, tenant = job
        self.reserve_ms.append((reserved - due) * 1000)
        self.reserve_service_ms.append((reserved - sent) * 1000)
        self.commit_ms.append((committed - reserved) * 1000)
        self.pair_ms.append((committed - due) * 1000)
        self.lag_ms.append((sent - due) * 1000)
        self.sender.put(tenant, client.event_id, 800)
        self._next(client)

    def failed(self, client: PairClient, why: str) -> None:
        self.errors[why[:80]] = self.errors.get(why[:80], 0) + 1
        if client.job is not None:
            self._next(client)

    def clear(self) -> None:
        for values in (
            self.reserve_ms,
            self.reserve_service_ms,
            self.commit_ms,
            self.pair_ms,
            self.lag_ms,
        ):
            values.clear()


async def round_trips(
    base: str, tenants: list[str], rate: float, duration: float, connections: int, sender: Any
) -> dict[str, Any]:
    from urllib.parse import urlsplit

    url = urlsplit(base)
    loop = asyncio.get_running_loop()
    load = PairLoad(tenants, sender)
    clients = []
    for _ in range(connections):
        _, client = await loop.create_connection(
            lambda: PairClient(load), url.hostname or "127.0.0.1", url.port or 80
        )
        clients.append(client)
        load.idle.append(client)

    async def drive(n: int, per_s: float) -> float:
        """Submit ``n`` pairs at ``per_s``, open loop; return the elapsed seconds."""
        start = time.perf_counter() + 0.05
        i = 0

        def tick() -> None:
            nonlocal i
            now = time.perf_counter()
            while i < n and start + i / per_s <= now:
                load.submit(i, start + i / per_s)
                i += 1
            if i < n:
                loop.call_at(loop.time() + (start + i / per_s - time.perf_counter()), tick)

        loop.call_at(loop.time() + 0.05, tick)
        while i < n or load.outstanding:
            await asyncio.sleep(0.02)
        return time.perf_counter() - start

    await drive(400, min(rate, 500.0))  # warm-up: connections, caches, first batches
    load.clear()
    load.first = 400
    n = int(rate * duration)
    elapsed = await drive(n, rate)
    sender.flush()
    for client in clients:
        if client.transport is not None:
            client.transport.close()

    def summary(values: list[float]) -> dict[str, float]:
        return {
            "p50": round(pct(values, 50), 3),
            "p99": round(pct(values, 99), 3),
            "max": round(max(values, default=0), 3),
        }

    return {
        "offered_per_s": rate,
        "reservations": len(load.pair_ms),
        "achieved_per_s": round(len(load.pair_ms) / elapsed, 1),
        "http_requests_per_s": round(2 * len(load.pair_ms) / elapsed, 1),
        "errors": load.errors,
        "reserve_ms": summary(load.reserve_ms),
        "reserve_service_ms": summary(load.reserve_service_ms),
        "commit_ms": summary(load.commit_ms),
        "reserve_commit_ms": summary(load.pair_ms),
        "start_lag_ms": summary(load.lag_ms),
    }


GO_CLIENT = ROOT / "tests" / "perf" / "quotaload"


def build_go_client(tmp: Path) -> Path:
    """``go build`` the Go load generator into ``tmp``; exits with a message without Go."""
    go = shutil.which("go")
    if go is None:
        sys.exit(
            "bench_quota.py: the Go load generator needs the Go toolchain (`go` on PATH, "
            f"Go 1.26 or later) to build {GO_CLIENT.relative_to(ROOT)}; install it, or run "
            "with --client python"
        )
    binary = tmp / "quotaload"
    built = subprocess.run(
        [go, "build", "-o", str(binary), "."],
        cwd=GO_CLIENT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if built.returncode != 0:
        sys.exit(f"bench_quota.py: go build of {GO_CLIENT} failed:\n{built.stderr}")
    return binary


class GoLoad:
    """The Go load generator as a child process (the same load as ``round_trips``).

    It writes a ``tenant\tevent_id`` line per completed pair to its stdout; a thread here
    hands them to the event producer. At the end it writes its figures to ``out``,
    closes its stdout and waits for its stdin to close, so that its CPU time can still
    be read (``wait`` then ``close``)."""

    def __init__(
        self,
        binary: Path,
        base: str,
        tenants: list[str],
        rate: float,
        duration: float,
        connections: int,
        sender: Any,
        out: Path,
        nice: int | None,
        rtprio: int | None = None,
    ) -> None:
        self.sender = sender
        self.out = out
        self.rate = rate
        cmd = [
            str(binary),
            "-url", base,
            "-rate", str(rate),
            "-duration", str(duration),
            "-connections", str(connections),
            "-tenants", ",".join(tenants),
            "-run", uuid.uuid4().hex[:6],
            "-out", str(out),
            "-wait-stdin",
        ]  # fmt: skip
        if nice is not None:  # nice(1) takes an increment; every thread of the child has it
            cmd = ["nice", "-n", str(nice - os.getpriority(os.PRIO_PROCESS, 0)), *cmd]
        if rtprio:  # chrt(1): SCHED_FIFO for the child and every thread it starts
            cmd = ["chrt", "--fifo", str(rtprio), *cmd]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.relay = threading.Thread(target=self._relay, name="quotaload-events", daemon=True)
        self.relay.start()

    def _relay(self) -> None:
        assert self.proc.stdout is not None
        put = self.sender.put
        for line in self.proc.stdout:
            tenant, event_id = line.decode().rstrip("\n").split("\t")
            put(tenant, event_id, 800)
        self.sender.flush()

    def wait(self) -> None:
        """Until the load is over (the child closed its stdout: finished, or failed)."""
        self.relay.join()

    def close(self) -> dict[str, Any]:
        """Lets the child exit; returns its figures, in ``round_trips``'s form."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        code = self.proc.wait(30)
        if code != 0:
            raise RuntimeError(f"the Go load generator exited with {code} (see its stderr)")
        result = json.loads(self.out.read_text())
        result["offered_per_s"] = self.rate
        for key, value in result.items():
            if key.endswith("_ms"):  # null: no value (pct()'s NaN)
                result[key] = {k: float("nan") if v is None else v for k, v in value.items()}
        return result


def alert_latency(h: Harness, n: int) -> dict[str, Any]:
    from confluent_kafka import OFFSET_END, Consumer, TopicPartition

    settings = h.settings
    run = uuid.uuid4().hex[:6]
    tenants = [f"tn-alert-{run}-{i}" for i in range(n)]
    for t in tenants:
        publish_definition(
            settings,
            QuotaDefinition(tenant_id=t, period="day", limit_tu=Decimal(1000), hard=True),
        )
    time.sleep(2)  # the worker follows the definitions topic
    topic = h.env["TOKENMETER_TOPIC_QUOTA_EVENTS"]
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"bench-{run}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 5,
        }
    )
    meta = consumer.list_topics(topic, timeout=10)
    consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in meta.topics[topic].partitions])
    arrived: dict[str, float] = {}
    done = threading.Event()

    def consume() -> None:
        while not done.is_set():
            for msg in consumer.consume(500, timeout=0.05):
                if msg.error() is not None:
                    continue
                alert = json.loads(msg.value())
                if alert["threshold"] == "100":
                    arrived.setdefault(alert["tenant_id"], time.time())

    reader = threading.Thread(target=consume)
    reader.start()
    time.sleep(1)
    producer = UsageProducer.from_settings(settings, **{"linger.ms": 0})
    sent: dict[str, float] = {}
    for i, t in enumerate(tenants):
        sent[t] = time.time()
        producer.send(event(t, f"a{run}-{i}", 1000))
        producer.flush()
        time.sleep(0.05)
    deadline = time.time() + 30
    while len(arrived) < n and time.time() < deadline:
        time.sleep(0.2)
    done.set()
    reader.join()
    consumer.close()
    lat = [(arrived[t] - sent[t]) * 1000 for t in tenants if t in arrived]
    return {
        "tenants": n,
        "alerts_received": len(lat),
        "event_to_alert_ms": {
            "p50": round(pct(lat, 50), 1),
            "p99": round(pct(lat, 99), 1),
            "max": round(max(lat, default=0), 1),
        },
    }


def _listener(port: int) -> Any:
    """The local process listening on ``port`` (the broker), if it can be seen."""
    import psutil

    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
                return psutil.Process(conn.pid)
    except psutil.AccessDenied:
        pass
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rate", type=float, default=2000.0, help="reservations per second")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--tenants", type=int, default=40)
    ap.add_argument("--alert-tenants", type=int, default=200)
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--client-nice",
        type=int,
        default=None,
        help="run the load generator (the gateway's stand-in) at this nice value, e.g. the\n"
        "same as TOKENMETER_QUOTA_SERVER_NICE: on one machine it competes with the\n"
        "worker, where a real gateway would run elsewhere (a negative value needs root)",
    )
    ap.add_argument(
        "--client-rtprio",
        type=int,
        default=None,
        help="run the Go load generator under SCHED_FIFO at this priority (chrt), e.g. with\n"
        "TOKENMETER_QUOTA_SERVER_RTPRIO: the gateway's stand-in then does not wait for a\n"
        "core behind the worker, as a gateway on its own machine would not (needs root)",
    )
    ap.add_argument(
        "--client",
        choices=("go", "python"),
        default="go",
        help="the load generator: go (tests/perf/quotaload, built with `go build`) or\n"
        "python (the asyncio client in this process, which takes more of the CPU)",
    )
    args = ap.parse_args()

    import psutil

    bootstrap = load_settings().kafka_bootstrap
    tmp = Path(tempfile.mkdtemp(prefix="bench-quota-"))
    binary = build_go_client(tmp) if args.client == "go" else None
    h = Harness(bootstrap, tmp)
    ensure_quota_topics(h.settings)
    run = uuid.uuid4().hex[:6]
    tenants = [f"tn-bench-{run}-{i}" for i in range(args.tenants)]
    for t in tenants:
        publish_definition(
            h.settings,
            QuotaDefinition(tenant_id=t, period="day", limit_tu=Decimal(10) ** 15, hard=True),
        )
    result: dict[str, Any] = {"cpus": os.cpu_count()}
    go_load: GoLoad | None = None
    try:
        h.start_worker()
        base = f"http://127.0.0.1:{h.port}"
        import urllib.request

        for t in tenants:  # until the worker serves every tenant
            for _ in range(200):
                try:
                    urllib.request.urlopen(f"{base}/v1/quotas/{t}", timeout=2).read()
                    break
                except OSError:
                    time.sleep(0.2)
        assert h.worker is not None
        sender = EventSender({k: v for k, v in h.env.items() if k.startswith("TOKENMETER_")})
        worker = psutil.Process(h.worker.pid)
        procs = {
            "worker": worker,
            "quota_server": worker.children()[0],
            "load_generator": psutil.Process(),
            "event_producer": psutil.Process(sender.proc.pid),
        }
        if args.client == "python" and args.client_nice is not None:
            os.setpriority(os.PRIO_PROCESS, 0, args.client_nice)  # not the event producer
        broker = _listener(int(bootstrap.rsplit(":", 1)[1]))
        if broker is not None:
            procs["kafka_broker"] = broker
        cpu0 = {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}
        all0 = psutil.cpu_times()
        load0 = os.getloadavg()
        t0 = time.monotonic()
        if binary is not None:
            go_load = GoLoad(
                binary, base, tenants, args.rate, args.duration, args.connections, sender,
                tmp / "quotaload.json", args.client_nice, args.client_rtprio,
            )  # fmt: skip
            procs["bench_process"] = procs["load_generator"]  # relays the event lines
            procs["load_generator"] = psutil.Process(go_load.proc.pid)
            cpu0["bench_process"], cpu0["load_generator"] = cpu0["load_generator"], 0.0
            go_load.wait()
            if go_load.proc.poll() is not None:  # it failed: no figures, no CPU time
                go_load.close()
        else:
            result["round_trips"] = asyncio.run(
                round_trips(base, tenants, args.rate, args.duration, args.connections, sender)
            )
        elapsed = time.monotonic() - t0
        all1 = psutil.cpu_times()
        cpu_percent = {
            name: round(100 * (sum(p.cpu_times()[:2]) - cpu0[name]) / elapsed)
            for name, p in procs.items()
        }
        client_nice = procs["load_generator"].nice()
        if go_load is not None:
            result["round_trips"] = go_load.close()  # the child exits: read it before
            go_load = None
        result["round_trips"]["client"] = args.client
        result["round_trips"]["cpu_percent"] = cpu_percent
        busy = (sum(all1) - all1.idle - all1.iowait) - (sum(all0) - all0.idle - all0.iowait)
        result["round_trips"]["cpu_percent"]["machine"] = round(100 * busy / elapsed)
        result["round_trips"]["nice"] = {
            "quota_server": procs["quota_server"].nice(),
            "pipeline_thread": int(h.env.get("TOKENMETER_PIPELINE_NICE", "10")),
            "load_generator": client_nice,
        }
        result["round_trips"]["realtime_priority"] = {
            "quota_server": os.sched_getparam(procs["quota_server"].pid).sched_priority,
            "load_generator": args.client_rtprio or 0,
        }
        result["round_trips"]["load_average_before"] = [round(x, 2) for x in load0]
        result["round_trips"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        result["round_trips"]["worker_cpu_percent"] = result["round_trips"]["cpu_percent"]["worker"]
        sender.close()
        h.cli("wait", "--idle", "1")
        result["worker_status"] = h.status()
        result["alerts"] = alert_latency(h, args.alert_tenants)
    finally:
        if go_load is not None and go_load.proc.poll() is None:
            go_load.proc.kill()
        if binary is not None:
            binary.unlink(missing_ok=True)
        h.close()
    print(json.dumps(result, indent=2, default=str))
    rt, al = result["round_trips"], result["alerts"]
    print(
        f"\nreserve+commit ({rt['client']} client) at {rt['offered_per_s']:.0f}/s offered: "
        f"{rt['achieved_per_s']:.0f}/s "
        f"achieved, p50 {rt['reserve_commit_ms']['p50']:.2f} ms, "
        f"p99 {rt['reserve_commit_ms']['p99']:.2f} ms (reserve p99 "
        f"{rt['reserve_ms']['p99']:.2f} ms, commit p99 {rt['commit_ms']['p99']:.2f} ms)\n"
        f"CPU % (of one core): {rt['cpu_percent']}; nice {rt['nice']}; real-time priority "
        f"{rt['realtime_priority']}; load average before "
        f"{rt['load_average_before']}, after {rt['load_average_after']}"
    )
    print(
        f"event crossing 100 % -> alert on quota-events: p50 "
        f"{al['event_to_alert_ms']['p50']:.0f} ms, p99 {al['event_to_alert_ms']['p99']:.0f} ms "
        f"({al['alerts_received']}/{al['tenants']} alerts)"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
