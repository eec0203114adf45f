"""The worker's HTTP endpoints (faust's web server, bound to 127.0.0.1 by default).

- ``GET  /v1/health``: 200 once the pipeline runs.
- ``GET  /v1/status``: totals so far (consumed, accepted, duplicates, dead letters).
- ``POST /v1/query`` ``{"sql": "..."}``: a read-only query of the warehouse, answered
  as ``{"columns": [...], "rows": [[...], ...]}``. This is how ``tokenmeter sql``
  reaches the embedded warehouse while the worker holds it; the engine enforces
  ``readonly=1`` and the ``TOKENMETER_QUERY_MAX_*`` limits (over one: 400 naming the
  setting). The query runs beside the pipeline, never holding its inserts, and is
  cancelled when its client goes away or the worker stops. Its text is never logged.
- ``GET  /metrics``: Prometheus metrics (``pipeline/metrics.py``), text format.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import decimal
import json
import logging
import uuid
from typing import TYPE_CHECKING, Any

import faust
from faust.web import Request, Response, View

from pipeline.warehouse import WarehouseError

if TYPE_CHECKING:
    from pipeline.app import Worker

log = logging.getLogger("tokenmeter.web")
# how often a running query checks that its client is still connected
_DISCONNECT_POLL_S = 0.25


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
            return self.json(
                {
                    "status": "ok",
                    "pipeline": worker._pipeline is not None,
                    "usage_partitions": len(worker.reader.partitions),
                }
            )

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
                table = await _run_query(worker, request, sql)
            except WarehouseError as exc:
                return self.error(400, str(exc))
            except Exception as exc:  # noqa: BLE001 - never a traceback with the SQL in the log
                log.error("query failed: %s", type(exc).__name__)
                return self.error(500, f"the query failed ({type(exc).__name__})")
            # off the event loop: a result of up to TOKENMETER_QUERY_MAX_RESULT_ROWS rows
            # takes seconds to turn into JSON
            loop = asyncio.get_running_loop()
            text = await loop.run_in_executor(None, _render, table)
            return self.text(text, content_type="application/json")

    @app.on_before_shutdown.connect
    async def stop_queries(sender: Any, /, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        # Stopping: end the analysts' queries now, not when their time is up (faust
        # waits for the web handlers before the worker can exit).
        if worker._pipeline is not None:
            await asyncio.get_running_loop().run_in_executor(
                None, worker._pipeline.wh.cancel_readonly
            )

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


def _render(table: Any) -> str:
    """An Arrow result as the endpoint's JSON text."""
    payload = {
        "columns": table.column_names,
        "types": [str(t) for t in table.schema.types],
        "rows": [list(r.values()) for r in table.to_pylist()],
    }
    return dumps(payload)


async def _run_query(worker: Worker, request: Request, sql: str) -> Any:
    """Run ``sql`` read-only on a thread of the loop's default executor (never the
    pipeline thread: the warehouse runs analysts' queries beside its inserts), and
    cancel it in the engine when the client's connection closes or this handler is
    cancelled. Returns the Arrow result; raises ``WarehouseError``."""
    wh = worker.pipeline.wh
    query_id = uuid.uuid4().hex
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(None, wh.query_readonly, sql, query_id)
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=_DISCONNECT_POLL_S)
            if done:
                return future.result()
            # faust's aiohttp driver hands the view aiohttp's request, which has it
            transport = getattr(request, "transport", None)
            if transport is None or transport.is_closing():
                await loop.run_in_executor(None, wh.cancel_readonly, query_id)
                return await future  # raises QueryLimitError ("cancelled")
    except asyncio.CancelledError:
        # the loop may be closing (its executor refuses work): the worker's close then
        # kills every query still running
        with contextlib.suppress(RuntimeError, WarehouseError):
            await loop.run_in_executor(None, wh.cancel_readonly, query_id)
        raise
