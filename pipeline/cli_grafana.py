"""``tokenmeter grafana ...``: dashboards, data sources and alert rules as code.

- ``grafana export DIR`` writes Grafana provisioning files (what ``infra/grafana/``
  holds, loaded by a stock Grafana at start);
- ``grafana deploy --url URL --token T`` upserts the same objects through Grafana's HTTP
  API, writing only what differs (a second deploy writes nothing).

The token comes from ``--token`` or ``TOKENMETER_GRAFANA_TOKEN`` and is never printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit, urlunsplit

import typer
from rich.console import Console
from rich.table import Table

from pipeline.grafana import PASSWORD_ENV, DataSourceConfig

console = Console()
err_console = Console(stderr=True)

grafana_app = typer.Typer(
    help="Dashboards, data sources and alert rules as code (Grafana).", no_args_is_help=True
)

_DEFAULTS = DataSourceConfig()

ClickHouseHost = Annotated[str, typer.Option(help="ClickHouse host as Grafana reaches it.")]
ClickHousePort = Annotated[int, typer.Option(help="ClickHouse HTTP port.")]
ClickHouseDatabase = Annotated[str, typer.Option(help="ClickHouse database.")]
ClickHouseUser = Annotated[str, typer.Option(help="ClickHouse user for Grafana (read-only).")]
PrometheusUrl = Annotated[str, typer.Option(help="Prometheus URL as Grafana reaches it.")]


def _config(host: str, port: int, database: str, user: str, prometheus: str) -> DataSourceConfig:
    return DataSourceConfig(
        clickhouse_host=host,
        clickhouse_port=port,
        clickhouse_database=database,
        clickhouse_user=user,
        prometheus_url=prometheus,
    )


@grafana_app.command("export")
def export_cmd(
    directory: Annotated[Path, typer.Argument(help="Where to write (e.g. infra/grafana).")],
    clickhouse_host: ClickHouseHost = _DEFAULTS.clickhouse_host,
    clickhouse_port: ClickHousePort = _DEFAULTS.clickhouse_port,
    clickhouse_database: ClickHouseDatabase = _DEFAULTS.clickhouse_database,
    clickhouse_user: ClickHouseUser = _DEFAULTS.clickhouse_user,
    prometheus_url: PrometheusUrl = _DEFAULTS.prometheus_url,
) -> None:
    """Write the provisioning files: provisioning/{datasources,dashboards,alerting}/ and
    dashboards/*.json. Unchanged files are left alone."""
    from pipeline.grafana import export, provisioning_files

    config = _config(
        clickhouse_host, clickhouse_port, clickhouse_database, clickhouse_user, prometheus_url
    )
    written = export(directory, config)
    total = len(provisioning_files(config))
    for path in written:
        console.print(f"wrote {path}")
    console.print(f"{len(written)} of {total} file(s) changed under {directory}")


@grafana_app.command("deploy")
def deploy_cmd(
    url: Annotated[str, typer.Option(help="Grafana base URL, e.g. http://127.0.0.1:3000.")],
    token: Annotated[
        str,
        typer.Option(
            envvar="TOKENMETER_GRAFANA_TOKEN",
            show_envvar=True,
            show_default=False,
            help="Service-account token (Editor or Admin). Never printed.",
        ),
    ],
    clickhouse_password: Annotated[
        str | None,
        typer.Option(
            envvar=PASSWORD_ENV,
            show_envvar=True,
            show_default=False,
            help="Password of the ClickHouse user; sent only if the data source has none.",
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Show what would change; write nothing.")] = False,
    timeout: Annotated[float, typer.Option(min=1.0, help="HTTP timeout in seconds.")] = 30.0,
    clickhouse_host: ClickHouseHost = _DEFAULTS.clickhouse_host,
    clickhouse_port: ClickHousePort = _DEFAULTS.clickhouse_port,
    clickhouse_database: ClickHouseDatabase = _DEFAULTS.clickhouse_database,
    clickhouse_user: ClickHouseUser = _DEFAULTS.clickhouse_user,
    prometheus_url: PrometheusUrl = _DEFAULTS.prometheus_url,
) -> None:
    """Upsert the tokenmeter folder, data sources, dashboards and alert-rule groups.
    Idempotent: everything is compared first, and only differences are written."""
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaException

    from pipeline.grafana import deploy

    config = _config(
        clickhouse_host, clickhouse_port, clickhouse_database, clickhouse_user, prometheus_url
    )
    api = GrafanaApi.from_url(url, credential=token, timeout=timeout)
    try:
        changes = deploy(api, config, clickhouse_password=clickhouse_password, dry_run=dry_run)
    except GrafanaException as exc:
        # The message is Grafana's answer (or the connection error); the token is sent
        # in a header and appears in neither.
        err_console.print(f"[red]error:[/] Grafana at {_redact(url)}: {_describe(exc)}")
        raise typer.Exit(2) from None
    table = Table("kind", "uid", "title", "action")
    for c in changes:
        colour = {"unchanged": "dim", "created": "green", "updated": "yellow"}[c.action]
        action = f"would be {c.action}" if dry_run and c.action != "unchanged" else c.action
        table.add_row(c.kind, c.uid, c.title, f"[{colour}]{action}[/]")
    console.print(table)
    writes = sum(c.action != "unchanged" for c in changes)
    verb = "would change" if dry_run else "changed"
    console.print(f"{writes} of {len(changes)} object(s) {verb}")


def _redact(url: str) -> str:
    """The URL without any user:password part."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _describe(exc: Exception) -> str:
    status = getattr(exc, "status_code", 0)
    message = getattr(exc, "message", None) or str(exc)
    if status == 401:
        return "401 unauthorized (check --token / TOKENMETER_GRAFANA_TOKEN)"
    if status == 403:
        return "403 forbidden (the token needs the Editor or Admin role)"
    return f"{status} {message}" if status else str(message)


def register(app: typer.Typer) -> None:
    """Mount ``grafana export`` and ``grafana deploy`` on the ``tokenmeter`` app."""
    app.add_typer(grafana_app, name="grafana")


__all__ = ["grafana_app", "register"]
