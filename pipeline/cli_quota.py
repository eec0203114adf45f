"""``tokenmeter quota set|show|delete|watch``: quota definitions and their alerts.

Definitions live in the compacted Kafka topic ``tokenmeter-quota-definitions`` (the
source of truth); ``set`` and ``delete`` write there and the worker picks the change up
within a second. ``show`` reads the topic and, if the worker runs, its current figures.
``watch`` tails ``quota-events``. Mistakes end with one line on stderr and exit code 2.

Mounted by the lead with ``register(app)``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline.settings import Settings

quota_app = typer.Typer(
    help="Quotas per tenant (or subscriber): define, show, delete, watch their alerts.",
    no_args_is_help=True,
)
console = Console()
err_console = Console(stderr=True)
_BEIJING = timedelta(hours=8)


def register(app: typer.Typer) -> None:
    """Mount ``quota`` on the main CLI."""
    app.add_typer(quota_app, name="quota")


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[red]error:[/] {message}", highlight=False)
    return typer.Exit(2)


def _settings(ctx: typer.Context) -> Settings:
    obj = ctx.find_root().obj
    if not isinstance(obj, Settings):
        from pipeline.settings import load_settings

        obj = load_settings()
    return obj


def _subscriber(settings: Settings, raw: str | None) -> str | None:
    if raw is None:
        return None
    from pipeline.events import pseudonymise

    return pseudonymise(raw, settings.pseudonym_secret())


def _decimal(text: str, option: str) -> Decimal:
    try:
        value = Decimal(text.replace("_", "").replace(",", ""))
    except InvalidOperation:
        raise _fail(f"{option}: not a number: {text!r}") from None
    if not value.is_finite() or value <= 0:
        raise _fail(f"{option}: must be a positive number")
    return value


@quota_app.command("set")
def quota_set(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant id.")],
    period: Annotated[str, typer.Option("--period", help="day or month (Beijing time).")],
    limit_tu: Annotated[str, typer.Option("--limit-tu", help="Limit in Token Units.")],
    thresholds: Annotated[
        str, typer.Option("--thresholds", help="Alert thresholds, percent of the limit.")
    ] = "50,80,100",
    hard: Annotated[
        bool,
        typer.Option("--hard/--soft", help="Hard: never grant past the limit. Soft: flag it."),
    ] = False,
    limit_cny: Annotated[
        str | None, typer.Option("--limit-cny", help="Optional limit in CNY as well.")
    ] = None,
    subscriber: Annotated[
        str | None,
        typer.Option("--subscriber", help="A subscriber's own quota (pseudonymised here)."),
    ] = None,
) -> None:
    """Define (or replace) a quota. The worker applies it within a second."""
    from pydantic import ValidationError

    from pipeline.metering.quota import QuotaDefinition, parse_thresholds
    from pipeline.quota.definitions import ensure_quota_topics, publish_definition

    settings = _settings(ctx)
    if period not in ("day", "month"):
        raise _fail(f"--period: must be day or month, not {period!r}")
    try:
        levels = parse_thresholds(thresholds)
    except ValueError as exc:
        raise _fail(f"--thresholds: {exc}") from None
    try:
        definition = QuotaDefinition(
            tenant_id=tenant,
            subscriber_id=_subscriber(settings, subscriber),
            period=period,  # type: ignore[arg-type]
            limit_tu=_decimal(limit_tu, "--limit-tu"),
            limit_cny=_decimal(limit_cny, "--limit-cny") if limit_cny is not None else None,
            thresholds=levels,
            hard=hard,
            updated_at=datetime.now(tz=UTC),
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        option = "--" + str(first["loc"][0]).replace("_id", "").replace("_", "-")
        raise _fail(f"{option}: {first['msg']}") from None
    ensure_quota_topics(settings)
    publish_definition(settings, definition)
    console.print(
        f"quota set: [bold]{definition.topic_key}[/] {definition.period} "
        f"{_fmt(definition.limit_tu)} TU"
        + (f" / {_fmt(definition.limit_cny)} CNY" if definition.limit_cny else "")
        + f", {'hard' if definition.hard else 'soft'}, thresholds "
        + ", ".join(f"{_fmt(t)}%" for t in definition.thresholds),
        highlight=False,
    )


@quota_app.command("delete")
def quota_delete(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant id.")],
    subscriber: Annotated[str | None, typer.Option("--subscriber")] = None,
) -> None:
    """Delete a quota (a tombstone on the definitions topic)."""
    from pipeline.metering.quota import QuotaKey
    from pipeline.quota.definitions import (
        current_definitions,
        publish_tombstone,
        read_definitions,
    )

    settings = _settings(ctx)
    key = QuotaKey(tenant, _subscriber(settings, subscriber) or "").topic_key
    changes, _ = _read(settings, read_definitions)
    if key not in current_definitions(changes):
        raise _fail(f"no quota defined for {key}")
    publish_tombstone(settings, key)
    console.print(f"quota deleted: [bold]{key}[/]", highlight=False)


def _read(settings: Settings, fn: Any) -> Any:
    try:
        return fn(settings, 15.0)
    except TimeoutError as exc:
        raise _fail(
            f"cannot read quota definitions from {settings.kafka_bootstrap}: {exc}"
        ) from None


def _worker_status(settings: Settings, key: Any) -> dict[str, Any] | None:
    from urllib.parse import quote

    url = f"{settings.web_url}/v1/quotas/{quote(key.tenant_id, safe='')}"
    if key.subscriber_id:
        url += f"?subscriber_id={key.subscriber_id}"
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            body: dict[str, Any] = json.loads(resp.read())
            return body
    except urllib.error.HTTPError as exc:
        try:
            return {"error": json.loads(exc.read()).get("error", str(exc))}
        except ValueError:
            return {"error": str(exc)}
    except (OSError, ValueError):
        return None


@quota_app.command("show")
def quota_show(
    ctx: typer.Context,
    tenant: Annotated[str | None, typer.Option("--tenant", help="Only this tenant.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per quota.")] = False,
) -> None:
    """The quota definitions, with current usage from the worker when it runs."""
    from pipeline.quota.definitions import current_definitions, read_definitions
    from pipeline.quota.service import key_from_topic_key

    settings = _settings(ctx)
    changes, _ = _read(settings, read_definitions)
    current = current_definitions(changes)
    rows = []
    for topic_key, change in sorted(current.items()):
        d = change.definition
        assert d is not None
        if tenant is not None and d.tenant_id != tenant:
            continue
        live = _worker_status(settings, key_from_topic_key(topic_key))
        rows.append((d, live))
    if as_json:
        for d, live in rows:
            body = json.loads(d.model_dump_json())
            body["usage"] = live
            typer.echo(json.dumps(body))
        return
    if not rows:
        console.print("no quotas defined" + (f" for tenant {tenant}" if tenant else ""))
        return
    table = Table("quota", "period", "limit TU", "mode", "used", "reserved", "remaining", "state")
    for col in (2, 4, 5, 6):
        table.columns[col].justify = "right"
    worker_seen = False
    for d, live in rows:
        usage: list[str | Text] = ["-", "-", "-", Text("no worker", style="dim")]
        if live is not None and "error" in live:
            usage = ["-", "-", "-", Text(str(live["error"])[:40], style="yellow")]
        elif live is not None:
            worker_seen = True
            style = {"ok": "green", "warning": "yellow", "exhausted": "red"}.get(live["state"], "")
            usage = [
                _fmt(Decimal(live["used"])),
                _fmt(Decimal(live["reserved"])),
                _fmt(Decimal(live["remaining"])),
                Text(live["state"], style=style),
            ]
        table.add_row(
            d.topic_key,
            d.period,
            _fmt(d.limit_tu) + (f"\n{_fmt(d.limit_cny)} CNY" if d.limit_cny else ""),
            ("hard " if d.hard else "soft ") + "/".join(_fmt(t) for t in d.thresholds) + "%",
            *usage,
        )
    console.print(table)
    if not worker_seen:
        console.print(f"[dim]usage: no worker answered at {settings.web_url}[/]")


def _fmt(value: Decimal | None) -> str:
    if value is None:
        return ""
    text = format(value.normalize(), "f")
    whole, _, frac = text.partition(".")
    return f"{int(whole):,}" + (f".{frac}" if frac else "")


def _alert_line(alert: dict[str, Any]) -> Text:
    crossed = datetime.fromisoformat(alert["crossed_at"]) + _BEIJING
    kind = alert["kind"]
    style = "bold red" if kind == "exhausted" else "yellow"
    who = alert["tenant_id"] + (f"/{alert['subscriber_id']}" if alert.get("subscriber_id") else "")
    used, limit = Decimal(alert["used_tu"]), Decimal(alert["limit_tu"])
    pct = (used * 100 / limit) if limit else Decimal(0)
    line = Text()
    line.append(crossed.strftime("%m-%d %H:%M:%S"), style="dim")
    line.append(f"  {kind:<9}", style=style)
    line.append(f" {alert['threshold']:>4}%", style=style)
    line.append(f"  {who:<20} {alert['period']:<10}")
    line.append(f"  {_fmt(used):>13} / {_fmt(limit)} TU ({pct:.1f}%)")
    line.append(f"  {'hard' if alert['hard'] else 'soft'}", style="dim")
    return line


@quota_app.command("watch")
def quota_watch(
    ctx: typer.Context,
    tenant: Annotated[str | None, typer.Option("--tenant", help="Only this tenant.")] = None,
    from_beginning: Annotated[
        bool, typer.Option("--from-beginning", help="Show past alerts too.")
    ] = False,
    count: Annotated[
        int | None, typer.Option("--max", min=1, help="Stop after this many alerts.")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", min=0.1, help="Stop after this many seconds.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Tail quota alerts (threshold crossings, exhaustion) as they happen; Ctrl-C stops.

    Times are Beijing time."""
    import uuid

    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, TopicPartition

    from pipeline.quota.alerts import decode_alert

    settings = _settings(ctx)
    topic = settings.topic_quota_events
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"tokenmeter-quota-watch-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "log_level": 3,
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=10)
    except Exception as exc:  # noqa: BLE001 - any failure here: the broker is not there
        consumer.close()
        raise _fail(f"cannot reach Kafka at {settings.kafka_bootstrap}: {exc}") from None
    tmeta = meta.topics.get(topic)
    if tmeta is None or tmeta.error is not None or not tmeta.partitions:
        consumer.close()
        raise _fail(f"topic {topic} does not exist (is the stack up?)")
    start = OFFSET_BEGINNING if from_beginning else OFFSET_END
    consumer.assign([TopicPartition(topic, p, start) for p in tmeta.partitions])
    if not as_json:
        console.print(f"[dim]watching {topic} on {settings.kafka_bootstrap} (Ctrl-C stops)[/]")
    seen = 0
    deadline = time.monotonic() + timeout if timeout is not None else None
    try:
        while deadline is None or time.monotonic() < deadline:
            msg = consumer.poll(0.25)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    err_console.print(f"[yellow]kafka:[/] {err}")
                continue
            alert = decode_alert(msg.value())
            if alert is None or (tenant is not None and alert.get("tenant_id") != tenant):
                continue
            if as_json:
                typer.echo(json.dumps(alert), nl=True)
            else:
                console.print(_alert_line(alert), highlight=False, soft_wrap=True)
            seen += 1
            if count is not None and seen >= count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
