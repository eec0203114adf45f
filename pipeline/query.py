"""Read-only queries for analysts: through the running worker, or straight to the
warehouse when no worker holds it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from pipeline.settings import Settings
from pipeline.warehouse import WarehouseError, WarehouseLockedError, open_warehouse
from pipeline.worker_state import running_worker


def query_worker(url: str, sql: str, timeout: float = 300.0) -> tuple[list[str], list[list[Any]]]:
    """POST the query to a worker's ``/v1/query``."""
    request = urllib.request.Request(
        f"{url}/v1/query",
        data=json.dumps({"sql": sql}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except ValueError:
            pass
        raise WarehouseError(str(detail)) from None
    except urllib.error.URLError as exc:
        raise WarehouseError(f"the worker at {url} does not answer: {exc.reason}") from None
    return body["columns"], body["rows"]


def run_readonly(settings: Settings, sql: str) -> tuple[list[str], list[list[Any]]]:
    """Run an analyst's query read-only; returns column names and rows."""
    if not settings.warehouse_url.get_secret_value():
        worker = running_worker(settings)
        if worker is not None:
            return query_worker(worker["url"], sql)
    try:
        wh = open_warehouse(settings)
    except WarehouseLockedError:
        worker = running_worker(settings)
        if worker is None:
            raise
        return query_worker(worker["url"], sql)
    try:
        table = wh.query_readonly(sql)
    finally:
        wh.close()
    return table.column_names, [list(r.values()) for r in table.to_pylist()]
