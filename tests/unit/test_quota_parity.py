"""The Go quota server against the Python reference, call for call.

The quota rules are written once in Python (``pipeline/metering/quota.py``, used by the
worker's ``QuotaService``) and once in Go (``quotad/``, which answers the HTTP calls in
production). Here both get the same seeded random sequences of reservations, commits,
releases, retries, stored usage events and status reads, on hard and soft tenant quotas
and a subscriber quota, and every answer must be the same: status code, every field
(reservation ids mapped one to one, expiry times within a second) and error messages.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from pipeline.events import pseudonymise
from pipeline.metering.quota import (
    BadAmountError,
    NoQuotaError,
    QuotaError,
    ReservationNotFoundError,
    ReservationSettledError,
    to_tu,
)
from pipeline.quota.service import (
    NotReadyError,
    QuotaService,
    RatedItem,
    grant_json,
    murmur2_partition,
    settlement_json,
    status_json,
)
from pipeline.settings import Settings
from pipeline.warehouse import Warehouse
from tests.unit.test_quota_server import Http, definition, running

D = Decimal
RAW_SUBSCRIBER = "13800138000"


def _status_of(exc: QuotaError) -> int:
    if isinstance(exc, BadAmountError):
        return 400
    if isinstance(exc, NoQuotaError | ReservationNotFoundError):
        return 404
    if isinstance(exc, NotReadyError):
        return 503
    return 409


class Reference:
    """The Python service answering as the HTTP server would."""

    def __init__(self, service: QuotaService) -> None:
        self.service = service

    def answer(self, fn: Callable[[], Any], to_json: Callable[[Any], Any]) -> tuple[int, Any]:
        try:
            result = fn()
        except QuotaError as exc:
            body: dict[str, Any] = {"error": str(exc)}
            if isinstance(exc, ReservationSettledError):
                body["reservation"] = settlement_json(exc.settlement)
            return _status_of(exc), body
        return 200, to_json(result)


def _now_ms() -> int:
    return int(datetime.now(tz=UTC).timestamp() * 1000)


def _amount(rng: random.Random) -> str | int:
    """Mostly whole TU, some with decimals, a few invalid."""
    roll = rng.random()
    if roll < 0.05:
        return "-5"
    if roll < 0.08:
        return "1.0000001"
    if roll < 0.3:
        return f"{rng.randint(0, 300)}.{rng.randint(0, 999999):06d}"
    return rng.randint(0, 400)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_go_and_python_answer_alike(
    seed: int, clean_warehouse: Warehouse, warehouse_settings: Settings, tmp_path: Path
) -> None:
    rng = random.Random(seed)

    async def inline(fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    async def run() -> None:
        with running(tmp_path / "go", ready=False) as go:
            key = go.settings.pseudonym_secret()
            sub = pseudonymise(RAW_SUBSCRIBER, key)
            py = QuotaService(
                warehouse_settings, inline, lambda: clean_warehouse, pseudonym_key=key,
                journal_path=tmp_path / "py" / "journal.jsonl",
                webhooks_path=tmp_path / "none.yaml", partitions=4, kafka=False,
            )  # fmt: skip
            changes = [
                definition("tn-hard", 2000, 1),
                definition("tn-soft", 500, 2, hard=False),
                definition("tn-hard", 900, 3, sub=sub),
            ]
            go.send("partitions", 4)
            for change in changes:
                py.apply_definition(change)
                go.send("definition", change)
            await py.start()
            await py.on_partitions_assigned([0, 1, 2, 3], wait=True)
            await asyncio.sleep(0.01)  # the restore's result is installed in the loop
            assert py.owns("tn-hard") and py.owns("tn-soft")
            go.send("assigned", [0, 1, 2, 3])
            go.send("install", [0, 1, 2, 3], list(py._sub_keys), [], set())
            go.send("started")
            go.sync()
            ref = Reference(py)
            http = Http(go.port)
            ids: list[tuple[str, str]] = []  # (python id, go id) of each reservation
            # the usage events' ids: a commit names one, a store stores some, in either
            # order (an event stored before its commit is not held again)
            events = [f"ev-{seed}-{n}" for n in range(80)]

            def to_go(text: str) -> str:
                for p, g in ids:
                    text = text.replace(p, g)
                return text

            def same(step: int, what: str, want: tuple[int, Any], got: tuple[int, Any]) -> None:
                w = json.loads(to_go(json.dumps(want[1])))
                g = got[1]
                for body in (w, g):
                    if isinstance(body, dict) and "expires_at" in body:
                        body["expires_at"] = datetime.fromisoformat(body["expires_at"])
                if isinstance(w, dict) and "expires_at" in w:
                    gap = abs((w["expires_at"] - g.pop("expires_at")).total_seconds())
                    assert gap < 1, (step, what, gap)
                    del w["expires_at"]
                assert (want[0], w) == (got[0], g), (step, what)

            for step in range(250):
                op = rng.choice(
                    ["reserve"] * 4 + ["commit"] * 3 + ["release", "store", "status", "retry"]
                )
                if op == "reserve":
                    tenant = rng.choice(["tn-hard", "tn-soft", "tn-hard", "tn-nobody"])
                    amount = _amount(rng)
                    with_sub = tenant == "tn-hard" and rng.random() < 0.3
                    body: dict[str, Any] = {"token_units": amount, "ttl_s": 600}
                    if with_sub:
                        body["subscriber_id"] = RAW_SUBSCRIBER

                    def reserve(t: str = tenant, b: dict[str, Any] = body) -> Any:
                        return py.reserve(t, to_tu(b["token_units"]), 600, b.get("subscriber_id"))

                    want = ref.answer(reserve, grant_json)
                    status, _, got = http.call(
                        "POST", f"/v1/quotas/{tenant}/reservations", json.dumps(body).encode()
                    )
                    if want[0] == 200 and want[1]["reservation_id"] is not None:
                        want = (201, want[1])
                        ids.append((want[1]["reservation_id"], got["reservation_id"]))
                    same(step, f"reserve {tenant} {body}", want, (status, got))
                elif op in ("commit", "retry", "release") and ids:
                    py_id, go_id = rng.choice(ids)
                    if op == "release":
                        want = ref.answer(lambda i=py_id: py.release(i), settlement_json)
                        status, _, got = http.call("DELETE", f"/v1/reservations/{go_id}")
                    else:
                        amount = _amount(rng) if op == "commit" else 100
                        event = rng.choice(events) if rng.random() < 0.9 else None
                        body = {"token_units": amount}
                        if event is not None:
                            body["event_id"] = event

                        def commit(i: str = py_id, b: dict[str, Any] = body) -> Any:
                            return py.commit(i, to_tu(b["token_units"]), b.get("event_id"))

                        want = ref.answer(commit, settlement_json)
                        status, _, got = http.call(
                            "POST", f"/v1/reservations/{go_id}/commit", json.dumps(body).encode()
                        )
                    same(step, f"{op} {py_id}", want, (status, got))
                elif op == "store":
                    # the worker stored usage events: some committed ones, some others
                    items = []
                    for n in range(rng.randint(1, 4)):
                        event = (
                            rng.choice(events) if rng.random() < 0.6 else f"raw-{seed}-{step}-{n}"
                        )
                        tenant = rng.choice(["tn-hard", "tn-soft"])
                        part = murmur2_partition(tenant.encode(), 4)
                        tu = D(rng.randint(1, 120))
                        items.append(RatedItem(tenant, sub, _now_ms(), tu, D("0.5"), event, part))
                    py._apply(items, {})
                    go.send("apply", items, {})
                    assert sorted(go.sync()) == sorted(py._pending_ids()), step
                else:
                    tenant, query = rng.choice(
                        [("tn-hard", ""), ("tn-soft", ""), ("tn-hard", f"?subscriber_id={sub}")]
                    )
                    subscriber = sub if query else None
                    want = ref.answer(lambda t=tenant, s=subscriber: py.get(t, s), status_json)
                    status, _, got = http.call("GET", f"/v1/quotas/{tenant}{query}")
                    same(step, f"status {tenant}{query}", want, (status, got))
            http.close()
            await py.stop()
            assert len(ids) > 20  # the sequence did reserve, and so compared real work

    asyncio.run(run())
