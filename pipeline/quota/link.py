"""The worker's end of the quota server (``quotad/``, a Go program): spawn it, feed it,
hear from it.

The worker and the quota server share a Unix socket pair. Each message is a 4-byte
big-endian length and a JSON array whose first element names it; amounts are exact
decimal strings (``quotad/link.go`` reads and writes the other end).

Worker -> server: ``("config", {...})`` first (listening address, journal path,
pseudonym key, pending TTL, priority, client limits), then the changes of the worker's
``QuotaService`` (``Replica`` in ``service.py``: usage of stored batches, restored
usage, definitions, partitions) in the order it made them, ``("routes", {partition:
url})`` (which worker owns which usage partition) and ``("ask", id, question)``.
Server -> worker: ``("listening",)`` or ``("error", text)`` once at start,
``("answer", id, value)``, and ``("stats", ...)`` deltas for the worker's Prometheus
metrics every half second.

Sending never blocks the caller: messages go through a queue to a sender thread, in
the order ``send`` was called. A receiver thread handles the answers. If the server
dies, the worker stops (``on_exit``) and its supervisor restarts both; if the worker
dies, the server follows it (it watches the socket and has ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import queue
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.metering.quota import DEFAULT_PENDING_TTL_MS, fmt
from pipeline.metrics import QUOTA_DURATION_BUCKETS
from pipeline.quota.definitions import definition_json
from pipeline.quota.journal import journal_path
from pipeline.quota.service import key_from_topic_key
from pipeline.settings import Settings, SettingsError

if TYPE_CHECKING:
    from pipeline.metrics import WorkerMetrics

log = logging.getLogger("tokenmeter.quota")

_LEN = struct.Struct(">I")
BINARY = "tokenmeter-quotad"


def quota_server_binary() -> Path:
    """The quota server program: next to this Python (``make setup`` builds it into the
    virtualenv's ``bin``), else on ``PATH``. ``SettingsError`` when it is not built."""
    beside = Path(sys.executable).parent / BINARY
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(BINARY)
    if found:
        return Path(found)
    raise SettingsError(
        f"the quota server program {BINARY} is not built: run `make setup` "
        "(it needs Go 1.26: `go version`), or put it on PATH"
    )


def _encode(message: tuple[Any, ...]) -> list[Any]:
    """A change of the worker's ``QuotaService`` as the JSON the server reads (amounts
    as exact decimal strings, ``fmt``)."""
    kind = message[0]
    if kind == "apply":
        singles, sums = message[1], message[2]
        return [
            kind,
            [
                [i.tenant_id, i.subscriber_id, i.event_ms, fmt(i.tu), fmt(i.cny), i.event_id,
                 i.partition]
                for i in singles
            ],
            [
                [tenant, part, day, fmt(s.tu), fmt(s.cny), s.event_ids]
                for (tenant, part, day), s in sums.items()
            ],
        ]  # fmt: skip
    if kind == "install":
        parts, sub_keys, rows, landed = message[1:5]
        return [
            kind,
            list(parts),
            [[k.tenant_id, k.subscriber_id] for k in sub_keys],
            [
                [tenant, sub, part, day, fmt(tu), fmt(cny)]
                for tenant, sub, part, day, tu, cny in rows
            ],
            sorted(landed),
        ]
    if kind == "definition":
        change = message[1]
        key = key_from_topic_key(change.key)
        d = change.definition
        return [kind, key.tenant_id, key.subscriber_id, definition_json(d) if d else None]
    if kind == "routes":
        return [kind, {str(p): url for p, url in dict(message[1]).items()}]
    return list(message)


def frame(message: tuple[Any, ...]) -> bytes:
    """One message on the wire."""
    data = json.dumps(_encode(message), separators=(",", ":")).encode()
    return _LEN.pack(len(data)) + data


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise EOFError("quota server closed the link")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket) -> tuple[Any, ...]:
    """The next message (blocking); ``EOFError`` when the other end is gone."""
    (size,) = _LEN.unpack(_read_exactly(sock, 4))
    return tuple(json.loads(_read_exactly(sock, size)))


def server_config(settings: Settings) -> dict[str, Any]:
    """What the server needs of the settings (sent over the link: the key is secret)."""
    return {
        "web_host": settings.web_host,
        "web_port": settings.web_port,
        "journal": str(journal_path(settings)),
        "pseudonym_key": settings.pseudonym_secret().hex(),
        "pending_ttl_ms": DEFAULT_PENDING_TTL_MS,
        "nice": settings.quota_server_nice,
        "rtprio": settings.quota_server_rtprio,
        "duration_buckets": list(QUOTA_DURATION_BUCKETS),
        "header_timeout_s": settings.quota_server_header_timeout_s,
        "body_timeout_s": settings.quota_server_body_timeout_s,
        "idle_timeout_s": settings.quota_server_idle_timeout_s,
        "max_connections": settings.quota_server_max_connections,
    }


def spawn_quota_server(
    settings: Settings, faust_port: int
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start the quota server and send it its configuration; returns the process and
    the worker's end of the link (the server answers ``listening`` or ``error`` first)."""
    program = quota_server_binary()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen(
        [
            str(program),
            "--link-fd",
            str(theirs.fileno()),
            "--parent-pid",
            str(os.getpid()),
            "--faust-port",
            str(faust_port),
        ],
        pass_fds=(theirs.fileno(),),
    )
    theirs.close()
    # a server that died at once shows as the end of the link on the first read
    with contextlib.suppress(OSError):
        ours.sendall(frame(("config", server_config(settings))))
    return proc, ours


class QuotaServerProcess:
    """The quota server child process, seen from the worker (a ``Replica``)."""

    def __init__(
        self,
        settings: Settings,
        faust_port: int,
        metrics: WorkerMetrics | None = None,
        on_exit: Callable[[str], None] | None = None,
    ) -> None:
        """``faust_port``: where the worker's own pages (health, status, metrics,
        query) listen, on 127.0.0.1; the server forwards every non-quota path there.
        ``on_exit(reason)`` is called (on the receiver thread) if the server dies while
        the worker runs."""
        self.settings = settings
        self.faust_port = faust_port
        self.metrics = metrics
        self.on_exit = on_exit
        self.proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._asks = itertools.count(1)
        self._waiting: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]] = {}
        self._lock = threading.Lock()
        self._closing = False
        self.open_reservations = 0

    def start(self, timeout_s: float = 60.0) -> None:
        """Spawn the server and wait until it listens on the web port. Raises
        ``SettingsError`` if it cannot (the port is taken, say). Call it from the
        thread that lives as long as the worker (the main thread): the server's
        ``PR_SET_PDEATHSIG`` fires when the thread that spawned it ends."""
        self.proc, ours = spawn_quota_server(self.settings, self.faust_port)
        ours.settimeout(timeout_s)
        try:
            first = read_frame(ours)
        except (EOFError, TimeoutError, OSError) as exc:
            self._kill()
            raise SettingsError(f"the quota server did not start: {exc}") from None
        if first[0] == "error":
            self._kill()
            raise SettingsError(str(first[1]))
        ours.settimeout(None)
        self._sock = ours
        for target, name in (
            (self._send_loop, "quota-link-send"),
            (self._recv_loop, "quota-link-recv"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info(
            "quota server (pid %d) listening on %s; worker pages on 127.0.0.1:%d",
            self.proc.pid,
            self.settings.web_url,
            self.faust_port,
        )

    # ---- Replica ---------------------------------------------------------------------
    def send(self, message: tuple[Any, ...]) -> None:
        """Queue ``message`` for the server (any thread; never blocks)."""
        self._queue.put(frame(message))

    async def ask(self, question: tuple[Any, ...]) -> Any:
        """Ask the server (it answers after every message sent before)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            ask_id = next(self._asks)
            self._waiting[ask_id] = (loop, future)
        self.send(("ask", ask_id, question))
        return await future

    async def pending_ids(self) -> list[str]:
        ids: list[str] = await self.ask(("pending_ids",))
        return ids

    # ---- threads ---------------------------------------------------------------------
    def _send_loop(self) -> None:
        assert self._sock is not None
        while (data := self._queue.get()) is not None:
            try:
                self._sock.sendall(data)
            except OSError:
                return  # the receiver reports the server's end

    def _recv_loop(self) -> None:
        assert self._sock is not None
        while True:
            try:
                message = read_frame(self._sock)
            except (EOFError, OSError) as exc:
                if not self._closing and self.on_exit is not None:
                    code = self.proc.poll() if self.proc is not None else None
                    self.on_exit(f"the quota server exited ({code}): {exc}")
                return
            kind = message[0]
            if kind == "answer":
                with self._lock:
                    found = self._waiting.pop(message[1], None)
                if found is not None:
                    loop, future = found
                    loop.call_soon_threadsafe(_resolve, future, message[2])
            elif kind == "stats":
                self.open_reservations = int(message[3])
                if self.metrics is not None:
                    self.metrics.observe_quota_server(message[1], message[2])

    # ---- stop ------------------------------------------------------------------------
    def close(self, timeout_s: float = 15.0) -> None:
        """Let the server finish (it closes its journal on the link's end) and reap it."""
        self._closing = True
        self._queue.put(None)
        for thread in self._threads[:1]:
            thread.join(timeout_s)
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._kill()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)
