"""Cross-carrier settlement: settlement lines, revenue shares and net positions.

``settle(wh, period, agreements)`` takes the period's current reconciliation run (or a
given one) and settles its *matched* and *accepted* transactions (jobs/reconcile.py):

* ``settlement_items``: one row per settled transaction with its line, its event ids
  and the list amount it bills: the serving carrier's record (its canonical record for
  an accepted duplicate), or the home carrier's record when the serving one is missing
  (an accepted ``missing_at_serving``).
* ``settlement_lines``: what each serving carrier bills each home carrier, one line per
  (serving carrier, home carrier, model, provider, channel):
  ``amount = list_amount x rate_percent / 100`` with the wholesale rate of
  ``config/agreements/wholesale.yaml``, **rounded once, half to even, to the cent**
  (CNY 0.01), per line. Every total above a line is a sum of line amounts, so totals
  balance to the cent.
* ``revenue_shares``: each line's amount split between the serving carrier, the model
  provider and the entry channel (``revenue_share.yaml``). Each share is first cut
  down to the cent; the cents left over go one each to the largest remainders (ties:
  serving carrier, then provider, then channel), so the shares of a line add up to its
  amount exactly.
* ``settlement_positions``: per carrier, receivable (lines it bills) - payable (lines
  billed to it) = net; the nets add up to zero.
* ``settlement_transfers``: ``bilateral``: per carrier pair, one payment of the
  difference of the two directions; ``multilateral``: netting across all carriers, at
  most n - 1 payments for n carriers (the largest debtor pays the largest creditor,
  repeatedly), which settles every net position with the fewest payments and the least
  money moved (the sum of the positive nets, the minimum possible).

Tracing: ``settlement_lines JOIN settlement_items USING (settlement_id, line_id)``
gives every event id behind a line.

A settlement id is a hash of the run id, the agreement files and the settled set (its
count and the sum of cityHash64 of its transaction ids): re-settling the same inputs
finds the settlement and writes nothing; accepting a category makes a new settlement
(the old one stays, for audit) and the period's current settlement switches to it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_DOWN, ROUND_HALF_EVEN, Decimal
from typing import Any

import pyarrow as pa

from jobs.agreements import Agreements
from jobs.reconcile import (
    CARRIERS,
    Period,
    ReconError,
    check_run_id,
    current_run,
    decided_results_sql,
    run_info,
)
from pipeline.warehouse import Warehouse, rows, scalar
from pipeline.warehouse.base import quote_literal

CENT = Decimal("0.01")
CURRENCY = "CNY"
SCHEMA_VERSION = 1
SETTLED_TABLES = (
    "settlement_items",
    "settlement_lines",
    "revenue_shares",
    "settlement_positions",
    "settlement_transfers",
)


# ---- the arithmetic (pure) --------------------------------------------------------------


def wholesale_amount(list_amount: Decimal, rate_percent: Decimal) -> Decimal:
    """A line's settled amount: list amount x rate / 100, half-even to the cent."""
    return (list_amount * rate_percent / 100).quantize(CENT, rounding=ROUND_HALF_EVEN)


def split_amount(amount: Decimal, percents: Sequence[Decimal]) -> list[Decimal]:
    """Split ``amount`` (whole cents, >= 0) by percentages adding up to 100, in cents,
    so the parts add up to ``amount`` exactly: each part rounded down, the cents left
    go one each to the largest remainders (ties: earlier parts first)."""
    if sum(percents) != 100:
        raise ValueError("percentages must add up to 100")
    if amount != amount.quantize(CENT) or amount < 0:
        raise ValueError("amount must be a non-negative number of whole cents")
    exact = [amount * p / 100 for p in percents]
    parts = [x.quantize(CENT, rounding=ROUND_DOWN) for x in exact]
    left = int((amount - sum(parts)) / CENT)
    order = sorted(range(len(parts)), key=lambda i: (-(exact[i] - parts[i]), i))
    for i in order[:left]:
        parts[i] += CENT
    return parts


@dataclass(frozen=True)
class Position:
    """A carrier's position: what it bills, what it is billed, and the difference."""

    carrier: str
    receivable: Decimal
    payable: Decimal

    @property
    def net(self) -> Decimal:
        return self.receivable - self.payable


@dataclass(frozen=True)
class Transfer:
    """A payment from ``payer`` to ``payee``."""

    payer: str
    payee: str
    amount: Decimal


def net_positions(
    bills: Mapping[tuple[str, str], Decimal], carriers: Sequence[str] = CARRIERS
) -> dict[str, Position]:
    """Positions from ``bills[(serving, home)]`` = what serving bills home."""
    recv = dict.fromkeys(carriers, Decimal("0.00"))
    pay = dict.fromkeys(carriers, Decimal("0.00"))
    for (serving, home), amount in bills.items():
        recv[serving] = recv.get(serving, Decimal("0.00")) + amount
        pay[home] = pay.get(home, Decimal("0.00")) + amount
    names = sorted(set(recv) | set(pay))
    return {
        c: Position(c, recv.get(c, Decimal("0.00")), pay.get(c, Decimal("0.00"))) for c in names
    }


def bilateral_transfers(bills: Mapping[tuple[str, str], Decimal]) -> list[Transfer]:
    """Per unordered carrier pair, one payment of the difference between the two
    directions (none when they cancel)."""
    pairs = sorted({tuple(sorted(k)) for k in bills})
    out = []
    for a, b in pairs:
        a_bills_b = bills.get((a, b), Decimal(0))
        b_bills_a = bills.get((b, a), Decimal(0))
        diff = a_bills_b - b_bills_a
        if diff > 0:
            out.append(Transfer(payer=b, payee=a, amount=diff))
        elif diff < 0:
            out.append(Transfer(payer=a, payee=b, amount=-diff))
    return out


def multilateral_transfers(positions: Mapping[str, Position]) -> list[Transfer]:
    """Payments that settle every net position: repeatedly, the carrier that owes most
    pays the carrier owed most the smaller of the two amounts. Each payment settles at
    least one carrier, so there are at most n - 1; the money moved is the sum of the
    positive positions, the least any set of payments can move."""
    nets = {c: p.net for c, p in positions.items()}
    if sum(nets.values()) != 0:
        raise ValueError("net positions must add up to zero")
    out = []
    while True:
        debtors = sorted((v, c) for c, v in nets.items() if v < 0)
        creditors = sorted(((-v, c) for c, v in nets.items() if v > 0))
        if not debtors or not creditors:
            break
        owed, payer = debtors[0]
        due, payee = creditors[0]
        amount = min(-owed, -due)
        out.append(Transfer(payer=payer, payee=payee, amount=amount))
        nets[payer] += amount
        nets[payee] -= amount
    return out


# ---- the job --------------------------------------------------------------------------


@dataclass
class Settlement:
    """The outcome of ``settle``."""

    settlement_id: str
    period: str
    run_id: str
    created: bool
    reactivated: bool
    items: int
    list_amount: Decimal
    amount: Decimal
    bills: dict[tuple[str, str], Decimal] = field(default_factory=dict)
    positions: dict[str, Position] = field(default_factory=dict)
    bilateral: list[Transfer] = field(default_factory=list)
    multilateral: list[Transfer] = field(default_factory=list)


def _now() -> datetime:
    return datetime.now(UTC)


def current_settlement(wh: Warehouse, period: str) -> str | None:
    """The period's current settlement id, or ``None``."""
    found = rows(
        wh.query_arrow(
            "SELECT argMax(settlement_id, activated_at) AS s, count() AS n"
            f" FROM settlement_activations WHERE period = {quote_literal(period)}"
        )
    )[0]
    return str(found["s"]) if found["n"] else None


def _activate(wh: Warehouse, period: str, settlement_id: str) -> bool:
    if current_settlement(wh, period) == settlement_id:
        return False
    wh.insert_arrow(
        "settlement_activations",
        pa.table(
            {
                "period": [period],
                "settlement_id": [settlement_id],
                "activated_at": pa.array([_now()], pa.timestamp("us", tz="UTC")),
            }
        ),
    )
    return True


def _settled_sql(run_id: str) -> str:
    """The run's transactions that settle: matched, or accepted by a decision."""
    inner = decided_results_sql([run_id])
    return f"SELECT * FROM ({inner}) WHERE category = 'matched' OR decision = 'accept'"


def load_settlement(wh: Warehouse, settlement_id: str) -> Settlement:
    """A stored settlement, with its bills, positions and transfers."""
    sid = quote_literal(settlement_id)
    head = rows(wh.query_arrow(f"SELECT * FROM settlement_runs WHERE settlement_id = {sid}"))
    if not head:
        raise ReconError(f"no settlement {settlement_id}")
    bills = {
        (r["serving_carrier"], r["home_carrier"]): r["amount"]
        for r in rows(
            wh.query_arrow(
                "SELECT toString(serving_carrier) AS serving_carrier,"
                " toString(home_carrier) AS home_carrier, sum(amount) AS amount"
                f" FROM settlement_lines WHERE settlement_id = {sid}"
                " GROUP BY serving_carrier, home_carrier ORDER BY serving_carrier, home_carrier"
            )
        )
    }
    positions = {
        r["carrier"]: Position(r["carrier"], r["receivable"], r["payable"])
        for r in rows(
            wh.query_arrow(
                "SELECT toString(carrier) AS carrier, receivable, payable"
                f" FROM settlement_positions WHERE settlement_id = {sid} ORDER BY carrier"
            )
        )
    }
    transfers = rows(
        wh.query_arrow(
            "SELECT toString(scheme) AS scheme, toString(payer) AS payer,"
            " toString(payee) AS payee, amount"
            f" FROM settlement_transfers WHERE settlement_id = {sid} ORDER BY scheme, payer, payee"
        )
    )
    h = head[0]
    return Settlement(
        settlement_id=settlement_id,
        period=h["period"],
        run_id=h["run_id"],
        created=False,
        reactivated=False,
        items=int(h["items"]),
        list_amount=h["list_amount"],
        amount=h["amount"],
        bills=bills,
        positions=positions,
        bilateral=[
            Transfer(t["payer"], t["payee"], t["amount"])
            for t in transfers
            if t["scheme"] == "bilateral"
        ],
        multilateral=[
            Transfer(t["payer"], t["payee"], t["amount"])
            for t in transfers
            if t["scheme"] == "multilateral"
        ],
    )


def settle(
    wh: Warehouse,
    period: Period | str,
    agreements: Agreements,
    run_id: str | None = None,
    carriers: Sequence[str] = CARRIERS,
) -> Settlement:
    """Settle a period (see the module docstring). ``run_id``: the reconciliation run to
    settle (default: the period's current run for ``carriers``). Idempotent."""
    label = period.label if isinstance(period, Period) else Period.parse(period).label
    if run_id is None:
        found = current_run(wh, label, carriers)
        if found is None:
            raise ReconError(
                f"no reconciliation run for {label} ({','.join(carriers)}); run"
                f" `tokenmeter reconcile --period {label}` first"
            )
        run_id = found
    run_id = check_run_id(run_id)
    info = run_info(wh, run_id)
    if info["period"] != label:
        raise ReconError(f"run {run_id} reconciles {info['period']}, not {label}")
    settled = _settled_sql(run_id)
    fp = rows(
        wh.query_arrow(
            f"SELECT count() AS n, sum(cityHash64(transaction_id)) AS h FROM ({settled})"
        )
    )[0]
    hashed = {
        "schema": SCHEMA_VERSION,
        "run_id": run_id,
        "agreements": agreements.sha256,
        "settled": int(fp["n"]),
        "settled_fingerprint": int(fp["h"] or 0),
    }
    settlement_id = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:16]
    sid = quote_literal(settlement_id)
    if scalar(wh.query_arrow(f"SELECT count() FROM settlement_runs WHERE settlement_id = {sid}")):
        reactivated = _activate(wh, label, settlement_id)
        result = load_settlement(wh, settlement_id)
        result.reactivated = reactivated
        return result
    for table in SETTLED_TABLES:  # leftovers of an interrupted settlement
        if scalar(wh.query_arrow(f"SELECT count() FROM {table} WHERE settlement_id = {sid}")):
            wh.execute(f"DELETE FROM {table} WHERE settlement_id = {sid}")

    wh.execute(
        "INSERT INTO settlement_items SELECT"
        f" {sid} AS settlement_id,"
        " concat(serving_carrier, '>', home_carrier, '/', model_id, '/', provider, '/', channel)"
        " AS line_id,"
        f" {quote_literal(label)} AS period, run_id, transaction_id, category,"
        " if(category = 'matched', 'matched', 'accepted') AS basis,"
        " serving_carrier, home_carrier, tenant_id, model_id, provider, channel,"
        " serving_event_id, home_event_id,"
        " if(serving_records > 0, serving_amount, home_amount) AS list_amount"
        f" FROM ({settled})"
    )
    groups = rows(
        wh.query_arrow(
            "SELECT line_id, toString(serving_carrier) AS serving_carrier,"
            " toString(home_carrier) AS home_carrier, toString(model_id) AS model_id,"
            " toString(provider) AS provider, toString(channel) AS channel,"
            " count() AS transactions, sum(list_amount) AS list_amount"
            f" FROM settlement_items WHERE settlement_id = {sid}"
            " GROUP BY line_id, serving_carrier, home_carrier, model_id, provider, channel"
            " ORDER BY line_id"
        )
    )
    lines: dict[str, list[Any]] = {
        k: []
        for k in (
            "line_id",
            "serving_carrier",
            "home_carrier",
            "model_id",
            "provider",
            "channel",
            "transactions",
            "list_amount",
            "rate_percent",
            "amount",
        )
    }
    shares: dict[str, list[Any]] = {
        k: []
        for k in (
            "line_id",
            "serving_carrier",
            "home_carrier",
            "party_type",
            "party",
            "share_percent",
            "amount",
        )
    }
    bills: dict[tuple[str, str], Decimal] = {}
    for g in groups:
        rate = agreements.wholesale.rate(g["serving_carrier"], g["home_carrier"], g["model_id"])
        amount = wholesale_amount(g["list_amount"], rate)
        for k in ("line_id", "serving_carrier", "home_carrier", "model_id", "provider", "channel"):
            lines[k].append(g[k])
        lines["transactions"].append(int(g["transactions"]))
        lines["list_amount"].append(g["list_amount"])
        lines["rate_percent"].append(rate)
        lines["amount"].append(amount)
        pair = (g["serving_carrier"], g["home_carrier"])
        bills[pair] = bills.get(pair, Decimal("0.00")) + amount
        split = agreements.revenue_share.split(g["provider"], g["channel"], g["serving_carrier"])
        percents = [p for _, p in split.items()]
        parties = {
            "serving_carrier": g["serving_carrier"],
            "model_provider": g["provider"],
            "channel": g["channel"],
        }
        for (party_type, pct), part in zip(
            split.items(), split_amount(amount, percents), strict=True
        ):
            shares["line_id"].append(g["line_id"])
            shares["serving_carrier"].append(g["serving_carrier"])
            shares["home_carrier"].append(g["home_carrier"])
            shares["party_type"].append(party_type)
            shares["party"].append(parties[party_type])
            shares["share_percent"].append(pct)
            shares["amount"].append(part)

    n_lines = len(lines["line_id"])
    if n_lines:
        wh.insert_arrow(
            "settlement_lines",
            pa.table(
                {
                    "settlement_id": [settlement_id] * n_lines,
                    "line_id": lines["line_id"],
                    "period": [label] * n_lines,
                    "serving_carrier": lines["serving_carrier"],
                    "home_carrier": lines["home_carrier"],
                    "model_id": lines["model_id"],
                    "provider": lines["provider"],
                    "channel": lines["channel"],
                    "transactions": pa.array(lines["transactions"], pa.uint64()),
                    "list_amount": pa.array(lines["list_amount"], pa.decimal128(38, 6)),
                    "rate_percent": pa.array(lines["rate_percent"], pa.decimal128(9, 4)),
                    "amount": pa.array(lines["amount"], pa.decimal128(38, 2)),
                    "currency": [CURRENCY] * n_lines,
                }
            ),
        )
        n_shares = len(shares["line_id"])
        wh.insert_arrow(
            "revenue_shares",
            pa.table(
                {
                    "settlement_id": [settlement_id] * n_shares,
                    "line_id": shares["line_id"],
                    "period": [label] * n_shares,
                    "serving_carrier": shares["serving_carrier"],
                    "home_carrier": shares["home_carrier"],
                    "party_type": shares["party_type"],
                    "party": shares["party"],
                    "share_percent": pa.array(shares["share_percent"], pa.decimal128(9, 4)),
                    "amount": pa.array(shares["amount"], pa.decimal128(38, 2)),
                    "currency": [CURRENCY] * n_shares,
                }
            ),
        )
    run_carriers = list(info["carriers"])
    positions = net_positions(bills, run_carriers)
    wh.insert_arrow(
        "settlement_positions",
        pa.table(
            {
                "settlement_id": [settlement_id] * len(positions),
                "period": [label] * len(positions),
                "carrier": list(positions),
                "receivable": pa.array(
                    [p.receivable for p in positions.values()], pa.decimal128(38, 2)
                ),
                "payable": pa.array([p.payable for p in positions.values()], pa.decimal128(38, 2)),
                "net": pa.array([p.net for p in positions.values()], pa.decimal128(38, 2)),
            }
        ),
    )
    bilateral = bilateral_transfers(bills)
    multilateral = multilateral_transfers(positions)
    transfers = [("bilateral", t) for t in bilateral] + [("multilateral", t) for t in multilateral]
    if transfers:
        wh.insert_arrow(
            "settlement_transfers",
            pa.table(
                {
                    "settlement_id": [settlement_id] * len(transfers),
                    "period": [label] * len(transfers),
                    "scheme": [s for s, _ in transfers],
                    "payer": [t.payer for _, t in transfers],
                    "payee": [t.payee for _, t in transfers],
                    "amount": pa.array([t.amount for _, t in transfers], pa.decimal128(38, 2)),
                }
            ),
        )
    list_total = sum(lines["list_amount"], Decimal("0.000000"))
    total = sum(lines["amount"], Decimal("0.00"))
    items = int(fp["n"])
    wh.insert_arrow(
        "settlement_runs",
        pa.table(
            {
                "settlement_id": [settlement_id],
                "period": [label],
                "run_id": [run_id],
                "agreements_sha256": [agreements.sha256],
                "wholesale_version": [agreements.wholesale.version],
                "revenue_share_version": [agreements.revenue_share.version],
                "items": pa.array([items], pa.uint64()),
                "list_amount": pa.array([list_total], pa.decimal128(38, 6)),
                "amount": pa.array([total], pa.decimal128(38, 2)),
                "currency": [CURRENCY],
                "created_at": pa.array([_now()], pa.timestamp("us", tz="UTC")),
            }
        ),
    )
    _activate(wh, label, settlement_id)
    return Settlement(
        settlement_id=settlement_id,
        period=label,
        run_id=run_id,
        created=True,
        reactivated=False,
        items=items,
        list_amount=list_total,
        amount=total,
        bills=dict(sorted(bills.items())),
        positions=positions,
        bilateral=bilateral,
        multilateral=multilateral,
    )
