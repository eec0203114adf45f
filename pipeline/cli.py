"""``tokenmeter``: the command line (contract section 2).

Every command reads ``TOKENMETER_*`` settings; flags override them. User mistakes
(bad settings, unreachable broker, bad SQL) end with a one-line message and a non-zero
exit code, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from confluent_kafka import KafkaException
from rich.console import Console
from rich.table import Table

from pipeline.settings import Settings, SettingsError, load_settings

app = typer.Typer(
    name="tokenmeter",
    help="Usage metering for AI model Tokens at telecom carriers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
stack_app = typer.Typer(help="The local Kafka broker (KRaft, 127.0.0.1).", no_args_is_help=True)
app.add_typer(stack_app, name="stack")

console = Console()
err_console = Console(stderr=True)


class UserError(Exception):
    """A mistake the user can fix; printed without a traceback."""


def _settings(ctx: typer.Context) -> Settings:
    obj: Settings = ctx.obj
    return obj


@app.callback()
def _root(
    ctx: typer.Context,
    data_dir: Annotated[
        Path | None, typer.Option(help="Data directory (TOKENMETER_DATA_DIR).")
    ] = None,
    bootstrap: Annotated[
        str | None, typer.Option(help="Kafka bootstrap (TOKENMETER_KAFKA_BOOTSTRAP).")
    ] = None,
    warehouse_url: Annotated[
        str | None, typer.Option(help="clickhouse:// URL (TOKENMETER_WAREHOUSE_URL).")
    ] = None,
) -> None:
    ctx.obj = load_settings(
        data_dir=data_dir, kafka_bootstrap=bootstrap, warehouse_url=warehouse_url
    )


# ---- stack ---------------------------------------------------------------------


@stack_app.command("up")
def stack_up(ctx: typer.Context) -> None:
    """Start Kafka (resolving its jars with Maven on first use) and create the topics."""
    from pipeline import stack

    status = stack.stack_up(_settings(ctx), console=console)
    _print_stack(status)


@stack_app.command("down")
def stack_down(ctx: typer.Context) -> None:
    """Stop the broker that `stack up` started (nothing else)."""
    from pipeline import stack

    stopped = stack.stack_down(_settings(ctx), console=console)
    console.print("broker stopped" if stopped else "no broker of ours was running")


@stack_app.command("status")
def stack_status(ctx: typer.Context) -> None:
    """Show whether the broker runs, where, and its topics. Exit 1 if it is down."""
    from pipeline import stack

    status = stack.stack_status(_settings(ctx))
    _print_stack(status)
    if not status.running:
        raise typer.Exit(1)


def _print_stack(status: Any) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("broker", "[green]running[/]" if status.running else "[red]stopped[/]")
    table.add_row("pid", str(status.pid or "-"))
    table.add_row("bootstrap", status.bootstrap)
    table.add_row("kafka", status.kafka_version)
    table.add_row("data dir", str(status.data_dir))
    table.add_row("log", str(status.log_file))
    for name, parts in sorted(status.topics.items()):
        table.add_row("topic", f"{name} ({parts} partitions)")
    console.print(table)


# ---- worker ----------------------------------------------------------------------


@app.command()
def worker(
    ctx: typer.Context,
    loglevel: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Run the stream processor in the foreground (Ctrl-C stops it cleanly)."""
    import os

    from pipeline.app import run_worker
    from pipeline.settings import PRIVATE_UMASK
    from pipeline.stack import require_worker_topics

    settings = _settings(ctx)
    # everything the worker writes (warehouse, quota journal, its state) is owner-only
    os.umask(PRIVATE_UMASK)
    tightened = settings.private_data_dir()
    if tightened:
        err_console.print(f"[yellow]note:[/] {tightened}")
    require_worker_topics(settings)
    raise typer.Exit(run_worker(settings, loglevel=loglevel))


# ---- produce ---------------------------------------------------------------------


@app.command()
def produce(
    ctx: typer.Context,
    file: Annotated[Path, typer.Option("--file", "-f", help="JSON lines, one event each.")],
) -> None:
    """Validate and send events from a JSONL file. Bad lines are reported by number and
    sent to the dead-letter topic; good lines are sent. Exit 1 if any line was bad."""
    from pipeline.produce import UsageProducer, read_jsonl
    from pipeline.rejects import FileRejects

    settings = _settings(ctx)
    if not file.is_file():
        raise UserError(f"--file: {file} does not exist")
    producer = UsageProducer.from_settings(settings)
    rejects = FileRejects(settings, file)
    sent = 0
    problems = []
    with _progress() as progress:
        task = progress.add_task(f"sending {file.name}", total=file.stat().st_size or None)
        for number, record, problem in read_jsonl(file, producer.rules):
            if problem is not None:
                problems.append(problem)
                rejects.add(problem)
            elif record is not None:
                producer.send_record(record)
                sent += 1
            if number % 1000 == 0:
                progress.update(task, completed=rejects.bytes_read())
        progress.update(task, completed=file.stat().st_size)
        delivered = producer.flush()
        rejects.flush()
    for p in problems:
        err_console.print(f"line {p.line}: {p.reason}: {p.detail}")
    summary = Table(show_header=False, box=None)
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    summary.add_row("events sent", f"{sent:,}")
    summary.add_row("delivered", f"{delivered:,}")
    if producer.spooled:
        summary.add_row("spooled (Kafka unreachable)", f"{producer.spooled:,}")
    summary.add_row("bad lines", f"{len(problems):,}")
    console.print(summary)
    if problems:
        raise typer.Exit(1)


def _progress() -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )


# ---- simulate --------------------------------------------------------------------


@app.command()
def simulate(
    ctx: typer.Context,
    events: Annotated[int, typer.Option(min=1, help="Messages to send.")] = 10_000,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same traffic.")] = 1,
    dup_rate: Annotated[float, typer.Option(min=0.0, max=0.5)] = 0.0,
    bad_rate: Annotated[float, typer.Option(min=0.0, max=0.5)] = 0.0,
    tenants: Annotated[int, typer.Option(min=1)] = 200,
    truth: Annotated[
        Path | None, typer.Option(help="Write the exact expected totals here.")
    ] = None,
    live_rate: Annotated[
        float | None,
        typer.Option(help="Live traffic: call i happens at start + i/RATE s (else: last 2 h)."),
    ] = None,
    late_share: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Live mode: share reported 10-60 min late.")
    ] = 0.0,
    rate: Annotated[
        float | None,
        typer.Option(
            min=1.0,
            help="Send at most this many messages per second (default: as fast as possible).",
        ),
    ] = None,
    recon_calls: Annotated[
        int,
        typer.Option(
            min=0,
            help="Also send both carriers' reports of this many cross-carrier calls spread "
            "over the month (for `tokenmeter reconcile`).",
        ),
    ] = 0,
    recon_faults: Annotated[
        str | None,
        typer.Option(
            help="Discrepancies among the --recon-calls: a rate spread over all six "
            "categories (0.07), or category=rate pairs (token_mismatch=0.01,duplicate=0.02). "
            'Their exact counts go to the truth file under "recon".',
        ),
    ] = None,
) -> None:
    """Send synthetic carrier traffic (models, carriers, channels, skewed tenants,
    cross-carrier calls, failed calls) with duplicates and bad records."""
    from pipeline.simulate_run import ReconFaults, run_simulation

    settings = _settings(ctx)
    faults = None
    if recon_faults is not None:
        try:
            faults = ReconFaults.parse(recon_faults)
        except ValueError as exc:
            raise UserError(f"--recon-faults: {exc}") from None
        if not recon_calls:
            recon_calls = 1000
    try:
        result = run_simulation(
            settings,
            events,
            seed,
            dup_rate,
            bad_rate,
            tenants,
            truth,
            err_console,
            live_rate=live_rate,
            late_share=late_share,
            recon_calls=recon_calls,
            recon_faults=faults,
            send_rate=rate,
        )
    except ValueError as exc:
        if not recon_calls:
            raise
        raise UserError(f"--recon-calls/--recon-faults: {exc}") from None
    summary = Table(show_header=False, box=None)
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    summary.add_row("messages sent", f"{result['messages']:,}")
    summary.add_row("unique valid", f"{result['unique_valid']:,}")
    summary.add_row("exact duplicates", f"{result['exact_duplicates']:,}")
    summary.add_row("bad", f"{result['dead_letters_total']:,}")
    summary.add_row("rate", f"{result['rate']:,.0f} msg/s")
    if result["spooled"]:
        summary.add_row("spooled (Kafka unreachable)", f"{result['spooled']:,}")
        left = result["spool_left"]
        summary.add_row(
            "still in the spool", f"{left:,}" + (" (`tokenmeter spool drain`)" if left else "")
        )
    if "recon" in result:
        recon = result["recon"]
        summary.add_row("cross-carrier calls", f"{recon['calls']:,} ({recon['records']:,} reports)")
        for period, counts in recon["periods"].items():
            faults_n = sum(counts.values()) - counts["matched"]
            summary.add_row(
                f"  in {period}", f"{counts['matched']:,} matched, {faults_n:,} discrepancies"
            )
    if truth:
        summary.add_row("truth", str(truth))
    console.print(summary)


# ---- sql -------------------------------------------------------------------------


@app.command()
def sql(
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help="A SELECT (or SHOW/DESCRIBE/EXPLAIN).")],
    fmt: Annotated[
        str, typer.Option("--format", help="table, json (one object per row) or csv")
    ] = "table",
) -> None:
    """Read-only query of the warehouse (through the worker if it is running)."""
    from pipeline.query import run_readonly

    if fmt not in ("table", "json", "csv"):
        raise UserError("--format: choose table, json or csv")
    columns, rows = run_readonly(_settings(ctx), query)
    if fmt == "json":
        from pipeline.web import json_value

        for row in rows:
            sys.stdout.write(
                json.dumps(
                    dict(zip(columns, row, strict=True)), default=json_value, ensure_ascii=False
                )
                + "\n"
            )
    elif fmt == "csv":
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    else:
        table = Table(*columns, show_lines=False)
        for row in rows:
            table.add_row(*("" if v is None else str(v) for v in row))
        console.print(table)
        err_console.print(f"{len(rows)} row(s)")


# ---- wait ------------------------------------------------------------------------


@app.command()
def wait(
    ctx: typer.Context,
    idle: Annotated[float, typer.Option(min=0.0, help="Seconds with nothing left to do.")] = 5.0,
    timeout: Annotated[
        float, typer.Option(min=1.0, help="Give up after this many seconds.")
    ] = 900.0,
) -> None:
    """Block until the worker has processed (and committed) everything produced so far,
    and nothing new arrived for --idle seconds."""
    from pipeline.lag import wait_caught_up

    with err_console.status("waiting for the worker") as status:
        lags = wait_caught_up(_settings(ctx), idle, timeout, status.update)
    if lags is not None:
        _print_lag(lags)
        raise UserError(
            f"--timeout: still {sum(p.lag for p in lags):,} message(s) behind after "
            f"{timeout:.0f} s (is `tokenmeter worker` running?)"
        )
    console.print("all produced events are processed")


def _print_lag(lags: Any) -> None:
    table = Table("topic", "partition", "end", "committed", "lag")
    for p in lags:
        table.add_row(p.topic, str(p.partition), f"{p.end:,}", f"{p.committed:,}", f"{p.lag:,}")
    err_console.print(table)


# ---- spool -----------------------------------------------------------------------

spool_app = typer.Typer(help="The producer's on-disk spool (used while Kafka is down).")
app.add_typer(spool_app, name="spool")


@spool_app.command("status")
def spool_status(ctx: typer.Context) -> None:
    """How many messages wait in the spool, and where."""
    from pipeline.spool import Spool

    settings = _settings(ctx)
    spool = Spool(settings.spool_path, settings.spool_max_mb << 20)
    console.print(
        f"{len(spool):,} message(s) in {len(spool.segments())} segment(s), "
        f"{spool.size():,} bytes, at {spool.directory}"
    )


@spool_app.command("drain")
def spool_drain(ctx: typer.Context) -> None:
    """Send spooled messages to Kafka now (exit 1 if the broker is still unreachable)."""
    from pipeline.produce import UsageProducer

    producer = UsageProducer.from_settings(_settings(ctx))
    sent = producer.drain()
    left = len(producer.spool) if producer.spool is not None else 0
    console.print(f"re-sent {sent:,} message(s); {left:,} left in the spool")
    if left:
        raise typer.Exit(1)


# ---- dead letters ----------------------------------------------------------------

dlq_app = typer.Typer(help="Inspect and replay dead letters.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")


@dlq_app.command("list")
def dlq_list(
    ctx: typer.Context,
    reason: Annotated[str | None, typer.Option(help="Only this reason.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Only letters failed at/after this time.")
    ] = None,
) -> None:
    """Dead letters by reason and stage, with first and last occurrence."""
    from pipeline.dlq import summary

    try:
        rows = summary(_settings(ctx), reason, since)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    table = Table("reason", "stage", "letters", "first", "last")
    table.columns[2].justify = "right"
    for r in rows:
        table.add_row(
            r["reason"], r["stage"], f"{int(r['letters']):,}", str(r["first"]), str(r["last"])
        )
    console.print(table)


@dlq_app.command("replay")
def dlq_replay(
    ctx: typer.Context,
    reason: Annotated[str, typer.Option(help="Replay the letters with this reason.")],
    since: Annotated[
        str | None, typer.Option(help="Only letters failed at/after this time.")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1)] = None,
) -> None:
    """Re-submit dead letters (e.g. `unpriced` after a price card fix). Already counted
    events stay counted once; letters still invalid are reported and left in place."""
    from pipeline.dlq import replay

    try:
        result = replay(_settings(ctx), reason, since, limit)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("selected", f"{result.selected:,}")
    table.add_row("re-sent", f"{result.sent:,}")
    for why, n in sorted(result.still_invalid.items()):
        table.add_row(f"still invalid ({why})", f"{n:,}")
    console.print(table)


# ---- demo ------------------------------------------------------------------------


@app.command()
def demo(
    ctx: typer.Context,
    events: Annotated[int, typer.Option(min=100, help="Messages to simulate.")] = 50_000,
    seed: Annotated[int | None, typer.Option(help="Random seed (default: time-based).")] = None,
    keep_running: Annotated[bool, typer.Option(help="Leave broker and worker running.")] = False,
) -> None:
    """The main job on the embedded default: Kafka + worker + simulated carrier traffic,
    then a summary of what was metered."""
    from pipeline.demo import run_demo

    run_demo(_settings(ctx), events, seed, keep_running, console, err_console)


def _mount_subcommands() -> None:
    from pipeline.cli_grafana import register as register_grafana
    from pipeline.cli_prices import prices_app
    from pipeline.cli_quota import register as register_quota
    from pipeline.cli_recon import register as register_recon
    from pipeline.cli_rerate import register as register_rerate

    app.add_typer(prices_app, name="prices")
    register_rerate(app)
    register_grafana(app)
    register_quota(app)
    register_recon(app)


_mount_subcommands()


def main() -> None:
    """Entry point: run the CLI; user errors become one red line and exit code 2."""
    from pipeline.produce import DeliveryError
    from pipeline.warehouse import WarehouseError

    known: tuple[type[BaseException], ...] = (
        UserError,
        SettingsError,
        WarehouseError,
        DeliveryError,
        KafkaException,
    )
    try:
        from pipeline.stack import StackError

        known = (*known, StackError)
    except ImportError:  # pragma: no cover
        pass
    try:
        app()
    except known as exc:
        err_console.print(f"[red]error:[/] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
