"""Dead-letter inspection and replay (``tokenmeter dlq list|replay``).

Replay re-submits rejected inputs to ``usage-events`` after the cause was fixed (a price
card that lacked a model, a lateness limit that was too tight, ...). Decodable dead
letters were stored as JSON and are re-validated and re-encoded by the producer SDK;
raw ones are re-sent byte for byte. The worker's deduplication keeps a replayed event
that was already counted from being counted again, and an event rejected as unpriced
was never entered in the dedup index, so it is accepted once its price exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pipeline.events import Reason, record_from_json
from pipeline.produce import InvalidEventError, UsageProducer
from pipeline.query import run_readonly
from pipeline.settings import Settings
from pipeline.warehouse.base import quote_literal

_REASONS = {r.value for r in Reason}


def _where(reason: str | None, since: str | None) -> str:
    parts = ["1"]
    if reason is not None:
        if reason not in _REASONS:
            raise ValueError(f"--reason: {reason!r} is not one of {', '.join(sorted(_REASONS))}")
        parts.append(f"reason = {quote_literal(reason)}")
    if since is not None:
        parts.append(f"failed_at >= parseDateTime64BestEffort({quote_literal(since)}, 3)")
    return " AND ".join(parts)


def summary(settings: Settings, reason: str | None, since: str | None) -> list[dict[str, Any]]:
    """Dead letters grouped by reason and stage, with first and last occurrence."""
    columns, rows = run_readonly(
        settings,
        "SELECT reason, stage, count() AS letters, min(failed_at) AS first, "
        f"max(failed_at) AS last FROM dead_letters WHERE {_where(reason, since)} "
        "GROUP BY reason, stage ORDER BY letters DESC, reason",
    )
    return [dict(zip(columns, r, strict=True)) for r in rows]


@dataclass
class ReplayResult:
    """What a replay did."""

    selected: int = 0
    sent: int = 0
    still_invalid: dict[str, int] = field(default_factory=dict)


def replay(
    settings: Settings, reason: str, since: str | None, limit: int | None = None
) -> ReplayResult:
    """Re-send the dead letters of one reason. Letters that are still invalid under the
    current rules are counted and left where they are."""
    sql = (
        # hex: binary payloads survive the JSON hop through the worker's query endpoint
        "SELECT hex(payload), payload_format, tenant_id FROM dead_letters "
        f"WHERE {_where(reason, since)} ORDER BY topic, partition, offset"
    )
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    columns, rows = run_readonly(settings, sql)
    producer = UsageProducer.from_settings(settings)
    result = ReplayResult(selected=len(rows))
    for payload_hex, fmt, tenant in rows:
        raw = bytes.fromhex(payload_hex)
        if fmt == "json":
            text = raw.decode("utf-8", "replace")
            try:
                record, rejection = record_from_json(json.loads(text))
            except ValueError:
                record, rejection = None, None
            if record is None:
                why = rejection.reason.value if rejection else "invalid_json"
                result.still_invalid[why] = result.still_invalid.get(why, 0) + 1
                continue
            try:
                producer.send_record(record)
            except InvalidEventError as exc:
                why = exc.rejection.reason.value
                result.still_invalid[why] = result.still_invalid.get(why, 0) + 1
                continue
        else:
            producer.send_raw((tenant or "").encode(), raw)
        result.sent += 1
    producer.flush()
    return result
