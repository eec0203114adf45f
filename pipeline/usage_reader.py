"""Delivery of the usage topic in large batches, on the partitions faust assigned.

faust keeps the group: membership, its assignor (so quota calls still route to the
partition's owner), rebalance signals, web pages, timers and the dead-letter agent. Its
per-message stream machinery costs ~80 us an event, so the usage topic is not read
through it: faust's fetching of that topic is paused, and this reader consumes the same
partitions with confluent-kafka's batch ``consume`` (~1.5 us an event) in a thread of
its own.

Two threads, one batch each at most:

- the *reader* thread consumes batch N+1 and prepares it (``prepare``: decode, validate,
  dedup, rate, build the tables) while
- the *store* thread (the pipeline's executor) writes batch N (``store``) and then
  commits its offsets through the group's member (``commit``; the broker refuses
  commits from a consumer that is not a member).

So offsets are committed only after the sink stored the batch, in batch order. On a
rebalance (``revoke``) the reader stops consuming, drops a prepared batch that was not
handed to the store yet, and waits for the batch being stored; a new assignment
(``assign``) starts each partition after what is already stored (the warehouse's mark,
or the group's committed offset if that is further).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from pipeline.settings import Settings
from pipeline.stages.ingest import RawMessage

log = logging.getLogger(__name__)
P = TypeVar("P")


@dataclass(slots=True)
class ConsumedBatch:
    """Messages of one ``consume`` call, as parallel lists (no object per message)."""

    topic: str
    values: list[bytes]
    partitions: list[int]
    offsets: list[int]
    timestamps: list[int]  # the broker's append time, epoch ms
    consume_cpu_s: float = 0.0  # the reader thread's CPU time to consume it

    def __len__(self) -> int:
        return len(self.values)

    def message(self, i: int) -> RawMessage:
        """Row ``i`` as a ``RawMessage`` (for the scalar paths)."""
        return RawMessage(
            self.topic, self.partitions[i], self.offsets[i], self.timestamps[i], None,
            self.values[i],
        )  # fmt: skip

    def messages(self) -> list[RawMessage]:
        """Every row as a ``RawMessage``."""
        return [self.message(i) for i in range(len(self.values))]

    def next_offsets(self) -> dict[int, int]:
        """Per partition, the offset to commit once this batch is stored (last + 1)."""
        out: dict[int, int] = {}
        for part, off in zip(self.partitions, self.offsets, strict=True):
            if off >= out.get(part, 0):
                out[part] = off + 1
        return out


def consumer_config(settings: Settings) -> dict[str, Any]:
    """The reader's confluent-kafka settings: the group's id (to read its committed
    offsets; it never joins), no automatic commits or offset stores, large fetches."""
    return {
        "bootstrap.servers": settings.kafka_bootstrap,
        "group.id": settings.consumer_group,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": False,
        "fetch.max.bytes": 64 * 1024 * 1024,
        "max.partition.fetch.bytes": 16 * 1024 * 1024,
        "queued.max.messages.kbytes": 256 * 1024,
        "fetch.wait.max.ms": 100,
        "log_level": 3,
    }


def batch_of(topic: str, msgs: list[Any]) -> ConsumedBatch:
    """A ``ConsumedBatch`` from confluent-kafka messages. A message carrying an error is
    logged and skipped (a fatal one raises ``KafkaException``)."""
    values: list[bytes] = []
    partitions: list[int] = []
    offsets: list[int] = []
    timestamps: list[int] = []
    for m in msgs:
        err = m.error()
        if err is not None:
            if err.fatal():
                from confluent_kafka import KafkaException

                raise KafkaException(err)
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("usage reader: %s", err)
            continue
        value = m.value()
        values.append(value if value is not None else b"")
        partitions.append(m.partition())
        offsets.append(m.offset())
        timestamps.append(m.timestamp()[1])
    return ConsumedBatch(topic, values, partitions, offsets, timestamps)


class UsageReader(Generic[P]):
    """The usage topic's consumer thread; see the module docstring.

    ``prepare(batch)`` runs on the reader thread and returns what ``store`` takes (or
    ``None`` for nothing to store); ``store(prepared)`` runs on ``executor`` (the
    pipeline thread) and must raise if the batch is not stored; ``commit(offsets)`` is
    then called on the same thread with {partition: next offset}. ``on_fatal(reason)``
    is called when the reader cannot go on (it must end the process without committing).
    """

    def __init__(
        self,
        settings: Settings,
        prepare: Callable[[ConsumedBatch], P | None],
        store: Callable[[P], object],
        commit: Callable[[dict[int, int]], None],
        executor: Executor,
        on_fatal: Callable[[str], None],
        on_stored: Callable[[object, ConsumedBatch, float], None] | None = None,
        thread_setup: Callable[[], None] | None = None,
    ) -> None:
        self.topic = settings.topic_usage
        self.batch_max = settings.batch_max
        self.within_s = settings.batch_within_s
        self._config = consumer_config(settings)
        self._prepare = prepare
        self._store = store
        self._commit = commit
        self._executor = executor
        self._on_fatal = on_fatal
        self._on_stored = on_stored
        self._thread_setup = thread_setup
        self._cond = threading.Condition()
        self._gen = 0  # bumped by every assign/revoke; a batch of an older one is dropped
        self._applied = 0  # the generation the reader thread has applied
        self._want: dict[int, int | None] | None = None  # partition -> stored mark
        self._assigned: list[int] = []
        self._inflight: Future[object] | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.positions: dict[int, int] = {}  # where each partition started (for tests/logs)

    @property
    def partitions(self) -> list[int]:
        """The usage partitions being read now."""
        return list(self._assigned)

    # ---- control (any thread) --------------------------------------------------
    def start(self) -> None:
        """Start the reader thread (it consumes once partitions are assigned)."""
        self._thread = threading.Thread(target=self._run, name="usage-reader", daemon=True)
        self._thread.start()

    def assign(self, marks: dict[int, int | None]) -> None:
        """Consume these partitions from now on: each from after its stored ``mark``
        (``None``: nothing stored) or from the group's committed offset if further.
        Blocks until the reader thread has applied it."""
        self._change(dict(marks))

    def revoke(self, timeout_s: float = 120.0) -> None:
        """Stop consuming every partition: drop what is prepared but not stored, wait for
        the batch being stored (its commit may then be refused, which is harmless:
        it is stored, and the next owner starts after the warehouse's mark)."""
        self._change({}, timeout_s)
        with self._cond:
            inflight = self._inflight
        if inflight is not None:
            try:
                inflight.result(timeout=timeout_s)
            except Exception:  # noqa: BLE001 - the store reported it (and ended the process)
                log.debug("the batch in flight failed during a revoke", exc_info=True)

    def stop(self, timeout_s: float = 120.0) -> None:
        """Stop the thread after the batch being stored; nothing else is committed."""
        self.revoke(timeout_s)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _change(self, want: dict[int, int | None], timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._gen += 1
            gen = self._gen
            self._want = want
            self._cond.notify_all()
            # applied at the top of the reader's loop, i.e. when no consume or prepare of
            # the old assignment is running any more
            while self._applied < gen and self._thread is not None:
                if self._stopping or not self._thread.is_alive():
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the usage reader did not take a new assignment")
                self._cond.wait(min(left, 0.2))

    # ---- the reader thread -----------------------------------------------------
    def _run(self) -> None:
        if self._thread_setup is not None:
            self._thread_setup()
        consumer = Consumer(self._config)
        try:
            self._loop(consumer)
        except Exception as exc:  # noqa: BLE001 - any failure here means "cannot go on"
            log.exception("usage reader failed")
            self._on_fatal(f"the usage reader failed: {exc}")
        finally:
            consumer.close()

    def _loop(self, consumer: Consumer) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                if self._want is not None:
                    ahead = self._apply(consumer, self._want)
                    self._want = None
                    self._applied = self._gen
                    self._cond.notify_all()
                    if ahead:
                        # The group's offsets may lag what is stored (a rewound group, a
                        # crash between store and commit, a tail of dead letters): move
                        # them up, after the rebalance (on the store thread, in order).
                        self._inflight = self._executor.submit(
                            self._commit_if_current, ahead, self._gen
                        )
                if not self._assigned:
                    self._cond.wait(0.2)
                    continue
                gen = self._gen
            cpu = time.thread_time()
            msgs = consumer.consume(num_messages=self.batch_max, timeout=self.within_s)
            batch = batch_of(self.topic, msgs) if msgs else None
            if batch is not None:
                batch.consume_cpu_s = time.thread_time() - cpu
            prepared = self._prepare(batch) if batch else None
            if batch is None:
                continue
            previous = self._inflight
            if previous is not None:
                previous.result()  # one batch stored at a time, in order
            with self._cond:
                if self._gen != gen:
                    continue  # revoked or reassigned meanwhile: not stored, not committed
                self._inflight = self._executor.submit(self._store_and_commit, prepared, batch, gen)

    def _apply(self, consumer: Consumer, marks: dict[int, int | None]) -> dict[int, int]:
        """Assign (or, for no marks, unassign) the consumer; returns the partitions whose
        start is beyond the group's committed offset, with that start."""
        if not marks:
            if self._assigned:
                consumer.unassign()
                log.info("usage reader: released partitions %s", self._assigned)
            self._assigned = []
            return {}
        parts = sorted(marks)
        committed = consumer.committed([TopicPartition(self.topic, p) for p in parts], 30)
        starts = []
        ahead: dict[int, int] = {}
        for tp in committed:
            mark = marks[tp.partition]
            start = max(tp.offset, (mark + 1) if mark is not None else OFFSET_BEGINNING)
            if start > max(tp.offset, 0):
                ahead[tp.partition] = start
            starts.append(TopicPartition(self.topic, tp.partition, start))
            self.positions[tp.partition] = start
        consumer.assign(starts)
        self._assigned = parts
        log.info(
            "usage reader: consuming %s",
            ", ".join(f"{tp.partition}@{tp.offset}" for tp in starts),
        )
        return ahead

    def _commit_if_current(self, offsets: dict[int, int], gen: int) -> None:
        with self._cond:
            if self._gen != gen:
                return
        self._commit(offsets)

    def _store_and_commit(self, prepared: P | None, batch: ConsumedBatch, gen: int) -> object:
        with self._cond:
            if self._gen != gen:
                return None  # revoked before it could be stored: a later owner replays it
        started = time.monotonic()
        result = self._store(prepared) if prepared is not None else None
        self._commit(batch.next_offsets())
        if self._on_stored is not None:
            self._on_stored(result, batch, time.monotonic() - started)
        return result
