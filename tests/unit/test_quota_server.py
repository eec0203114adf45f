"""The quota server (quotad/, the Go program the worker spawns), black box: spawned as
the worker spawns it and fed over a real socket pair the way the worker feeds it
(pipeline/quota/link.py), then asked over HTTP/1.1 on its port. The four calls, their
errors, HTTP framing, routing to the owning worker and forwarding of the worker's own
pages, the metrics it reports, the journal across a SIGKILL, and the worker -> server
mirror of the usage state."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from pipeline.metering.plans import period_key
from pipeline.metering.quota import QuotaDefinition, QuotaKey
from pipeline.metrics import QUOTA_DURATION_BUCKETS, WorkerMetrics
from pipeline.quota.definitions import DefinitionChange
from pipeline.quota.link import QuotaServerProcess, frame, read_frame, spawn_quota_server
from pipeline.quota.service import QuotaService, RatedItem, murmur2_partition, parse_reservation_id
from pipeline.settings import Settings
from pipeline.warehouse import Warehouse
from tests.integration.harness import free_port
from tests.unit.test_quota_service import rated
from tests.unit.warehouse_fill import write_rated

D = Decimal
SUB = "sub_" + "1" * 32


def definition(
    tenant: str, limit: int, offset: int, hard: bool = True, sub: str | None = None
) -> DefinitionChange:
    d = QuotaDefinition(
        tenant_id=tenant, subscriber_id=sub, period="day", limit_tu=D(limit), hard=hard
    )
    return DefinitionChange(d.topic_key, d, 0, offset, 0)


def now_ms() -> int:
    return int(datetime.now(tz=UTC).timestamp() * 1000)


class Server:
    """The quota server process, and the worker's end of its link (this test)."""

    def __init__(self, tmp_path: Path, port: int, faust_port: int, **settings: Any) -> None:
        self.settings = Settings(
            data_dir=tmp_path, web_port=port, pseudonym_key=SecretStr("k" * 32), **settings
        )
        self.port = port
        self.proc, self.sock = spawn_quota_server(self.settings, faust_port)
        self.frames: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.stats: list[tuple[Any, ...]] = []
        self._asks = itertools.count(1)
        self.first = read_frame(self.sock)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                message = read_frame(self.sock)
            except (EOFError, OSError):
                return
            if message[0] == "stats":
                self.stats.append(message)
            else:
                self.frames.put(message)

    def send(self, *message: Any) -> None:
        self.sock.sendall(frame(tuple(message)))

    def sync(self) -> list[str]:
        """Ask for the pending event ids: the answer comes after every message sent
        before it was applied."""
        ask = next(self._asks)
        self.send("ask", ask, ("pending_ids",))
        answer = self.frames.get(timeout=10)
        assert answer[:2] == ("answer", ask)
        return list(answer[2])

    def ready(self) -> None:
        """What the worker sends once it owns every partition, for two tenants."""
        self.send("partitions", 4)
        self.send("definition", definition("tn-hard", 1000, 1))
        self.send("definition", definition("tn-soft", 10, 2, hard=False))
        self.send("assigned", [0, 1, 2, 3])
        self.send("install", [0, 1, 2, 3], [], [], set())
        self.send("started")
        self.sync()

    def stop(self) -> int:
        self.sock.shutdown(socket.SHUT_RDWR)
        code = self.proc.wait(10)
        self.sock.close()
        return code


@contextmanager
def running(
    tmp_path: Path, faust_port: int = 1, ready: bool = True, **settings: Any
) -> Iterator[Server]:
    server = Server(tmp_path, free_port(), faust_port, **settings)
    try:
        assert server.first == ("listening",)
        if ready:
            server.ready()
        yield server
    finally:
        if server.proc.poll() is None:
            assert server.stop() == 0


class Http:
    """A raw keep-alive HTTP/1.1 client, to see exactly what goes over the wire."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.reader = self.sock.makefile("rb")

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def head(self) -> bytes:
        lines = []
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            lines.append(line)
        return b"".join(lines)

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        lines = self.head().decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.lower()] = value.strip()
        body = self.reader.read(int(headers.get("content-length", "0")))
        return status, headers, body

    def call(
        self, method: str, path: str, body: bytes | None = None, extra: str = ""
    ) -> tuple[int, dict[str, str], Any]:
        data = body or b""
        self.raw(
            f"{method} {path} HTTP/1.1\r\nHost: t\r\n{extra}Content-Length: {len(data)}\r\n\r\n"
            .encode() + data
        )  # fmt: skip
        status, headers, raw = self.answer()
        return status, headers, json.loads(raw) if raw else None

    def closed(self) -> bool:
        return self.reader.read() == b""

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def _item(tenant: str, tu: int, event_id: str) -> RatedItem:
    part = murmur2_partition(tenant.encode(), 4)
    return RatedItem(tenant, SUB, now_ms(), D(tu), D(0), event_id, part)


def test_the_four_calls_over_http(tmp_path: Path) -> None:
    with running(tmp_path) as r:
        http = Http(r.port)
        status, headers, body = http.call(
            "POST", "/v1/quotas/tn-hard/reservations", b'{"token_units": 600, "ttl_s": 30}'
        )
        assert status == 201 and body["granted"] == "600" and body["over_limit"] is False
        assert headers["content-type"] == "application/json"
        rid = body["reservation_id"]
        assert parse_reservation_id(rid).tenant_id == "tn-hard"
        expires = datetime.fromisoformat(body["expires_at"]).timestamp() * 1000
        assert abs(expires - (now_ms() + 30_000)) < 2_000
        status, _, body = http.call(
            "POST", "/v1/quotas/tn-hard/reservations", b'{"token_units": "600"}'
        )
        assert (status, body["granted"], body["requested"]) == (201, "400", "600")
        second = body["reservation_id"]
        status, _, body = http.call(
            "POST", "/v1/quotas/tn-hard/reservations", b'{"token_units": 1}'
        )
        assert (status, body["reservation_id"], body["granted"]) == (200, None, "0")
        status, _, body = http.call(
            "POST", f"/v1/reservations/{rid}/commit", b'{"token_units": 500, "event_id": "e1"}'
        )
        assert status == 200
        assert (body["outcome"], body["committed"], body["released"], body["event_id"]) == (
            "committed",
            "500",
            "100",
            "e1",
        )
        status, _, body = http.call("DELETE", f"/v1/reservations/{second}")
        assert (status, body["outcome"], body["released"]) == (200, "released", "400")
        status, _, body = http.call("GET", "/v1/quotas/tn-hard")
        assert status == 200
        assert (body["used"], body["reserved"], body["pending"], body["remaining"]) == (
            "0",
            "500",
            "500",
            "500",
        )
        assert (body["state"], body["thresholds"], body["crossed"]) == (
            "ok",
            ["50", "80", "100"],
            [],
        )
        assert r.sync() == ["e1"]  # the pending commit's event id, for the worker's restore
        # the worker reports the stored event: it settles the pending hold
        r.send("apply", [_item("tn-hard", 500, "e1")], {})
        assert r.sync() == []
        status, _, body = http.call("GET", "/v1/quotas/tn-hard")
        assert (body["used"], body["reserved"], body["remaining"]) == ("500", "0", "500")
        assert (body["state"], body["crossed"]) == ("warning", ["50"])
        # the journal has every call, written before the answers
        lines = (tmp_path / "quota" / "reservations.jsonl").read_text().splitlines()
        assert [json.loads(line)["o"] for line in lines] == ["r", "r", "c", "d"]
        http.close()


def test_errors_are_clear(tmp_path: Path) -> None:
    with running(tmp_path) as r:
        http = Http(r.port)
        cases = [
            ("GET", "/v1/quotas/nobody", None, 404, "no quota defined for tenant nobody"),
            ("POST", "/v1/quotas/tn-hard/reservations", b"{", 400, "body must be JSON"),
            ("POST", "/v1/quotas/tn-hard/reservations", b"[1]", 400, "JSON object"),
            ("POST", "/v1/quotas/tn-hard/reservations", b"null", 400, "JSON object"),
            ("POST", "/v1/quotas/tn-hard/reservations", b"{}", 400, "token_units: required"),
            ("POST", "/v1/quotas/tn-hard/reservations", b'{"token_units": -1}', 400, ">= 0"),
            ("POST", "/v1/quotas/tn-hard/reservations", b'{"token_units": true}', 400,
             "must be a number"),
            ("POST", "/v1/quotas/tn-hard/reservations", b'{"token_units": "NaN"}', 400,
             "finite"),
            ("POST", "/v1/quotas/tn-hard/reservations", b'{"token_units": "abc"}', 400,
             "must be a number, got 'abc'"),
            ("POST", "/v1/quotas/tn-hard/reservations", b'{"token_units": 2e18}', 400,
             "<= 1e18"),
            ("POST", "/v1/quotas/tn-hard/reservations", b'{"token_units": 1.0000001}', 400,
             "at most 6 decimal places"),
            ("POST", "/v1/quotas/tn-hard/reservations", b'{"token_units": 1, "ttl_s": 0}',
             400, "ttl_s: must be in (0, 3600]"),
            ("POST", "/v1/quotas/tn-hard/reservations", b'{"token_units": 1, "ttl_s": "x"}',
             400, "ttl_s: must be a number"),
            ("POST", "/v1/quotas/tn-hard/reservations",
             b'{"token_units": 1, "subscriber_id": ""}', 400, "subscriber_id"),
            ("DELETE", "/v1/reservations/rsv_nope", None, 404, "not a reservation id"),
            ("POST", "/v1/reservations/rsv_nope/commit", b'{"token_units": 1}', 404,
             "not a reservation id"),
            ("PUT", "/v1/quotas/tn-hard", None, 405, "use GET"),
        ]  # fmt: skip
        for method, path, body, want, words in cases:
            status, headers, answer = http.call(method, path, body)
            assert (status, path, body) == (want, path, body)
            assert words in answer["error"], (path, body, answer)
            assert headers["content-type"] == "application/json"
        assert http.call("PUT", "/v1/quotas/tn-hard")[1]["allow"] == "GET"
        # settled twice: 409 with how it ended; the same commit again: 200
        _, _, grant = http.call("POST", "/v1/quotas/tn-soft/reservations", b'{"token_units": 25}')
        assert grant["over_limit"] is True  # soft: granted past the limit, flagged
        rid = grant["reservation_id"]
        commit = b'{"token_units": 5, "event_id": "x\\"y"}'
        status, _, first = http.call("POST", f"/v1/reservations/{rid}/commit", commit)
        assert status == 200 and first["event_id"] == 'x"y'
        status, _, again = http.call("POST", f"/v1/reservations/{rid}/commit", commit)
        assert (status, again) == (200, first)
        status, _, body = http.call("POST", f"/v1/reservations/{rid}/commit", b'{"token_units": 6}')
        assert status == 409 and body["error"].endswith("is already committed (5 TU)")
        status, _, body = http.call("DELETE", f"/v1/reservations/{rid}")
        assert status == 409 and body["reservation"]["outcome"] == "committed"
        http.close()


def test_http_framing(tmp_path: Path) -> None:
    """Pipelined requests answer in order; a body may come in pieces, after a
    100-continue; chunked bodies, oversized bodies and bad request lines are refused;
    HTTP/1.0 closes the connection."""
    with running(tmp_path) as r:
        http = Http(r.port)
        one = b"GET /v1/quotas/tn-hard HTTP/1.1\r\nHost: t\r\n\r\n"
        two = b"GET /v1/quotas/nobody HTTP/1.1\r\nHost: t\r\n\r\n"
        http.raw(one + two + one)
        assert [http.answer()[0] for _ in range(3)] == [200, 404, 200]
        body = b'{"token_units": 7}'
        http.raw(
            b"POST /v1/quotas/tn-hard/reservations HTTP/1.1\r\nHost: t\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        assert http.head() == b"HTTP/1.1 100 Continue\r\n"
        http.raw(body[:5])
        time.sleep(0.05)
        http.raw(body[5:])
        status, _, raw = http.answer()
        assert status == 201 and json.loads(raw)["granted"] == "7"
        http.raw(
            b"POST /v1/quotas/tn-hard/reservations HTTP/1.1\r\nHost: t\r\n"
            b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n0\r\n\r\n'
        )
        status, headers, _ = http.answer()
        assert (status, headers["connection"]) == (411, "close")
        assert http.closed()
        http.close()
        http = Http(r.port)
        # refused on its head: the server answers before the body and closes
        http.raw(
            b"POST /v1/quotas/tn-hard/reservations HTTP/1.1\r\nHost: t\r\n"
            b"Content-Length: %d\r\n\r\n" % (1024 * 1024 + 1)
        )
        status, headers, raw = http.answer()
        assert status == 413 and "larger than 1048576 bytes" in json.loads(raw)["error"]
        assert headers["connection"] == "close" and http.closed()
        http.close()
        huge = b"GET /v1/quotas/tn-hard HTTP/1.1\r\nX-Big: " + b"y" * 17_000 + b"\r\n\r\n"
        for bad, want in ((b"NONSENSE\r\n\r\n", 400), (b"GET / SPDY/3\r\n\r\n", 505),
                          (huge, 431)):  # fmt: skip
            http = Http(r.port)
            http.raw(bad)
            assert http.answer()[0] == want
            assert http.closed()
            http.close()
        http = Http(r.port)
        http.raw(b"GET /v1/quotas/tn-hard HTTP/1.0\r\n\r\n")
        assert http.answer()[0] == 200
        assert http.closed()
        http.close()


def test_not_ready_until_the_worker_restored_the_partition(tmp_path: Path) -> None:
    with running(tmp_path, ready=False) as r:
        http = Http(r.port)
        status, headers, body = http.call("GET", "/v1/quotas/tn-a")
        assert (status, headers["retry-after"]) == (503, "1") and "starting" in body["error"]
        r.send("partitions", 4)
        r.send("definition", definition("tn-a", 100, 1))
        r.send("started")
        r.sync()
        status, _, body = http.call("GET", "/v1/quotas/tn-a")
        assert status == 503 and "not loaded on this worker yet" in body["error"]
        part = murmur2_partition(b"tn-a", 4)
        r.send("assigned", [part])
        today = period_key(now_ms(), "day")
        r.send("install", [part], [], [("tn-a", "", part, today, D(30), D(0))], set())
        r.sync()
        status, _, body = http.call("GET", "/v1/quotas/tn-a")
        assert (status, body["used"], body["remaining"]) == (200, "30", "70")
        r.send("revoked", [part])
        r.sync()
        assert http.call("GET", "/v1/quotas/tn-a")[0] == 503
        # a subscriber quota answers once the worker has loaded that subscriber's usage
        r.send("assigned", [part])
        r.send("install", [part], [], [], set())
        r.send("definition", definition("tn-a", 50, 2, sub=SUB))
        r.sync()
        status, _, body = http.call("GET", f"/v1/quotas/tn-a?subscriber_id={SUB}")
        assert status == 503 and "being loaded" in body["error"]
        r.send(
            "install", [], [QuotaKey("tn-a", SUB)], [("tn-a", SUB, part, today, D(20), D(0))], set()
        )
        r.sync()
        status, _, body = http.call("GET", f"/v1/quotas/tn-a?subscriber_id={SUB}")
        assert (status, body["subscriber_id"], body["used"], body["remaining"]) == (
            200,
            SUB,
            "20",
            "30",
        )
        # a subscriber's reservation holds on the tenant's quota too
        status, _, grant = http.call(
            "POST",
            "/v1/quotas/tn-a/reservations",
            json.dumps({"token_units": 40, "subscriber_id": SUB}).encode(),
        )
        assert (status, grant["granted"]) == (201, "30")
        assert parse_reservation_id(grant["reservation_id"]).subscriber_id == SUB
        assert http.call("GET", "/v1/quotas/tn-a")[2]["reserved"] == "30"
        http.close()


class _Pages(BaseHTTPRequestHandler):
    """Stands in for the worker's own pages, and for another worker."""

    seen: list[tuple[str, str, bytes, str | None]] = []

    def _any(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append(
            (self.command, self.path, body, self.headers.get("X-Tokenmeter-Forwarded"))
        )
        if self.path.startswith("/v1/quotas/"):
            data, status, ctype = b'{"owner": "the-other-worker"}', 201, "application/json"
        else:
            data, status, ctype = b"tokenmeter_up 1\n", 200, "text/plain; version=0.0.4"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _any

    def log_message(self, *_args: Any) -> None:
        pass


def test_other_paths_go_to_the_worker_and_calls_to_the_owner(tmp_path: Path) -> None:
    pages = ThreadingHTTPServer(("127.0.0.1", 0), _Pages)
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    other = pages.server_address[1]
    seen = _Pages.seen
    try:
        with running(tmp_path, faust_port=other) as r:
            http = Http(r.port)
            http.raw(b"GET /metrics?x=1 HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, raw = http.answer()
            assert (status, raw) == (200, b"tokenmeter_up 1\n")
            assert headers["content-type"].startswith("text/plain")
            assert seen[-1] == ("GET", "/metrics?x=1", b"", None)
            # a tenant of a partition another worker owns: forwarded there, body and all
            tenant = "tn-elsewhere"
            part = murmur2_partition(tenant.encode(), 4)
            r.send("revoked", [part])
            r.send("routes", {part: f"http://127.0.0.1:{other}"})
            r.sync()
            status, headers, body = http.call(
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
            status, _, _ = http.call(
                "GET", f"/v1/quotas/{tenant}", extra="X-Tokenmeter-Forwarded: 1\r\n"
            )
            assert status == 404  # no quota defined for it here
            http.close()
    finally:
        pages.shutdown()
        pages.server_close()
    # the worker's pages unreachable: a clear 503, not a hang
    with running(tmp_path, faust_port=free_port()) as r:
        http = Http(r.port)
        status, headers, body = http.call("GET", "/v1/health")
        assert status == 503 and headers["retry-after"] == "1"
        assert "the worker's pages cannot be reached yet" in body["error"]
        http.close()


def test_two_content_lengths_are_refused(tmp_path: Path) -> None:
    """Two different lengths could let a body carry a second, smuggled request."""
    with running(tmp_path) as r:
        http = Http(r.port)
        smuggled = b"GET /v1/quotas/tn-hard HTTP/1.1\r\nHost: t\r\n\r\n"
        http.raw(
            b"POST /v1/quotas/tn-hard/reservations HTTP/1.1\r\nHost: t\r\n"
            b"Content-Length: %d\r\nContent-Length: 0\r\n\r\n" % len(smuggled) + smuggled
        )
        status, headers, raw = http.answer()
        assert (status, headers["connection"]) == (400, "close")
        assert json.loads(raw)["error"] == "more than one Content-Length"
        assert http.closed()
        http.close()


class _Elsewhere(_Pages):
    """Another host the quota server must never reach for a client."""

    seen: list[tuple[str, str, bytes, str | None]] = []
    do_PUT = do_DELETE = _Pages._any


def test_only_paths_reach_the_workers_pages(tmp_path: Path) -> None:
    """Issue 14, 1: appended to the pages' address, "@host:port/..." named another host,
    any method and body. Only origin-form targets ("/...") are taken (400 for the rest),
    and a path goes to the worker's pages whatever it looks like."""
    pages = ThreadingHTTPServer(("127.0.0.1", 0), _Pages)
    elsewhere = ThreadingHTTPServer(("127.0.0.1", 0), _Elsewhere)
    for server in (pages, elsewhere):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    other = f"127.0.0.1:{elsewhere.server_address[1]}"
    try:
        with running(tmp_path, faust_port=pages.server_address[1]) as r:
            for target in (f"@{other}/admin/delete", f"http://{other}/admin/delete", other,
                           "*", f"/\x01@{other}/admin/delete"):  # fmt: skip
                http = Http(r.port)
                http.raw(
                    f"PUT {target} HTTP/1.1\r\nContent-Length: 11\r\n"
                    "Content-Type: application/json\r\nConnection: close\r\n\r\n"
                    '{"evil":1}\n'.encode()
                )
                status, _, raw = http.answer()
                assert status == 400, target
                assert "origin-form" in json.loads(raw)["error"]
                http.close()
            http = Http(r.port)
            path = f"//{other}/admin/delete?to=@{other}"
            http.raw(f"POST {path} HTTP/1.1\r\nContent-Length: 2\r\n\r\n{{}}".encode())
            assert http.answer()[0] == 200
            # (Python's handler shows a leading "//" as "/")
            assert _Pages.seen[-1] == ("POST", path[1:], b"{}", None)
            http.close()
    finally:
        for server in (pages, elsewhere):
            server.shutdown()
            server.server_close()
    assert _Elsewhere.seen == []


def test_a_huge_number_is_refused_and_stalls_no_one(tmp_path: Path) -> None:
    """Issue 14, 2: expanding 1e30000000 held the lock of every call for seconds
    (1e999999999: minutes and GBs). Amounts are bounded as text, before any arithmetic
    and outside the lock: 400 naming the field, and a call sent meanwhile goes through."""
    bodies = {
        b'{"token_units": 1e999999999}': "token_units: the exponent must be within -30..30",
        b'{"token_units": 1e30000000, "ttl_s": 5}': "token_units: the exponent must be within",
        b'{"token_units": "1e-10000000"}': "token_units: the exponent must be within",
        b'{"token_units": 1' + b"0" * 500_000 + b"}": "token_units: too long a number",
    }
    with running(tmp_path) as r:
        answers: dict[bytes, tuple[int, Any]] = {}

        def send(body: bytes) -> None:
            http = Http(r.port)
            status, _, answer = http.call("POST", "/v1/quotas/tn-hard/reservations", body)
            answers[body] = (status, answer)
            http.close()

        attackers = [threading.Thread(target=send, args=(body,)) for body in bodies]
        for thread in attackers:
            thread.start()
        http = Http(r.port)
        time.sleep(0.3)  # the numbers are in the server by now (expanding, unbounded)
        started = time.monotonic()
        status, _, grant = http.call(
            "POST", "/v1/quotas/tn-hard/reservations", b'{"token_units": 5}'
        )
        took = time.monotonic() - started
        assert (status, grant["granted"]) == (201, "5")
        # a correctness bound (no stall of seconds), not a performance target
        assert took < 1.0, took
        for thread in attackers:
            thread.join(10)
        for body, words in bodies.items():
            status, answer = answers[body]
            assert status == 400 and words in answer["error"], (body[:40], answer)
        # the bounds refuse nothing a valid amount can be
        for amount, want in (("1e19", 400), ("0.000001e6", 201), ("1.0000000", 201)):
            body = json.dumps({"token_units": amount}).encode()
            status, _, answer = http.call("POST", "/v1/quotas/tn-soft/reservations", body)
            assert status == want, (amount, answer)
        http.close()


def _read_all(sock: socket.socket) -> bytes:
    """What a client gets until the server closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_slow_clients_are_cut_and_normal_calls_stay_fast(tmp_path: Path) -> None:
    """Issue 14, 7: slow heads and bodies are answered 408 and closed after their
    timeout, an idle kept-alive connection is closed, connections past the cap get 503
    at once; meanwhile an ordinary client's calls go through as usual."""
    limit = 3.0
    with running(
        tmp_path,
        quota_server_header_timeout_s=limit,
        quota_server_body_timeout_s=limit,
        quota_server_idle_timeout_s=limit,
        quota_server_max_connections=40,
    ) as r:
        started = time.monotonic()
        slow: list[tuple[socket.socket, bytes]] = []
        for n in range(35):
            sock = socket.create_connection(("127.0.0.1", r.port), timeout=limit + 10)
            if n < 30:  # a head that never ends
                sock.sendall(b"POST /v1/quotas/tn-hard/reservations HTTP/1.1\r\nHost: t\r\n")
                slow.append((sock, b"request head not received within 3s"))
            else:  # a body of 1 MiB that never comes
                sock.sendall(
                    b"POST /v1/quotas/tn-hard/reservations HTTP/1.1\r\nHost: t\r\n"
                    b'Content-Length: 1048576\r\n\r\n{"token_units": '
                )
                slow.append((sock, b"request body not received within 3s"))
        http = Http(r.port)
        times = []
        for _ in range(20):
            before = time.monotonic()
            status, _, grant = http.call(
                "POST", "/v1/quotas/tn-soft/reservations", b'{"token_units": 1}'
            )
            times.append(time.monotonic() - before)
            assert status == 201
        # not held up behind the slow clients (they are held until the limit, 3 s)
        assert max(times) < limit - 1.0, times
        # 36 open; 4 more fill the cap, the next is turned away at once
        fillers = [socket.create_connection(("127.0.0.1", r.port)) for _ in range(4)]
        over = Http(r.port)
        status, headers, body = over.call("GET", "/v1/quotas/tn-hard")
        assert (status, headers["retry-after"]) == (503, "1")
        assert "too many connections" in body["error"]
        assert over.closed() and time.monotonic() - started < limit
        over.close()
        for sock, words in slow:
            answer = _read_all(sock)
            assert answer.startswith(b"HTTP/1.1 408 ") and words in answer, answer[:200]
            sock.close()
        # cut at the limit, not long after (the bound allows for a loaded machine)
        assert limit - 0.5 < time.monotonic() - started < limit + 3
        for sock in fillers:  # connected, and never a byte: cut too
            assert _read_all(sock).startswith(b"HTTP/1.1 408 ")
            sock.close()
        # the ordinary client, idle past the limit, is closed without a word
        assert http.closed()
        http.close()
        http = Http(r.port)
        assert http.call("GET", "/v1/quotas/tn-hard")[0] == 200
        http.close()


def test_client_limits_name_their_settings() -> None:
    from pipeline.settings import SettingsError, load_settings

    for name in ("header_timeout_s", "body_timeout_s", "idle_timeout_s", "max_connections"):
        with pytest.raises(SettingsError, match=f"TOKENMETER_QUOTA_SERVER_{name.upper()}"):
            load_settings(**{f"quota_server_{name}": 0})
    s = load_settings()
    assert (
        s.quota_server_header_timeout_s,
        s.quota_server_body_timeout_s,
        s.quota_server_idle_timeout_s,
        s.quota_server_max_connections,
    ) == (10.0, 30.0, 60.0, 1024)


def test_the_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = Server(tmp_path, port, 1)
        kind, message = server.first
        assert kind == "error" and message.startswith("TOKENMETER_WEB_PORT: cannot listen")
        assert str(port) in message
        assert server.proc.wait(10) == 1


def test_reservation_metrics_reach_the_worker_registry(tmp_path: Path) -> None:
    with running(tmp_path) as r:
        http = Http(r.port)
        for body in (b'{"token_units": 600}', b'{"token_units": 600}', b'{"token_units": 1}',
                     b'{"token_units": -1}'):  # fmt: skip
            http.call("POST", "/v1/quotas/tn-hard/reservations", body)
        http.call("GET", "/v1/quotas/tn-hard")
        deadline = time.monotonic() + 5
        while not any(m[1] for m in r.stats) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.6)  # one more report: every call is in one of them
        http.close()
    metrics = WorkerMetrics()
    for message in r.stats:
        metrics.observe_quota_server(message[1], message[2])
    assert r.stats[-1][3] == 2  # open reservations
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


def test_open_reservations_survive_a_sigkill(tmp_path: Path) -> None:
    """The journal: a killed server's successor holds what it granted, and a commit of
    a reservation made before the kill settles it."""
    with running(tmp_path) as r:
        http = Http(r.port)
        _, _, kept = http.call("POST", "/v1/quotas/tn-hard/reservations", b'{"token_units": 300}')
        _, _, done = http.call("POST", "/v1/quotas/tn-hard/reservations", b'{"token_units": 200}')
        http.call(
            "POST",
            f"/v1/reservations/{done['reservation_id']}/commit",
            b'{"token_units": 150, "event_id": "e-before"}',
        )
        _, _, gone = http.call("POST", "/v1/quotas/tn-hard/reservations", b'{"token_units": 100}')
        http.call("DELETE", f"/v1/reservations/{gone['reservation_id']}")
        http.close()
        r.proc.send_signal(signal.SIGKILL)
        r.proc.wait(10)
    with running(tmp_path) as r:
        assert r.sync() == ["e-before"]
        http = Http(r.port)
        status, _, body = http.call("GET", "/v1/quotas/tn-hard")
        assert (body["reserved"], body["pending"], body["open_reservations"]) == ("450", "150", 1)
        status, _, body = http.call(
            "POST", f"/v1/reservations/{kept['reservation_id']}/commit", b'{"token_units": 300}'
        )
        assert (status, body["outcome"], body["released"]) == (200, "committed", "0")
        status, _, body = http.call("DELETE", f"/v1/reservations/{gone['reservation_id']}")
        assert status == 404  # released before the kill: not held again
        http.close()


def test_the_server_mirrors_the_workers_usage(
    clean_warehouse: Warehouse, warehouse_settings: Settings, tmp_path: Path
) -> None:
    """The worker's side (usage, no holds) drives the server through the real link
    (QuotaServerProcess): same usage, pending commits settled by stored events, holds in
    the server only, and a restore asks the server for its pending event ids."""
    wh = clean_warehouse
    settings = warehouse_settings.model_copy(update={"web_port": free_port(), "data_dir": tmp_path})

    async def inline(fn: Callable[..., Any], *args: Any) -> Any:
        result = fn(*args)
        await asyncio.sleep(0)  # what fn posted to the loop runs first, as in the worker
        return result

    async def run() -> None:
        link = QuotaServerProcess(settings, 1)
        link.start()
        try:
            worker = QuotaService(
                settings, inline, lambda: wh, pseudonym_key=b"unit-test-pseudonym-key-0123",
                webhooks_path=tmp_path / "none.yaml", kafka=False, replica=link, partitions=4,
            )  # fmt: skip
            assert worker.journal is None
            worker.apply_definition(definition("tn-m", 1000, 1))
            await worker.start()
            await worker.on_partitions_assigned([0, 1, 2, 3], wait=True)
            # the link is asynchronous: the answer to a question comes after every change
            # sent before it was applied (so the restored partitions are served)
            assert await link.pending_ids() == []
            http = Http(settings.web_port)

            def call(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
                status, _, answer = http.call(method, path, json.dumps(body).encode())
                assert status in (200, 201), answer
                return answer

            grant = call("POST", "/v1/quotas/tn-m/reservations", {"token_units": 400})
            call("POST", f"/v1/reservations/{grant['reservation_id']}/commit",
                 {"token_units": 300, "event_id": "e-1"})  # fmt: skip
            other = call("POST", "/v1/quotas/tn-m/reservations", {"token_units": 100})
            call("POST", f"/v1/reservations/{other['reservation_id']}/commit",
                 {"token_units": 100, "event_id": "e-2"})  # fmt: skip
            now = now_ms()
            first = rated("tn-m", 300, "e-1", when=now - 1000)
            write_rated(wh, [first])
            worker.on_rated_batch([first])
            await asyncio.sleep(0.01)  # the batch is applied in the loop
            assert sorted(await link.pending_ids()) == ["e-2"]  # e-1 settled, e-2 held
            status = call("GET", "/v1/quotas/tn-m")
            assert (status["used"], status["pending"]) == ("300", "100")
            assert worker.get("tn-m").used.tu == 300
            assert worker.ledgers[next(iter(worker.ledgers))].holds == {}
            # e-2 is stored while this worker does not own the partition; the restore
            # after the rebalance counts it and drops its hold in the server
            worker.on_partitions_revoked([0, 1, 2, 3])
            write_rated(wh, [rated("tn-m", 100, "e-2", when=now - 500)])
            await worker.on_partitions_assigned([0, 1, 2, 3], wait=True)
            assert await link.pending_ids() == []
            status = call("GET", "/v1/quotas/tn-m")
            assert (status["used"], status["pending"], status["reserved"]) == ("400", "0", "0")
            assert worker.get("tn-m").used.tu == 400
            http.close()
            await worker.stop()
        finally:
            link.close()
        assert link.proc is not None and link.proc.returncode == 0

    asyncio.run(run())


def test_a_missing_program_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.quota import link
    from pipeline.settings import SettingsError

    monkeypatch.setattr(link, "BINARY", "tokenmeter-quotad-not-built")
    with pytest.raises(SettingsError, match="is not built: run `make setup`"):
        link.quota_server_binary()


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


def test_a_bad_quota_server_rtprio_names_its_setting() -> None:
    from pipeline.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="TOKENMETER_QUOTA_SERVER_RTPRIO"):
        load_settings(quota_server_rtprio=100)
    assert load_settings().quota_server_rtprio == 0


def test_the_server_takes_the_priorities_it_is_given(tmp_path: Path) -> None:
    """Nice value and real-time policy reach every thread; without the privilege to
    raise them, the server still serves (and says why in its log)."""
    privileged = os.geteuid() == 0
    with running(tmp_path, quota_server_nice=-3, quota_server_rtprio=7) as r:
        http = Http(r.port)
        assert http.call("GET", "/v1/quotas/tn-hard")[0] == 200
        http.close()
        threads = [int(t) for t in os.listdir(f"/proc/{r.proc.pid}/task")]
        policies = {os.sched_getscheduler(t) for t in threads}
        priorities = {os.sched_getparam(t).sched_priority for t in threads}
        if privileged:
            assert (policies, priorities) == ({os.SCHED_FIFO}, {7})
        else:
            assert policies == {os.SCHED_OTHER}
    with running(tmp_path, quota_server_nice=5) as r:
        threads = [int(t) for t in os.listdir(f"/proc/{r.proc.pid}/task")]
        assert {os.getpriority(os.PRIO_PROCESS, t) for t in threads} == {5}
        assert {os.sched_getscheduler(t) for t in threads} == {os.SCHED_OTHER}
