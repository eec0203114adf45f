"""``tokenmeter reconcile | recon ... | settle | report``: cross-carrier reconciliation and
settlement from the command line (the jobs are in ``jobs/``; docs/settlement.md is the
clerk's guide).

The lead mounts it with ``register(app)``:

* ``tokenmeter reconcile --period YYYY-MM [--carriers A,B]`` (tolerances as options);
* ``tokenmeter recon accept|dispute --run R --category C [--transaction T]``,
  ``tokenmeter recon list [--period P]``, ``tokenmeter recon show --run R``;
* ``tokenmeter settle --period YYYY-MM [--run R]``;
* ``tokenmeter report --period YYYY-MM [--out DIR]``.

Mistakes end with a one-line message and exit code 2, never a traceback (a bad price
card or agreement file: one line per problem, exit code 1). The embedded warehouse is
opened directly: stop the worker first.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from jobs.agreements import DEFAULT_AGREEMENTS_DIR, AgreementError, load_agreements
from jobs.reconcile import (
    CATEGORIES,
    DEFAULT_AMOUNT_TOLERANCE,
    DEFAULT_BOUNDARY_WINDOW_S,
    DISCREPANCIES,
    Period,
    ReconError,
    ReconParams,
    ReconRun,
    check_run_id,
    decision_counts,
    list_runs,
    parse_carriers,
    reconcile,
    record_decision,
    run_info,
    summary,
)
from jobs.report import write_report
from jobs.settle import Settlement, settle
from pipeline.metering.pricing import PriceCardError, load_cards
from pipeline.settings import Settings, load_settings
from pipeline.warehouse import Warehouse, WarehouseError, open_warehouse

recon_app = typer.Typer(
    help="Decisions on reconciliation discrepancies, and the runs.", no_args_is_help=True
)

_PeriodOpt = Annotated[str, typer.Option("--period", help="The month, YYYY-MM (Beijing time).")]
_CarriersOpt = Annotated[
    str | None,
    typer.Option("--carriers", help="Carriers to reconcile, e.g. CMCC,CTCC (default: all)."),
]


class _Fail(Exception):
    """A message to print before exiting with ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def _settings(ctx: typer.Context) -> Settings:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Settings) else load_settings()


def _err() -> Console:
    return Console(stderr=True, highlight=False)


def _out() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal:  # piped to a file or a pager: do not cut the tables
        console = Console(highlight=False, width=160)
    return console


def _run(ctx: typer.Context, job: Any) -> Any:
    """Open the warehouse, run ``job(wh)``, close; turn known errors into one line."""
    err = _err()
    try:
        wh = open_warehouse(_settings(ctx))
    except WarehouseError as exc:
        err.print(Text.assemble(("error: ", "red"), str(exc)))
        raise typer.Exit(2) from None
    try:
        return job(wh)
    except (PriceCardError, AgreementError) as exc:
        for line in exc.errors:
            err.print(line, markup=False)
        raise typer.Exit(1) from None
    except (ReconError, WarehouseError, _Fail) as exc:
        err.print(Text.assemble(("error: ", "red"), str(exc)))
        raise typer.Exit(getattr(exc, "code", 2)) from None
    finally:
        wh.close()


def _period(text: str) -> Period:
    try:
        return Period.parse(text)
    except ReconError as exc:
        raise typer.BadParameter(
            str(exc).removeprefix("--period: "), param_hint="--period"
        ) from None


def _money(value: Decimal | int | None, places: int = 2) -> str:
    return f"{Decimal(value or 0):,.{places}f}"


def summary_table(rows_: list[dict[str, Any]], title: str) -> Table:
    """Transactions per category (rows) and carrier pair (columns)."""
    pairs = sorted({f"{r['serving_carrier']}>{r['home_carrier']}" for r in rows_})
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("category", no_wrap=True)
    for pair in pairs:
        table.add_column(pair, justify="right", no_wrap=True)
    table.add_column("all", justify="right", style="bold")
    table.add_column("serving CNY", justify="right")
    table.add_column("home CNY", justify="right")
    for cat in CATEGORIES:
        cells = {
            f"{r['serving_carrier']}>{r['home_carrier']}": r for r in rows_ if r["category"] == cat
        }
        n = sum(int(r["transactions"]) for r in cells.values())
        s_amt = sum((r["serving_amount"] for r in cells.values()), Decimal(0))
        h_amt = sum((r["home_amount"] for r in cells.values()), Decimal(0))
        table.add_row(
            cat,
            *(f"{int(cells[p]['transactions']):,}" if p in cells else "0" for p in pairs),
            f"{n:,}",
            _money(s_amt),
            _money(h_amt),
        )
    return table


def _print_run(run: ReconRun) -> None:
    out = _out()
    out.print(summary_table(run.summary, f"Reconciliation {run.period} ({','.join(run.carriers)})"))
    if run.created:
        state = "new run"
    elif run.reactivated:
        state = "inputs match an earlier run: it is current again, nothing recomputed"
    else:
        state = "unchanged: same inputs, nothing written"
    out.print(
        f"run id: {run.run_id} ({state}); {run.input_records:,} records,"
        f" {run.transactions:,} transactions, {run.duration_s:.1f} s"
    )


def reconcile_command(
    ctx: typer.Context,
    period: _PeriodOpt,
    carriers: _CarriersOpt = None,
    token_tolerance: Annotated[
        int, typer.Option(min=0, help="Token difference (sum over classes) still matched.")
    ] = 0,
    amount_tolerance: Annotated[
        str, typer.Option(help="Relative amount difference still matched (0.001 = 0.1 %).")
    ] = str(DEFAULT_AMOUNT_TOLERANCE),
    boundary_window: Annotated[
        int,
        typer.Option(
            min=0, max=86_400, help="Seconds around a month-end midnight to pair records across."
        ),
    ] = DEFAULT_BOUNDARY_WINDOW_S,
    price_cards: Annotated[
        Path | None, typer.Option(help="Price card directory (default: TOKENMETER_PRICE_CARDS).")
    ] = None,
) -> None:
    """Pair both carriers' records of each cross-carrier call in a period and classify it:
    matched, token_mismatch, amount_mismatch, missing_at_home, missing_at_serving,
    duplicate, period_boundary. Idempotent: the same inputs give the same run."""
    p = _period(period)
    try:
        tol = Decimal(amount_tolerance)
    except InvalidOperation:
        raise typer.BadParameter("not a number", param_hint="--amount-tolerance") from None

    def job(wh: Warehouse) -> None:
        params = ReconParams(
            period=p,
            carriers=parse_carriers(carriers),
            token_tolerance=token_tolerance,
            amount_tolerance=tol,
            boundary_window_s=boundary_window,
        )
        book = load_cards(price_cards if price_cards is not None else _settings(ctx).price_cards)
        _print_run(reconcile(wh, params, book))

    _run(ctx, job)


def _decide(
    ctx: typer.Context,
    decision: str,
    run: str,
    category: str,
    transaction: str | None,
    note: str,
) -> None:
    def job(wh: Warehouse) -> None:
        d = record_decision(wh, run, category, decision, transaction, note)
        what = f"transaction {transaction}" if transaction else f"category {category}"
        _out().print(
            f"{_PAST[decision]} {what} of run {d.run_id}: {d.transactions:,} transaction(s),"
            f" CNY {_money(d.amount, 6)} list amount. Run `tokenmeter settle` to apply it."
        )

    _run(ctx, job)


_PAST = {"accept": "accepted", "dispute": "disputed"}
_RunOpt = Annotated[str, typer.Option("--run", help="Run id (see `tokenmeter recon list`).")]
_CategoryOpt = Annotated[
    str, typer.Option("--category", help=f"One of: {', '.join(DISCREPANCIES)}.")
]
_TxOpt = Annotated[
    str | None, typer.Option("--transaction", help="Only this transaction of the category.")
]
_NoteOpt = Annotated[str, typer.Option("--note", help="Why (kept with the decision).")]


@recon_app.command("accept")
def accept_command(
    ctx: typer.Context,
    run: _RunOpt,
    category: _CategoryOpt,
    transaction: _TxOpt = None,
    note: _NoteOpt = "",
) -> None:
    """Accept a category of discrepancies (or one transaction): it will be settled."""
    _decide(ctx, "accept", run, category, transaction, note)


@recon_app.command("dispute")
def dispute_command(
    ctx: typer.Context,
    run: _RunOpt,
    category: _CategoryOpt,
    transaction: _TxOpt = None,
    note: _NoteOpt = "",
) -> None:
    """Dispute a category (or one transaction): not settled; listed in later reports."""
    _decide(ctx, "dispute", run, category, transaction, note)


@recon_app.command("list")
def list_command(
    ctx: typer.Context,
    period: Annotated[str | None, typer.Option("--period", help="Only this month.")] = None,
) -> None:
    """Reconciliation runs, newest first; * marks the current run of a period."""
    label = _period(period).label if period else None

    def job(wh: Warehouse) -> None:
        table = Table(box=box.SIMPLE_HEAD)
        for col in ("", "run", "period", "carriers", "records", "transactions", "created (UTC)"):
            table.add_column(
                col, justify="right" if col in ("records", "transactions") else "left", no_wrap=True
            )
        for r in list_runs(wh, label):
            table.add_row(
                "*" if r["current"] else "",
                r["run_id"],
                r["period"],
                ",".join(r["carriers"]),
                f"{int(r['input_records']):,}",
                f"{int(r['transactions']):,}",
                r["created_at"].strftime("%Y-%m-%d %H:%M:%S"),
            )
        _out().print(table)

    _run(ctx, job)


@recon_app.command("show")
def show_command(ctx: typer.Context, run: _RunOpt) -> None:
    """A run's summary and the decisions taken on it."""

    def job(wh: Warehouse) -> None:
        run_id = check_run_id(run)
        info = run_info(wh, run_id)
        out = _out()
        out.print(summary_table(summary(wh, run_id), f"Run {run_id}: {info['period']}"))
        table = Table(title="Decisions", title_justify="left", box=box.SIMPLE_HEAD)
        for col in ("category", "accepted", "disputed", "open", "open CNY"):
            table.add_column(col, justify="left" if col == "category" else "right")
        for r in decision_counts(wh, run_id):
            table.add_row(
                r["category"],
                f"{int(r['accepted']):,}",
                f"{int(r['disputed']):,}",
                f"{int(r['open']):,}",
                _money(r["open_amount"], 6),
            )
        out.print(table)

    _run(ctx, job)


def _print_settlement(st: Settlement) -> None:
    out = _out()
    carriers = sorted(st.positions)
    table = Table(title=f"Settlement {st.period}", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("serving \\ home")
    for c in carriers:
        table.add_column(c, justify="right")
    table.add_column("receivable", justify="right")
    table.add_column("payable", justify="right")
    table.add_column("net", justify="right", style="bold")
    for s in carriers:
        pos = st.positions[s]
        table.add_row(
            s,
            *("-" if s == h else _money(st.bills.get((s, h), Decimal(0))) for h in carriers),
            _money(pos.receivable),
            _money(pos.payable),
            _money(pos.net),
        )
    out.print(table)
    for name, transfers in (("bilateral", st.bilateral), ("multilateral", st.multilateral)):
        paid = "; ".join(f"{t.payer} pays {t.payee} CNY {_money(t.amount)}" for t in transfers)
        out.print(f"{name} transfers: {paid or 'none'}")
    if st.created:
        state = "new settlement"
    elif st.reactivated:
        state = "inputs match an earlier settlement: it is current again"
    else:
        state = "unchanged: same inputs, nothing written"
    out.print(
        f"settlement id: {st.settlement_id} ({state}); run {st.run_id}; {st.items:,} settled"
        f" transactions; list CNY {_money(st.list_amount, 6)}; settled CNY {_money(st.amount)}"
    )


def settle_command(
    ctx: typer.Context,
    period: _PeriodOpt,
    run: Annotated[
        str | None, typer.Option("--run", help="Run to settle (default: the current one).")
    ] = None,
    carriers: _CarriersOpt = None,
    agreements: Annotated[
        Path, typer.Option(help="Directory with wholesale.yaml and revenue_share.yaml.")
    ] = DEFAULT_AGREEMENTS_DIR,
) -> None:
    """Settle a period's matched and accepted transactions: settlement lines at the
    wholesale rate, revenue shares, bilateral and multilateral net positions."""
    p = _period(period)

    def job(wh: Warehouse) -> None:
        ag = load_agreements(agreements)
        _print_settlement(settle(wh, p, ag, run_id=run, carriers=parse_carriers(carriers)))

    _run(ctx, job)


def report_command(
    ctx: typer.Context,
    period: _PeriodOpt,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Directory for the files (default: <data dir>/reports)."),
    ] = None,
    carriers: _CarriersOpt = None,
) -> None:
    """Write the period's settlement report (self-contained HTML) and CSV/Parquet exports
    of its settlement lines and revenue shares."""
    p = _period(period)
    target = out if out is not None else _settings(ctx).data_path / "reports"

    def job(wh: Warehouse) -> None:
        files = write_report(wh, p, target, parse_carriers(carriers))
        console = _out()
        for path in (
            files.html,
            files.lines_csv,
            files.lines_parquet,
            files.shares_csv,
            files.shares_parquet,
        ):
            console.print(str(path))

    _run(ctx, job)


def register(app: typer.Typer) -> None:
    """Add ``reconcile``, ``recon``, ``settle`` and ``report`` to the main app."""
    app.command("reconcile")(reconcile_command)
    app.command("settle")(settle_command)
    app.command("report")(report_command)
    app.add_typer(recon_app, name="recon")
