"""The faust-streaming app, wired explicitly: ``create_app(settings)`` builds it, nothing
happens at import time.

Two thin agents:
- ``ingest`` consumes ``usage-events`` in batches (``take_events``) and hands each batch
  to ``Pipeline.process_usage`` on the pipeline thread;
- ``dead_letters`` consumes ``usage-dead-letters`` and mirrors it into the table.

Commit after flush: ``take_events`` acks a batch's events only when the agent asks for
the next batch, i.e. after ``process_*`` returned, and faust commits acked offsets
only. faust would also ack a batch whose agent raised or was cancelled, so a batch
that could not be stored ends the process at once (``_crash``), without committing:
the restart replays it, and the sink's offset marks keep the replay from counting
anything twice.

The web port (``TOKENMETER_WEB_HOST:TOKENMETER_WEB_PORT``) belongs to the quota server,
a child process (``quotad/``, Go; ``pipeline/quota/link.py``): it answers the quota calls itself and
forwards every other path to faust's web server, which listens on a private port of
127.0.0.1. The pipeline thread runs at ``TOKENMETER_PIPELINE_NICE``, below the quota
server, so batch work never delays a reservation for long.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

import faust
from faust.streams import Stream
from faust.types import EventT, StreamT
from mode.types.signals import BaseSignalT

from pipeline.metrics import WorkerMetrics
from pipeline.runtime import BatchReport, Pipeline
from pipeline.settings import Settings
from pipeline.stages.ingest import RawMessage

log = logging.getLogger("tokenmeter.worker")
T = TypeVar("T")


def _crash(reason: str) -> None:
    """Leave without committing anything (faust would commit acked offsets on a clean
    stop). Exit code 75 (EX_TEMPFAIL): restart me, the batch will be replayed."""
    log.critical("stopping without commit: %s", reason)
    logging.shutdown()
    sys.stderr.flush()
    os._exit(75)


def _raw(events: list[EventT]) -> list[RawMessage]:
    out = []
    for event in events:
        msg = event.message
        out.append(
            RawMessage(
                topic=msg.topic,
                partition=msg.partition,
                offset=msg.offset,
                timestamp_ms=int(msg.timestamp * 1000),
                key=msg.key,
                value=msg.value if isinstance(msg.value, bytes) else bytes(msg.value or b""),
            )
        )
    return out


class _Throughput:
    """Events and batches per logging interval (the worker logs them every 10 s)."""

    def __init__(self) -> None:
        self.events = 0
        self.batches = 0
        self.busy_s = 0.0
        self.since = time.monotonic()

    def add(self, events: int, seconds: float) -> None:
        self.events += events
        self.batches += 1
        self.busy_s += seconds

    def report(self) -> str | None:
        now = time.monotonic()
        elapsed, self.since = now - self.since, now
        if not self.batches:
            return None
        line = (
            f"{self.events / elapsed:,.0f} events/s, {self.batches} batches "
            f"(avg {self.events / self.batches:,.0f} events, "
            f"{1000 * self.busy_s / self.batches:,.0f} ms), busy {100 * self.busy_s / elapsed:.0f}%"
        )
        self.events = self.batches = 0
        self.busy_s = 0.0
        return line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Worker:
    """The faust app plus the pipeline thread it feeds."""

    def __init__(
        self,
        settings: Settings,
        pipeline_factory: Callable[[], Pipeline],
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else WorkerMetrics(settings)
        self._factory = pipeline_factory
        self._pipeline: Pipeline | None = None
        # One thread owns the pipeline (chdb session, dedup index, producers).
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        self.stats = _Throughput()
        from pipeline.quota import QuotaService
        from pipeline.quota.link import QuotaServerProcess

        # faust's own pages (health, status, metrics, query) listen here; the quota
        # server owns the public web port and forwards them
        self.faust_port = _free_port()
        self.quota_server = QuotaServerProcess(
            settings, self.faust_port, self.metrics, on_exit=_crash
        )
        self.quota = QuotaService(
            settings,
            self.on_pipeline,
            lambda: self.pipeline.wh,
            pseudonym_key=settings.pseudonym_secret(),
            replica=self.quota_server,
            metrics=self.metrics,
        )
        self._routes: dict[int, str] = {}
        self.app = self._build_app()

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            raise RuntimeError("pipeline not started")
        return self._pipeline

    async def on_pipeline(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the pipeline thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, fn, *args)

    async def _run_batch(self, fn: Callable[[list[RawMessage]], Any], events: list[EventT]) -> Any:
        batch = _raw(events)
        started = time.monotonic()
        future = asyncio.get_running_loop().run_in_executor(self.executor, fn, batch)
        try:
            result = await asyncio.shield(future)
            elapsed = time.monotonic() - started
            self.stats.add(len(batch), elapsed)
            if isinstance(result, BatchReport):
                self.metrics.observe_batch(result, elapsed)
            elif isinstance(result, int):  # the dead-letter mirror: rows stored
                self.metrics.observe_dead_letter_batch(result, elapsed)
            return result
        except asyncio.CancelledError:
            # Stopping: let the write in flight finish; commit only if it did.
            try:
                await asyncio.wait_for(future, timeout=60)
            except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - any failure here means "not stored"
                _crash(f"stopped while a batch was being stored ({type(exc).__name__})")
            raise
        except Exception as exc:  # noqa: BLE001 - an unstored batch must never be acked
            log.exception("batch failed")
            _crash(f"batch of {len(batch)} could not be processed: {exc}")
            raise

    def _build_app(self) -> faust.App:
        s = self.settings
        app = faust.App(
            s.consumer_group,
            broker=f"kafka://{s.kafka_bootstrap}",
            store="memory://",
            datadir=str(s.data_path / "worker"),
            key_serializer="raw",
            value_serializer="raw",
            web_host="127.0.0.1",
            web_bind="127.0.0.1",
            web_port=self.faust_port,
            # how other workers reach this one: the quota server's public port
            canonical_url=s.web_url,
            web_in_thread=False,
            broker_session_timeout=6.0,
            broker_heartbeat_interval=1.0,
            broker_commit_interval=1.0,
            broker_max_poll_records=s.batch_max,
            stream_buffer_maxsize=max(4096, s.batch_max * 2),
            consumer_auto_offset_reset="earliest",
            topic_disable_leader=True,
            topic_allow_declare=False,
            producer_acks=-1,
        )
        usage = app.topic(s.topic_usage, key_type=bytes, value_type=bytes)
        dead = app.topic(s.topic_dead_letters, key_type=bytes, value_type=bytes)

        @app.agent(usage, concurrency=1, name="ingest")
        async def ingest(stream: StreamT) -> None:
            async for events in cast(Stream, stream).take_events(
                s.batch_max, within=s.batch_within_s
            ):
                await self._run_batch(self.pipeline.process_usage, list(events))

        @app.agent(dead, concurrency=1, name="dead_letters")
        async def dead_letters(stream: StreamT) -> None:
            async for events in cast(Stream, stream).take_events(
                s.batch_max, within=s.batch_within_s
            ):
                await self._run_batch(self.pipeline.process_dead_letters, list(events))

        @app.on_partitions_revoked.connect
        async def on_revoked(
            sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any
        ) -> None:
            parts = usage_partitions(s, args, kwargs, "revoked")
            if parts and self._pipeline is not None:
                self.quota.on_partitions_revoked(parts)
                await self.on_pipeline(self.pipeline.release_usage_partitions, parts)

        @app.on_partitions_assigned.connect
        async def on_assigned(
            sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any
        ) -> None:
            parts = usage_partitions(s, args, kwargs, "assigned")
            if parts and self._pipeline is not None:
                await self.quota.on_partitions_assigned(parts)
            self._send_routes()

        @app.task
        async def start_quota() -> None:
            await self.quota.start()

        @app.on_before_shutdown.connect
        async def stop_quota(
            sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any
        ) -> None:
            await self.quota.stop()

        @app.timer(2.0)
        async def quota_routes() -> None:
            self._send_routes()

        @app.timer(10.0)
        async def log_throughput() -> None:
            line = self.stats.report()
            if line:
                log.info("throughput: %s", line)

        from pipeline.web import register_pages

        register_pages(app, self)
        return app

    def _send_routes(self) -> None:
        """Tell the quota server which worker (URL) owns each usage partition, as
        faust's assignor distributed them, when that changed."""
        routes: dict[int, str] = {}
        for owner, topics in self.app.router.external_topics_metadata().items():
            for partition in topics.get(self.settings.topic_usage, ()):
                routes[int(partition)] = str(owner)
        if routes != self._routes:
            self._routes = routes
            self.quota_server.send(("routes", routes))

    def _lower_priority(self) -> None:
        """Run the calling thread, and the threads it starts from now on, at
        ``TOKENMETER_PIPELINE_NICE`` (Linux: a nice value is per thread)."""
        nice = self.settings.pipeline_nice
        if nice:
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
            except OSError as exc:  # not permitted here: run at normal priority
                log.warning("cannot lower the worker's CPU priority: %s", exc)

    def _start_pipeline_thread(self) -> Pipeline:
        """On the pipeline thread: lower its priority (and that of the threads it starts,
        like the warehouse engine's and the producers'), then build the pipeline."""
        self._lower_priority()
        return self._factory()

    def start_pipeline(self) -> None:
        """Start the quota server (it takes the web port), then open the warehouse and
        the producers on the pipeline thread, at a lower priority (blocking; before the
        app starts). Call from the main thread. Faust's loop keeps the normal priority:
        it publishes the threshold alerts."""
        self.quota_server.start()
        self._pipeline = self.executor.submit(self._start_pipeline_thread).result()
        self._pipeline.quota = self.quota
        self.metrics.start()

    def stop_pipeline(self) -> None:
        """Release the warehouse (after the app stopped), then stop the quota server."""
        self.metrics.close()
        if self._pipeline is not None:
            self.executor.submit(self._pipeline.close).result()
            self._pipeline = None
        self.executor.shutdown(wait=True)
        self.quota_server.close()


def usage_partitions(
    s: Settings, args: tuple[Any, ...], kwargs: dict[str, Any], name: str
) -> list[int]:
    """The usage topic's partitions in a rebalance signal's ``revoked``/``assigned`` set
    (positional or by keyword, as faust sends it)."""
    tps: set[Any] = args[0] if args else kwargs.get(name, set())
    return [tp.partition for tp in tps if tp.topic == s.topic_usage]


def run_worker(settings: Settings, loglevel: str = "info") -> int:
    """Run the worker in the foreground until SIGINT/SIGTERM. Returns an exit code."""
    from faust.worker import Worker as FaustWorker

    from pipeline.worker_state import worker_pidfile

    metrics = WorkerMetrics(settings)
    worker = Worker(settings, lambda: Pipeline(settings, metrics=metrics), metrics)
    worker.start_pipeline()
    try:
        with worker_pidfile(settings):
            fw = FaustWorker(worker.app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
            fw.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        worker.stop_pipeline()
    return 0
