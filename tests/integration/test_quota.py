"""Quota enforcement end to end: the real worker's HTTP quota service, real Kafka, the
real ClickHouse engine. 8 concurrent gateway clients against one hard quota; threshold
alerts exactly once, also across SIGKILLs."""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from pipeline.events import UsageEvent
from pipeline.meter import Meter
from pipeline.produce import UsageProducer
from pipeline.quota.definitions import read_topic
from tests.integration.harness import Harness

pytestmark = pytest.mark.integration

LIMIT = 1_000_000


def get(h: Harness, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{h.port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_for_quota(h: Harness, tenant: str, timeout: float = 60) -> dict[str, Any]:
    """Until the worker serves the tenant's quota (definitions read, usage restored)."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = get(h, f"/v1/quotas/{tenant}")
        if status == 200:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"quota of {tenant} not served: {status} {body}\n{h.log_tail()}")
        time.sleep(0.3)


def event(tenant: str, event_id: str, tu: int) -> UsageEvent:
    """deepseek-v3, input tokens only: its Token Units equal its input tokens."""
    return UsageEvent(
        event_id=event_id,
        event_time=datetime.now(tz=UTC),
        source="gateway",
        source_id="gw-quota-test",
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


def alerts_on_topic(h: Harness, tenant: str) -> list[dict[str, Any]]:
    messages, _ = read_topic(h.settings, h.env["TOKENMETER_TOPIC_QUOTA_EVENTS"], 30.0, "test")
    out = [json.loads(m.value()) for m in messages]
    return [a for a in out if a["tenant_id"] == tenant]


def wait_for_alerts(h: Harness, tenant: str, n: int, timeout: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = alerts_on_topic(h, tenant)
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_eight_clients_never_exceed_a_hard_quota(harness: Harness) -> None:
    h, tenant = harness, "tn-quota-hard"
    h.cli("quota", "set", "--tenant", tenant, "--period", "day", "--limit-tu", str(LIMIT), "--hard")
    h.start_worker()
    assert wait_for_quota(h, tenant)["used"] == "0"
    producer = UsageProducer.from_settings(h.settings)
    meter = Meter(f"http://127.0.0.1:{h.port}", producer)
    committed: list[int] = []
    violations: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        rng = random.Random(n)
        zeros = seq = 0
        while zeros < 5:
            seq += 1
            want = rng.randint(500, 6_000)
            with meter.reserve(tenant, want, ttl_s=30) as r:
                granted = int(r.granted)
                if granted == 0:
                    zeros += 1
                    time.sleep(0.05)
                    continue
                zeros = 0
                if rng.random() < 0.1:
                    continue  # the call was not made: leaving the block releases
                used = granted if granted < want else rng.randint(granted // 2, granted)
                result = r.commit(used, event(tenant, f"c{n}-{seq}", used))
                assert result.settled, result.error
                with lock:
                    committed.append(used)

    def monitor() -> None:
        while not stop.is_set():
            _, body = get(h, f"/v1/quotas/{tenant}")
            total = Decimal(body["used"]) + Decimal(body["reserved"])
            if total > LIMIT:
                violations.append(f"used {body['used']} + reserved {body['reserved']} > limit")
            time.sleep(0.02)

    watcher = threading.Thread(target=monitor)
    watcher.start()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    # fill what releases left over, so the quota ends exactly at its limit
    while True:
        with meter.reserve(tenant, LIMIT) as r:
            if r.granted == 0:
                break
            r.commit(int(r.granted), event(tenant, f"fill-{len(committed)}", int(r.granted)))
            committed.append(int(r.granted))
    elapsed = time.monotonic() - started
    producer.flush()
    h.cli("wait", "--idle", "2")
    stop.set()
    watcher.join()
    print(f"\n{len(committed)} commits by 8 clients in {elapsed:.1f} s")

    assert not violations, violations[:3]
    assert sum(committed) == LIMIT  # never more; and the fill reached it exactly
    final = wait_for_quota(h, tenant)
    assert (final["used"], final["reserved"], final["pending"], final["remaining"]) == (
        str(LIMIT),
        "0",
        "0",
        "0",
    )
    assert final["state"] == "exhausted"
    rated = h.sql(
        "SELECT count() AS n, sumIf(token_units, billable) AS tu FROM rated_usage "
        f"WHERE tenant_id = '{tenant}'"
    )[0]
    stored = h.scalar(f"SELECT sum(token_units) FROM usage_events WHERE tenant_id = '{tenant}'")
    assert int(rated["n"]) == len(committed)
    assert Decimal(str(rated["tu"])) == Decimal(str(stored)) == Decimal(final["used"])

    found = wait_for_alerts(h, tenant, 3)
    assert sorted((a["threshold"], a["kind"]) for a in found) == [
        ("100", "exhausted"),
        ("50", "threshold"),
        ("80", "threshold"),
    ]
    assert h.scalar(f"SELECT count() FROM quota_events WHERE tenant_id = '{tenant}'") == 3
    # `quota show --json` reads the definition from Kafka and the figures from the worker
    shown = [json.loads(line) for line in h.cli("quota", "show", "--json").stdout.splitlines()]
    mine = [s for s in shown if s["tenant_id"] == tenant]
    assert mine and mine[0]["usage"]["used"] == str(LIMIT)


def test_alerts_exactly_once_across_sigkills(harness: Harness) -> None:
    """A worker killed between a crossing and its delivery delivers it once after the
    restart; killing it again (before or after the table row) changes nothing."""
    h, tenant = harness, "tn-quota-kill"
    hold = h.data_dir / "faults" / "hold-quota-alerts"
    hold.parent.mkdir(parents=True, exist_ok=True)
    hold.touch()  # crossings are detected but not published while this exists
    h.cli("quota", "set", "--tenant", tenant, "--period", "month", "--limit-tu", "1000", "--hard")
    h.start_worker()
    wait_for_quota(h, tenant)
    producer = UsageProducer.from_settings(h.settings)
    producer.send(event(tenant, "k-1", 850))
    producer.flush()
    h.cli("wait", "--idle", "1")
    body = wait_for_quota(h, tenant)
    assert (body["used"], body["crossed"]) == ("850", ["50", "80"])
    time.sleep(1)
    assert alerts_on_topic(h, tenant) == []  # crossed, not delivered

    h.kill_worker()
    hold.unlink()
    h.start_worker()
    found = wait_for_alerts(h, tenant, 2)
    assert sorted(a["threshold"] for a in found) == ["50", "80"]
    assert all(a["trigger_event_id"] is None for a in found)  # re-derived after the kill
    h.kill_worker()  # maybe before its table rows were written: the topic has them

    h.start_worker()
    wait_for_quota(h, tenant)
    producer.send(event(tenant, "k-2", 200))
    producer.flush()
    found = wait_for_alerts(h, tenant, 3)
    assert sorted(a["threshold"] for a in found) == ["100", "50", "80"]
    last = [a for a in found if a["threshold"] == "100"][0]
    assert last["trigger_event_id"] == "k-2" and last["used_tu"] == "1050"
    h.cli("wait", "--idle", "1")
    time.sleep(1.5)  # the table writer's tick
    h.kill_worker()

    h.start_worker()
    wait_for_quota(h, tenant)
    time.sleep(3)
    found = alerts_on_topic(h, tenant)
    assert sorted(a["threshold"] for a in found) == ["100", "50", "80"]
    assert len({a["event_id"] for a in found}) == 3
    rows = h.sql(
        "SELECT toUInt32(threshold) AS t, count() AS n FROM quota_events "
        f"WHERE tenant_id = '{tenant}' GROUP BY t ORDER BY t"
    )
    assert {int(r["t"]): int(r["n"]) for r in rows} == {50: 1, 80: 1, 100: 1}
    watched = h.cli(
        "quota",
        "watch",
        "--from-beginning",
        "--tenant",
        tenant,
        "--json",
        "--max",
        "3",
        "--timeout",
        "20",
    ).stdout.splitlines()
    assert len(watched) == 3


def scrape(h: Harness) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics, parsed: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{h.port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_http_errors_are_clear(harness: Harness) -> None:
    h = harness
    h.cli("quota", "set", "--tenant", "tn-quota-err", "--period", "day", "--limit-tu", "10")
    h.start_worker()
    wait_for_quota(h, "tn-quota-err")

    def call(method: str, path: str, body: bytes | None) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(f"http://127.0.0.1:{h.port}{path}", data=body, method=method)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    assert call("GET", "/v1/quotas/nobody", None)[0] == 404
    status, body = call("POST", "/v1/quotas/tn-quota-err/reservations", b"{")
    assert status == 400 and "JSON" in body["error"]
    status, body = call("POST", "/v1/quotas/tn-quota-err/reservations", b'{"token_units": -1}')
    assert status == 400 and "token_units" in body["error"]
    status, body = call("POST", "/v1/quotas/tn-quota-err/reservations", b'{"token_units": 25}')
    assert status == 201 and body["granted"] == "25" and body["over_limit"] is True  # soft
    rid = body["reservation_id"]
    assert call("DELETE", f"/v1/reservations/{rid}", None)[0] == 200
    status, body = call("POST", f"/v1/reservations/{rid}/commit", b'{"token_units": 1}')
    assert status == 409 and "released" in body["error"]
    assert call("DELETE", "/v1/reservations/rsv_nope", None)[0] == 404
    # /metrics counts what the quota server answered (it reports every half second)
    name = "tokenmeter_quota_request_duration_seconds"
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(h)
        outcomes = {
            o: samples[("tokenmeter_quota_reservations_total", (("outcome", o),))]
            for o in ("granted", "partial", "denied", "error")
        }
        calls = {c: samples[(f"{name}_count", (("call", c),))] for c in ("reserve", "commit")}
        releases = samples[(f"{name}_count", (("call", "release"),))]
        if releases == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert outcomes == {"granted": 1, "partial": 0, "denied": 0, "error": 2}
    assert calls == {"reserve": 3, "commit": 1} and releases == 2
    assert samples[(f"{name}_bucket", (("call", "reserve"), ("le", "+Inf")))] == 3
    assert samples[(f"{name}_count", (("call", "status"),))] >= 1
    h.cli("quota", "delete", "--tenant", "tn-quota-err")
    deadline = time.monotonic() + 10
    while call("GET", "/v1/quotas/tn-quota-err", None)[0] != 404:
        assert time.monotonic() < deadline, "deleted quota still served"
        time.sleep(0.2)


def test_requests_reach_the_worker_that_owns_the_tenant(harness: Harness) -> None:
    """Two workers share the usage partitions; either one answers for every tenant,
    forwarding to the owner (each keeps its own embedded warehouse here, which is
    enough for routing)."""
    import os
    import signal
    import subprocess
    import sys

    from tests.integration.harness import ROOT, free_port

    h = harness
    tenants = [f"tn-quota-route-{i}" for i in range(8)]
    for t in tenants:
        h.cli("quota", "set", "--tenant", t, "--period", "day", "--limit-tu", "1000", "--hard")
    h.start_worker()
    other_dir = h.data_dir.parent / "data-2"
    other_dir.mkdir()
    (other_dir / "secrets").mkdir()
    (other_dir / "secrets" / "pseudonym.key").write_text(
        (h.data_dir / "secrets" / "pseudonym.key").read_text()
    )
    port = free_port()
    env = dict(h.env, TOKENMETER_DATA_DIR=str(other_dir), TOKENMETER_WEB_PORT=str(port))
    with (other_dir / "worker.log").open("ab") as log:
        second = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "worker"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        ports = (h.port, port)

        def status(p: int, tenant: str) -> int:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{p}/v1/quotas/{tenant}", timeout=5
                ) as r:
                    return int(r.status)
            except urllib.error.HTTPError as exc:
                return int(exc.code)
            except OSError:
                return 0  # not listening yet

        deadline = time.monotonic() + 90
        while not all(status(p, t) == 200 for p in ports for t in tenants):
            assert time.monotonic() < deadline, "both workers never answered for all tenants"
            time.sleep(0.5)
        forwarded = set()
        for i, t in enumerate(tenants):
            entry, other = ports[i % 2], ports[1 - i % 2]
            req = urllib.request.Request(
                f"http://127.0.0.1:{entry}/v1/quotas/{t}/reservations",
                data=b'{"token_units": 700}',
                method="POST",
            )
            with urllib.request.urlopen(req, timeout=5) as r:
                grant = json.loads(r.read())
                if r.headers.get("X-Tokenmeter-Owner"):
                    forwarded.add(entry)
            assert grant["granted"] == "700"
            # the same quota, whichever worker is asked: the second grant is partial
            req = urllib.request.Request(
                f"http://127.0.0.1:{other}/v1/quotas/{t}/reservations",
                data=b'{"token_units": 700}',
                method="POST",
            )
            with urllib.request.urlopen(req, timeout=5) as r:
                assert json.loads(r.read())["granted"] == "300"
            rid = grant["reservation_id"]
            req = urllib.request.Request(
                f"http://127.0.0.1:{other}/v1/reservations/{rid}", method="DELETE"
            )
            with urllib.request.urlopen(req, timeout=5) as r:
                assert json.loads(r.read())["outcome"] == "released"
            for p in ports:
                with urllib.request.urlopen(f"http://127.0.0.1:{p}/v1/quotas/{t}") as r:
                    assert json.loads(r.read())["reserved"] == "300"
        assert forwarded == set(ports)  # each worker forwarded to the other at least once
    finally:
        os.killpg(second.pid, signal.SIGKILL)
        second.wait(10)
