"""The quota server: the worker's web port, in a process of its own.

Why a process: a reservation is on the critical path of every model call, and the
worker's event loop and interpreter are busy with batches (faust's per-message work,
the pipeline thread's decoding and inserts). Here the four quota calls run in a loop
that does nothing else, in an interpreter that shares no lock with the pipeline, and
the worker runs its batch work at a lower CPU priority (``TOKENMETER_PIPELINE_NICE``):
the control plane first, as online charging systems do.

What it owns: the reservations (``QuotaService`` in follower mode: ledgers, holds, the
journal) and the listening socket on ``TOKENMETER_WEB_HOST:TOKENMETER_WEB_PORT``. What
it gets from the worker (``link.py``): every change of usage, definitions and
partitions, in the order the worker made them, so its ledgers hold the same usage as
the worker's; and which worker owns which usage partition, to route a call to the
owner. What stays in the worker: reading Kafka and the warehouse, thresholds and
alerts, webhooks, and its own pages (health, status, metrics, query), which this
server forwards to it on 127.0.0.1.

HTTP: a small HTTP/1.1 server on asyncio's Protocol (keep-alive, pipelining,
``Content-Length`` bodies up to 1 MiB; ``Transfer-Encoding`` is refused with 411).
The quota calls are answered synchronously in ``data_received``: each runs to
completion before the next starts, so "never past the limit" holds without locks.

It stops when the worker does: at the end of the link (the worker closed it or died),
and ``PR_SET_PDEATHSIG`` (SIGKILL) should the worker be killed.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import ctypes
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, cast

from pipeline.metrics import QUOTA_DURATION_BUCKETS
from pipeline.quota.link import frame
from pipeline.quota.service import QuotaService
from pipeline.quota.web import FORWARDED, JSON, OWNER, Call, QuotaApi, Reply, error
from pipeline.settings import Settings, SettingsError, load_settings

log = logging.getLogger("tokenmeter.quota.server")

# Python's full (generation 2) garbage collections stop the loop for 50-100 ms once
# hundreds of thousands of reservations and settlements are alive, and find nothing: the
# ledgers hold no reference cycles (reference counting frees them). The server leaves
# the young generations to the interpreter and runs a full collection itself, rarely.
FULL_GC_INTERVAL_S = 600.0
MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024
STATS_INTERVAL_S = 0.5
_REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    411: "Length Required",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_FORWARDED = FORWARDED.lower()


@dataclass(slots=True)
class Request:
    method: str
    target: str  # path and query, as sent
    path: str
    query: str
    head: str  # the header lines, each after "\r\n"
    lower: str  # the same, lower-cased
    body: bytes

    def header(self, name: str) -> str | None:
        """A header's value (``name`` in lower case), or ``None``."""
        return _header(self.head, self.lower, name)


def _header(head: str, lower: str, name: str) -> str | None:
    at = lower.find(f"\r\n{name}:")
    if at < 0:
        return None
    start = at + len(name) + 3
    end = lower.find("\r\n", start)
    return head[start : end if end >= 0 else len(head)].strip()


async def _no_run(*_args: Any) -> Any:
    raise RuntimeError("the quota server has no warehouse: the worker restores usage")


def _no_warehouse() -> Any:
    raise RuntimeError("the quota server has no warehouse")


class QuotaServer:
    """The follower ``QuotaService``, its HTTP calls and its link to the worker."""

    def __init__(self, settings: Settings, faust_port: int) -> None:
        self.settings = settings
        self.service = QuotaService(
            settings,
            _no_run,
            _no_warehouse,
            pseudonym_key=settings.pseudonym_secret(),
            kafka=False,
            follower=True,
        )
        self.api = QuotaApi(self.service, self._observe)
        self.own = (settings.web_host, settings.web_port)
        self.faust_base = f"http://127.0.0.1:{faust_port}"
        self.routes: dict[int, tuple[str, str, int]] = {}  # partition -> (url, host, port)
        self._writer: asyncio.StreamWriter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        journal = self.service.journal
        if journal is not None:
            journal.hold()
        self._session: Any = None  # aiohttp.ClientSession, made on first use
        self._outcomes: dict[str, int] = {}
        self._durations: dict[str, list[float]] = {}

    # ---- metrics ---------------------------------------------------------------------
    def _observe(self, call: str, outcome: str | None, seconds: float) -> None:
        if outcome is not None:
            self._outcomes[outcome] = self._outcomes.get(outcome, 0) + 1
        found = self._durations.get(call)
        if found is None:
            # bucket counts (last: above every bound), then the sum of seconds
            found = self._durations[call] = [0.0] * (len(QUOTA_DURATION_BUCKETS) + 2)
        found[bisect.bisect_left(QUOTA_DURATION_BUCKETS, seconds)] += 1
        found[-1] += seconds

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            outcomes, self._outcomes = self._outcomes, {}
            durations, self._durations = self._durations, {}
            open_reservations = sum(
                1
                for ledger in self.service.ledgers.values()
                if not ledger.key.subscriber_id
                for h in ledger.holds.values()
                if not h.pending
            )
            self._send(("stats", outcomes, durations, open_reservations))

    async def _full_gc_loop(self) -> None:
        while True:
            await asyncio.sleep(FULL_GC_INTERVAL_S)
            started = time.perf_counter()
            found = gc.collect()
            log.debug(
                "quota server: full garbage collection, %d objects, %.0f ms",
                found,
                1000 * (time.perf_counter() - started),
            )

    # ---- the link ----------------------------------------------------------------------
    def _send(self, message: tuple[Any, ...]) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(frame(message))

    async def _follow(self, reader: asyncio.StreamReader) -> None:
        """Apply the worker's messages until it closes the link."""
        import pickle

        while True:
            try:
                head = await reader.readexactly(4)
                message = pickle.loads(await reader.readexactly(int.from_bytes(head, "big")))
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            kind = message[0]
            if kind == "routes":
                self.routes = {
                    int(p): (url, *_host_port(url)) for p, url in dict(message[1]).items()
                }
            elif kind == "ask":
                self._send(("answer", message[1], self.service.on_replica_message(message[2])))
            else:
                self.service.on_replica_message(message)

    # ---- requests ----------------------------------------------------------------------
    def dispatch(self, req: Request) -> Reply | Awaitable[Reply]:
        """A reply now (quota calls answered here), or one to wait for (forwarded)."""
        call = QuotaApi.match(req.method, req.path)
        if call is None:
            return self._proxy(self.faust_base, req, 300.0, ())
        if isinstance(call, Reply):
            return call
        dest = self._owner(call)
        if dest is not None and req.header(_FORWARDED) is None:
            return self._proxy(dest, req, 30.0, ((OWNER, dest),))
        return self.api.handle(call, req.query, req.body)

    def _owner(self, call: Call) -> str | None:
        """The URL of the worker that owns the call's tenant, when that is another one."""
        tenant = call.tenant_id
        if tenant is None or self.service.owns(tenant):
            return None
        found = self.routes.get(self.service.partition_of(tenant))
        if found is None or (found[1], found[2]) == self.own:
            return None  # no owner known yet, or us: answer here (503 until restored)
        return found[0]

    async def _proxy(
        self, base: str, req: Request, timeout_s: float, extra: tuple[tuple[str, str], ...]
    ) -> Reply:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        headers = {FORWARDED: "1"} if extra else {}
        for name in ("accept", "content-type", "accept-encoding"):
            value = req.header(name)
            if value is not None:
                headers[name] = value
        try:
            async with self._session.request(
                req.method,
                base + req.target,
                data=req.body or None,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as resp:
                body = await resp.read()
                kept = tuple(
                    (name, resp.headers[name])
                    for name in ("Content-Encoding", "Retry-After", "Allow")
                    if name in resp.headers
                )
                return Reply(
                    resp.status, body, kept + extra, resp.headers.get("Content-Type", JSON)
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            what = "the worker's pages" if not extra else f"the owning worker {base}"
            reply = error(503, f"{what} cannot be reached yet ({type(exc).__name__}); retry")
            return Reply(503, reply.body, (("Retry-After", "1"),))

    def send_answer(self, proto: HttpProtocol, data: bytes, keep: bool) -> None:
        """Send an answer at once, after the journal's lines for it (and for the answers
        before it) are written: a killed server never answered what it forgot."""
        journal = self.service.journal
        if journal is not None:
            journal.flush()
        proto.write_now(data, keep)

    # ---- run -----------------------------------------------------------------------------
    async def run(self, link: socket.socket) -> int:
        loop = self._loop = asyncio.get_running_loop()
        reader, self._writer = await asyncio.open_unix_connection(sock=link)
        host, port = self.own
        try:
            server = await loop.create_server(
                lambda: HttpProtocol(self), host=host, port=port, backlog=1024
            )
        except OSError as exc:
            self._send(
                (
                    "error",
                    f"TOKENMETER_WEB_PORT: cannot listen on {host}:{port}: {exc.strerror or exc}",
                )
            )
            await self._writer.drain()
            return 1
        self._send(("listening",))
        self.service.start_follower()
        stats = asyncio.ensure_future(self._stats_loop())
        collector = asyncio.ensure_future(self._full_gc_loop())
        try:
            await self._follow(reader)  # until the worker goes
        finally:
            server.close()
            for task in (stats, collector):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.service.stop()
            if self._session is not None:
                await self._session.close()
        return 0


def _host_port(url: str) -> tuple[str, int]:
    from yarl import URL

    u = URL(url)
    return u.host or "", u.port or 80


class HttpProtocol(asyncio.Protocol):
    """One client connection: HTTP/1.1 requests in, replies out, in order."""

    def __init__(self, server: QuotaServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False  # a forwarded request is in flight: later ones wait
        self.closed = False  # no more requests are read (closing, or closed)
        self.continued = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._drain()

    def _drain(self) -> None:
        while not self.closed:
            buf = self.buf
            end = buf.find(b"\r\n\r\n")
            if end < 0 or end > MAX_HEAD:
                if len(buf) > MAX_HEAD:
                    self._fail(431, "request head too large")
                return
            text = buf[:end].decode("latin-1")
            eol = text.find("\r\n")
            line, head = (text, "") if eol < 0 else (text[:eol], text[eol:])
            parts = line.split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                self._fail(400 if len(parts) != 3 else 505, "malformed request line")
                return
            method, target, version = parts
            lower = head.lower()
            if "\r\ntransfer-encoding:" in lower:
                self._fail(411, "send the body with Content-Length")
                return
            length_text = _header(head, lower, "content-length") or "0"
            if not length_text.isdigit():
                self._fail(400, "bad Content-Length")
                return
            length = int(length_text)
            if length > MAX_BODY:
                self._fail(413, f"body larger than {MAX_BODY} bytes")
                return
            total = end + 4 + length
            if len(buf) < total:
                expect = _header(head, lower, "expect") if not self.continued else None
                if expect is not None and expect.lower() == "100-continue":
                    self.continued = True
                    self._write_raw(b"HTTP/1.1 100 Continue\r\n\r\n")
                return
            body = bytes(buf[end + 4 : total])
            del buf[:total]
            self.continued = False
            conn = (_header(head, lower, "connection") or "").lower()
            keep = conn != "close" if version == "HTTP/1.1" else conn == "keep-alive"
            path, _, query = target.partition("?")
            answer = self.server.dispatch(Request(method, target, path, query, head, lower, body))
            if isinstance(answer, Reply):
                self._reply(answer, keep)
            else:
                self.busy = True
                asyncio.ensure_future(self._later(answer, keep))
                return

    async def _later(self, pending: Awaitable[Reply], keep: bool) -> None:
        try:
            answer = await pending
        except Exception:  # noqa: BLE001 - a bug here must still answer this client
            log.exception("quota server: request failed")
            answer = error(500, "internal error")
        self._reply(answer, keep)
        self.busy = False
        self._drain()

    def _write_raw(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _reply(self, answer: Reply, keep: bool) -> None:
        head = [
            f"HTTP/1.1 {answer.status} {_REASONS.get(answer.status, 'Status')}\r\n"
            f"Content-Type: {answer.content_type}\r\nContent-Length: {len(answer.body)}\r\n"
        ]
        for name, value in answer.headers:
            head.append(f"{name}: {value}\r\n")
        if not keep:
            head.append("Connection: close\r\n")
            self.closed = True  # read no further request
        head.append("\r\n")
        self.server.send_answer(self, "".join(head).encode("latin-1") + answer.body, keep)

    def write_now(self, data: bytes, keep: bool) -> None:
        """Send an answer (``QuotaServer.send_answer``); close after it if not ``keep``."""
        if self.transport is not None:
            self.transport.write(data)
            if not keep:
                self.transport.close()

    def _fail(self, status: int, message: str) -> None:
        self._reply(error(status, message), keep=False)


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the worker (the thread that spawned it) ends."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the end of the link still stops the server
    if os.getppid() != parent_pid:
        os._exit(0)  # the worker is already gone


def _set_priority(nice: int) -> None:
    """Run at ``TOKENMETER_QUOTA_SERVER_NICE`` (threads started later inherit it)."""
    if nice == os.getpriority(os.PRIO_PROCESS, 0):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as exc:  # a negative value needs CAP_SYS_NICE: run at the normal one
        log.warning("TOKENMETER_QUOTA_SERVER_NICE=%d not applied: %s", nice, exc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="tokenmeter quota server (spawned by the worker)")
    ap.add_argument("--link-fd", type=int, required=True)
    ap.add_argument("--parent-pid", type=int, required=True)
    ap.add_argument("--faust-port", type=int, required=True)
    args = ap.parse_args(argv)
    _die_with_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
    )
    link = socket.socket(fileno=args.link_fd)
    try:
        settings = load_settings()
        server = QuotaServer(settings, args.faust_port)
        _set_priority(settings.quota_server_nice)
    except (SettingsError, OSError, ValueError) as exc:
        link.sendall(frame(("error", str(exc))))
        return 1
    gc.freeze()  # what start-up made is kept for good: no collection looks at it again
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 1_000_000_000)  # no automatic full collection
    started = time.monotonic()
    code = asyncio.run(server.run(link))
    log.info("quota server stopped after %.0f s", time.monotonic() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())
