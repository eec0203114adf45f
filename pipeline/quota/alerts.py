"""Quota alerts: the record a threshold crossing becomes, and its trip to Kafka.

One alert = one JSON object, the same on the ``quota-events`` topic (key = tenant_id,
header ``event_id``), in the ``quota_events`` table and in webhook bodies::

    {"event_id": "qe_…", "kind": "threshold" | "exhausted", "tenant_id": "…",
     "subscriber_id": null | "sub_…", "period_type": "day" | "month",
     "period": "2026-11-28", "threshold": "80", "used_tu": "812345.5",
     "limit_tu": "1000000", "used_cny": "1.62", "limit_cny": null, "hard": true,
     "crossed_at": "2026-11-28T02:00:00.123+00:00", "trigger_event_id": "gw1-…" | null}

``event_id`` is derived from (tenant, subscriber, period, threshold), so a consumer can
always de-duplicate; the worker itself publishes each id once (see ``service.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pyarrow as pa
from confluent_kafka import KafkaError, Message, Producer

from pipeline.metering.quota import Crossing, fmt
from pipeline.produce import producer_config
from pipeline.settings import Settings

log = logging.getLogger(__name__)


def alert_record(c: Crossing) -> dict[str, Any]:
    """The alert for a crossing (JSON-ready: Decimals as exact strings)."""
    return {
        "event_id": c.event_id,
        "kind": c.kind,
        "tenant_id": c.key.tenant_id,
        "subscriber_id": c.key.subscriber_id or None,
        "period_type": c.period_type,
        "period": c.period,
        "threshold": fmt(c.threshold),
        "used_tu": fmt(c.used_tu),
        "limit_tu": fmt(c.limit_tu),
        "used_cny": fmt(c.used_cny),
        "limit_cny": fmt(c.limit_cny) if c.limit_cny is not None else None,
        "hard": c.hard,
        "crossed_at": datetime.fromtimestamp(c.crossed_ms / 1000, tz=UTC).isoformat(
            timespec="milliseconds"
        ),
        "trigger_event_id": c.trigger_event_id,
    }


def encode_alert(alert: dict[str, Any]) -> bytes:
    return json.dumps(alert, separators=(",", ":"), ensure_ascii=False).encode()


QUOTA_EVENTS_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("kind", pa.string()),
        ("tenant_id", pa.string()),
        ("subscriber_id", pa.string()),
        ("period_type", pa.string()),
        ("period", pa.string()),
        ("threshold", pa.decimal128(9, 2)),
        ("used_tu", pa.decimal128(38, 6)),
        ("limit_tu", pa.decimal128(38, 6)),
        ("used_cny", pa.decimal128(38, 6)),
        ("limit_cny", pa.decimal128(38, 6)),
        ("hard", pa.bool_()),
        ("trigger_event_id", pa.string()),
        ("crossed_at", pa.timestamp("ms", tz="UTC")),
        ("published_at", pa.timestamp("ms", tz="UTC")),
    ]
)


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


def quota_events_table(alerts: list[tuple[dict[str, Any], int]]) -> pa.Table:
    """Rows for ``quota_events`` from (alert, published_at_ms) pairs."""
    rows = []
    for a, published_ms in alerts:
        rows.append(
            {
                "event_id": a["event_id"],
                "kind": a["kind"],
                "tenant_id": a["tenant_id"],
                "subscriber_id": a["subscriber_id"] or "",
                "period_type": a["period_type"],
                "period": a["period"],
                "threshold": Decimal(a["threshold"]).quantize(Decimal("0.01")),
                "used_tu": Decimal(a["used_tu"]).quantize(Decimal("0.000001")),
                "limit_tu": Decimal(a["limit_tu"]).quantize(Decimal("0.000001")),
                "used_cny": Decimal(a["used_cny"]).quantize(Decimal("0.000001")),
                "limit_cny": (
                    Decimal(a["limit_cny"]).quantize(Decimal("0.000001"))
                    if a["limit_cny"] is not None
                    else None
                ),
                "hard": bool(a["hard"]),
                "trigger_event_id": a["trigger_event_id"],
                "crossed_at": _ts(a["crossed_at"]),
                "published_at": datetime.fromtimestamp(published_ms / 1000, tz=UTC),
            }
        )
    return pa.Table.from_pylist(rows, schema=QUOTA_EVENTS_SCHEMA)


class PublishError(Exception):
    """Kafka did not acknowledge an alert."""


class AlertPublisher:
    """Publishes alerts to ``quota-events`` with an idempotent producer and awaits the
    broker's acknowledgement. Delivery callbacks are served by a daemon thread."""

    def __init__(self, settings: Settings) -> None:
        self.topic = settings.topic_quota_events
        self._producer = Producer(
            producer_config(settings, **{"linger.ms": 0, "message.timeout.ms": 10_000})
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="quota-alerts", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)

    async def publish(self, alert: dict[str, Any]) -> int:
        """Send one alert; returns the broker's timestamp (ms). Raises ``PublishError``."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            def settle() -> None:
                if done.done():
                    return
                if err is not None:
                    done.set_exception(PublishError(f"{err.name()}: {err.str()}"))
                else:
                    done.set_result(int(msg.timestamp()[1]))

            loop.call_soon_threadsafe(settle)

        self._producer.produce(
            self.topic,
            value=encode_alert(alert),
            key=alert["tenant_id"].encode(),
            headers=[("event_id", alert["event_id"].encode())],
            on_delivery=on_delivery,
        )
        return await done

    def close(self) -> None:
        self._producer.flush(5)
        self._stop.set()
        self._thread.join(timeout=2)


def decode_alert(value: bytes | None) -> dict[str, Any] | None:
    """An alert from the topic, or ``None`` if the value is not one."""
    if value is None:
        return None
    try:
        data = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("event_id"), str):
        return None
    return data
