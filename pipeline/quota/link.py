"""The worker's end of the quota server (``server.py``): spawn it, feed it, hear from it.

The worker and the quota server share a Unix socket pair. Each message is a 4-byte
big-endian length and a pickled tuple (both ends are this code base, in one process
tree: nothing else can write to the socket).

Worker -> server: the changes of the worker's ``QuotaService`` (``Replica`` in
``service.py``: usage of stored batches, restored usage, definitions, partitions),
``("routes", {partition: url})`` (which worker owns which usage partition), and
``("ask", id, question)``. Server -> worker: ``("listening",)`` or ``("error", text)``
once at start, ``("answer", id, value)``, and ``("stats", ...)`` deltas for the
worker's Prometheus metrics every half second.

Sending never blocks the caller: messages go through a queue to a sender thread, in
the order ``send`` was called. A receiver thread handles the answers. If the server
dies, the worker stops (``on_exit``) and its supervisor restarts both; if the worker
dies, the server follows it (it watches the socket and has ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import queue
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline.settings import Settings, SettingsError

if TYPE_CHECKING:
    from pipeline.metrics import WorkerMetrics

log = logging.getLogger("tokenmeter.quota")

_LEN = struct.Struct(">I")


def frame(message: tuple[Any, ...]) -> bytes:
    """One message on the wire."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
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
    message: tuple[Any, ...] = pickle.loads(_read_exactly(sock, size))
    return message


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
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline.quota.server",
                "--link-fd",
                str(theirs.fileno()),
                "--parent-pid",
                str(os.getpid()),
                "--faust-port",
                str(self.faust_port),
            ],
            pass_fds=(theirs.fileno(),),
        )
        theirs.close()
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
