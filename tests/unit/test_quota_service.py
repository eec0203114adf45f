"""The quota service (pipeline/quota/) against the shared embedded warehouse, without
Kafka: usage restored from usage_events, pending commits settled by their events,
threshold alerts recorded once (also across a "kill"), the reservation journal, and
signed webhooks with retries."""

from __future__ import annotations

import asyncio
import itertools
import re
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from pipeline.metering.plans import TenantPlans
from pipeline.metering.pricing import load_cards
from pipeline.metering.quota import (
    NoQuotaError,
    QuotaDefinition,
    ReservationNotFoundError,
    ReservationSettledError,
    crossing_id,
)
from pipeline.metrics import WorkerMetrics
from pipeline.quota.definitions import DefinitionChange, decode_definition, encode_definition
from pipeline.quota.service import (
    NotReadyError,
    QuotaService,
    murmur2_partition,
    parse_reservation_id,
    reservation_id,
    status_json,
)
from pipeline.quota.webhooks import (
    SIGNATURE_HEADER,
    Webhook,
    WebhookConfigError,
    is_public_address,
    load_webhooks,
    verify,
)
from pipeline.settings import Settings, load_settings
from pipeline.stages.ingest import Accepted
from pipeline.stages.rate import Rated, RateStage
from pipeline.warehouse import Warehouse
from tests.unit.warehouse_fill import CARDS, write_rated

D = Decimal
NOW = int(datetime(2026, 11, 28, 2, 0, tzinfo=UTC).timestamp() * 1000)  # 10:00 Beijing
_OFFSETS = itertools.count(1)
_RATER = RateStage(load_cards(CARDS), TenantPlans())


def rated(tenant: str, tu: int, event_id: str, when: int = NOW - 60_000, **over: Any) -> Rated:
    """A deepseek-v3 input-only call: its Token Units equal its input tokens."""
    rec: dict[str, Any] = {
        "event_id": event_id,
        "event_time": when,
        "source": "gateway",
        "source_id": "gw-1",
        "reporting_carrier": "CMCC",
        "home_carrier": "CMCC",
        "serving_carrier": "CMCC",
        "transaction_id": None,
        "tenant_id": tenant,
        "subscriber_id": "sub_" + "1" * 32,
        "channel": "api",
        "model_id": "deepseek-v3",
        "provider": "deepseek",
        "input_tokens": tu,
        "output_tokens": 0,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "status": "ok",
        "routing_policy": None,
        "latency_ms": 10,
        "region": None,
        "attributes": {},
    }
    rec.update(over)
    part = murmur2_partition(tenant.encode(), 4)
    acc = Accepted(rec, 0, "usage-events", part, next(_OFFSETS), when + 100)
    [r], unpriced = _RATER.rate([acc])
    assert not unpriced and r.rating.token_units == tu or not r.rating.billable
    return r


def definition(tenant: str, limit: int = 1000, hard: bool = True, **kw: Any) -> DefinitionChange:
    d = QuotaDefinition(tenant_id=tenant, period="day", limit_tu=D(limit), hard=hard, **kw)
    return DefinitionChange(d.topic_key, d, 0, next(_OFFSETS), NOW)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> int:
        return self.now


async def _inline(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def make_service(
    settings: Settings, wh: Warehouse, tmp_path: Path, clock: Clock, **kw: Any
) -> QuotaService:
    return QuotaService(
        settings,
        _inline,
        lambda: wh,
        pseudonym_key=b"unit-test-pseudonym-key-0123456789",
        journal_path=tmp_path / "journal.jsonl",
        webhooks_path=kw.pop("webhooks_path", tmp_path / "none.yaml"),
        partitions=4,
        kafka=kw.pop("kafka", False),
        clock=clock,
        **kw,
    )


async def settle(service: QuotaService) -> None:
    """Let posted callbacks, the emitter and the table writer run."""
    for _ in range(5):
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)
    await service._flush_tables()


def alerts(wh: Warehouse, tenant: str) -> list[tuple[str, str]]:
    t = wh.query_arrow(
        "SELECT toString(threshold) AS t, kind, trigger_event_id FROM quota_events FINAL "
        f"WHERE tenant_id = '{tenant}' ORDER BY threshold"
    )
    return [(r["t"], r["kind"]) for r in t.to_pylist()]


def test_usage_restore_commit_and_thresholds(
    clean_warehouse: Warehouse, warehouse_settings: Settings, tmp_path: Path
) -> None:
    wh, clock = clean_warehouse, Clock()
    write_rated(wh, [rated("tn-a", 400, "old-1"), rated("tn-a", 200, "old-2")])
    # yesterday's usage is another period; other tenants are counted separately
    write_rated(wh, [rated("tn-a", 999, "y-1", when=NOW - 86_400_000), rated("tn-b", 7, "b-1")])

    async def run() -> None:
        service = make_service(warehouse_settings, wh, tmp_path, clock)
        service.apply_definition(definition("tn-a"))
        await service.start()
        with pytest.raises(NotReadyError):
            service.get("tn-a")  # its partition is not restored yet
        await service.on_partitions_assigned([0, 1, 2, 3], wait=True)
        await settle(service)
        st = service.get("tn-a")
        assert (st.used.tu, st.state) == (600, "warning")
        assert alerts(wh, "tn-a") == [("50", "threshold")]

        grant = service.reserve("tn-a", D(500), 30)
        assert grant.granted == 400 and grant.reservation_id is not None
        assert service.reserve("tn-a", D(1), 30).granted == 0
        outcome = service.commit(grant.reservation_id, D(300), "ev-300")
        assert (outcome.committed, outcome.released) == (300, 100)
        body = status_json(service.get("tn-a"))
        assert (body["used"], body["reserved"], body["pending"], body["remaining"]) == (
            "600",
            "300",
            "300",
            "100",
        )
        # the usage event lands: used grows by its rated TU, the pending hold goes
        r = rated("tn-a", 300, "ev-300")
        write_rated(wh, [r])
        service.on_rated_batch([r])
        await settle(service)
        body = status_json(service.get("tn-a"))
        assert (body["used"], body["reserved"], body["remaining"]) == ("900", "0", "100")
        assert alerts(wh, "tn-a") == [("50", "threshold"), ("80", "threshold")]
        trigger = wh.query_arrow(
            "SELECT trigger_event_id FROM quota_events WHERE tenant_id = 'tn-a' AND threshold = 80"
        )
        assert trigger.column(0).to_pylist() == ["ev-300"]
        with pytest.raises(NoQuotaError):
            service.get("tn-b")
        await service.stop()

    asyncio.run(run())


def test_restart_resumes_reservations_usage_and_emitted_thresholds(
    clean_warehouse: Warehouse, warehouse_settings: Settings, tmp_path: Path
) -> None:
    wh, clock = clean_warehouse, Clock()

    async def first() -> tuple[str, str]:
        service = make_service(warehouse_settings, wh, tmp_path, clock)
        service.apply_definition(definition("tn-r"))
        await service.start()
        await service.on_partitions_assigned([0, 1, 2, 3], wait=True)
        r = rated("tn-r", 850, "e-850")
        write_rated(wh, [r])
        service.on_rated_batch([r])
        await settle(service)
        open_ = service.reserve("tn-r", D(100), 60)
        committed = service.reserve("tn-r", D(50), 60)
        assert open_.reservation_id and committed.reservation_id
        service.commit(committed.reservation_id, D(40), "e-40")
        # killed: no stop(), nothing flushed on the way out
        for task in service._tasks:
            task.cancel()
        return open_.reservation_id, committed.reservation_id

    open_id, committed_id = asyncio.run(first())
    assert alerts(wh, "tn-r") == [("50", "threshold"), ("80", "threshold")]

    async def second() -> None:
        clock.now += 5_000
        service = make_service(warehouse_settings, wh, tmp_path, clock)
        service.apply_definition(definition("tn-r"))
        await service.start()
        await service.on_partitions_assigned([0, 1, 2, 3], wait=True)
        await settle(service)
        st = service.get("tn-r")
        # used from usage_events; the open reservation and the pending commit from the
        # journal: 850 + 100 + 40 = 990, so only 10 TU are left
        assert (st.used.tu, st.reserved, st.pending, st.remaining) == (850, 100, 40, 10)
        assert service.reserve("tn-r", D(50), 30).granted == 10
        assert service.release(open_id).released == 100
        with pytest.raises(ReservationSettledError):
            service.commit(committed_id, D(1))
        # the pending commit's event lands after the restart
        r = rated("tn-r", 40, "e-40")
        write_rated(wh, [r])
        service.on_rated_batch([r])
        await settle(service)
        assert (service.get("tn-r").used.tu, service.get("tn-r").pending) == (890, 0)
        assert alerts(wh, "tn-r") == [("50", "threshold"), ("80", "threshold")]
        await service.stop()

    asyncio.run(second())


def test_a_crossing_lost_in_a_kill_is_emitted_once_after_the_restart(
    clean_warehouse: Warehouse, warehouse_settings: Settings, tmp_path: Path
) -> None:
    wh, clock = clean_warehouse, Clock()

    async def killed_before_publishing() -> None:
        service = make_service(warehouse_settings, wh, tmp_path, clock)
        service.apply_definition(definition("tn-k", limit=100))
        await service.start()
        for task in service._tasks:  # the emitter never gets to run
            task.cancel()
        await service.on_partitions_assigned([0, 1, 2, 3], wait=True)
        r = rated("tn-k", 100, "k-1")
        write_rated(wh, [r])
        service.on_rated_batch([r])
        for _ in range(3):
            await asyncio.sleep(0)
        assert [c.threshold for c in service._outbox] == [50, 80, 100]

    asyncio.run(killed_before_publishing())
    assert alerts(wh, "tn-k") == []

    async def restarted() -> None:
        for _ in range(2):  # and once more: nothing new
            service = make_service(warehouse_settings, wh, tmp_path, clock)
            service.apply_definition(definition("tn-k", limit=100))
            await service.start()
            await service.on_partitions_assigned([0, 1, 2, 3], wait=True)
            await settle(service)
            await service.stop()

    asyncio.run(restarted())
    assert alerts(wh, "tn-k") == [("50", "threshold"), ("80", "threshold"), ("100", "exhausted")]
    ids = wh.query_arrow("SELECT event_id FROM quota_events WHERE tenant_id = 'tn-k'")
    assert sorted(ids.column(0).to_pylist()) == sorted(
        crossing_id(parse_key("tn-k"), "2026-11-28", D(t)) for t in (50, 80, 100)
    )


def parse_key(tenant: str) -> Any:
    from pipeline.metering.quota import QuotaKey

    return QuotaKey(tenant)


def test_restore_sets_usage_so_batches_before_it_are_not_counted_twice(
    clean_warehouse: Warehouse, warehouse_settings: Settings, tmp_path: Path
) -> None:
    wh, clock = clean_warehouse, Clock()

    async def run() -> None:
        service = make_service(warehouse_settings, wh, tmp_path, clock)
        service.apply_definition(definition("tn-o", limit=10_000, hard=False))
        await service.start()
        await service.on_partitions_assigned([0, 1, 2, 3], wait=True)
        before = rated("tn-o", 100, "o-1")
        write_rated(wh, [before])
        service.on_rated_batch([before])  # posted, then a restore reads it too
        await service.on_partitions_assigned([murmur2_partition(b"tn-o", 4)], wait=True)
        after = rated("tn-o", 10, "o-2")
        write_rated(wh, [after])
        service.on_rated_batch([after])
        await settle(service)
        assert service.get("tn-o").used.tu == 110
        # a tenant without a definition is counted too (a definition may come later)
        other = rated("tn-free", 5, "f-1")
        write_rated(wh, [other])
        service.on_rated_batch([other])
        await settle(service)
        service.apply_definition(definition("tn-free", limit=10))
        assert service.get("tn-free").used.tu == 5
        await service.stop()

    asyncio.run(run())


def test_soft_quota_subscriber_quota_and_errors(
    clean_warehouse: Warehouse, warehouse_settings: Settings, tmp_path: Path
) -> None:
    wh, clock = clean_warehouse, Clock()
    sub_raw = "13800138000"

    async def run() -> None:
        service = make_service(warehouse_settings, wh, tmp_path, clock)
        sub = service.quota_key("tn-s", sub_raw).subscriber_id
        service.apply_definition(definition("tn-s", limit=100, hard=False))
        service.apply_definition(definition("tn-s", limit=30, hard=True, subscriber_id=sub))
        await service.start()
        await service.on_partitions_assigned([0, 1, 2, 3], wait=True)
        await settle(service)
        soft = service.reserve("tn-s", D(150), 10)
        assert (soft.granted, soft.over_limit) == (150, True)
        assert service.release(soft.reservation_id or "").released == 150
        # the subscriber's hard quota caps the grant; the tenant's holds it too
        g = service.reserve("tn-s", D(50), 10, subscriber_id=sub_raw)
        assert g.granted == 30
        assert service.get("tn-s").reserved == 30
        assert service.get("tn-s", sub_raw).remaining == 0
        clock.now += 10_000  # TTL over: released by itself
        assert service.get("tn-s", sub_raw).remaining == 30
        with pytest.raises(ReservationSettledError, match="expired"):
            service.commit(g.reservation_id or "", D(1))
        with pytest.raises(ReservationNotFoundError):
            service.release("rsv_bogus")
        with pytest.raises(NoQuotaError):
            service.reserve("tn-nobody", D(1), 10)
        await service.stop()

    asyncio.run(run())


def test_reservation_ids_and_definition_encoding() -> None:
    key = parse_key("tenant/with.odd chars")
    assert parse_reservation_id(reservation_id(key)) == key
    d = QuotaDefinition(
        tenant_id="t", period="month", limit_tu=D("1000000"), limit_cny=D("12.5"), hard=True
    )
    again = decode_definition(encode_definition(d))
    assert (again.limit_tu, again.limit_cny, again.thresholds, again.hard) == (
        d.limit_tu,
        d.limit_cny,
        d.thresholds,
        True,
    )


Handler = Callable[[web.Request], Any]


def deliver_exhausted(
    settings: Settings,
    wh: Warehouse,
    tmp_path: Path,
    hooks_yaml: Callable[[int], str],
    handler: Handler,
    until: Callable[[], bool],
    host: str = "127.0.0.1",
    **kw: Any,
) -> None:
    """Run the quota service with the webhooks file ``hooks_yaml(port)`` (``port``: a
    receiver on ``host`` answering with ``handler``), exhaust tenant ``tn-w`` once, and
    wait (up to 2.5 s) until ``until()``; the attempts are then in webhook_deliveries."""

    async def run() -> None:
        server = web.Application()
        server.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(server, access_log=None)  # the receiver's log is not ours
        await runner.setup()
        site = web.TCPSite(runner, host, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        hooks = tmp_path / "hooks.yaml"
        hooks.write_text(hooks_yaml(port))
        service = make_service(settings, wh, tmp_path, Clock(), webhooks_path=hooks, **kw)
        service.apply_definition(definition("tn-w", limit=10))
        await service.start()
        await service.on_partitions_assigned([0, 1, 2, 3], wait=True)
        r = rated("tn-w", 10, "w-1")
        write_rated(wh, [r])
        service.on_rated_batch([r])
        for _ in range(50):
            await asyncio.sleep(0.05)
            if until():
                break
        await settle(service)
        await service.stop()
        await runner.cleanup()

    asyncio.run(run())


def allowing_private(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """``settings`` with TOKENMETER_WEBHOOK_ALLOW_PRIVATE=true, as an operator sets it
    for a receiver on this machine (every test receiver here is on loopback)."""
    monkeypatch.setenv("TOKENMETER_WEBHOOK_ALLOW_PRIVATE", "true")
    allowed = load_settings(data_dir=settings.data_dir)
    assert allowed.webhook_allow_private
    return allowed


def test_webhooks_are_signed_retried_and_recorded(
    clean_warehouse: Warehouse,
    warehouse_settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wh = clean_warehouse
    secret = "a-webhook-secret-of-some-length"
    monkeypatch.setenv("TM_TEST_HOOK_SECRET", secret)
    received: list[tuple[bytes, dict[str, str]]] = []
    metrics = WorkerMetrics()

    async def handler(request: web.Request) -> web.Response:
        received.append((await request.read(), dict(request.headers)))
        return web.Response(status=503 if len(received) == 1 else 204)

    settings = allowing_private(warehouse_settings, monkeypatch)
    hooks = load_webhooks_text(tmp_path, "http://127.0.0.1:1/hook", True, secret)
    assert "a-webhook" not in repr(hooks)
    deliver_exhausted(
        settings,
        wh,
        tmp_path,
        lambda port: (
            "webhooks:\n"
            f"  - {{name: ops, url: 'http://127.0.0.1:{port}/hook', "
            "secret_env: TM_TEST_HOOK_SECRET, backoff_s: 0.05, kinds: [exhausted]}\n"
        ),
        handler,
        lambda: len(received) >= 2,
        metrics=metrics,
    )
    assert len(received) == 2  # exhausted only (the filter), delivered on the 2nd attempt
    body, headers = received[1]
    assert verify(secret.encode(), body, headers[SIGNATURE_HEADER])
    assert headers["X-Tokenmeter-Attempt"] == "2"
    rows = wh.query_arrow(
        "SELECT attempt, status, http_status FROM webhook_deliveries ORDER BY attempt"
    ).to_pylist()
    assert [(r["attempt"], r["status"], r["http_status"]) for r in rows] == [
        (1, "retry", 503),
        (2, "ok", 204),
    ]
    # and counted for /metrics, by outcome
    counted = {
        outcome: metrics.registry.get_sample_value(
            "tokenmeter_webhook_deliveries_total", {"outcome": outcome}
        )
        for outcome in ("ok", "retry", "failed")
    }
    assert counted == {"ok": 1, "retry": 1, "failed": 0}


def load_webhooks_text(
    tmp_path: Path, url: str, allow_private: bool = False, secret: str = "s" * 20
) -> list[Webhook]:
    """The webhooks of a file with one webhook to ``url`` (``secret`` in TM_TEST_S)."""
    path = tmp_path / "one-hook.yaml"
    path.write_text(f"webhooks:\n  - {{name: ops, url: '{url}', secret_env: TM_TEST_S}}\n")
    return load_webhooks(path, {"TM_TEST_S": secret}, allow_private=allow_private)


NOT_PUBLIC = [
    "http://127.0.0.1:8080/hook",
    "http://127.9.9.9/hook",
    "http://[::1]:8080/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://0.0.0.0:6066/v1/quotas",
    "http://10.1.2.3/hook",
    "http://172.16.0.1/hook",
    "http://172.31.255.254/hook",
    "http://192.168.1.1/hook",
    "http://[fc00::1]/hook",
    "http://[fd12:3456::1]/hook",
    "http://[fe80::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://localhost:6066/v1/quotas",
    "https://LOCALHOST./hook",
]


@pytest.mark.parametrize("url", NOT_PUBLIC)
def test_a_webhook_to_a_private_address_is_refused_when_configured(
    tmp_path: Path, url: str
) -> None:
    with pytest.raises(WebhookConfigError) as caught:
        load_webhooks_text(tmp_path, url)
    message = str(caught.value)
    assert "webhooks.0.url" in message and "TOKENMETER_WEBHOOK_ALLOW_PRIVATE" in message
    # the operator's explicit setting allows it
    assert [h.url for h in load_webhooks_text(tmp_path, url, allow_private=True)] == [url]


def test_public_webhook_urls_are_accepted(tmp_path: Path) -> None:
    for url in (
        "https://ops.example.com/hooks/tm",
        "http://8.8.8.8/x",
        "https://[2001:4860::8888]/",
    ):
        assert [h.url for h in load_webhooks_text(tmp_path, url)] == [url]
    assert load_settings().webhook_allow_private is False  # refused unless set
    with pytest.raises(Exception, match="TOKENMETER_WEBHOOK_ALLOW_PRIVATE"):
        load_settings(webhook_allow_private="perhaps")


def _loopback_name() -> tuple[str, str]:
    """A host name other than localhost that resolves to this machine only (the machine's
    own name, in /etc/hosts), and that address."""
    name = socket.gethostname()
    try:
        addresses = {a[4][0] for a in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
    except OSError:
        pytest.skip(f"this machine's name {name} does not resolve")
    if len(addresses) != 1 or is_public_address(next(iter(addresses))):
        pytest.skip(f"{name} resolves to {addresses}, not one non-public address")
    return name, addresses.pop()


def test_a_name_that_resolves_to_a_private_address_is_refused_at_delivery(
    clean_warehouse: Warehouse,
    warehouse_settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DNS decides at call time: a name accepted in the file that resolves to a private
    address is not called; the attempt is a final row that says why."""
    name, address = _loopback_name()
    monkeypatch.setenv("TM_TEST_HOOK_SECRET", "a-webhook-secret-of-some-length")
    received: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        received.append(request.path)
        return web.Response(status=204)

    def hooks(port: int) -> str:
        return (
            "webhooks:\n"
            f"  - {{name: ops, url: 'http://{name}:{port}/hook', "
            "secret_env: TM_TEST_HOOK_SECRET, kinds: [exhausted]}\n"
        )

    def rows() -> list[dict[str, Any]]:
        return clean_warehouse.query_arrow(
            "SELECT attempt, status, http_status, error FROM webhook_deliveries"
        ).to_pylist()

    deliver_exhausted(
        warehouse_settings, clean_warehouse, tmp_path, hooks, handler, lambda: False, host=address
    )
    assert received == []
    [row] = rows()
    assert (row["attempt"], row["status"], row["http_status"]) == (1, "failed", None)
    assert f"resolves to {address}" in row["error"]
    assert "TOKENMETER_WEBHOOK_ALLOW_PRIVATE" in row["error"]

    # the same receiver is reached once the setting allows it (the refusal was the check)
    clean_warehouse.execute("TRUNCATE TABLE webhook_deliveries")
    settings = allowing_private(warehouse_settings, monkeypatch)
    deliver_exhausted(
        settings, clean_warehouse, tmp_path, hooks, handler, lambda: bool(received), host=address
    )
    assert received == ["/hook"]
    assert [r["status"] for r in rows()] == ["ok"]


def test_a_redirect_is_not_followed(
    clean_warehouse: Warehouse,
    warehouse_settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TM_TEST_HOOK_SECRET", "a-webhook-secret-of-some-length")
    received: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        received.append(request.path)
        return web.Response(status=307, headers={"Location": "http://169.254.169.254/x"})

    deliver_exhausted(
        allowing_private(warehouse_settings, monkeypatch),
        clean_warehouse,
        tmp_path,
        lambda port: (
            "webhooks:\n"
            f"  - {{name: ops, url: 'http://127.0.0.1:{port}/hook', "
            "secret_env: TM_TEST_HOOK_SECRET, kinds: [exhausted], backoff_s: 0.05}\n"
        ),
        handler,
        lambda: bool(received),
    )
    assert received == ["/hook"]  # called once, not again, and the target never
    [row] = clean_warehouse.query_arrow(
        "SELECT status, http_status, error FROM webhook_deliveries"
    ).to_pylist()
    assert (row["status"], row["http_status"]) == ("failed", 307)
    assert "redirects are not followed" in row["error"]


def test_no_secret_of_a_webhook_url_reaches_the_table_or_the_log(
    clean_warehouse: Warehouse,
    warehouse_settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Secrets in a URL's user info, path and query (as chat webhooks carry them) are not
    in webhook_deliveries, which analysts read, whatever the outcome: retried, ok, final
    4xx, connection refused."""
    monkeypatch.setenv("TM_TEST_HOOK_SECRET", "a-webhook-secret-of-some-length")
    secrets = ["pw-Zq81vMx", "T0B1path-Kx93LqP", "tok-Wp27sNc", "usr-Hk55"]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused
    calls: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(request.path)
        if request.path.startswith("/gone"):
            return web.Response(status=410)
        return web.Response(status=503 if len(calls) == 1 else 204)

    def hooks(port: int) -> str:
        base = f"http://{secrets[3]}:{secrets[0]}@127.0.0.1"
        return (
            "webhooks:\n"
            f"  - {{name: ok, url: '{base}:{port}/services/{secrets[1]}?token={secrets[2]}', "
            "secret_env: TM_TEST_HOOK_SECRET, kinds: [exhausted], backoff_s: 0.05}\n"
            f"  - {{name: gone, url: '{base}:{port}/gone/{secrets[1]}?token={secrets[2]}', "
            "secret_env: TM_TEST_HOOK_SECRET, kinds: [exhausted]}\n"
            f"  - {{name: down, url: '{base}:{closed_port}/x/{secrets[1]}?t={secrets[2]}', "
            "secret_env: TM_TEST_HOOK_SECRET, kinds: [exhausted], max_attempts: 1}\n"
        )

    caplog.set_level("DEBUG")
    deliver_exhausted(
        allowing_private(warehouse_settings, monkeypatch),
        clean_warehouse,
        tmp_path,
        hooks,
        handler,
        lambda: len(calls) >= 3,
    )
    table = clean_warehouse.query_arrow(
        "SELECT webhook, url, status, http_status, error FROM webhook_deliveries"
    )
    statuses = sorted((r["webhook"], r["status"], r["http_status"]) for r in table.to_pylist())
    assert statuses == [
        ("down", "failed", None),
        ("gone", "failed", 410),
        ("ok", "ok", 204),
        ("ok", "retry", 503),
    ]
    stored = " ".join(str(v) for row in table.to_pylist() for v in row.values())
    for secret in secrets:
        assert secret not in stored
        assert secret not in caplog.text
    urls = set(table.column("url").to_pylist())
    assert len(urls) == 2 and f"http://127.0.0.1:{closed_port}/…" in urls
    assert all(re.fullmatch(r"http://127\.0\.0\.1:\d+/…", u) for u in urls)


def test_webhook_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text("webhooks:\n  - {name: a, url: 'http://x/', secret_env: NOPE_SECRET}\n")
    with pytest.raises(Exception, match="NOPE_SECRET"):
        load_webhooks(path, environ={})
    path.write_text("webhooks:\n  - {name: a, url: 'ftp://x/', secret_env: S}\n")
    with pytest.raises(Exception, match="url"):
        load_webhooks(path, environ={"S": "x" * 20})
    assert load_webhooks(tmp_path / "missing.yaml") == []


def test_cli_refuses_bad_definitions_before_touching_kafka() -> None:
    import typer
    from typer.testing import CliRunner

    from pipeline.cli_quota import register

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    register(app)
    runner = CliRunner()
    cases = [
        (["--period", "week", "--limit-tu", "10"], "--period: must be day or month"),
        (["--period", "day", "--limit-tu", "-5"], "--limit-tu: must be a positive number"),
        (["--period", "day", "--limit-tu", "ten"], "--limit-tu: not a number"),
        (["--period", "day", "--limit-tu", "10", "--thresholds", "0,50"], "--thresholds"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["quota", "set", "--tenant", "t", *args])
        assert result.exit_code == 2, result.output
        assert message in result.output.replace("\n", " ")
