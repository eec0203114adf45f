"""Both carriers' records of cross-carrier calls, with reconciliation faults at exact counts.

``ReconSimulation`` generates ``calls`` cross-carrier model calls (home carrier !=
serving carrier) as usage-event records (the ``pipeline.events`` record shape:
``event_time`` in UTC epoch ms, raw ``subscriber_id``), each reported by both carriers
with one shared ``transaction_id``, and puts an exact number of them in each
discrepancy category of ``jobs/reconcile.py``:

* ``matched``: two records that agree (the second record's event_time differs by up to
  1.5 s, as two platforms' clocks do);
* ``token_mismatch``: the home record's output_tokens differ by more than the token
  tolerance;
* ``amount_mismatch``: same tokens, but the home record names another model, whose
  list price differs by more than the relative amount tolerance (checked with the
  price cards, at the record's own time);
* ``missing_at_home`` / ``missing_at_serving``: only the serving / home carrier's record;
* ``duplicate``: one carrier (either) reports the call twice, with two event ids;
* ``period_boundary``: the two records lie on either side of a month-end midnight
  (Beijing time), within half the boundary window of it.

``fault_rate`` r gives ``round(calls * r)`` faults (Python's round: half to even),
spread evenly over the six discrepancy categories: ``faults // 6`` each, the remainder
one each to distinct, randomly chosen categories; the rest are matched. ``faults`` gives
the counts per category instead. Everything depends only on the arguments: one
``random.Random(seed)`` makes every choice.

``truth`` holds the exact expected ``recon_summary`` counts per period and per carrier
pair (``"SERVING>HOME"``); ``write_recon_truth`` / ``ReconTruth.to_json`` put them in a
truth file under ``"recon"``. Two constructors place the calls in time:

* ``for_period(seed, "2026-11", calls, ...)``: a whole month, for batch tests that
  insert the records straight into ``usage_events`` (``usage_events_batch``). Calls lie
  in [start + w, end - w) (w = the boundary window), ``period_boundary`` calls straddle
  the month's end, and ``start_boundary_calls`` more straddle its start: those belong
  to the previous month (``period_boundary`` there) and must not appear in this one.
* ``for_stream(seed, now_ms, calls, ...)``: for ``tokenmeter simulate --recon-faults``:
  every record passes the worker's time checks at ``now_ms`` (not in the future, not
  older than the lateness limit). Calls lie in the current month up to ``now_ms``;
  ``period_boundary`` calls straddle the current month's start (so they count in the
  previous month, whose end it is). When the month is younger than the boundary window
  plus 10 minutes, calls go into the previous month instead.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.events import payload_hash, pseudonymise
from pipeline.metering.pricing import PriceBook, Rating, load_cards
from pipeline.simulate import CARRIER_LIST, CHANNELS, FAILED_STATUSES, MODELS, REGIONS, STATUSES

CATEGORIES: tuple[str, ...] = (
    "matched",
    "token_mismatch",
    "amount_mismatch",
    "missing_at_home",
    "missing_at_serving",
    "duplicate",
    "period_boundary",
)
FAULTS: tuple[str, ...] = CATEGORIES[1:]
DEFAULT_WINDOW_S = 3600
_REPO = Path(__file__).resolve().parents[1]
_CARRIER_WEIGHTS = {"CMCC": 55, "CTCC": 25, "CUCC": 20}
_SKEW_MS = 1500  # the two reports of one call differ in event_time by up to this
_DUP_LAG_MS = 5000  # a duplicate report comes up to this much later
_BODY_MARGIN_MS = 60_000
_HOUR_MS = 3_600_000
_DAY_MS = 86_400_000


def fault_counts(calls: int, rate: float, rng: random.Random) -> dict[str, int]:
    """Calls per category for a fault rate (see the module docstring)."""
    if calls < 0:
        raise ValueError("calls must not be negative")
    if not 0.0 <= rate <= 1.0:
        raise ValueError("the fault rate must lie in [0, 1]")
    faults = round(calls * rate)
    counts = dict.fromkeys(CATEGORIES, 0)
    for name in FAULTS:
        counts[name] = faults // len(FAULTS)
    for name in rng.sample(FAULTS, faults % len(FAULTS)):
        counts[name] += 1
    counts["matched"] = calls - faults
    return counts


def beijing_month_start(ms: int) -> int:
    """UTC epoch ms of the start (Beijing time) of the month holding ``ms``."""
    from jobs.reconcile import Period

    return Period.containing(ms).start_ms


def _period_of(ms: int) -> str:
    from jobs.reconcile import Period

    return Period.containing(ms).label


@dataclass
class ReconTruth:
    """Expected reconciliation counts: per period, per category (all categories, zeros
    included), and per period per carrier pair (``"SERVING>HOME"``) per category."""

    seed: int
    calls: int = 0
    records: int = 0
    periods: dict[str, dict[str, int]] = field(default_factory=dict)
    by_pair: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def add(self, period: str, serving: str, home: str, category: str) -> None:
        """Count one transaction."""
        self.calls += 1
        cell = self.periods.setdefault(period, dict.fromkeys(CATEGORIES, 0))
        cell[category] += 1
        pair = self.by_pair.setdefault(period, {}).setdefault(
            f"{serving}>{home}", dict.fromkeys(CATEGORIES, 0)
        )
        pair[category] += 1

    def add_matched_calls(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Count the clean cross-carrier calls of another stream (``Simulation``'s, whose
        two reports are identical but for ids and source): each transaction reported by
        both carriers is ``matched`` in the period of its records. Returns how many."""
        seen: dict[str, Mapping[str, Any]] = {}
        added = 0
        for rec in records:
            tx = rec.get("transaction_id")
            if not tx or rec["home_carrier"] == rec["serving_carrier"]:
                continue
            first = seen.pop(tx, None)
            if first is None:
                seen[tx] = rec
                continue
            self.records += 2
            period = _period_of(min(first["event_time"], rec["event_time"]))
            self.add(period, rec["serving_carrier"], rec["home_carrier"], "matched")
            added += 1
        if seen:
            raise ValueError(f"{len(seen)} cross-carrier call(s) have only one report")
        return added

    def to_json(self) -> dict[str, Any]:
        """JSON-ready, keys sorted."""
        return {
            "seed": self.seed,
            "calls": self.calls,
            "records": self.records,
            "settings": dict(sorted(self.settings.items())),
            "periods": {p: dict(v) for p, v in sorted(self.periods.items())},
            "by_pair": {
                p: {k: dict(v) for k, v in sorted(pairs.items())}
                for p, pairs in sorted(self.by_pair.items())
            },
        }


def write_recon_truth(truth: ReconTruth, path: str | os.PathLike[str]) -> Path:
    """Write (or add to) a truth file: ``truth.to_json()`` under the key ``"recon"``,
    keeping whatever else the file holds; atomic (temporary file, then rename)."""
    target = Path(path)
    data: dict[str, Any] = {}
    if target.exists():
        loaded = json.loads(target.read_text())
        if isinstance(loaded, dict):
            data = loaded
    data["recon"] = truth.to_json()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(target)
    return target


def _weighted(pairs: Iterable[tuple[Any, int]]) -> tuple[list[Any], list[int]]:
    items, cum, total = [], [], 0
    for item, weight in pairs:
        total += weight
        items.append(item)
        cum.append(total)
    return items, cum


class ReconSimulation:
    """Cross-carrier calls with reconciliation faults at exact counts.

    ``body_ms``: [from, to) UTC epoch ms in which ordinary calls happen (one period).
    ``boundary_ms``: the month boundary that ``period_boundary`` calls straddle.
    ``start_boundary``: ``(boundary_ms, n)``: n more calls straddling another boundary
    (counted in the period that ends there), beyond ``calls``.
    ``id_salt``: mixed into event and transaction ids (``for_stream`` uses ``now_ms``, so
    two runs never send the same ids, which the worker would drop as duplicates).
    ``book``: price cards used to make ``amount_mismatch`` calls differ by enough
    (default: ``config/price_cards``). Tolerances must be the ones reconcile will use.
    """

    def __init__(
        self,
        seed: int,
        body_ms: tuple[int, int],
        boundary_ms: int | None,
        calls: int,
        fault_rate: float = 0.0,
        faults: Mapping[str, int] | None = None,
        tenants: int = 60,
        book: PriceBook | None = None,
        token_tolerance: int = 0,
        amount_tolerance: Decimal = Decimal("0.001"),
        boundary_window_s: int = DEFAULT_WINDOW_S,
        start_boundary: tuple[int, int] | None = None,
        id_salt: str = "",
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        lo, hi = body_ms
        if hi - lo < 2 * _SKEW_MS + _DUP_LAG_MS:
            raise ValueError("the time range for calls is too short")
        if _period_of(lo) != _period_of(hi - 1):
            raise ValueError("the time range for calls must lie within one month")
        self.body = (lo, hi)
        self.boundary_ms = boundary_ms
        self.window_ms = boundary_window_s * 1000
        self.token_tolerance = token_tolerance
        self.amount_tolerance = amount_tolerance
        self.book = book if book is not None else load_cards(_REPO / "config" / "price_cards")
        if faults is None:
            self.counts = fault_counts(calls, fault_rate, self.rng)
        else:
            unknown = set(faults) - set(CATEGORIES)
            if unknown:
                raise ValueError(f"unknown categories: {sorted(unknown)}")
            self.counts = dict.fromkeys(CATEGORIES, 0)
            self.counts.update(faults)
            if faults.get("matched") is None:
                self.counts["matched"] = calls - sum(faults.values())
            if self.counts["matched"] < 0 or sum(self.counts.values()) != calls:
                raise ValueError("faults must add up to at most calls")
        if self.counts["period_boundary"] and (boundary_ms is None or self.window_ms < 4):
            raise ValueError("period_boundary calls need a boundary and a boundary window")
        self.start_boundary = start_boundary
        tag = f"recon:{seed}:{lo}:{id_salt}".encode()
        self._run = hashlib.blake2b(tag, digest_size=5).hexdigest()
        self._n = 0
        self._tx = 0
        self.truth = ReconTruth(
            seed=seed,
            settings={
                "token_tolerance": token_tolerance,
                "amount_tolerance": str(amount_tolerance),
                "boundary_window_s": boundary_window_s,
            },
        )
        self.transactions: dict[str, tuple[str, str]] = {}  # tx -> (period, category)
        rng = self.rng
        homes, home_cum = _weighted(_CARRIER_WEIGHTS.items())
        self._tenants: list[tuple[str, str, str]] = []  # (tenant_id, home, region)
        for i in range(max(1, tenants)):
            home = homes[bisect.bisect_right(home_cum, rng.random() * home_cum[-1])]
            region = REGIONS[int(rng.random() * len(REGIONS))][0]
            self._tenants.append((f"tn-{home.lower()}-{i + 1:04d}", home, region))
        self._tenant_cum = []
        total = 0.0
        for rank in range(len(self._tenants)):
            total += 1.0 / (rank + 1) ** 1.1  # Zipf: a few tenants make most calls
            self._tenant_cum.append(total)
        self._models, self._model_cum = _weighted(((m, p), w) for m, p, w, _ in MODELS)
        self._channels, self._channel_cum = _weighted(CHANNELS)
        self._statuses, self._status_cum = _weighted(STATUSES)
        self._reasoning = {m for m, _, _, r in MODELS if r}
        self._records: list[dict[str, Any]] | None = None

    # ---- constructors -----------------------------------------------------------------

    @classmethod
    def for_period(
        cls,
        seed: int,
        period: str,
        calls: int,
        fault_rate: float = 0.0,
        start_boundary_calls: int = 0,
        boundary_window_s: int = DEFAULT_WINDOW_S,
        **kwargs: Any,
    ) -> ReconSimulation:
        """A whole month (Beijing time): see the module docstring."""
        from jobs.reconcile import Period

        p = Period.parse(period)
        margin = max(boundary_window_s * 1000, _BODY_MARGIN_MS)
        return cls(
            seed,
            (p.start_ms + margin, p.end_ms - margin),
            p.end_ms,
            calls,
            fault_rate=fault_rate,
            boundary_window_s=boundary_window_s,
            start_boundary=(p.start_ms, start_boundary_calls) if start_boundary_calls else None,
            **kwargs,
        )

    @classmethod
    def for_stream(
        cls,
        seed: int,
        now_ms: int,
        calls: int,
        fault_rate: float = 0.0,
        lateness_limit_s: int = 35 * 86_400,
        boundary_window_s: int = DEFAULT_WINDOW_S,
        **kwargs: Any,
    ) -> ReconSimulation:
        """Records the worker accepts when sent at ``now_ms``: see the module docstring."""
        window = boundary_window_s * 1000
        latest = now_ms - 2000  # the newest event_time used
        month = beijing_month_start(latest)
        if latest - month >= window + 10 * 60_000:
            body = (month + max(window, _BODY_MARGIN_MS), latest)
        else:
            previous = beijing_month_start(month - 1)
            margin = max(window, _BODY_MARGIN_MS)
            body = (previous + margin, month - margin)
        boundary = month if latest - month > 2000 else beijing_month_start(month - 1)
        oldest = min(body[0], boundary - window // 2)
        if oldest < now_ms - lateness_limit_s * 1000 + 10 * 60_000:
            raise ValueError("the lateness limit is too short for a month of calls")
        sim = cls(
            seed,
            body,
            boundary,
            calls,
            fault_rate=fault_rate,
            id_salt=str(now_ms),  # ids never repeat an earlier run's: the worker drops those
            boundary_window_s=boundary_window_s,
            **kwargs,
        )
        sim._latest = latest
        return sim

    _latest: int | None = None

    # ---- generation ---------------------------------------------------------------------

    def records(self) -> list[dict[str, Any]]:
        """Every record, ordered by (event_time, event_id). Generated once; the truth is
        complete afterwards."""
        if self._records is None:
            self._records = self._generate()
        return [dict(r, attributes=dict(r["attributes"])) for r in self._records]

    def _generate(self) -> list[dict[str, Any]]:
        plan = [c for c in CATEGORIES for _ in range(self.counts[c])]
        self.rng.shuffle(plan)
        out: list[dict[str, Any]] = []
        for category in plan:
            out.extend(self._transaction(category))
        if self.start_boundary is not None:
            boundary, n = self.start_boundary
            for _ in range(n):
                out.extend(self._transaction("period_boundary", boundary))
        out.sort(key=lambda r: (r["event_time"], r["event_id"]))
        self.truth.records = len(out)
        return out

    def _pick(self, items: list[Any], cum: list[int] | list[float]) -> Any:
        return items[bisect.bisect_right(cum, self.rng.random() * cum[-1])]

    def _next_id(self, carrier: str) -> str:
        self._n += 1
        return f"{carrier.lower()}-rc{self._run}-{self._n}"

    def _call(self, when: int, billable: bool = False) -> dict[str, Any]:
        """The serving carrier's record of a fresh call at ``when``."""
        rng = self.rng
        tenant_id, home, region = self._pick(self._tenants, self._tenant_cum)
        serving = rng.choice([c for c in CARRIER_LIST if c != home])
        model_id, provider = self._pick(self._models, self._model_cum)
        channel = self._pick(self._channels, self._channel_cum)
        status = "ok" if billable else self._pick(self._statuses, self._status_cum)
        if status in FAILED_STATUSES:
            input_tokens = 50 + int(rng.lognormvariate(5.8, 0.9)) % 8000
            output_tokens = cached = reasoning = 0
        else:
            input_tokens = 50 + int(rng.lognormvariate(6.7, 1.0)) % 20_000
            output_tokens = 10 + int(rng.lognormvariate(5.5, 0.9)) % 4000
            cached = int(input_tokens * rng.uniform(0.1, 0.9)) if rng.random() < 0.3 else 0
            reasoning = (
                50 + int(rng.lognormvariate(7.0, 0.8)) % 16_000
                if model_id in self._reasoning
                else 0
            )
        self._tx += 1
        phone = f"1{rng.choice('3456789')}{rng.randrange(10**9):09d}"
        return {
            "event_id": self._next_id(serving),
            "event_time": when,
            "source": "gateway",
            "source_id": f"gw-{serving.lower()}-{region[3:].lower()}-{rng.randrange(1, 9):02d}",
            "reporting_carrier": serving,
            "home_carrier": home,
            "serving_carrier": serving,
            "transaction_id": f"tx-rc{self._run}-{self._tx}",
            "tenant_id": tenant_id,
            "subscriber_id": phone,
            "channel": channel,
            "model_id": model_id,
            "provider": provider,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cached_tokens": cached,
            "reasoning_tokens": reasoning,
            "status": status,
            "routing_policy": rng.choice(("cost_first", "balanced", "quality_first", None)),
            "latency_ms": 200 + int(rng.random() * 4000),
            "region": region,
            "attributes": {},
        }

    def _home_copy(self, rec: dict[str, Any], when: int) -> dict[str, Any]:
        home = rec["home_carrier"]
        copy = dict(rec, attributes=dict(rec["attributes"]))
        copy["event_id"] = self._next_id(home)
        copy["reporting_carrier"] = home
        copy["event_time"] = when
        copy["source_id"] = f"gw-{home.lower()}-{rec['source_id'].split('-', 2)[2]}"
        return copy

    def _body_time(self) -> int:
        lo, hi = self.body
        return lo + _SKEW_MS + int(self.rng.random() * (hi - lo - 2 * _SKEW_MS - _DUP_LAG_MS))

    def _skewed(self, when: int) -> int:
        return when + self.rng.randint(-_SKEW_MS, _SKEW_MS)

    def _amount(self, rec: Mapping[str, Any]) -> Decimal:
        rating = self.book.rate(rec)
        if not isinstance(rating, Rating):
            raise ValueError(f"the price cards cannot price {rec['model_id']}: {rating.detail}")
        return rating.list_amount

    def _transaction(self, category: str, boundary: int | None = None) -> list[dict[str, Any]]:
        """The records of one call in ``category``; counts it in the truth."""
        rng = self.rng
        if category == "period_boundary":
            edge = self.boundary_ms if boundary is None else boundary
            assert edge is not None  # checked in __init__
            half = self.window_ms // 2
            if self._latest is not None:
                half = min(half, self._latest - edge)
            before = edge - 1 - int(rng.random() * (half - 1))
            after = edge + int(rng.random() * half)
            s = self._call(before)
            h = self._home_copy(s, after)
            if rng.random() < 0.5:  # which carrier's record falls after midnight
                s["event_time"], h["event_time"] = after, before
            period = _period_of(edge - 1)
            records = [s, h]
        else:
            when = self._body_time()
            s = self._call(when, billable=category == "amount_mismatch")
            h = self._home_copy(s, self._skewed(when))
            records = [s, h]
            if category == "token_mismatch":
                h["output_tokens"] += self.token_tolerance + 1 + rng.randrange(50)
            elif category == "amount_mismatch":
                self._change_model(s, h)
            elif category == "missing_at_home":
                records = [s]
            elif category == "missing_at_serving":
                records = [h]
            elif category == "duplicate":
                twin = dict(s if rng.random() < 0.5 else h)
                twin["attributes"] = {}
                twin["event_id"] = self._next_id(twin["reporting_carrier"])
                twin["event_time"] += 1 + int(rng.random() * _DUP_LAG_MS)
                records.append(twin)
            period = _period_of(when)
        tx = s["transaction_id"]
        self.transactions[tx] = (period, category)
        self.truth.add(period, s["serving_carrier"], s["home_carrier"], category)
        return records

    def _change_model(self, s: dict[str, Any], h: dict[str, Any]) -> None:
        """Make the home record name another model whose list amount differs by more
        than the tolerance (new calls until one does)."""
        rng = self.rng
        while True:
            a_s = self._amount(s)
            others = [m for m, _ in self._models if m != s["model_id"]]
            rng.shuffle(others)
            for model in others:
                h["model_id"] = model
                a_h = self._amount(h)
                if abs(a_s - a_h) > self.amount_tolerance * max(a_s, a_h):
                    return
            fresh = self._call(s["event_time"], billable=True)  # pragma: no cover - rare
            for key in ("input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens"):
                s[key] = h[key] = fresh[key]


def usage_events_batch(
    records: Iterable[Mapping[str, Any]],
    pseudonym_key: bytes,
    ingested_at: datetime | None = None,
    topic: str = "recon-simulation",
    book: PriceBook | None = None,
) -> pa.Table:
    """Records as a ``usage_events`` Arrow batch, as the worker would store them
    (subscriber pseudonymised, payload_hash and the list-price rating set), for batch
    tests and benchmarks that bypass Kafka. Built from the table's Arrow schema
    (``pipeline.warehouse.arrow_rows.USAGE_EVENTS``): a column this function does not
    know is left empty."""
    from pipeline.warehouse.arrow_rows import USAGE_EVENTS

    book = book if book is not None else load_cards(_REPO / "config" / "price_cards")
    when = ingested_at or datetime.now(UTC)
    cols: dict[str, list[Any]] = {name: [] for name in USAGE_EVENTS.names}
    for offset, rec in enumerate(records):
        row = dict(rec)
        row["attributes"] = dict(rec.get("attributes") or {})
        row["subscriber_id"] = pseudonymise(row["subscriber_id"], pseudonym_key)
        rating = book.rate(row)
        if not isinstance(rating, Rating):
            raise ValueError(f"{row['event_id']}: unpriced ({rating.reason})")
        known: dict[str, Any] = {
            "payload_hash": payload_hash(row),
            "token_units": rating.token_units,
            "amount": rating.amount,
            "list_amount": rating.list_amount,
            "currency": rating.currency,
            "price_card_version": rating.price_card_version,
            "price_line": rating.price_line,
            "billable": rating.billable,
            "tier_usage_tu": rating.tier_usage_tu,
            "tenant_plan": "",
            "plan_period": _period_of(row["event_time"]),
            "rating_run": "stream",
            "topic": topic,
            "partition": 0,
            "offset": offset,
            "ingested_at": when,
        }
        for name, values in cols.items():
            if name == "attributes":
                values.append(list(row["attributes"].items()))
            elif name in row:
                values.append(row[name])
            else:
                values.append(known.get(name))
    return pa.table(cols, schema=USAGE_EVENTS)
