"""``tokenmeter rerate --from T1 --to T2``: re-rate an event-time range after a price-card
fix (the job is ``jobs/rerate.py``; its docstring says what is written, in which order).

The lead mounts it with ``register(app)``. Prints the range's totals before and after,
side by side (overall, by model, by price card version), the number of changed events
and the run id. Mistakes end with a one-line message, never a traceback: exit code 1
for a bad price card or events the cards cannot price, 2 for a bad option, a warehouse
held by the running worker ("stop the worker first") or a warehouse error.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from jobs.rerate import RerateError, RerateReport, Totals, UnpricedEventsError, rerate, to_ms
from pipeline.metering.plans import PlansError, load_plans
from pipeline.metering.pricing import PriceCardError, load_cards
from pipeline.settings import Settings
from pipeline.warehouse import WarehouseError, WarehouseLockedError, open_warehouse


def parse_instant(option: str, text: str) -> int:
    """An RFC 3339 date-time with a UTC offset as epoch ms; ``typer.BadParameter`` names
    the option otherwise."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not an RFC 3339 date-time (e.g. 2026-11-28T08:00:00+08:00)",
            param_hint=option,
        ) from None
    if when.tzinfo is None:
        raise typer.BadParameter(
            f"{text!r} has no UTC offset; write e.g. {text.strip()}+08:00", param_hint=option
        )
    return to_ms(when)


def _error(console: Console, message: str) -> None:
    console.print(Text.assemble(("error: ", "red"), message))


def _money(value: Decimal) -> str:
    return f"{value:,.6f}"


def _change(old: Decimal, new: Decimal) -> str:
    diff = new - old
    return f"{diff:+,.6f}" if diff else "0"


def _totals_table(report: RerateReport) -> Table:
    table = Table(title="Range totals", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("", style="bold", overflow="fold")
    table.add_column("before", justify="right", overflow="fold")
    table.add_column("after", justify="right", overflow="fold")
    table.add_column("change", justify="right", overflow="fold")
    old, new = report.old, report.new
    table.add_row("events", f"{old.events:,}", f"{new.events:,}", "0")
    table.add_row(
        "token units",
        _money(old.token_units),
        _money(new.token_units),
        _change(old.token_units, new.token_units),
    )
    table.add_row(
        "amount (CNY)", _money(old.amount), _money(new.amount), _change(old.amount, new.amount)
    )
    table.add_row(
        "list amount (CNY)",
        _money(old.list_amount),
        _money(new.list_amount),
        _change(old.list_amount, new.list_amount),
    )
    return table


def _model_table(report: RerateReport) -> Table:
    tu_moved = any(old.token_units != new.token_units for old, new in report.by_model.values())
    table = Table(title="By model", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("model", overflow="fold")
    table.add_column("events", justify="right", overflow="fold")
    table.add_column("CNY before", justify="right", overflow="fold")
    table.add_column("CNY after", justify="right", overflow="fold")
    table.add_column("change", justify="right", overflow="fold")
    if tu_moved:
        table.add_column("TU change", justify="right", overflow="fold")
    for model, (old, new) in report.by_model.items():
        cells = [
            model,
            f"{old.events:,}",
            _money(old.amount),
            _money(new.amount),
            _change(old.amount, new.amount),
        ]
        if tu_moved:
            cells.append(_change(old.token_units, new.token_units))
        table.add_row(*cells)
    return table


def _version_table(report: RerateReport) -> Table:
    table = Table(title="By price card version", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("version", overflow="fold")
    table.add_column("events before", justify="right", overflow="fold")
    table.add_column("events after", justify="right", overflow="fold")
    table.add_column("CNY before", justify="right", overflow="fold")
    table.add_column("CNY after", justify="right", overflow="fold")
    empty = Totals()
    for version in sorted({*report.by_version_old, *report.by_version_new}):
        old = report.by_version_old.get(version, empty)
        new = report.by_version_new.get(version, empty)
        table.add_row(
            version,
            f"{old.events:,}",
            f"{new.events:,}",
            _money(old.amount),
            _money(new.amount),
        )
    return table


def print_report(console: Console, report: RerateReport, dry_run: bool) -> None:
    """The side-by-side totals and what was (or would be) written."""
    for run_id, outcome in report.recovered:
        console.print(f"interrupted run {run_id}: {outcome}")
    console.print(_totals_table(report))
    if report.by_model:
        console.print(_model_table(report))
        console.print(_version_table(report))
    console.print(f"changed events: {report.changed:,} of {report.old.events:,}")
    seconds = sum(report.seconds.values())
    if report.changed == 0:
        console.print(f"nothing to re-rate: 0 changed, nothing written ({seconds:.1f} s)")
    elif dry_run:
        console.print(f"dry run: run id would be {report.run_id}; nothing written")
    else:
        rows = ", ".join(f"{t} {n:,}" for t, n in report.rollup_rows.items())
        console.print(f"run id: {report.run_id}")
        console.print(f"rollup delta rows: {rows}; usage_events updated ({seconds:.1f} s)")
    if report.price_cards_stored:
        console.print(f"price_cards updated for: {', '.join(report.price_cards_stored)}")


def rerate_command(
    ctx: typer.Context,
    from_: Annotated[
        str,
        typer.Option(
            "--from", help="Start of the event-time range (inclusive), RFC 3339 with offset."
        ),
    ],
    to: Annotated[
        str,
        typer.Option("--to", help="End of the event-time range (exclusive), RFC 3339 with offset."),
    ],
    price_cards: Annotated[
        Path | None,
        typer.Option(help="Price card directory or file (default: TOKENMETER_PRICE_CARDS)."),
    ] = None,
    tenant_plans: Annotated[
        Path | None,
        typer.Option(help="Tenant plans file (default: TOKENMETER_TENANT_PLANS)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Compute and print; write nothing.")
    ] = False,
) -> None:
    """Re-rate events whose event_time is in [--from, --to) with the current price cards;
    correct usage_events (rated_usage) and the minute/hour/day rollups. Idempotent: a
    second run finds nothing to change. Stop the worker first (embedded warehouse)."""
    settings: Settings = ctx.obj
    start_ms = parse_instant("--from", from_)
    end_ms = parse_instant("--to", to)
    if end_ms <= start_ms:
        raise typer.BadParameter("must be after --from", param_hint="--to")
    cards_path = price_cards if price_cards is not None else settings.price_cards
    plans_path = tenant_plans if tenant_plans is not None else settings.tenant_plans
    err = Console(stderr=True, highlight=False)
    try:
        book = load_cards(cards_path)
    except PriceCardError as exc:
        for line in exc.errors:
            err.print(line, markup=False)
        raise typer.Exit(1) from None
    try:
        plans = load_plans(plans_path)
    except PlansError as exc:
        _error(err, f"tenant plans: {exc}")
        raise typer.Exit(2) from None
    try:
        wh = open_warehouse(settings)
    except WarehouseLockedError:
        _error(
            err,
            f"stop the worker first: the embedded warehouse ({settings.warehouse_path}) is "
            "open in another process, usually `tokenmeter worker`, and `tokenmeter rerate` "
            "needs it to itself. Run rerate again once the worker has stopped, then start "
            "the worker with the fixed price cards.",
        )
        raise typer.Exit(2) from None
    console = Console(highlight=False)
    try:
        report = rerate(wh, book, plans, start_ms, end_ms, dry_run=dry_run, source=str(cards_path))
    except UnpricedEventsError as exc:
        _error(err, str(exc))
        for carrier, event_id, why in exc.events[:10]:
            err.print(f"  {carrier} {event_id}: {why.reason}: {why.detail}", markup=False)
        raise typer.Exit(1) from None
    except (RerateError, WarehouseError) as exc:
        _error(err, str(exc))
        raise typer.Exit(2) from None
    finally:
        wh.close()
    console.print(
        f"Re-rating events from {from_} to {to} with price cards "
        f"{', '.join(book.versions)} ({cards_path})"
    )
    print_report(console, report, dry_run)


def register(app: typer.Typer) -> None:
    """Add ``rerate`` to the ``tokenmeter`` app."""
    app.command("rerate")(rerate_command)
