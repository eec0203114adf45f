"""Quota service benchmark: reserve+commit round trips, and crossing-to-alert latency.

    TOKENMETER_KAFKA_BOOTSTRAP=127.0.0.1:19092 .venv/bin/python tests/perf/bench_quota.py \
        [--rate 2000] [--duration 20] [--connections 32] [--alert-tenants 200] [--out F.json]

Starts a real worker (subprocess, own topics and data dir, like the integration tests)
against the broker in TOKENMETER_KAFKA_BOOTSTRAP, then:

1. Round trips: an open-loop load of ``--rate`` reservations per second for
   ``--duration`` seconds over ``--connections`` keep-alive HTTP connections: each one
   is ``POST reservations`` then ``POST commit`` (with the event id), and the usage
   event is then produced to Kafka, so the pipeline runs with the same traffic (one
   event per reservation). Reported: p50/p99/max of reserve, of commit and of the pair
   (from its scheduled start, so a slow worker is not hidden by a slow client: no
   coordinated omission), achieved reservations/s, worker CPU.
2. Alert latency: ``--alert-tenants`` tenants get a hard quota of 1000 TU; one event of
   1000 TU each (20 tenants per second) crosses 50, 80 and 100 % at once. Reported: the
   time from producing the event to a consumer receiving its 100 % alert from
   ``quota-events`` (p50/p99/max).

The load generator runs on the same machine (and cores) as the worker, the broker and
the embedded ClickHouse engine, so the figures are an upper bound. Not collected by
pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.events import UsageEvent  # noqa: E402
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
    """Child process: turn (tenant, event_id, tu) items into usage events on Kafka."""
    os.environ.update(settings_env)
    producer = UsageProducer.from_settings(load_settings())
    while (item := q.get()) is not None:
        for tenant, event_id, tu in item:
            producer.send(event(tenant, event_id, tu))
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


class Conn:
    """One keep-alive HTTP/1.1 connection, speaking just enough HTTP for this API: a
    lean client, so the load generator takes little of the CPU the worker needs."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> Conn:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.writer.write(
            b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body)
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        at = head.lower().find(b"content-length:")
        size = int(head[at + 15 : head.index(b"\r\n", at)])
        return status, await self.reader.readexactly(size)

    def close(self) -> None:
        self.writer.close()


async def round_trips(
    base: str, tenants: list[str], rate: float, duration: float, connections: int, sender: Any
) -> dict[str, Any]:
    from urllib.parse import urlsplit

    url = urlsplit(base)
    reserve_ms: list[float] = []
    commit_ms: list[float] = []
    pair_ms: list[float] = []
    errors: dict[str, int] = {}
    run = uuid.uuid4().hex[:6]
    pool: asyncio.Queue[Conn] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(await Conn.open(url.hostname or "127.0.0.1", url.port or 80))
    reserve_body = b'{"token_units": 1000, "ttl_s": 30}'

    async def one(i: int, scheduled: float, tag: str = "m") -> None:
        tenant = tenants[i % len(tenants)]
        conn = await pool.get()
        try:
            t0 = time.perf_counter()
            status, data = await conn.post(f"/v1/quotas/{tenant}/reservations", reserve_body)
            t1 = time.perf_counter()
            if status != 201:
                raise RuntimeError(f"reserve: HTTP {status} {data[:80]!r}")
            rid = json.loads(data)["reservation_id"]
            event_id = f"b{run}-{tag}{i}"
            body = b'{"token_units": 800, "event_id": "%s"}' % event_id.encode()
            status, data = await conn.post(f"/v1/reservations/{rid}/commit", body)
            t2 = time.perf_counter()
            if status != 200:
                raise RuntimeError(f"commit: HTTP {status} {data[:80]!r}")
        except (OSError, RuntimeError, asyncio.IncompleteReadError) as exc:
            key = str(exc)[:80]
            errors[key] = errors.get(key, 0) + 1
            return
        finally:
            pool.put_nowait(conn)
        reserve_ms.append((t1 - t0) * 1000)
        commit_ms.append((t2 - t1) * 1000)
        pair_ms.append((t2 - scheduled) * 1000)
        sender.put(tenant, event_id, 800)

    # warm-up: connections, caches, the worker's first batches
    await asyncio.gather(*(one(i, time.perf_counter(), "w") for i in range(200)))
    reserve_ms.clear(), commit_ms.clear(), pair_ms.clear()
    n = int(rate * duration)
    tasks = []
    start = time.perf_counter() + 0.05
    for i in range(n):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i, scheduled)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    sender.flush()
    while not pool.empty():
        pool.get_nowait().close()

    def summary(values: list[float]) -> dict[str, float]:
        return {
            "p50": round(pct(values, 50), 3),
            "p99": round(pct(values, 99), 3),
            "max": round(max(values, default=0), 3),
        }

    return {
        "offered_per_s": rate,
        "reservations": len(pair_ms),
        "achieved_per_s": round(len(pair_ms) / elapsed, 1),
        "http_requests_per_s": round(2 * len(pair_ms) / elapsed, 1),
        "errors": errors,
        "reserve_ms": summary(reserve_ms),
        "commit_ms": summary(commit_ms),
        "reserve_commit_ms": summary(pair_ms),
    }


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rate", type=float, default=2000.0, help="reservations per second")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--tenants", type=int, default=40)
    ap.add_argument("--alert-tenants", type=int, default=200)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import psutil

    bootstrap = load_settings().kafka_bootstrap
    tmp = Path(tempfile.mkdtemp(prefix="bench-quota-"))
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
        proc = psutil.Process(h.worker.pid)
        sender = EventSender({k: v for k, v in h.env.items() if k.startswith("TOKENMETER_")})
        cpu0 = proc.cpu_times()
        t0 = time.monotonic()
        result["round_trips"] = asyncio.run(
            round_trips(base, tenants, args.rate, args.duration, args.connections, sender)
        )
        cpu1 = proc.cpu_times()
        result["round_trips"]["worker_cpu_percent"] = round(
            100 * ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / (time.monotonic() - t0)
        )
        sender.close()
        h.cli("wait", "--idle", "1")
        result["worker_status"] = h.status()
        result["alerts"] = alert_latency(h, args.alert_tenants)
    finally:
        h.close()
    print(json.dumps(result, indent=2, default=str))
    rt, al = result["round_trips"], result["alerts"]
    print(
        f"\nreserve+commit at {rt['offered_per_s']:.0f}/s offered: {rt['achieved_per_s']:.0f}/s "
        f"achieved, p50 {rt['reserve_commit_ms']['p50']:.2f} ms, "
        f"p99 {rt['reserve_commit_ms']['p99']:.2f} ms (reserve p99 "
        f"{rt['reserve_ms']['p99']:.2f} ms, commit p99 {rt['commit_ms']['p99']:.2f} ms), "
        f"worker CPU {rt['worker_cpu_percent']} %"
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
