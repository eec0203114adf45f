"""``tokenmeter prices ...``: look at and check price card files.

The lead mounts it with ``app.add_typer(prices_app, name="prices")``. Errors in a card
are printed one per line (``<file>: <yaml path>: <problem>``) with exit code 1, never a
traceback.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline.metering.pricing import (
    DEFAULT_CARD_DIR,
    TOKEN_CLASSES,
    PriceBook,
    PriceCard,
    PriceCardError,
    load_cards,
)

prices_app = typer.Typer(
    help="Price cards: show them, check a file before it is deployed.",
    no_args_is_help=True,
)

_CLASS_LABELS = {
    "input": "Input",
    "cached_input": "Cached",
    "output": "Output",
    "reasoning": "Reasoning",
}
_SHOWN_CLASSES = ("input", "cached_input", "output", "reasoning")


def _num(value: Decimal, places: int = 2) -> str:
    """Fixed notation, at least ``places`` decimals, never dropping a significant digit."""
    exponent = value.normalize().as_tuple().exponent
    shown = max(places, -exponent) if isinstance(exponent, int) else places
    return f"{value:.{shown}f}"


def _load_or_exit(path: Path) -> PriceBook:
    try:
        return load_cards(path)
    except PriceCardError as exc:
        for line in exc.errors:
            typer.echo(line, err=True)
        raise typer.Exit(1) from None


def _card_table(card: PriceCard, previous: PriceCard | None, source: str) -> Table:
    table = Table(
        title=(
            f"Price card {card.version}, effective from "
            f"{card.effective_from.isoformat()} ({source})"
        ),
        caption=(
            "CNY per million tokens. (x) = not set, follows the input/output price"
            + (f"; up/down arrow = changed since {previous.version}" if previous else "")
            + ". TU per token = TU factor x class weight."
        ),
        title_justify="left",
        caption_justify="left",
    )
    table.add_column("Carrier", no_wrap=True)
    table.add_column("Model", no_wrap=True, overflow="fold")
    for cls in _SHOWN_CLASSES:
        table.add_column(_CLASS_LABELS[cls], justify="right", no_wrap=True)
    table.add_column("TU factor", justify="right", no_wrap=True)
    for line in card.lines:
        before = previous.line_for(line.serving_carrier, line.model_id) if previous else None
        cells: list[Text | str] = [Text(line.serving_carrier), Text(line.model_id)]
        for cls in _SHOWN_CLASSES:
            price = line.prices.price(cls)
            shown, style = _num(price), ""
            if getattr(line.prices, cls) is None:
                shown, style = f"({shown})", "dim"
            old = before.prices.price(cls) if before is not None else price
            if old != price:
                shown, style = shown + (" ↓" if price < old else " ↑"), "bold yellow"
            cells.append(Text(shown, style=style))
        units = card.units_for(line.model_id)
        cells.append(_num(units.token_unit_factor, 1) if units else "-")
        table.add_row(*cells)
    return table


def _policy_table(card: PriceCard) -> Table:
    table = Table(title=f"Plans and billing, card {card.version}", title_justify="left")
    table.add_column("Setting")
    table.add_column("Value")
    weights = card.class_weights
    shown = ", ".join(
        f"{cls.replace('_', ' ')} {_num(w, 0)}"
        for cls in TOKEN_CLASSES
        if (w := getattr(weights, cls)) is not None
    )
    table.add_row("TU class weights", shown or "all 1")
    for name, plan in card.plans.items():
        tiers = "; ".join(
            f"from {tier.from_tu:,f} TU: {_num(tier.discount_percent, 0)} % off"
            for tier in plan.tiers
        )
        table.add_row(Text(f"plan {name} (per {plan.period})"), tiers or "list price")
    billed = card.billable.model_dump()
    table.add_row("billable", ", ".join(s for s, b in billed.items() if b) or "none")
    table.add_row("not billable", ", ".join(s for s, b in billed.items() if not b) or "none")
    return table


@prices_app.command("show")
def show(
    file_or_dir: Annotated[
        Path, typer.Argument(help="A price card file or a directory of them.")
    ] = DEFAULT_CARD_DIR,
) -> None:
    """Print every version of the price card as tables."""
    book = _load_or_exit(file_or_dir)
    console = Console(highlight=False)
    previous: PriceCard | None = None
    for card in book.cards:
        source = book.sources[card.version].name if card.version in book.sources else "?"
        console.print(_card_table(card, previous, source))
        console.print(_policy_table(card))
        console.print()
        previous = card


@prices_app.command("check")
def check(
    file: Annotated[Path, typer.Argument(help="A price card file (or a directory of them).")],
) -> None:
    """Validate price card files; print OK and a summary, or every error (exit code 1)."""
    book = _load_or_exit(file)
    lines = sum(len(card.lines) for card in book.cards)
    versions = ", ".join(
        f"{card.version} (from {card.effective_from.isoformat()})" for card in book.cards
    )
    typer.echo(f"OK: {lines} lines, versions {versions}")
