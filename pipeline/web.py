"""The worker's HTTP endpoints (faust's web server, bound to 127.0.0.1 by default).

- ``GET  /v1/health``: 200 once the pipeline runs.
- ``GET  /v1/status``: totals so far (consumed, accepted, duplicates, dead letters).
- ``POST /v1/query`` ``{"sql": "..."}``: a read-only query of the warehouse, answered
  as ``{"columns": [...], "rows": [[...], ...]}``. This is how ``tokenmeter sql``
  reaches the embedded warehouse while the worker holds it; the engine enforces
  ``readonly=1``.
- ``GET  /metrics``: Prometheus metrics (``pipeline/metrics.py``), text format.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import json
from typing import TYPE_CHECKING, Any

import faust
from faust.web import Request, Response, View

from pipeline.warehouse import WarehouseError

if TYPE_CHECKING:
    from pipeline.app import Worker


def json_value(value: Any) -> Any:
    """A query value as JSON: Decimal as a string (exact), datetimes as RFC 3339."""
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, list):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    return value


def dumps(obj: Any) -> str:
    """JSON text for a response body."""
    return json.dumps(obj, default=json_value, ensure_ascii=False)


def register_pages(app: faust.App, worker: Worker) -> None:
    """Attach the endpoints to the worker's faust app."""

    @app.page("/v1/health")
    class Health(View):
        async def get(self, request: Request) -> Response:
            return self.json({"status": "ok", "pipeline": worker._pipeline is not None})

    @app.page("/v1/status")
    class Status(View):
        async def get(self, request: Request) -> Response:
            totals = worker.pipeline.totals
            return self.json(
                {
                    "consumed": totals.consumed,
                    "accepted": totals.accepted,
                    "inserted": totals.inserted,
                    "duplicates": totals.duplicates,
                    "dead_letters": dict(totals.dead_letters),
                    "dedup_keys": len(worker.pipeline.dedup),
                    "sink_errors": worker.pipeline.sink_errors,
                    # CPU microseconds per stage since the start, for the benchmark
                    "stage_cpu_us": dict(worker.pipeline.stage_cpu_us),
                }
            )

    @app.page("/v1/query")
    class Query(View):
        async def post(self, request: Request) -> Response:
            try:
                body = await request.json()
            except ValueError:
                return self.error(400, 'body must be JSON: {"sql": "SELECT ..."}')
            sql = body.get("sql") if isinstance(body, dict) else None
            if not isinstance(sql, str) or not sql.strip():
                return self.error(400, 'body must be JSON: {"sql": "SELECT ..."}')
            try:
                # Not on the pipeline thread: a query waits for one chdb call at most,
                # never for a whole batch (the warehouse serialises calls itself).
                loop = asyncio.get_running_loop()
                table = await loop.run_in_executor(None, worker.pipeline.wh.query_readonly, sql)
            except WarehouseError as exc:
                return self.error(400, str(exc))
            payload = {
                "columns": table.column_names,
                "types": [str(t) for t in table.schema.types],
                "rows": [list(r.values()) for r in table.to_pylist()],
            }
            return self.text(dumps(payload), content_type="application/json")

    @app.page("/metrics")
    class Metrics(View):
        async def get(self, request: Request) -> Response:
            metrics = getattr(worker, "metrics", None)
            if metrics is None:
                return self.error(503, "metrics are not enabled in this worker")
            # Rendering reads counters in memory only (consumer lag is read from Kafka on
            # the metrics thread), so it is safe on the event loop.
            body, content_type = metrics.render(request.headers.get("Accept", ""))
            return self.bytes(body, headers={"Content-Type": content_type})
