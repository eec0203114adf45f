"""The quota service: running usage and threshold alerts in the worker; reservations
in the quota server.

Two processes
-------------
In the worker, the service keeps usage, definitions, thresholds, alerts and webhooks,
and mirrors every change of usage, definitions and partitions to the quota server
(``replica``: ``link.QuotaServerProcess``), in the order it makes them. The quota server
(``quotad/``, a Go program) holds the reservations and their journal and answers the
four HTTP calls; its ledgers follow the rules of ``pipeline/metering/quota.py``.

Without a replica (unit tests), this service also does what the quota server does,
with the ledgers of ``pipeline/metering/quota.py``: ``get``, ``reserve``, ``commit``,
``release`` and the journal. That reference is what ``tests/unit/test_quota_parity.py``
holds the Go server to, call for call.

Threads and order
-----------------
Everything lives in the worker's event loop and is changed only there, by plain
synchronous methods: each call runs to completion before the next one starts, so
"never past the limit" holds whatever the number of concurrent clients, without locks.

The pipeline thread reports usage: ``on_rated_batch(rated)`` is called after a batch's
``usage_events`` rows are stored. It sums the batch per tenant and Beijing day and
hands the result to the loop with ``call_soon_threadsafe``. Restoring usage after a
(re)assignment runs a query on the pipeline thread too and hands its result over the
same way, so the loop sees "restore" and "batch" updates in the order the pipeline
stored them; a restore *sets* usage (it does not add), so a batch stored before it is
not counted twice and one stored after it is added exactly once.

What survives a restart
-----------------------
* usage: re-read from ``usage_events`` (billable ``token_units`` per tenant and Beijing
  day of the current and previous period) when the worker takes a partition;
* open reservations and commits awaiting their usage event: the journal
  (``journal.py``), replayed at start; holds whose event is meanwhile stored are dropped;
* emitted thresholds: the ids on the ``quota-events`` topic and in ``quota_events``.

Exactly once per threshold per period
-------------------------------------
A crossing is *derived*: thresholds reached by stored usage, minus those already
emitted. Its id is deterministic (``crossing_id``). The worker publishes an id to
``quota-events`` only if the id is neither on the topic (read at start) nor in
``quota_events``, waits for the broker's acknowledgement, then writes the table row
(insert_deduplication_token = the id). Killed before the publish: the restart re-derives
the crossing and publishes it. Killed after it: the restart finds the id on the topic
and only completes the table row. So the topic and the table get each crossing once.
The one window left is a message still in flight inside the killed process's socket
when the restarted worker reads the topic (seconds earlier); consumers can always
de-duplicate by ``event_id``. Webhooks are at-least-once (HTTP cannot do better):
each attempt is recorded in ``webhook_deliveries`` and a restart resumes the ones
without a final outcome; receivers de-duplicate with ``X-Tokenmeter-Event-Id``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import itertools
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import KafkaException

from pipeline.events import pseudonymise
from pipeline.metering.plans import period_key
from pipeline.metering.quota import (
    MAX_TTL_S,
    ZERO,
    BadAmountError,
    Crossing,
    Grant,
    Hold,
    NoQuotaError,
    QuotaDefinition,
    QuotaError,
    QuotaKey,
    QuotaLedger,
    QuotaStatus,
    ReservationNotFoundError,
    Settlement,
    Usage,
    fmt,
    period_start_ms,
)
from pipeline.quota.alerts import AlertPublisher, PublishError, decode_alert, quota_events_table
from pipeline.quota.definitions import DefinitionChange
from pipeline.quota.journal import Journal, JournalHold
from pipeline.quota.journal import journal_path as default_journal_path
from pipeline.quota.webhooks import Attempt, WebhookDispatcher, load_webhooks
from pipeline.settings import Settings
from pipeline.stack import StackError
from pipeline.warehouse.base import Warehouse, WarehouseError, quote_literal

if TYPE_CHECKING:
    from pipeline.metrics import WorkerMetrics
    from pipeline.stages.rate import Rated

log = logging.getLogger("tokenmeter.quota")

RunBlocking = Callable[..., Awaitable[Any]]
_SUB_KEY = re.compile(r"^(.*)/(sub_[0-9a-f]{32})$")
_DAY_MS = 86_400_000
_BEIJING_MS = 8 * 3_600_000
# what a start attempt raises while Kafka or the warehouse is away: retried with backoff
_START_RETRIED = (KafkaException, StackError, TimeoutError, WarehouseError, OSError, RuntimeError)
RESERVATION_PREFIX = "rsv_"

_QUOTAS_SCHEMA = pa.schema(
    [
        ("tenant_id", pa.string()),
        ("subscriber_id", pa.string()),
        ("period", pa.string()),
        ("limit_tu", pa.decimal128(38, 6)),
        ("limit_cny", pa.decimal128(38, 6)),
        ("thresholds", pa.list_(pa.decimal128(9, 2))),
        ("hard", pa.bool_()),
        ("deleted", pa.bool_()),
        ("updated_at", pa.timestamp("ms", tz="UTC")),
        ("version", pa.uint64()),
    ]
)
_DELIVERIES_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("webhook", pa.string()),
        ("url", pa.string()),
        ("attempt", pa.uint32()),
        ("status", pa.string()),
        ("http_status", pa.uint16()),
        ("error", pa.string()),
        ("duration_ms", pa.float64()),
        ("attempted_at", pa.timestamp("ms", tz="UTC")),
        ("next_attempt_at", pa.timestamp("ms", tz="UTC")),
    ]
)


class Replica(Protocol):
    """The quota server process that holds the reservations (``pipeline/quota/link.py``):
    the worker's service mirrors every change of usage, definitions and partitions to it,
    in the order it makes them."""

    def send(self, message: tuple[Any, ...]) -> None:
        """Queue one change for the server (never blocks)."""

    async def pending_ids(self) -> list[str]:
        """The event ids of the server's pending commits (after every change sent before)."""
        ...

    @property
    def open_reservations(self) -> int:
        """The server's count of open reservations (its last report)."""
        ...


class NotReadyError(QuotaError):
    """The service cannot answer for this tenant yet (starting, or its partition's
    usage is being restored, or another worker owns it). Retry shortly: HTTP 503."""


def key_from_topic_key(text: str) -> QuotaKey:
    """``tenant`` or ``tenant/sub_<hex>`` -> QuotaKey."""
    m = _SUB_KEY.match(text)
    return QuotaKey(m.group(1), m.group(2)) if m else QuotaKey(text)


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _unb64(text: str) -> str:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()


_ID_PREFIX = secrets.token_hex(4)  # per process: ids from two workers never collide
_ID_SEQ = itertools.count(1)


def reservation_id(key: QuotaKey) -> str:
    """A new reservation id that names its quota (so any worker can route it):
    ``rsv_<b64 tenant>.<b64 subscriber>.<process prefix><sequence, hex>``. Unique, not
    secret: the API has no authentication to protect (it listens on 127.0.0.1)."""
    token = f"{_ID_PREFIX}{next(_ID_SEQ):08x}"
    return f"{RESERVATION_PREFIX}{_b64(key.tenant_id)}.{_b64(key.subscriber_id)}.{token}"


def wall_clock_ms() -> int:
    """Epoch milliseconds (the service's default clock; cheaper than datetime)."""
    return time.time_ns() // 1_000_000


def parse_reservation_id(res_id: str) -> QuotaKey:
    """The quota a reservation id belongs to; ``ReservationNotFoundError`` if malformed."""
    if not res_id.startswith(RESERVATION_PREFIX):
        raise ReservationNotFoundError(f"not a reservation id: {res_id!r}")
    parts = res_id[len(RESERVATION_PREFIX) :].split(".")
    if len(parts) != 3:
        raise ReservationNotFoundError(f"not a reservation id: {res_id!r}")
    try:
        return QuotaKey(_unb64(parts[0]), _unb64(parts[1]))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ReservationNotFoundError(f"not a reservation id: {res_id!r}") from None


def murmur2_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (Java, librdkafka murmur2, aiokafka)
    gives a key."""
    from aiokafka.partitioner import murmur2

    return int((murmur2(key) & 0x7FFFFFFF) % partitions)


@dataclass(frozen=True, slots=True)
class RatedItem:
    """One stored, rated event of a tenant with a quota definition."""

    tenant_id: str
    subscriber_id: str
    event_ms: int
    tu: Decimal
    cny: Decimal
    event_id: str
    partition: int


@dataclass(slots=True)
class _DaySum:
    tu: Decimal = ZERO
    cny: Decimal = ZERO
    event_ids: list[str] = field(default_factory=list)


_Agg = dict[tuple[str, int, str], _DaySum]  # (tenant, partition, Beijing day)


class QuotaService:
    """Quota enforcement for the tenants whose usage partitions this worker owns."""

    def __init__(
        self,
        settings: Settings,
        run_blocking: RunBlocking,
        warehouse: Callable[[], Warehouse],
        *,
        pseudonym_key: bytes,
        webhooks_path: Path | None = None,
        journal_path: Path | None = None,
        pending_ttl_s: float = 300.0,
        partitions: int | None = None,
        kafka: bool = True,
        clock: Callable[[], int] = wall_clock_ms,
        replica: Replica | None = None,
        metrics: WorkerMetrics | None = None,
        kafka_timeout_s: float = 30.0,
    ) -> None:
        """``run_blocking(fn, *args)`` runs ``fn`` on the pipeline thread (the one that
        owns the warehouse) and returns its result; ``warehouse()`` returns the
        pipeline's warehouse (only called on that thread). ``kafka=False`` (tests)
        publishes nothing and reads no topic. ``partitions`` is the usage topic's
        partition count (read from Kafka at start when ``None``).

        With ``replica`` (the worker) it keeps usage, definitions and alerts, holds no
        reservation and no journal, and mirrors every change to the quota server.
        Without one (unit tests) it also holds the reservations and the journal.
        ``metrics``: where webhook delivery attempts are counted. ``kafka_timeout_s``:
        how long one start attempt waits for Kafka before it is retried."""
        self.settings = settings
        self.kafka_timeout_s = kafka_timeout_s
        self._run = run_blocking
        self._warehouse = warehouse
        self._key = pseudonym_key
        self.kafka = kafka
        self.clock = clock
        self.pending_ttl_ms = int(pending_ttl_s * 1000)
        self.replica = replica
        self.webhooks = load_webhooks(
            webhooks_path
            if webhooks_path is not None
            else settings.data_path / "quota_webhooks.yaml",
            allow_private=settings.webhook_allow_private,
        )
        self.journal: Journal | None = (
            None if replica is not None else Journal(journal_path or default_journal_path(settings))
        )
        self._journal_replayed = False
        self.partitions = partitions
        self.ledgers: dict[QuotaKey, QuotaLedger] = {}
        self.definitions: dict[QuotaKey, QuotaDefinition] = {}
        self._defined_tenants: frozenset[str] = frozenset()
        self._sub_keys: frozenset[QuotaKey] = frozenset()
        self._ready_parts: set[int] = set()
        self._synced_subs: set[QuotaKey] = set()
        self._partition_cache: dict[str, int] = {}
        self._day_keys: dict[int, str] = {}
        self.published: set[str] = set()  # alert ids on the quota-events topic
        self.recorded: set[str] = set()  # alert ids in quota_events
        self._outbox: list[Crossing] = []
        self._outbox_event = asyncio.Event()
        self._table_alerts: list[tuple[dict[str, Any], int]] = []
        self._attempts: list[Attempt] = []
        self._quota_rows: list[dict[str, Any]] = []
        self._mirrored_version = -1
        self._pending_webhooks: list[tuple[dict[str, Any], dict[str, int]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._assigned: set[int] = set()
        self._follower: Any = None
        self.publisher: AlertPublisher | None = None
        self.metrics = metrics
        self.dispatcher = WebhookDispatcher(
            self.webhooks, self._record_attempt, allow_private=settings.webhook_allow_private
        )
        self.started = False
        self._emit_ready = False
        self._stopping = False
        self.alert_latency_ms: list[float] = []  # detection -> broker ack, for metrics

    def _record_attempt(self, attempt: Attempt) -> None:
        self._attempts.append(attempt)  # written to webhook_deliveries by the table writer
        if self.metrics is not None:
            self.metrics.observe_webhook_delivery(attempt.status)

    # ---- keys, partitions, readiness ----------------------------------------------
    def quota_key(self, tenant_id: str, subscriber_id: str | None = None) -> QuotaKey:
        """The key for a tenant (and optionally a raw or pseudonymised subscriber id)."""
        if subscriber_id:
            return QuotaKey(tenant_id, pseudonymise(subscriber_id, self._key))
        return QuotaKey(tenant_id)

    def partition_of(self, tenant_id: str) -> int:
        """The usage-topic partition of a tenant (its events' key is the tenant id)."""
        found = self._partition_cache.get(tenant_id)
        if found is None:
            found = murmur2_partition(tenant_id.encode(), self.partitions or 1)
            if len(self._partition_cache) < 1_000_000:
                self._partition_cache[tenant_id] = found
        return found

    def owns(self, tenant_id: str) -> bool:
        """Whether this worker has restored (and so serves) the tenant's partition."""
        return self.partition_of(tenant_id) in self._ready_parts

    def _ledger(self, key: QuotaKey, partition: int | None = None) -> QuotaLedger:
        ledger = self.ledgers.get(key)
        if ledger is None:
            ledger = QuotaLedger(
                key,
                self.definitions.get(key),
                pending_ttl_ms=self.pending_ttl_ms,
                partition=partition if partition is not None else self.partition_of(key.tenant_id),
            )
            self.ledgers[key] = ledger
        return ledger

    def _ledgers_for(self, key: QuotaKey) -> list[QuotaLedger]:
        """The ledgers a request on ``key`` acts on: the subscriber's (if any) and the
        tenant's. Raises ``NoQuotaError`` / ``NotReadyError``."""
        if not self.started:
            raise NotReadyError("the quota service is starting; retry shortly")
        if key not in self.definitions:
            who = f"subscriber {key.subscriber_id} of tenant" if key.subscriber_id else "tenant"
            raise NoQuotaError(f"no quota defined for {who} {key.tenant_id}")
        if not self.owns(key.tenant_id):
            raise NotReadyError(
                f"usage of tenant {key.tenant_id} is not loaded on this worker yet; retry shortly"
            )
        if key.subscriber_id and key not in self._synced_subs:
            raise NotReadyError(f"usage of {key} is being loaded; retry shortly")
        out = [self._ledger(key)]
        tenant = QuotaKey(key.tenant_id)
        if key.subscriber_id and tenant in self.definitions:
            out.append(self._ledger(tenant))
        return out

    # ---- the four calls ---------------------------------------------------------------
    def get(self, tenant_id: str, subscriber_id: str | None = None) -> QuotaStatus:
        """The quota's figures for its current period."""
        return self._ledgers_for(self.quota_key(tenant_id, subscriber_id))[0].status(self.clock())

    def reserve(
        self,
        tenant_id: str,
        token_units: Decimal,
        ttl_s: float,
        subscriber_id: str | None = None,
    ) -> Grant:
        """Grant up to ``token_units`` for ``ttl_s`` seconds (hard: never past the limit
        of the subscriber's or the tenant's quota)."""
        if not 0 < ttl_s <= MAX_TTL_S:
            raise BadAmountError(f"ttl_s: must be in (0, {MAX_TTL_S}]")
        key = self.quota_key(tenant_id, subscriber_id)
        ledgers = self._ledgers_for(key)
        now = self.clock()
        granted = token_units
        for ledger in ledgers:
            if ledger.definition is not None and ledger.definition.hard:
                granted = min(granted, ledger.available(now))
        res_id = reservation_id(key)
        ttl_ms = int(ttl_s * 1000)
        grants = [ledger.reserve(res_id, granted, ttl_ms, now) for ledger in ledgers]
        first = grants[0]
        grant = Grant(
            first.reservation_id,
            token_units,
            first.granted,
            first.expires_ms,
            any(g.over_limit for g in grants),
        )
        if grant.reservation_id is not None and self.journal is not None:
            self.journal.reserved(key, res_id, grant.granted, grant.expires_ms)
        return grant

    def commit(self, res_id: str, token_units: Decimal, event_id: str | None = None) -> Settlement:
        """Settle a reservation with what was used; the rest is released."""
        key = parse_reservation_id(res_id)
        ledgers = self._ledgers_for_reservation(key, res_id)
        now = self.clock()
        outcome = ledgers[0].commit(res_id, token_units, now, event_id)
        for other in ledgers[1:]:
            with contextlib.suppress(QuotaError):
                other.commit(res_id, token_units, now, event_id)
        if outcome.at_ms == now and self.journal is not None:  # not a repeated answer
            self.journal.committed(res_id, token_units, event_id, now + self.pending_ttl_ms)
        return outcome

    def release(self, res_id: str) -> Settlement:
        """Give a reservation back."""
        key = parse_reservation_id(res_id)
        ledgers = self._ledgers_for_reservation(key, res_id)
        now = self.clock()
        outcome = ledgers[0].release(res_id, now)
        for other in ledgers[1:]:
            with contextlib.suppress(QuotaError):
                other.release(res_id, now)
        if outcome.at_ms == now and self.journal is not None:
            self.journal.released(res_id)
        return outcome

    def _ledgers_for_reservation(self, key: QuotaKey, res_id: str) -> list[QuotaLedger]:
        try:
            return self._ledgers_for(key)
        except NoQuotaError:
            # The definition was deleted while the reservation was open: settle it anyway.
            ledger = self.ledgers.get(key)
            if ledger is None or (res_id not in ledger.holds and res_id not in ledger._settled):
                raise ReservationNotFoundError(f"no open reservation {res_id}") from None
            return [ledger]

    # ---- usage from the pipeline (pipeline thread) ----------------------------------------
    def _day(self, ms: int) -> str:
        index = (ms + _BEIJING_MS) // _DAY_MS
        found = self._day_keys.get(index)
        if found is None:
            found = period_key(ms, "day")
            if len(self._day_keys) > 4096:
                self._day_keys.clear()
            self._day_keys[index] = found
        return found

    def on_rated_batch(self, rated: Sequence[Rated]) -> None:
        """Count a stored batch (called on the pipeline thread, after ``usage_events``
        was written). Tenants with a definition get per-event items (exact threshold
        triggers); the others a sum per tenant and day."""
        if not rated:
            return
        loop = self._loop
        if loop is None:
            raise RuntimeError("QuotaService.start() or on_partitions_assigned() must run first")
        defined = self._defined_tenants
        singles: list[RatedItem] = []
        agg: _Agg = {}
        for r in rated:
            rec = r.accepted.record
            tenant = rec["tenant_id"]
            rating = r.rating
            tu = rating.token_units if rating.billable else ZERO
            if tenant in defined:
                singles.append(
                    RatedItem(
                        tenant,
                        rec["subscriber_id"],
                        rec["event_time"],
                        tu,
                        rating.amount,
                        rec["event_id"],
                        r.accepted.partition,
                    )
                )
                continue
            k = (tenant, r.accepted.partition, self._day(rec["event_time"]))
            s = agg.get(k)
            if s is None:
                s = agg[k] = _DaySum()
            s.tu += tu
            s.cny += rating.amount
            s.event_ids.append(rec["event_id"])
        loop.call_soon_threadsafe(self._apply, singles, agg)

    def on_rated_columns(self, events: pa.Table, tu_micro: Any, cny_micro: Any) -> None:
        """``on_rated_batch`` for a stored columnar batch: ``events`` has ``tenant_id``,
        ``subscriber_id``, ``event_time`` (epoch ms), ``event_id`` and ``partition``;
        ``tu_micro``/``cny_micro`` (int64 numpy) are each event's billable TU and amount in
        micro-units. Tenants with a definition get per-event items, the others one sum
        per (tenant, partition, Beijing day), summed in integers."""
        if events.num_rows == 0:
            return
        loop = self._loop
        if loop is None:
            raise RuntimeError("QuotaService.start() or on_partitions_assigned() must run first")
        tenant = events.column("tenant_id")
        defined = self._defined_tenants
        single = (
            np.asarray(
                pc.fill_null(
                    pc.is_in(tenant, value_set=pa.array(sorted(defined), pa.string())), False
                ).to_numpy(zero_copy_only=False),
                dtype=bool,
            )
            if defined
            else np.zeros(events.num_rows, dtype=bool)
        )
        singles: list[RatedItem] = []
        for i in np.flatnonzero(single):
            row = events.slice(int(i), 1).to_pylist()[0]
            singles.append(
                RatedItem(
                    row["tenant_id"],
                    row["subscriber_id"],
                    int(row["event_time"]),
                    Decimal(int(tu_micro[i])).scaleb(-6),
                    Decimal(int(cny_micro[i])).scaleb(-6),
                    row["event_id"],
                    int(row["partition"]),
                )
            )
        agg: _Agg = {}
        rest = np.flatnonzero(~single)
        if rest.size:
            ms = np.asarray(events.column("event_time").to_numpy(), dtype=np.int64)[rest]
            days = (ms + _BEIJING_MS) // _DAY_MS
            work = pa.table(
                {
                    "tenant": tenant.take(rest),
                    "partition": events.column("partition").take(rest),
                    "day": pa.array(days),
                    "tu": pa.array(tu_micro[rest]),
                    "cny": pa.array(cny_micro[rest]),
                    "event_id": events.column("event_id").take(rest),
                }
            )
            grouped = work.group_by(["tenant", "partition", "day"], use_threads=False).aggregate(
                [("tu", "sum"), ("cny", "sum"), ("event_id", "list"), ("day", "min")]
            )
            day_ms = {int(d): int(m) for d, m in zip(days, ms, strict=True)}
            for t, p, d, tu, cny, ids in zip(
                *(
                    grouped.column(c).to_pylist()
                    for c in ("tenant", "partition", "day", "tu_sum", "cny_sum", "event_id_list")
                ),
                strict=True,
            ):
                agg[(t, int(p), self._day(day_ms[int(d)]))] = _DaySum(
                    Decimal(tu).scaleb(-6), Decimal(cny).scaleb(-6), ids
                )
        loop.call_soon_threadsafe(self._apply, singles, agg)

    def _apply(self, singles: list[RatedItem], agg: _Agg) -> None:
        if self.replica is not None:
            self.replica.send(("apply", singles, agg))
        now = self.clock()
        for (tenant, part, day), s in agg.items():
            self._ledger(QuotaKey(tenant), part).add_period_usage(day, s.tu, s.cny, s.event_ids)
        for it in singles:
            ledger = self._ledger(QuotaKey(it.tenant_id), it.partition)
            ledger.add_usage(it.event_ms, it.tu, it.cny, it.event_id, now)
            self._check(ledger, now, it.event_id)
            sub = self.ledgers.get(QuotaKey(it.tenant_id, it.subscriber_id))
            if sub is not None:
                sub.add_usage(it.event_ms, it.tu, it.cny, it.event_id, now)
                self._check(sub, now, it.event_id)

    def _check(self, ledger: QuotaLedger, now: int, trigger: str | None = None) -> None:
        if not self._emit_ready or ledger.definition is None:
            return
        if ledger.partition not in self._ready_parts:
            return
        crossed = ledger.crossings(now, trigger)
        if crossed:
            self._outbox.extend(crossed)
            self._outbox_event.set()

    # ---- restoring usage ---------------------------------------------------------------
    def _since_ms(self, now: int) -> int:
        # the previous day and the previous month are kept (late events, roll-over)
        month = period_start_ms(now, "month")
        previous_month = period_start_ms(month - 1, "month")
        return min(previous_month, period_start_ms(now, "day") - _DAY_MS)

    def _usage_query(self, where: str, since: int, by_subscriber: bool) -> pa.Table:
        sub = "subscriber_id, " if by_subscriber else ""
        return self._warehouse().query_arrow(
            f"SELECT tenant_id, {sub}partition, "
            "toString(toDate(event_time, 'Asia/Shanghai')) AS day, "
            "sumIf(token_units, billable) AS tu, sumIf(amount, billable) AS cny "
            f"FROM usage_events WHERE topic = {quote_literal(self.settings.topic_usage)} "
            f"AND event_time >= fromUnixTimestamp64Milli({since}) AND {where} "
            f"GROUP BY tenant_id, {sub}partition, day"
        )

    def _restore_sync(
        self,
        parts: list[int],
        sub_keys: list[QuotaKey],
        pending_ids: list[str],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """On the pipeline thread: read stored usage of ``parts`` (all tenants) and of
        ``sub_keys``, and which pending events are stored; post the result to the loop."""
        since = self._since_ms(self.clock())
        tenant_rows: list[tuple[str, str, int, str, Decimal, Decimal]] = []
        if parts:
            t = self._usage_query(
                f"partition IN ({', '.join(str(p) for p in parts)})", since, False
            )
            for tenant, part, day, tu, cny in zip(
                *(t.column(i).to_pylist() for i in range(5)), strict=True
            ):
                tenant_rows.append((tenant, "", int(part), day, tu or ZERO, cny or ZERO))
        if sub_keys:
            pairs = ", ".join(
                f"({quote_literal(k.tenant_id)}, {quote_literal(k.subscriber_id)})"
                for k in sub_keys
            )
            t = self._usage_query(f"(tenant_id, subscriber_id) IN ({pairs})", since, True)
            for tenant, sub, part, day, tu, cny in zip(
                *(t.column(i).to_pylist() for i in range(6)), strict=True
            ):
                tenant_rows.append((tenant, sub, int(part), day, tu or ZERO, cny or ZERO))
        landed: set[str] = set()
        for start in range(0, len(pending_ids), 5000):
            chunk = pending_ids[start : start + 5000]
            t = self._warehouse().query_arrow(
                "SELECT DISTINCT event_id FROM usage_events WHERE event_id IN ("
                + ", ".join(quote_literal(e) for e in chunk)
                + ")"
            )
            landed.update(t.column(0).to_pylist() if t.num_rows else [])
        loop.call_soon_threadsafe(self._install, parts, sub_keys, tenant_rows, landed)

    def _install(
        self,
        parts: list[int],
        sub_keys: list[QuotaKey],
        rows: list[tuple[str, str, int, str, Decimal, Decimal]],
        landed: set[str],
    ) -> None:
        if self.replica is not None:
            self.replica.send(("install", parts, sub_keys, rows, landed))
        fresh: dict[QuotaKey, tuple[int, dict[str, Usage]]] = {}
        for tenant, sub, part, day, tu, cny in rows:
            key = QuotaKey(tenant, sub)
            _, usage = fresh.setdefault(key, (part, {}))
            for period in (day, day[:7]):
                bucket = usage.setdefault(period, Usage())
                bucket.tu += Decimal(tu)
                bucket.cny += Decimal(cny)
        part_set = set(parts)
        sub_set = set(sub_keys)
        for key, ledger in self.ledgers.items():
            restored = (not key.subscriber_id and ledger.partition in part_set) or key in sub_set
            if restored and key not in fresh:
                ledger.set_usage({})
        for key, (part, usage) in fresh.items():
            self._ledger(key, part).set_usage(usage)
        if landed:
            for ledger in self.ledgers.values():
                if ledger.holds:
                    ledger.settle_landed(landed)
        # a partition revoked while its restore was queued stays unserved
        self._ready_parts |= part_set & self._assigned
        self._synced_subs |= sub_set
        now = self.clock()
        for key in list(self.definitions):
            found = self.ledgers.get(key)
            if found is not None and (found.partition in part_set or key in sub_set):
                self._check(found, now)
        if not (parts or sub_keys):
            return
        log.info(
            "quota usage restored: partitions %s, %d subscriber quotas, %d keys",
            sorted(part_set),
            len(sub_set),
            len(fresh),
        )

    def _pending_ids(self) -> list[str]:
        ids: list[str] = []
        for ledger in self.ledgers.values():
            if ledger.pending:
                ids.extend(ledger.pending_event_ids())
        return ids

    async def on_partitions_assigned(self, partitions: Sequence[int], wait: bool = False) -> None:
        """The worker took these usage partitions: restore their usage (a query on the
        pipeline thread, in order with its batches), then serve their tenants. Returns at
        once (a rebalance is not held up by a batch in progress) unless ``wait``."""
        self._loop = asyncio.get_running_loop()
        parts = sorted(set(partitions))
        self._assigned |= set(parts)
        if not parts:
            return
        if self.replica is not None:
            self.replica.send(("assigned", parts))
        if wait:
            await self._restore_partitions(parts)
        else:
            self._spawn(self._restore_partitions(parts))

    async def _restore_partitions(self, parts: list[int]) -> None:
        assert self._loop is not None
        subs = [k for k in self._sub_keys if self.partition_of(k.tenant_id) in parts]
        pending = await self._pending_ids_anywhere()
        await self._run(self._restore_sync, parts, subs, pending, self._loop)

    def on_partitions_revoked(self, partitions: Sequence[int]) -> None:
        """Stop serving these partitions' tenants (another worker may take them)."""
        self._assigned -= set(partitions)
        self._ready_parts -= set(partitions)
        if self.replica is not None:
            self.replica.send(("revoked", sorted(set(partitions))))

    # ---- definitions ----------------------------------------------------------------------
    def apply_definition(self, change: DefinitionChange) -> None:
        """A definition was set or deleted (from the topic); in the loop."""
        if self.replica is not None:
            self.replica.send(("definition", change))
        key = key_from_topic_key(change.key)
        d = change.definition
        previous = self.definitions.get(key)
        if d is None:
            self.definitions.pop(key, None)
            ledger = self.ledgers.get(key)
            if ledger is not None:
                ledger.definition = None
                if key.subscriber_id and not ledger.holds:
                    del self.ledgers[key]
                    self._synced_subs.discard(key)
        else:
            self.definitions[key] = d
            self._ledger(key).definition = d
        self._defined_tenants = frozenset(k.tenant_id for k in self.definitions)
        self._sub_keys = frozenset(k for k in self.definitions if k.subscriber_id)
        if change.offset > self._mirrored_version:
            shown = d or previous
            self._quota_rows.append(
                {
                    "tenant_id": key.tenant_id,
                    "subscriber_id": key.subscriber_id,
                    "period": shown.period if shown else "",
                    "limit_tu": shown.limit_tu if shown else ZERO,
                    "limit_cny": shown.limit_cny if shown else None,
                    "thresholds": list(shown.thresholds) if shown else [],
                    "hard": bool(shown.hard) if shown else False,
                    "deleted": d is None,
                    "updated_at": datetime.fromtimestamp(change.timestamp_ms / 1000, tz=UTC),
                    "version": change.offset,
                }
            )
        if d is not None and key.subscriber_id and self.started and key not in self._synced_subs:
            self._spawn(self._restore_keys([key]))
        elif d is not None:
            self._check(self._ledger(key), self.clock())

    async def _restore_keys(self, keys: list[QuotaKey]) -> None:
        assert self._loop is not None
        await self._run(self._restore_sync, [], keys, [], self._loop)

    def _on_change_threadsafe(self, change: DefinitionChange) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.apply_definition, change)

    # ---- start / stop ------------------------------------------------------------------------
    async def start(self, retry_max_s: float = 30.0) -> None:
        """Load definitions, emitted alerts and open reservations; start following the
        definitions topic and the background tasks. Call once, in the worker's loop.

        Kafka or the warehouse being unavailable is retried with backoff (requests get
        503 meanwhile); the pipeline itself is not held up by this."""
        delay = 0.5
        while True:
            try:
                await self._start_once()
                return
            except _START_RETRIED as exc:
                # Kafka or the warehouse went away while starting (a broker outage can
                # begin at any point of it): never the worker's end, it retries
                if self._stopping:
                    raise
                log.warning("quota service not started yet (retrying in %.1f s): %s", delay, exc)
                if self.publisher is not None:
                    self.publisher.close()
                    self.publisher = None
                await asyncio.sleep(delay)
                delay = min(retry_max_s, delay * 2)

    async def _start_once(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        changes: list[DefinitionChange] = []
        topic_alerts: list[tuple[dict[str, Any], int]] = []
        ends: dict[int, int] = {}
        if self.kafka:
            from pipeline.quota.definitions import (
                DefinitionFollower,
                ensure_quota_topics,
                read_definitions,
                read_topic,
            )

            timeout_s = self.kafka_timeout_s
            await loop.run_in_executor(None, ensure_quota_topics, self.settings, timeout_s)
            if self.partitions is None:
                self.partitions = await loop.run_in_executor(None, self._usage_partition_count)
        if self.replica is not None:
            self.replica.send(("partitions", self.partitions or 1))
        if self.kafka:
            changes, ends = await loop.run_in_executor(
                None, read_definitions, self.settings, timeout_s
            )
            messages, _ = await loop.run_in_executor(
                None,
                read_topic,
                self.settings,
                self.settings.topic_quota_events,
                timeout_s,
                "quota-scan",
            )
            for msg in messages:
                alert = decode_alert(msg.value())
                if alert is not None:
                    topic_alerts.append((alert, int(msg.timestamp()[1])))
            self.publisher = AlertPublisher(self.settings)
        state = await self._run(self._load_state_sync)
        self._mirrored_version = state["mirrored_version"]
        for change in changes:
            self.apply_definition(change)
        # emitted: the table, then the topic (a topic id missing from the table gets its row)
        emitted: dict[str, dict[str, Any]] = {}
        for alert in state["alerts"]:
            self.recorded.add(alert["event_id"])
            emitted[alert["event_id"]] = alert
        for alert, ts in topic_alerts:
            self.published.add(alert["event_id"])
            emitted.setdefault(alert["event_id"], alert)
            if alert["event_id"] not in self.recorded:
                self._table_alerts.append((alert, ts))
                self.recorded.add(alert["event_id"])
        for alert in emitted.values():
            key = QuotaKey(alert["tenant_id"], alert.get("subscriber_id") or "")
            self._ledger(key).mark_emitted(alert["period"], Decimal(str(alert["threshold"])))
        # a table row without its topic message: the publish was acknowledged (the row
        # is written only after that), the message may have expired from the topic
        self.published |= self.recorded
        self._replay_journal()
        subs = sorted(self._sub_keys)
        pending = await self._pending_ids_anywhere()
        await self._run(self._restore_sync, [], subs, pending, loop)
        self._resume_webhooks(emitted, state["deliveries"])
        if self.kafka:
            self._follower = DefinitionFollower(self.settings, ends, self._on_change_threadsafe)
            self._follower.start()
        self.started = True
        if self.replica is not None:
            self.replica.send(("started",))
        self._emit_ready = True
        self._spawn(self._emit_loop())
        self._spawn(self._write_loop())
        self._spawn(self._sweep_loop())
        self._sweep()
        log.info(
            "quota service ready: %d definitions, %d emitted alerts, %d open holds, %d webhooks",
            len(self.definitions),
            len(emitted),
            sum(len(ledger.holds) for ledger in self.ledgers.values()),
            len(self.webhooks),
        )

    def _replay_journal(self) -> None:
        """Re-open the holds of the journal (once; only where the journal is kept)."""
        if self.journal is None or self._journal_replayed:
            return
        self._journal_replayed = True
        now = self.clock()
        for jh in self.journal.replay(now):
            self._restore_hold(jh, now)

    async def _pending_ids_anywhere(self) -> list[str]:
        if self.replica is not None:
            return await self.replica.pending_ids()
        return self._pending_ids()

    def _usage_partition_count(self) -> int:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.settings.kafka_bootstrap, "log_level": 0})
        meta = admin.list_topics(self.settings.topic_usage, timeout=self.kafka_timeout_s)
        topic = meta.topics.get(self.settings.topic_usage)
        if topic is None or topic.error is not None or not topic.partitions:
            raise RuntimeError(f"usage topic {self.settings.topic_usage} not found")
        return len(topic.partitions)

    def _restore_hold(self, jh: JournalHold, now: int) -> None:
        ledgers = [self._ledger(jh.key)]
        if jh.key.subscriber_id:
            ledgers.append(self._ledger(QuotaKey(jh.key.tenant_id)))
        for ledger in ledgers:
            h = jh.hold
            ledger.restore_hold(
                Hold(h.id, h.amount, h.expires_ms, h.granted, h.pending, h.event_id), now
            )

    def _load_state_sync(self) -> dict[str, Any]:
        """On the pipeline thread: emitted alerts (last 40 days), webhook outcomes and the
        mirror's version."""
        wh = self._warehouse()
        since = self.clock() - 40 * _DAY_MS
        t = wh.query_arrow(
            "SELECT event_id, kind, tenant_id, subscriber_id, period_type, period, "
            "toString(threshold) AS threshold, toString(used_tu) AS used_tu, "
            "toString(limit_tu) AS limit_tu, toString(used_cny) AS used_cny, "
            "toString(limit_cny) AS limit_cny, hard, trigger_event_id, "
            "toUnixTimestamp64Milli(crossed_at) AS crossed_ms "
            "FROM quota_events FINAL "
            f"WHERE crossed_at >= fromUnixTimestamp64Milli({since})"
        )
        alerts = []
        for row in t.to_pylist():
            row["subscriber_id"] = row["subscriber_id"] or None
            row["threshold"] = fmt(Decimal(row["threshold"]))
            for name in ("used_tu", "limit_tu", "used_cny"):
                row[name] = fmt(Decimal(row[name]))
            row["limit_cny"] = fmt(Decimal(row["limit_cny"])) if row["limit_cny"] else None
            row["crossed_at"] = datetime.fromtimestamp(
                row.pop("crossed_ms") / 1000, tz=UTC
            ).isoformat(timespec="milliseconds")
            alerts.append(row)
        d = wh.query_arrow(
            "SELECT event_id, webhook, max(attempt) AS last, "
            "countIf(status IN ('ok', 'failed')) AS final FROM webhook_deliveries "
            f"WHERE attempted_at >= fromUnixTimestamp64Milli({since}) "
            "GROUP BY event_id, webhook"
        )
        deliveries = {
            (r["event_id"], r["webhook"]): (int(r["last"]), int(r["final"]) > 0)
            for r in d.to_pylist()
        }
        v = wh.query_arrow("SELECT count() AS n, max(version) AS v FROM quotas")
        n, version = v.column(0)[0].as_py(), v.column(1)[0].as_py()
        return {
            "alerts": alerts,
            "deliveries": deliveries,
            "mirrored_version": int(version) if n else -1,
        }

    def _resume_webhooks(
        self,
        emitted: dict[str, dict[str, Any]],
        deliveries: dict[tuple[str, str], tuple[int, bool]],
    ) -> None:
        horizon = self.clock() - 2 * _DAY_MS
        for event_id, alert in emitted.items():
            crossed = datetime.fromisoformat(alert["crossed_at"]).timestamp() * 1000
            if crossed < horizon:
                continue
            todo: dict[str, int] = {}
            for hook in self.webhooks:
                last, final = deliveries.get((event_id, hook.name), (0, False))
                if not final and hook.wants(alert):
                    todo[hook.name] = last + 1
            if todo:
                self._pending_webhooks.append((alert, todo))

    async def stop(self) -> None:
        """Flush what is buffered and stop the background work (best effort: nothing
        here is needed for correctness after a crash)."""
        self._stopping = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self._flush_tables()
        await self.dispatcher.close()
        if self._follower is not None:
            self._follower.stop()
        if self.publisher is not None:
            self.publisher.close()
        if self.journal is not None:
            self.journal.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("quota task failed", exc_info=task.exception())

    # ---- background work -----------------------------------------------------------------------
    async def _emit_loop(self) -> None:
        for alert, todo in self._pending_webhooks:
            self.dispatcher.submit(alert, todo)
        self._pending_webhooks.clear()
        backoff = 0.2
        while True:
            await self._outbox_event.wait()
            self._outbox_event.clear()
            batch, self._outbox = self._outbox, []
            try:
                await self._emit(batch)
                backoff = 0.2
            except PublishError as exc:
                log.warning("quota alerts not published (retrying in %.1f s): %s", backoff, exc)
                self._outbox = batch + self._outbox
                await asyncio.sleep(backoff)
                backoff = min(30.0, backoff * 2)
                self._outbox_event.set()

    @property
    def hold_switch(self) -> Path:
        """Fault drill: while this file exists, alerts are detected but not published
        (to show that a worker killed between a crossing and its delivery emits it once
        after the restart)."""
        return self.settings.data_path / "faults" / "hold-quota-alerts"

    async def _emit(self, batch: list[Crossing]) -> None:
        while self.hold_switch.exists():
            await asyncio.sleep(0.1)
        alerts = [_alert_of(c) for c in batch]
        todo = [a for a in alerts if a["event_id"] not in self.published]
        acks: list[int] = []
        if todo and self.publisher is not None:
            results = await asyncio.gather(
                *(self.publisher.publish(a) for a in todo), return_exceptions=True
            )
            failed = [r for r in results if isinstance(r, BaseException)]
            for alert, result in zip(todo, results, strict=True):
                if not isinstance(result, BaseException):
                    self.published.add(alert["event_id"])
            if failed:
                raise PublishError(str(failed[0]))
            acks = [int(r) for r in results if isinstance(r, int)]
        else:
            for a in todo:
                self.published.add(a["event_id"])
        now = self.clock()
        for c in batch:
            self.alert_latency_ms.append(float(now - c.crossed_ms))
        del self.alert_latency_ms[:-10_000]
        for i, alert in enumerate(alerts):
            if alert["event_id"] in self.recorded:
                continue
            self.recorded.add(alert["event_id"])
            self._table_alerts.append((alert, acks[i] if i < len(acks) else now))
            self.dispatcher.submit(alert)
            log.info(
                "quota %s: %s %s %s%% (%s of %s TU)",
                alert["kind"],
                alert["tenant_id"],
                alert["period"],
                alert["threshold"],
                alert["used_tu"],
                alert["limit_tu"],
            )

    async def _write_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            try:
                await self._flush_tables()
            except Exception as exc:  # noqa: BLE001 - retried on the next tick, never lost
                log.warning("quota tables not written yet (will retry): %s", exc)

    async def _flush_tables(self) -> None:
        alerts, self._table_alerts = self._table_alerts, []
        attempts, self._attempts[:] = list(self._attempts), []
        rows, self._quota_rows = self._quota_rows, []
        if not (alerts or attempts or rows):
            return
        try:
            await self._run(self._write_sync, alerts, attempts, rows)
        except BaseException:
            self._table_alerts = alerts + self._table_alerts
            self._attempts[:0] = attempts
            self._quota_rows = rows + self._quota_rows
            raise
        if rows:
            self._mirrored_version = max(self._mirrored_version, *(r["version"] for r in rows))

    def _write_sync(
        self,
        alerts: list[tuple[dict[str, Any], int]],
        attempts: list[Attempt],
        rows: list[dict[str, Any]],
    ) -> None:
        wh = self._warehouse()
        if alerts:
            table = quota_events_table(alerts)
            ids = "|".join(sorted(a["event_id"] for a, _ in alerts))
            token = "quota_events-" + hashlib.sha256(ids.encode()).hexdigest()[:32]
            wh.insert_arrow("quota_events", table, dedup_token=token)
        if attempts:
            data = pa.Table.from_pylist([a.row() for a in attempts], schema=_DELIVERIES_SCHEMA)
            wh.insert_arrow("webhook_deliveries", data)
        if rows:
            wh.insert_arrow("quotas", pa.Table.from_pylist(rows, schema=_QUOTAS_SCHEMA))

    async def _sweep_loop(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            self._sweep(prune=ticks % 60 == 0)

    def _sweep(self, prune: bool = False) -> None:
        """Expire reservations, catch period roll-overs and compact the journal."""
        now = self.clock()
        # holds exist only under definitions (and expire lazily on every call anyway);
        # the whole map (one ledger per tenant seen) is walked once a minute only
        for key in self.definitions:
            found = self.ledgers.get(key)
            if found is not None:
                if found.holds:
                    found.expire(now)
                self._check(found, now)
        if prune:
            for ledger in self.ledgers.values():
                ledger.expire(now)
                ledger.prune(now)
            for key in [k for k, ledger in self.ledgers.items() if ledger.idle]:
                del self.ledgers[key]
        if self.journal is not None and self.journal.lines > 200_000:
            live = [
                JournalHold(ledger.key, h)
                for ledger in self.ledgers.values()
                for h in ledger.holds.values()
                # a subscriber reservation is journaled once, under the subscriber's key
                if not (not ledger.key.subscriber_id and _sub_of(h.id))
            ]
            self.journal.compact(live)

    # ---- metrics -------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counts for /v1/status-style reporting."""
        lat = sorted(self.alert_latency_ms)
        return {
            "definitions": len(self.definitions),
            "ledgers": len(self.ledgers),
            # the quota server holds them when there is one (it reports its count)
            "open_reservations": self.replica.open_reservations
            if self.replica is not None
            else sum(
                1
                for ledger in self.ledgers.values()
                for h in ledger.holds.values()
                if not h.pending
            ),
            "ready_partitions": sorted(self._ready_parts),
            "alerts_published": len(self.published),
            "alert_publish_p99_ms": lat[int(len(lat) * 0.99) - 1] if lat else None,
        }


def _sub_of(res_id: str) -> bool:
    try:
        return bool(parse_reservation_id(res_id).subscriber_id)
    except ReservationNotFoundError:
        return False


def _alert_of(c: Crossing) -> dict[str, Any]:
    from pipeline.quota.alerts import alert_record

    return alert_record(c)


def status_json(s: QuotaStatus) -> dict[str, Any]:
    """``GET /v1/quotas/{tenant}`` body (amounts as exact decimal strings)."""
    d = s.definition
    reserved = s.reserved + s.pending
    body: dict[str, Any] = {
        "tenant_id": s.key.tenant_id,
        "subscriber_id": s.key.subscriber_id or None,
        "period_type": d.period,
        "period": s.period,
        "limit": fmt(d.limit_tu),
        "used": fmt(s.used.tu),
        "reserved": fmt(reserved),
        "pending": fmt(s.pending),
        "remaining": fmt(s.remaining),
        "state": s.state,
        "hard": d.hard,
        "thresholds": [fmt(t) for t in d.thresholds],
        "crossed": [fmt(t) for t in s.crossed],
        "open_reservations": s.open_reservations,
    }
    if d.limit_cny is not None:
        body["limit_cny"] = fmt(d.limit_cny)
        body["used_cny"] = fmt(s.used.cny)
    return body


def grant_json(g: Grant) -> dict[str, Any]:
    return {
        "reservation_id": g.reservation_id,
        "requested": fmt(g.requested),
        "granted": fmt(g.granted),
        "expires_at": datetime.fromtimestamp(g.expires_ms / 1000, tz=UTC).isoformat(
            timespec="milliseconds"
        ),
        "over_limit": g.over_limit,
    }


def settlement_json(s: Settlement) -> dict[str, Any]:
    return {
        "reservation_id": s.reservation_id,
        "outcome": s.outcome,
        "granted": fmt(s.granted),
        "committed": fmt(s.committed),
        "released": fmt(s.released),
        "over_grant": s.over_grant,
        "event_id": s.event_id,
    }
