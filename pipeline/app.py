"""The faust-streaming app, wired explicitly: ``create_app(settings)`` builds it, nothing
happens at import time.

The usage topic is read by ``UsageReader`` (``pipeline/usage_reader.py``): faust keeps
the group (membership, assignor, rebalance signals), its fetching of that topic is
paused, and a confluent-kafka consumer in a thread reads the partitions faust assigned in
large batches. Each batch is stored by ``Pipeline.process_usage`` on the pipeline thread
and only then committed, through faust's consumer (the group's member). A batch that
could not be stored ends the process at once (``_crash``), without committing: the
restart replays it, and the sink's offset marks keep the replay from counting anything
twice. The ``dead_letters`` agent consumes ``usage-dead-letters`` with faust
(``take_events``; acked, hence committed, only after ``process_dead_letters`` returned)
and mirrors it into the table.

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
from faust.types import TP, EventT, StreamT
from mode.types.signals import BaseSignalT

from pipeline.metrics import WorkerMetrics
from pipeline.runtime import BatchReport, Pipeline
from pipeline.settings import Settings
from pipeline.stages.columnar import PreparedUsage
from pipeline.stages.ingest import RawMessage
from pipeline.usage_reader import ConsumedBatch, UsageReader

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
        self.reader: UsageReader[PreparedUsage] = UsageReader(
            settings,
            prepare=self._prepare_usage,
            store=self._store_usage,
            commit=self._commit_usage,
            executor=self.executor,
            on_fatal=_crash,
            on_stored=self._observe_usage,
            thread_setup=self._lower_priority,
        )

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            raise RuntimeError("pipeline not started")
        return self._pipeline

    async def on_pipeline(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the pipeline thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, fn, *args)

    # ---- the usage topic: UsageReader callbacks ------------------------------------
    def _prepare_usage(self, batch: ConsumedBatch) -> PreparedUsage:
        """On the reader thread, while the pipeline thread stores the batch before."""
        return self.pipeline.prepare_usage(batch)

    def _store_usage(self, prepared: PreparedUsage) -> BatchReport:
        """On the pipeline thread: store one batch; a batch that could not be stored ends
        the process without committing (the restart replays it)."""
        try:
            return self.pipeline.store_usage(prepared)
        except Exception as exc:  # noqa: BLE001 - an unstored batch must never be committed
            log.exception("batch failed")
            _crash(f"batch of {prepared.consumed} could not be stored: {exc}")
            raise

    def _commit_usage(self, offsets: dict[int, int]) -> None:
        """On the pipeline thread, after the store: commit through faust's consumer, the
        group's member (the broker refuses commits from a non-member). Not waited for:
        commits run in the order they are handed over, and the store of the next batch
        need not wait for the broker's answer. A refusal after a rebalance is harmless:
        the batch is stored, and the next owner starts after it."""
        topic = self.settings.topic_usage
        tps = {TP(topic, p): off for p, off in offsets.items()}
        # faust's Consumer: ``_commit`` commits the given offsets through the member
        consumer: Any = self.app.consumer
        future = asyncio.run_coroutine_threadsafe(consumer._commit(tps), self.app.loop)

        def done(f: Any) -> None:
            if f.cancelled():
                log.info("usage offsets %s not committed (stopping)", offsets)
            elif f.exception() is not None:
                log.warning("usage offsets %s not committed: %r", offsets, f.exception())
            elif not f.result():
                log.info("usage offsets %s not committed (rebalanced meanwhile)", offsets)

        future.add_done_callback(done)

    def _observe_usage(self, result: object, batch: ConsumedBatch, seconds: float) -> None:
        self.stats.add(len(batch), seconds)
        if isinstance(result, BatchReport):
            self.metrics.observe_batch(result, seconds)

    async def _pause_faust_fetch(self, partitions: list[int]) -> None:
        """Stop faust (and its aiokafka consumer, whose fetcher would otherwise keep
        reading the topic) from fetching these usage partitions."""
        topic = self.settings.topic_usage
        tps = {TP(topic, p) for p in partitions}
        consumer: Any = self.app.consumer
        consumer.pause_partitions(tps)
        if not getattr(consumer, "_tokenmeter_usage_quiet", False):
            # faust's livelock check would log an error every few seconds, after
            # stream_processing_timeout, that aiokafka sends no fetch for these partitions:
            # true and intended. The check stays on for every other topic.
            check = consumer.verify_event_path

            def verify_event_path(now: float, tp: TP) -> None:
                if tp.topic != topic:
                    check(now, tp)

            consumer.verify_event_path = verify_event_path
            consumer._tokenmeter_usage_quiet = True
        thread = getattr(consumer, "_thread", None)
        if thread is None:
            return

        async def pause_in_aiokafka() -> None:
            from aiokafka.structs import TopicPartition as AioTP

            aio = thread._ensure_consumer()
            mine = {AioTP(topic, p) for p in partitions} & aio.assignment()
            aio.pause(*mine)

        await thread.call_thread(pause_in_aiokafka)

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
            # This agent holds faust's subscription of the usage topic (membership, the
            # assignor, quota routing), but faust's fetching of it is paused on every
            # assignment and the UsageReader consumes it in batches. A message that
            # reached faust before the pause is never acked (noack), so faust never
            # commits an offset of this topic: only the reader does, after the store.
            async for _event in cast(Stream, stream).noack():
                pass

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
                # stop reading, drop the batch not stored yet, wait for the one being stored
                await asyncio.get_running_loop().run_in_executor(None, self.reader.revoke)
                await self.on_pipeline(self.pipeline.release_usage_partitions, parts)

        @app.on_partitions_assigned.connect
        async def on_assigned(
            sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any
        ) -> None:
            parts = usage_partitions(s, args, kwargs, "assigned")
            if parts and self._pipeline is not None:
                await self._pause_faust_fetch(parts)
                marks = await self.on_pipeline(self.pipeline.take_usage_partitions, parts)
                await asyncio.get_running_loop().run_in_executor(None, self.reader.assign, marks)
                await self.quota.on_partitions_assigned(parts)
            self._send_routes()

        @app.task
        async def start_quota() -> None:
            await self.quota.start()

        @app.on_before_shutdown.connect
        async def stop_quota(
            sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any
        ) -> None:
            if self._pipeline is not None:
                self._pipeline.stopping = True  # a sink retrying gives up; nothing commits
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
        self.reader.start()

    def stop_pipeline(self) -> None:
        """Release the warehouse (after the app stopped), then stop the quota server."""
        if self._pipeline is not None:
            self._pipeline.stopping = True  # a sink retrying gives up: nothing is committed
        self.reader.stop()
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
