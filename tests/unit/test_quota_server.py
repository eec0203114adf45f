"""The quota server (pipeline/quota/server.py) in-process: its HTTP/1.1 handling, the
four calls answered from a follower fed over a real socket pair like the worker feeds
it, routing to the owning worker, forwarding of the worker's own pages, and the
metrics it reports. Plus the hand-written answer bodies and the worker -> server
mirror of the usage state."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from pipeline.metering.quota import Grant, QuotaDefinition, Settlement, fmt, to_tu
from pipeline.metrics import QUOTA_DURATION_BUCKETS, WorkerMetrics
from pipeline.quota.definitions import DefinitionChange
from pipeline.quota.link import frame, read_frame
from pipeline.quota.server import QuotaServer
from pipeline.quota.service import (
    QuotaService,
    grant_body,
    grant_json,
    iso_ms,
    murmur2_partition,
    parse_reservation_id,
    reservation_id,
    settlement_body,
    settlement_json,
)
from pipeline.settings import Settings
from pipeline.warehouse import Warehouse
from tests.unit.test_quota_service import Clock, rated
from tests.unit.warehouse_fill import write_rated

D = Decimal


def definition(tenant: str, limit: int, offset: int, hard: bool = True) -> DefinitionChange:
    d = QuotaDefinition(tenant_id=tenant, period="day", limit_tu=D(limit), hard=hard)
    return DefinitionChange(d.topic_key, d, 0, offset, 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Running:
    server: QuotaServer
    port: int
    worker: socket.socket  # the worker's end of the link
    answers: list[tuple[Any, ...]]

    def send(self, *message: Any) -> None:
        self.worker.sendall(frame(tuple(message)))


class Http:
    """A raw keep-alive HTTP/1.1 client (asyncio streams), to see exactly what goes
    over the wire."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Http:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> tuple[int, dict[str, str], bytes]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body

    async def call(
        self, method: str, path: str, body: bytes | None = None
    ) -> tuple[int, dict[str, str], Any]:
        data = body or b""
        await self.raw(
            f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        status, headers, raw = await self.answer()
        return status, headers, json.loads(raw) if raw else None

    def close(self) -> None:
        self.writer.close()


@asynccontextmanager
async def running(
    tmp_path: Path, faust_port: int = 1, ready: bool = True
) -> AsyncIterator[Running]:
    port = free_port()
    settings = Settings(data_dir=tmp_path, web_port=port, pseudonym_key=SecretStr("k" * 32))
    ours, theirs = socket.socketpair()
    server = QuotaServer(settings, faust_port)
    task = asyncio.ensure_future(server.run(theirs))
    loop = asyncio.get_running_loop()
    first = await loop.run_in_executor(None, read_frame, ours)
    assert first == ("listening",)
    answers: list[tuple[Any, ...]] = []
    reader_stop = False

    def read_answers() -> None:
        while not reader_stop:
            try:
                answers.append(read_frame(ours))
            except (EOFError, OSError):
                return

    reading = loop.run_in_executor(None, read_answers)
    r = Running(server, port, ours, answers)
    if ready:
        r.send("partitions", 4)
        r.send("definition", definition("tn-hard", 1000, 1))
        r.send("definition", definition("tn-soft", 10, 2, hard=False))
        r.send("assigned", [0, 1, 2, 3])
        r.send("install", [0, 1, 2, 3], [], [], set())
        r.send("started")
        await until(lambda: server.service.started)
    try:
        yield r
    finally:
        reader_stop = True
        ours.shutdown(socket.SHUT_RDWR)
        assert await asyncio.wait_for(task, 10) == 0
        ours.close()
        await reading


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition never met"
        await asyncio.sleep(0.01)


def test_the_four_calls_over_http(tmp_path: Path) -> None:
    async def run() -> None:
        async with running(tmp_path) as r:
            http = await Http.open(r.port)
            status, _, body = await http.call(
                "POST", "/v1/quotas/tn-hard/reservations", b'{"token_units": 600, "ttl_s": 30}'
            )
            assert status == 201 and body["granted"] == "600" and body["over_limit"] is False
            rid = body["reservation_id"]
            assert parse_reservation_id(rid).tenant_id == "tn-hard"
            status, _, body = await http.call(
                "POST", "/v1/quotas/tn-hard/reservations", b'{"token_units": "600"}'
            )
            assert (status, body["granted"], body["requested"]) == (201, "400", "600")
            second = body["reservation_id"]
            status, _, body = await http.call(
                "POST", "/v1/quotas/tn-hard/reservations", b'{"token_units": 1}'
            )
            assert (status, body["reservation_id"], body["granted"]) == (200, None, "0")
            status, _, body = await http.call(
                "POST", f"/v1/reservations/{rid}/commit", b'{"token_units": 500, "event_id": "e1"}'
            )
            assert status == 200
            assert (body["outcome"], body["committed"], body["released"]) == (
                "committed",
                "500",
                "100",
            )
            status, _, body = await http.call("DELETE", f"/v1/reservations/{second}")
            assert (status, body["outcome"], body["released"]) == (200, "released", "400")
            status, _, body = await http.call("GET", "/v1/quotas/tn-hard")
            assert status == 200
            assert (body["used"], body["reserved"], body["pending"], body["remaining"]) == (
                "0",
                "500",
                "500",
                "500",
            )
            # the worker reports the stored event: it settles the pending hold
            r.send(
                "apply",
                [_item("tn-hard", 500, "e1")],
                {},
            )
            await until(lambda: r.server.service.ledgers[_key("tn-hard")].pending == 0)
            status, _, body = await http.call("GET", "/v1/quotas/tn-hard")
            assert (body["used"], body["reserved"], body["remaining"]) == ("500", "0", "500")
            # the journal has every call, written before the answers
            lines = (tmp_path / "quota" / "reservations.jsonl").read_text().splitlines()
            assert [json.loads(line)["o"] for line in lines] == ["r", "r", "c", "d"]
            http.close()

    asyncio.run(run())


def _key(tenant: str) -> Any:
    from pipeline.metering.quota import QuotaKey

    return QuotaKey(tenant)


def _item(tenant: str, tu: int, event_id: str) -> Any:
    from pipeline.quota.service import RatedItem

    now = int(datetime.now(tz=UTC).timestamp() * 1000)
    part = murmur2_partition(tenant.encode(), 4)
    return RatedItem(tenant, "sub_" + "1" * 32, now, D(tu), D(0), event_id, part)


def test_errors_are_clear(tmp_path: Path) -> None:
    async def run() -> None:
        async with running(tmp_path) as r:
            http = await Http.open(r.port)
            cases = [
                ("GET", "/v1/quotas/nobody", None, 404, "no quota"),
                ("POST", "/v1/quotas/tn-hard/reservations", b"{", 400, "JSON"),
                ("POST", "/v1/quotas/tn-hard/reservations", b"[1]", 400, "JSON object"),
                ("POST", "/v1/quotas/tn-hard/reservations", b"{}", 400, "token_units"),
                ("POST", "/v1/quotas/tn-hard/reservations", b'{"token_units": -1}', 400, ">= 0"),
                ("POST", "/v1/quotas/tn-hard/reservations", b'{"token_units": 1.0000001}', 400,
                 "decimal"),
                ("POST", "/v1/quotas/tn-hard/reservations", b'{"token_units": 1, "ttl_s": 0}',
                 400, "ttl_s"),
                ("POST", "/v1/quotas/tn-hard/reservations", b'{"token_units": 1, "ttl_s": "x"}',
                 400, "ttl_s"),
                ("DELETE", "/v1/reservations/rsv_nope", None, 404, "not a reservation"),
                ("POST", "/v1/reservations/rsv_nope/commit", b'{"token_units": 1}', 404,
                 "not a reservation"),
                ("PUT", "/v1/quotas/tn-hard", None, 405, "GET"),
            ]  # fmt: skip
            for method, path, body, want, words in cases:
                status, headers, answer = await http.call(method, path, body)
                assert (status, path) == (want, path)
                assert words in answer["error"], (path, answer)
                assert headers["content-type"] == "application/json"
            # settled twice: 409 with how it ended; the same commit again: 200
            _, _, grant = await http.call(
                "POST", "/v1/quotas/tn-soft/reservations", b'{"token_units": 25}'
            )
            assert grant["over_limit"] is True  # soft: granted past the limit, flagged
            rid = grant["reservation_id"]
            commit = b'{"token_units": 5, "event_id": "x\\"y"}'
            status, _, first = await http.call("POST", f"/v1/reservations/{rid}/commit", commit)
            assert status == 200 and first["event_id"] == 'x"y'
            status, _, again = await http.call("POST", f"/v1/reservations/{rid}/commit", commit)
            assert (status, again) == (200, first)
            status, _, body = await http.call("DELETE", f"/v1/reservations/{rid}")
            assert status == 409 and body["reservation"]["outcome"] == "committed"
            http.close()

    asyncio.run(run())


def test_http_framing(tmp_path: Path) -> None:
    """Pipelined requests answer in order; a body may come in pieces, after a
    100-continue; chunked bodies, bad request lines and HTTP/1.0 close the connection."""

    async def run() -> None:
        async with running(tmp_path) as r:
            http = await Http.open(r.port)
            one = b"GET /v1/quotas/tn-hard HTTP/1.1\r\nHost: t\r\n\r\n"
            two = b"GET /v1/quotas/nobody HTTP/1.1\r\nHost: t\r\n\r\n"
            await http.raw(one + two + one)
            assert [(await http.answer())[0] for _ in range(3)] == [200, 404, 200]
            body = b'{"token_units": 7}'
            head = (
                b"POST /v1/quotas/tn-hard/reservations HTTP/1.1\r\nHost: t\r\n"
                b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
            )
            await http.raw(head)
            assert await http.reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            await http.raw(body[:5])
            await asyncio.sleep(0.05)
            await http.raw(body[5:])
            status, _, raw = await http.answer()
            assert status == 201 and json.loads(raw)["granted"] == "7"
            await http.raw(
                b"POST /v1/quotas/tn-hard/reservations HTTP/1.1\r\nHost: t\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            status, headers, _ = await http.answer()
            assert (status, headers["connection"]) == (411, "close")
            assert await http.reader.read() == b""  # closed
            http.close()
            for bad, want in ((b"NONSENSE\r\n\r\n", 400), (b"GET / SPDY/3\r\n\r\n", 505)):
                http = await Http.open(r.port)
                await http.raw(bad)
                assert (await http.answer())[0] == want
                http.close()
            http = await Http.open(r.port)
            await http.raw(b"GET /v1/quotas/tn-hard HTTP/1.0\r\n\r\n")
            status, headers, _ = await http.answer()
            assert (status, headers["connection"]) == (200, "close")
            http.close()

    asyncio.run(run())


def test_not_ready_until_the_worker_restored_the_partition(tmp_path: Path) -> None:
    async def run() -> None:
        async with running(tmp_path, ready=False) as r:
            http = await Http.open(r.port)
            status, headers, body = await http.call("GET", "/v1/quotas/tn-a")
            assert (status, headers["retry-after"]) == (503, "1") and "starting" in body["error"]
            r.send("partitions", 4)
            r.send("definition", definition("tn-a", 100, 1))
            r.send("started")
            await until(lambda: r.server.service.started)
            status, _, body = await http.call("GET", "/v1/quotas/tn-a")
            assert status == 503 and "not loaded" in body["error"]
            part = murmur2_partition(b"tn-a", 4)
            r.send("assigned", [part])
            r.send("install", [part], [], [("tn-a", "", part, _today(), D(30), D(0))], set())
            await until(lambda: r.server.service.owns("tn-a"))
            status, _, body = await http.call("GET", "/v1/quotas/tn-a")
            assert (status, body["used"], body["remaining"]) == (200, "30", "70")
            r.send("revoked", [part])
            await until(lambda: not r.server.service.owns("tn-a"))
            assert (await http.call("GET", "/v1/quotas/tn-a"))[0] == 503
            http.close()

    asyncio.run(run())


def _today() -> str:
    from pipeline.metering.plans import period_key

    return period_key(int(datetime.now(tz=UTC).timestamp() * 1000), "day")


def test_other_paths_go_to_the_worker_and_calls_to_the_owner(tmp_path: Path) -> None:
    seen: list[tuple[str, str, bytes, str | None]] = []

    async def page(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append(
            (request.method, request.path_qs, body, request.headers.get("X-Tokenmeter-Forwarded"))
        )
        if request.path.startswith("/v1/quotas/"):
            return web.json_response({"owner": "the-other-worker"}, status=201)
        return web.Response(text="tokenmeter_up 1\n", content_type="text/plain")

    async def run() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", page)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        other = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with running(tmp_path, faust_port=other) as r:
                http = await Http.open(r.port)
                await http.raw(b"GET /metrics?x=1 HTTP/1.1\r\nHost: t\r\n\r\n")
                status, headers, raw = await http.answer()
                assert (status, raw) == (200, b"tokenmeter_up 1\n")
                assert headers["content-type"].startswith("text/plain")
                assert seen[-1] == ("GET", "/metrics?x=1", b"", None)
                # a tenant of a partition another worker owns: forwarded there, body and all
                tenant = "tn-elsewhere"
                part = murmur2_partition(tenant.encode(), 4)
                r.send("revoked", [part])
                r.send("routes", {part: f"http://127.0.0.1:{other}"})
                await until(lambda: part in r.server.routes)
                status, headers, body = await http.call(
                    "POST", f"/v1/quotas/{tenant}/reservations", b'{"token_units": 3}'
                )
                assert (status, body) == (201, {"owner": "the-other-worker"})
                assert headers["x-tokenmeter-owner"] == f"http://127.0.0.1:{other}"
                assert seen[-1] == (
                    "POST",
                    f"/v1/quotas/{tenant}/reservations",
                    b'{"token_units": 3}',
                    "1",
                )
                # a forwarded request is answered here, never forwarded again
                await http.raw(
                    f"GET /v1/quotas/{tenant} HTTP/1.1\r\nHost: t\r\n"
                    "X-Tokenmeter-Forwarded: 1\r\n\r\n".encode()
                )
                assert (await http.answer())[0] == 404  # no quota defined for it here
                http.close()
        finally:
            await runner.cleanup()
        # the worker's pages unreachable: a clear 503, not a hang
        async with running(tmp_path, faust_port=free_port()) as r:
            http = await Http.open(r.port)
            status, headers, body = await http.call("GET", "/v1/health")
            assert status == 503 and headers["retry-after"] == "1" and "retry" in body["error"]
            http.close()

    asyncio.run(run())


def test_the_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    async def run() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            settings = Settings(data_dir=tmp_path, web_port=port, pseudonym_key=SecretStr("k" * 32))
            ours, theirs = socket.socketpair()
            code = await QuotaServer(settings, 1).run(theirs)
            assert code == 1
            kind, message = read_frame(ours)
            assert kind == "error" and message.startswith("TOKENMETER_WEB_PORT: cannot listen")
            assert str(port) in message
            ours.close()

    asyncio.run(run())


def test_reservation_metrics_reach_the_worker_registry(tmp_path: Path) -> None:
    async def run() -> None:
        async with running(tmp_path) as r:
            http = await Http.open(r.port)
            for body in (b'{"token_units": 600}', b'{"token_units": 600}', b'{"token_units": 1}',
                         b'{"token_units": -1}'):  # fmt: skip
                await http.call("POST", "/v1/quotas/tn-hard/reservations", body)
            await http.call("GET", "/v1/quotas/tn-hard")
            await until(lambda: any(a[0] == "stats" and a[1] for a in r.answers))
            http.close()
        metrics = WorkerMetrics()
        for message in r.answers:
            if message[0] == "stats":
                metrics.observe_quota_server(message[1], message[2])
        text = metrics.render()[0].decode()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        outcomes = {
            o: samples[("tokenmeter_quota_reservations_total", (("outcome", o),))]
            for o in ("granted", "partial", "denied", "error")
        }
        assert outcomes == {"granted": 1, "partial": 1, "denied": 1, "error": 1}
        name = "tokenmeter_quota_request_duration_seconds"
        assert samples[(f"{name}_count", (("call", "reserve"),))] == 4
        assert samples[(f"{name}_count", (("call", "status"),))] == 1
        assert samples[(f"{name}_count", (("call", "commit"),))] == 0
        inf = samples[(f"{name}_bucket", (("call", "reserve"), ("le", "+Inf")))]
        assert inf == 4 and samples[(f"{name}_sum", (("call", "reserve"),))] > 0
        les = {labels[1][1] for (n, labels) in samples if n == f"{name}_bucket"}
        assert les == {repr(b) for b in QUOTA_DURATION_BUCKETS} | {"+Inf"}

    asyncio.run(run())


def test_answer_bodies_are_the_json_of_the_dicts() -> None:
    rid = reservation_id(_key("tn-ü"))
    grants = [
        Grant(rid, to_tu(1000), to_tu("999.5"), 1_764_295_230_123, False),
        Grant(None, to_tu(3), to_tu(0), 1_764_295_230_009, True),
    ]
    for g in grants:
        assert grant_body(g) == json.dumps(grant_json(g), separators=(",", ":")).encode()
    settlements = [
        Settlement(rid, "committed", to_tu(10), to_tu("2.5"), to_tu("7.5"), False, 'a"b\\ü', 1),
        Settlement(rid, "released", to_tu(10), to_tu(0), to_tu(10)),
        Settlement(rid, "committed", to_tu(1), to_tu(3), to_tu(0), True, None, 5),
    ]
    for s in settlements:
        assert settlement_body(s) == json.dumps(settlement_json(s), separators=(",", ":")).encode()
    for ms in (0, 1_764_295_230_123, 1_764_295_230_999, 1_764_295_231_000, 1_700_000_000_001):
        expected = datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")
        assert iso_ms(ms) == expected
    # the memos give what the plain code gives
    assert fmt(to_tu(1000)) == "1000" and to_tu(1000) == D(1000)
    assert str(to_tu(7)) == str(D(7).quantize(D("0.000001")))
    assert fmt(to_tu("-0")) == "-0" and fmt(to_tu(0)) == "0"
    assert parse_reservation_id(rid) == _key("tn-ü") == parse_reservation_id(rid)


class Recorder:
    """A Replica that keeps what the worker's service sends."""

    def __init__(self, follower: QuotaService) -> None:
        self.follower = follower
        self.sent: list[tuple[Any, ...]] = []

    def send(self, message: tuple[Any, ...]) -> None:
        self.sent.append(message)
        self.follower.on_replica_message(message)

    async def pending_ids(self) -> list[str]:
        ids: list[str] = self.follower.on_replica_message(("pending_ids",))
        assert ids == self.follower._pending_ids()
        return ids


def _no_warehouse() -> Warehouse:
    raise AssertionError("the follower never reads the warehouse")


def test_the_follower_mirrors_the_workers_usage(
    clean_warehouse: Warehouse, warehouse_settings: Settings, tmp_path: Path
) -> None:
    """The worker's side (usage, no holds) drives the follower (holds, journal) through
    the Replica messages: same usage, pending commits settled by stored events, holds in
    the follower only, and a restore asks the follower for its pending event ids."""
    wh, clock = clean_warehouse, Clock()

    async def inline(fn: Callable[..., Any], *args: Any) -> Any:
        result = fn(*args)
        await asyncio.sleep(0)  # what fn posted to the loop runs first, as in the worker
        return result

    async def run() -> None:
        key = b"unit-test-pseudonym-key-0123456789"
        follower = QuotaService(
            warehouse_settings, inline, _no_warehouse, pseudonym_key=key, clock=clock,
            journal_path=tmp_path / "j.jsonl", kafka=False, follower=True,
        )  # fmt: skip
        follower.start_follower()
        replica = Recorder(follower)
        worker = QuotaService(
            warehouse_settings, inline, lambda: wh, pseudonym_key=key, clock=clock,
            webhooks_path=tmp_path / "none.yaml", kafka=False, replica=replica, partitions=4,
        )  # fmt: skip
        assert worker.journal is None and follower.webhooks == []
        worker.apply_definition(definition("tn-m", 1000, 1))
        await worker.start()
        await worker.on_partitions_assigned([0, 1, 2, 3], wait=True)
        assert follower.started and follower.owns("tn-m") and follower.partitions == 4
        grant = follower.reserve("tn-m", D(400), 30)
        assert grant.reservation_id is not None
        follower.commit(grant.reservation_id, D(300), "e-1")
        other = follower.reserve("tn-m", D(100), 30)
        assert other.reservation_id is not None
        follower.commit(other.reservation_id, D(100), "e-2")
        first = rated("tn-m", 300, "e-1")
        write_rated(wh, [first])
        worker.on_rated_batch([first])
        await asyncio.sleep(0.01)  # the batch is applied in the loop
        assert follower.get("tn-m").used.tu == worker.get("tn-m").used.tu == 300
        assert follower.get("tn-m").pending == 100  # e-1 settled, e-2 still held
        assert worker.ledgers[_key("tn-m")].holds == {}
        # e-2 is stored while this worker does not own the partition; the restore after
        # the rebalance counts it and drops its hold in the follower
        worker.on_partitions_revoked([0, 1, 2, 3])
        write_rated(wh, [rated("tn-m", 100, "e-2")])
        await worker.on_partitions_assigned([0, 1, 2, 3], wait=True)
        status = follower.get("tn-m")
        assert (status.used.tu, status.pending, status.reserved) == (400, 0, 0)
        assert worker.get("tn-m").used.tu == 400
        assert [m[0] for m in replica.sent] == [
            "definition", "partitions", "install", "started", "assigned", "install",
            "apply", "revoked", "assigned", "install",
        ]  # fmt: skip
        await worker.stop()
        await follower.stop()

    asyncio.run(run())


def test_a_bad_pipeline_nice_names_its_setting() -> None:
    from pipeline.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="TOKENMETER_PIPELINE_NICE"):
        load_settings(pipeline_nice=30)
    assert load_settings(pipeline_nice=0).pipeline_nice == 0


def test_a_bad_quota_server_nice_names_its_setting() -> None:
    from pipeline.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="TOKENMETER_QUOTA_SERVER_NICE"):
        load_settings(quota_server_nice=-21)
    assert load_settings(quota_server_nice=-5).quota_server_nice == -5
