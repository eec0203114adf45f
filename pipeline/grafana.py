"""Dashboards, data sources and alert rules as code: the one place their SQL lives.

Everything operators see in Grafana is defined here, in Python, and turned into two
outputs that always agree:

- ``export(directory)`` writes Grafana *provisioning* files (``infra/grafana/``): data
  sources, a dashboard provider, the dashboards' JSON and the alert rules, which a stock
  Grafana loads at start (see ``infra/docker-compose.yml``);
- ``deploy(api, ...)`` upserts the same folder, data sources, dashboards and alert-rule
  groups into a running Grafana through its HTTP API (grafana-client). It reads each
  object first and writes only what differs, so a second deploy writes nothing.

Dashboards query ClickHouse through Grafana's official ClickHouse plugin
(``grafana-clickhouse-datasource``; macros ``$__timeFilter``, ``$__timeInterval``) and
the worker's Prometheus metrics (``pipeline/metrics.py``). ``expand_sql`` performs the
plugin's and Grafana's substitutions, so tests run every panel's SQL against the real
engine.

Quota utilisation reads the current tenant-wide definitions from ``quotas``
(``FINAL``, ``subscriber_id = ''``, ``NOT deleted``) and counts used Token Units as the
quota ledger does: billable TU (``tier_usage_tu``) of the stored events in the current
Beijing day or month. Threshold crossings and webhook deliveries come from
``quota_events`` and ``webhook_deliveries``.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import yaml

# ---- identities ----------------------------------------------------------------------

FOLDER_UID = "tokenmeter"
FOLDER_TITLE = "tokenmeter"
CLICKHOUSE_UID = "tokenmeter-clickhouse"
PROMETHEUS_UID = "tokenmeter-prometheus"
CLICKHOUSE_TYPE = "grafana-clickhouse-datasource"
CLICKHOUSE_PLUGIN_VERSION = "4.20.0"
PROMETHEUS_TYPE = "prometheus"
SCHEMA_VERSION = 39  # Grafana 11.x dashboard model; newer Grafana migrates it on load
DASHBOARDS_PATH = "/var/lib/grafana/dashboards/tokenmeter"  # where the provider reads
PASSWORD_ENV = "TOKENMETER_GRAFANA_CLICKHOUSE_PASSWORD"
ALL = "__all"  # the custom "All" value of multi-value variables
TZ = "Asia/Shanghai"  # rollup periods and billing periods are Beijing time

# Alert thresholds, as exact fractions of the quota (numerator, denominator).
QUOTA_WARNING = (4, 5)  # 80 %
DEAD_LETTER_RATIO = 0.02  # dead letters / consumed messages over 5 minutes
SINK_FAILURE_STREAK = 2  # more failed attempts in a row than this = failing


def _sql(text: str) -> str:
    return textwrap.dedent(text).strip()


def var_in(column: str, variable: str) -> str:
    """A multi-value variable filter; the custom All value ``'__all'`` matches all."""
    ref = f"${{{variable}:singlequote}}"
    return f"('{ALL}' IN ({ref}) OR {column} IN ({ref}))"


# ---- the model -------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    """One panel query: ClickHouse SQL or PromQL."""

    sql: str = ""
    expr: str = ""
    legend: str = ""
    time_series: bool = False  # ClickHouse: time-series format (else table)

    @property
    def datasource(self) -> str:
        return CLICKHOUSE_UID if self.sql else PROMETHEUS_UID


@dataclass(frozen=True)
class Panel:
    """One panel. ClickHouse panels have one query and name the columns it returns."""

    title: str
    type: str  # timeseries, stat, table, barchart, bargauge
    queries: tuple[Query, ...]
    columns: tuple[str, ...] = ()
    w: int = 12
    h: int = 8
    unit: str = "short"
    description: str = ""
    thresholds: tuple[tuple[float | None, str], ...] = ()
    stacked: bool = False
    decimals: int | None = None
    max: float | None = None


@dataclass(frozen=True)
class Row:
    """A full-width section header."""

    title: str


@dataclass(frozen=True)
class Variable:
    """A multi-value ClickHouse query variable with an All option."""

    name: str
    label: str
    sql: str


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    items: tuple[Panel | Row, ...]
    variables: tuple[Variable, ...] = ()
    time_from: str = "now-24h"
    refresh: str = "1m"
    tags: tuple[str, ...] = ("tokenmeter",)

    @property
    def panels(self) -> list[Panel]:
        return [p for p in self.items if isinstance(p, Panel)]


@dataclass(frozen=True)
class AlertRule:
    """A Grafana-managed alert rule: query A, condition ``A > threshold``.

    ClickHouse rules return one row per alert instance: string columns become labels,
    the numeric column is the value. Prometheus rules are instant queries."""

    uid: str
    title: str
    group: str
    query: Query
    threshold: float
    for_: str
    labels: Mapping[str, str]
    summary: str
    description: str
    columns: tuple[str, ...] = ()
    no_data: str = "OK"
    exec_err: str = "Error"
    range_s: int = 600


@dataclass(frozen=True)
class RuleGroup:
    name: str
    interval_s: int
    rules: tuple[AlertRule, ...]


@dataclass(frozen=True)
class DataSourceConfig:
    """How Grafana reaches ClickHouse and Prometheus (defaults: infra/docker-compose.yml)."""

    clickhouse_host: str = "clickhouse"
    clickhouse_port: int = 8123
    clickhouse_protocol: str = "http"
    clickhouse_database: str = "tokenmeter"
    clickhouse_user: str = "grafana"
    prometheus_url: str = "http://prometheus:9090"


def ch(title: str, type_: str, sql: str, columns: Sequence[str], **kw: Any) -> Panel:
    """A ClickHouse panel (table format unless it is a time series)."""
    query = Query(sql=_sql(sql), time_series=type_ == "timeseries")
    return Panel(title, type_, (query,), tuple(columns), **kw)


def prom(title: str, type_: str, *queries: tuple[str, str], **kw: Any) -> Panel:
    """A Prometheus panel: (expr, legend) pairs."""
    return Panel(title, type_, tuple(Query(expr=e, legend=leg) for e, leg in queries), **kw)


# ---- usage and cost --------------------------------------------------------------------

USAGE_FILTER = "\n  AND ".join(
    [
        "$__timeFilter(period_start)",
        var_in("tenant_id", "tenant"),
        var_in("reporting_carrier", "carrier"),
        var_in("model_id", "model"),
        var_in("channel", "channel"),
    ]
)


def _usage(select: str, tail: str = "", table: str = "usage_minute") -> str:
    return f"SELECT {select}\nFROM {table}\nWHERE {USAGE_FILTER}" + (f"\n{tail}" if tail else "")


USAGE_VARIABLES = (
    Variable("tenant", "Tenant", "SELECT DISTINCT tenant_id FROM usage_day ORDER BY tenant_id"),
    Variable(
        "carrier",
        "Reporting carrier",
        "SELECT DISTINCT reporting_carrier FROM usage_day ORDER BY reporting_carrier",
    ),
    Variable("model", "Model", "SELECT DISTINCT model_id FROM usage_day ORDER BY model_id"),
    Variable("channel", "Channel", "SELECT DISTINCT channel FROM usage_day ORDER BY channel"),
)

CNY = "currencyCNY"

USAGE = Dashboard(
    uid="tokenmeter-usage",
    title="tokenmeter / Usage and cost",
    description="Token Units and CNY by tenant, model, carrier and channel (usage_minute).",
    variables=USAGE_VARIABLES,
    items=(
        Row("Totals in range"),
        ch("Events", "stat", _usage("sum(events) AS events"), ["events"], w=6, h=4),
        ch(
            "Token Units",
            "stat",
            _usage("sum(token_units) AS token_units"),
            ["token_units"],
            w=6,
            h=4,
        ),
        ch(
            "Amount (CNY)",
            "stat",
            _usage("sum(amount) AS amount_cny"),
            ["amount_cny"],
            w=6,
            h=4,
            unit=CNY,
            decimals=2,
        ),
        ch(
            "Late events (corrections)",
            "stat",
            _usage("sumIf(events, kind = 'late') AS late_events"),
            ["late_events"],
            w=6,
            h=4,
            description="Events that arrived after their minute window closed.",
        ),
        Row("Over time"),
        ch(
            "Token Units by reporting carrier",
            "timeseries",
            _usage(
                "$__timeInterval(period_start) AS time, reporting_carrier, "
                "sum(token_units) AS token_units",
                "GROUP BY time, reporting_carrier\nORDER BY time",
            ),
            ["time", "reporting_carrier", "token_units"],
            stacked=True,
        ),
        ch(
            "Amount (CNY) by model",
            "timeseries",
            _usage(
                "$__timeInterval(period_start) AS time, model_id, sum(amount) AS amount_cny",
                "GROUP BY time, model_id\nORDER BY time",
            ),
            ["time", "model_id", "amount_cny"],
            unit=CNY,
            stacked=True,
        ),
        Row("Breakdown"),
        ch(
            "Top tenants",
            "table",
            _usage(
                "tenant_id, sum(events) AS events, sum(token_units) AS token_units, "
                "sum(amount) AS amount_cny",
                "GROUP BY tenant_id\nORDER BY token_units DESC, tenant_id\nLIMIT 20",
            ),
            ["tenant_id", "events", "token_units", "amount_cny"],
            h=10,
        ),
        ch(
            "By model",
            "barchart",
            _usage(
                "model_id, sum(token_units) AS token_units, sum(amount) AS amount_cny",
                "GROUP BY model_id\nORDER BY token_units DESC",
            ),
            ["model_id", "token_units", "amount_cny"],
            h=10,
        ),
        ch(
            "By channel",
            "barchart",
            _usage(
                "channel, sum(token_units) AS token_units, sum(amount) AS amount_cny",
                "GROUP BY channel\nORDER BY token_units DESC",
            ),
            ["channel", "token_units", "amount_cny"],
            h=9,
        ),
        ch(
            "Carriers: reporting, home and serving",
            "table",
            _usage(
                "reporting_carrier, home_carrier, serving_carrier, sum(events) AS events, "
                "sum(token_units) AS token_units, sum(amount) AS amount_cny",
                "GROUP BY reporting_carrier, home_carrier, serving_carrier\n"
                "ORDER BY reporting_carrier, home_carrier, serving_carrier",
            ),
            [
                "reporting_carrier",
                "home_carrier",
                "serving_carrier",
                "events",
                "token_units",
                "amount_cny",
            ],
            h=9,
        ),
        ch(
            "Token classes by model",
            "table",
            _usage(
                "model_id, sum(input_tokens) AS input_tokens, sum(output_tokens) AS "
                "output_tokens, sum(cached_tokens) AS cached_tokens, sum(reasoning_tokens) AS "
                "reasoning_tokens",
                "GROUP BY model_id\nORDER BY model_id",
            ),
            ["model_id", "input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens"],
            w=24,
        ),
    ),
)

# ---- quota -----------------------------------------------------------------------------

# One row per tenant with a tenant-wide quota: its limit, the billable Token Units used
# in the current period (as the quota ledger counts them: tier_usage_tu of the stored
# events, by event time, Beijing day or month; reservations in flight are not
# included), and the state.
QUOTA_SQL = _sql(
    f"""
    WITH
        limits AS (
            SELECT tenant_id, period AS quota_period, limit_tu AS quota_limit_tu
            FROM quotas FINAL
            WHERE subscriber_id = '' AND NOT deleted
        ),
        used AS (
            SELECT
                tenant_id,
                sumIf(tier_usage_tu, toDate(event_time, '{TZ}') = toDate(now('{TZ}')))
                    AS used_day,
                sum(tier_usage_tu) AS used_month
            FROM usage_events
            WHERE event_time >= toDateTime(toStartOfMonth(now('{TZ}')), '{TZ}')
            GROUP BY tenant_id
        )
    SELECT
        l.tenant_id AS tenant_id,
        l.quota_period AS period,
        l.quota_limit_tu AS limit_tu,
        if(l.quota_period = 'day', u.used_day, u.used_month) AS used_tu,
        greatest(l.quota_limit_tu - used_tu, 0) AS remaining_tu,
        if(l.quota_limit_tu > 0, toFloat64(used_tu) / toFloat64(l.quota_limit_tu), 0)
            AS utilisation,
        multiIf(
            used_tu >= l.quota_limit_tu, 'exhausted',
            used_tu * {QUOTA_WARNING[1]} >= l.quota_limit_tu * {QUOTA_WARNING[0]}, 'warning',
            'ok'
        ) AS state
    FROM limits AS l
    LEFT JOIN used AS u ON u.tenant_id = l.tenant_id
    """
)


def _quota(select: str, tail: str = "") -> str:
    inner = textwrap.indent(QUOTA_SQL, "    ")
    return f"SELECT {select}\nFROM (\n{inner}\n)" + (f"\n{tail}" if tail else "")


QUOTA_THRESHOLDS: tuple[tuple[float | None, str], ...] = (
    (None, "green"),
    (QUOTA_WARNING[0] / QUOTA_WARNING[1], "orange"),
    (1.0, "red"),
)

QUOTA = Dashboard(
    uid="tokenmeter-quota",
    title="tokenmeter / Quota utilisation",
    description=(
        "Billable Token Units in the current quota period against each tenant's limit "
        "(quotas + usage_events); warning at 80 %, exhausted at 100 %; crossings and "
        "webhook deliveries."
    ),
    variables=(USAGE_VARIABLES[0],),
    time_from="now-30d",
    items=(
        Row("Current period"),
        ch(
            "Tenants at warning / exhausted",
            "stat",
            _quota(
                "countIf(state = 'warning') AS warning, countIf(state = 'exhausted') AS exhausted"
            ),
            ["warning", "exhausted"],
            w=6,
            h=10,
            thresholds=((None, "green"), (1.0, "orange")),
        ),
        ch(
            "Utilisation by tenant (top 20)",
            "bargauge",
            _quota("tenant_id, utilisation", "ORDER BY utilisation DESC, tenant_id\nLIMIT 20"),
            ["tenant_id", "utilisation"],
            w=18,
            h=10,
            unit="percentunit",
            thresholds=QUOTA_THRESHOLDS,
            max=1.2,
        ),
        ch(
            "Quotas",
            "table",
            _quota(
                "tenant_id, period, limit_tu, used_tu, remaining_tu, utilisation, state",
                "ORDER BY utilisation DESC, tenant_id\nLIMIT 200",
            ),
            ["tenant_id", "period", "limit_tu", "used_tu", "remaining_tu", "utilisation", "state"],
            w=24,
            h=8,
        ),
        Row("History"),
        ch(
            "Token Units per day, by tenant",
            "timeseries",
            _sql(
                f"""
                SELECT period_start AS time, tenant_id, sum(token_units) AS token_units
                FROM usage_day
                WHERE period_start >= toStartOfDay($__fromTime, '{TZ}')
                  AND period_start <= $__toTime
                  AND {var_in("tenant_id", "tenant")}
                GROUP BY time, tenant_id
                ORDER BY time
                """
            ),
            ["time", "tenant_id", "token_units"],
            w=24,
        ),
        Row("Threshold crossings and webhooks"),
        ch(
            "Threshold crossings",
            "table",
            """
            SELECT crossed_at, tenant_id, subscriber_id, period, threshold, kind, used_tu,
                limit_tu, hard
            FROM quota_events FINAL
            WHERE $__timeFilter(crossed_at)
            ORDER BY crossed_at DESC, tenant_id, subscriber_id, threshold
            LIMIT 200
            """,
            [
                "crossed_at",
                "tenant_id",
                "subscriber_id",
                "period",
                "threshold",
                "kind",
                "used_tu",
                "limit_tu",
                "hard",
            ],
            w=14,
            h=9,
        ),
        ch(
            "Webhook deliveries by status",
            "timeseries",
            """
            SELECT $__timeInterval(attempted_at) AS time, status, count() AS deliveries
            FROM webhook_deliveries
            WHERE $__timeFilter(attempted_at)
            GROUP BY time, status
            ORDER BY time
            """,
            ["time", "status", "deliveries"],
            w=10,
            h=9,
            stacked=True,
        ),
        Row("Quota service"),
        prom(
            "Reservations by outcome (per second)",
            "timeseries",
            (
                "sum by (outcome) (rate(tokenmeter_quota_reservations_total[$__rate_interval]))",
                "{{outcome}}",
            ),
            unit="reqps",
        ),
        prom(
            "Webhook deliveries by outcome (per second)",
            "timeseries",
            (
                "sum by (outcome) (rate(tokenmeter_webhook_deliveries_total[$__rate_interval]))",
                "{{outcome}}",
            ),
            unit="reqps",
        ),
    ),
)

# ---- reconciliation ------------------------------------------------------------------

# Live pairing of cross-carrier calls by transaction_id, straight from usage_events:
# the early view of what `tokenmeter reconcile` will classify (its stored results are
# the authority). Calls whose two reports straddle the time range show as missing.
PAIRS_SQL = _sql(
    f"""
    SELECT
        transaction_id,
        formatDateTime(min(event_time), '%Y-%m', '{TZ}') AS period,
        any(home_carrier) AS home,
        any(serving_carrier) AS serving,
        countIf(reporting_carrier = home_carrier) AS at_home,
        countIf(reporting_carrier = serving_carrier) AS at_serving,
        uniqExact(input_tokens, output_tokens, cached_tokens, reasoning_tokens) AS token_versions,
        uniqExact(list_amount) AS amount_versions,
        uniqExact(toYYYYMM(event_time, '{TZ}')) AS months,
        multiIf(
            at_home > 1 OR at_serving > 1, 'duplicate',
            at_home = 0, 'missing_at_home',
            at_serving = 0, 'missing_at_serving',
            months > 1, 'period_boundary',
            token_versions > 1, 'token_mismatch',
            amount_versions > 1, 'amount_mismatch',
            'matched'
        ) AS status,
        groupArray(event_id) AS event_ids
    FROM usage_events
    WHERE transaction_id IS NOT NULL
      AND home_carrier != serving_carrier
      AND $__timeFilter(event_time)
    GROUP BY transaction_id
    """
)

RECON_STATUSES = (
    "matched",
    "token_mismatch",
    "amount_mismatch",
    "missing_at_home",
    "missing_at_serving",
    "duplicate",
    "period_boundary",
)


def _pairs(select: str, tail: str = "") -> str:
    inner = textwrap.indent(PAIRS_SQL, "    ")
    return f"SELECT {select}\nFROM (\n{inner}\n)" + (f"\n{tail}" if tail else "")


_STATUS_COUNTS = ", ".join(f"countIf(status = '{s}') AS {s}" for s in RECON_STATUSES)

RECON = Dashboard(
    uid="tokenmeter-recon",
    title="tokenmeter / Reconciliation",
    description=(
        "Cross-carrier calls paired by transaction_id, per billing period (Beijing month): "
        "a live view of usage_events; `tokenmeter reconcile` stores the authoritative result."
    ),
    time_from="now-90d",
    refresh="5m",
    items=(
        Row("Status per period"),
        ch(
            "Match rate",
            "stat",
            _pairs("if(count() = 0, 1, countIf(status = 'matched') / count()) AS match_rate"),
            ["match_rate"],
            w=6,
            h=8,
            unit="percentunit",
            decimals=2,
            thresholds=((None, "red"), (0.99, "orange"), (0.999, "green")),
        ),
        ch(
            "Calls by status and period",
            "barchart",
            _pairs(f"period, {_STATUS_COUNTS}", "GROUP BY period\nORDER BY period"),
            ["period", *RECON_STATUSES],
            w=18,
            h=8,
            stacked=True,
        ),
        ch(
            "Status per period",
            "table",
            _pairs(
                f"period, count() AS calls, {_STATUS_COUNTS}, matched / calls AS match_rate",
                "GROUP BY period\nORDER BY period",
            ),
            ["period", "calls", *RECON_STATUSES, "match_rate"],
            w=24,
            h=7,
        ),
        Row("Details"),
        ch(
            "By carrier pair",
            "table",
            _pairs(
                "home AS home_carrier, serving AS serving_carrier, count() AS calls, "
                "countIf(status = 'matched') AS matched, calls - matched AS unmatched, "
                "matched / calls AS match_rate",
                "GROUP BY home_carrier, serving_carrier\nORDER BY home_carrier, serving_carrier",
            ),
            ["home_carrier", "serving_carrier", "calls", "matched", "unmatched", "match_rate"],
            w=10,
            h=9,
        ),
        ch(
            "Unmatched calls (latest 200)",
            "table",
            _pairs(
                "transaction_id, period, home AS home_carrier, serving AS serving_carrier, "
                "status, arrayStringConcat(arraySort(event_ids), ', ') AS event_ids",
                "WHERE status != 'matched'\nORDER BY period DESC, transaction_id\nLIMIT 200",
            ),
            ["transaction_id", "period", "home_carrier", "serving_carrier", "status", "event_ids"],
            w=14,
            h=9,
        ),
    ),
)

# ---- pipeline health -------------------------------------------------------------------

RATE = "[$__rate_interval]"

PIPELINE = Dashboard(
    uid="tokenmeter-pipeline",
    title="tokenmeter / Pipeline health",
    description="Throughput, consumer lag, dead letters and sink latency of the worker.",
    time_from="now-1h",
    refresh="30s",
    items=(
        Row("Throughput"),
        prom(
            "Events per second",
            "timeseries",
            (f"sum(rate(tokenmeter_events_consumed_total{RATE}))", "consumed"),
            (f"sum(rate(tokenmeter_events_accepted_total{RATE}))", "accepted"),
            (f"sum(rate(tokenmeter_duplicates_dropped_total{RATE}))", "duplicates dropped"),
            (f"sum(rate(tokenmeter_dead_letters_total{RATE}))", "dead letters"),
            unit="ops",
        ),
        prom(
            "Dead letters per second, by reason",
            "timeseries",
            (f"sum by (reason) (rate(tokenmeter_dead_letters_total{RATE})) > 0", "{{reason}}"),
            unit="ops",
            stacked=True,
        ),
        Row("Consumer lag"),
        prom(
            "Lag by partition (end offset - committed offset)",
            "timeseries",
            (
                "sum by (topic, partition) (tokenmeter_consumer_lag_messages)",
                "{{topic}}/{{partition}}",
            ),
            w=18,
        ),
        prom(
            "Total lag",
            "stat",
            ("sum(tokenmeter_consumer_lag_messages)", "messages"),
            w=6,
            thresholds=((None, "green"), (10_000.0, "orange"), (100_000.0, "red")),
        ),
        Row("Latency"),
        prom(
            "Batch duration (ingest)",
            "timeseries",
            *[
                (
                    f"histogram_quantile({q}, sum by (le) "
                    f'(rate(tokenmeter_batch_duration_seconds_bucket{{agent="ingest"}}{RATE})))',
                    f"p{round(q * 100)}",
                )
                for q in (0.5, 0.95, 0.99)
            ],
            unit="s",
        ),
        prom(
            "Sink flush duration p95, by table",
            "timeseries",
            (
                "histogram_quantile(0.95, sum by (le, table) "
                f"(rate(tokenmeter_sink_flush_duration_seconds_bucket{RATE})))",
                "{{table}}",
            ),
            unit="s",
        ),
        Row("Sink"),
        prom(
            "Sink errors and retries per second",
            "timeseries",
            (f"sum by (table) (rate(tokenmeter_sink_errors_total{RATE}))", "errors {{table}}"),
            (f"sum by (table) (rate(tokenmeter_sink_retries_total{RATE}))", "retries {{table}}"),
            w=9,
            unit="ops",
        ),
        prom(
            "Rows inserted per second, by table",
            "timeseries",
            (f"sum by (table) (rate(tokenmeter_sink_rows_inserted_total{RATE}))", "{{table}}"),
            w=9,
            unit="rowsps",
        ),
        prom(
            "Failure streak",
            "stat",
            ("max(tokenmeter_sink_consecutive_failures)", "failed attempts in a row"),
            w=6,
            thresholds=((None, "green"), (1.0, "orange"), (SINK_FAILURE_STREAK + 1.0, "red")),
        ),
        Row("Warehouse"),
        ch(
            "Dead letters stored, by reason",
            "timeseries",
            """
            SELECT $__timeInterval(failed_at) AS time, reason, count() AS dead_letters
            FROM dead_letters
            WHERE $__timeFilter(failed_at)
            GROUP BY time, reason
            ORDER BY time
            """,
            ["time", "reason", "dead_letters"],
            stacked=True,
        ),
        ch(
            "Late events (corrections)",
            "timeseries",
            """
            SELECT $__timeInterval(arrived_at) AS time, count() AS late_events
            FROM usage_corrections
            WHERE $__timeFilter(arrived_at)
            GROUP BY time
            ORDER BY time
            """,
            ["time", "late_events"],
            w=6,
        ),
        ch(
            "Last stored event (s ago)",
            "stat",
            """
            SELECT dateDiff('second', max(ingested_at), now64(3)) AS seconds_since_last_insert
            FROM usage_events
            """,
            ["seconds_since_last_insert"],
            w=6,
            unit="s",
            thresholds=((None, "green"), (300.0, "orange"), (900.0, "red")),
        ),
        ch(
            "Latest dead letters",
            "table",
            """
            SELECT failed_at, reason, stage, detail, event_id, reporting_carrier, topic,
                partition, offset
            FROM dead_letters
            WHERE $__timeFilter(failed_at)
            ORDER BY failed_at DESC
            LIMIT 100
            """,
            [
                "failed_at",
                "reason",
                "stage",
                "detail",
                "event_id",
                "reporting_carrier",
                "topic",
                "partition",
                "offset",
            ],
            w=24,
        ),
    ),
)

DASHBOARDS: tuple[Dashboard, ...] = (USAGE, QUOTA, RECON, PIPELINE)

# ---- alert rules -----------------------------------------------------------------------

_BASE_LABELS = {"service": "tokenmeter"}


def _quota_alert(kind: str) -> Query:
    num, den = QUOTA_WARNING
    if kind == "warning":
        hit = f"used_tu * {den} >= limit_tu * {num} AND used_tu < limit_tu"
    else:
        hit = "used_tu >= limit_tu"
    return Query(sql=_quota(f"tenant_id, if({hit}, utilisation, 0) AS utilisation"))


QUOTA_RULES = RuleGroup(
    "tokenmeter-quota",
    60,
    (
        AlertRule(
            uid="tokenmeter-quota-warning",
            title="Tenant at or above 80 % of quota",
            group="tokenmeter-quota",
            query=_quota_alert("warning"),
            columns=("tenant_id", "utilisation"),
            threshold=0.0,
            for_="0s",
            labels={**_BASE_LABELS, "team": "billing", "component": "quota", "severity": "warning"},
            summary="Tenant {{ .Labels.tenant_id }} has used "
            "{{ humanizePercentage .Values.A.Value }} of its quota",
            description="Metered Token Units in the current quota period reached 80 % of the "
            "limit (quotas + usage_events). Reservations in flight are not included.",
        ),
        AlertRule(
            uid="tokenmeter-quota-exhausted",
            title="Tenant at or above 100 % of quota",
            group="tokenmeter-quota",
            query=_quota_alert("exhausted"),
            columns=("tenant_id", "utilisation"),
            threshold=0.0,
            for_="0s",
            labels={
                **_BASE_LABELS,
                "team": "billing",
                "component": "quota",
                "severity": "critical",
            },
            summary="Tenant {{ .Labels.tenant_id }} has exhausted its quota "
            "({{ humanizePercentage .Values.A.Value }})",
            description="Metered Token Units in the current quota period reached the limit; "
            "hard quotas now refuse reservations.",
        ),
    ),
)

PIPELINE_RULES = RuleGroup(
    "tokenmeter-pipeline",
    60,
    (
        AlertRule(
            uid="tokenmeter-dead-letter-rate",
            title="Dead-letter rate above 2 %",
            group="tokenmeter-pipeline",
            query=Query(
                expr="sum(rate(tokenmeter_dead_letters_total[5m])) / "
                "clamp_min(sum(rate(tokenmeter_events_consumed_total[5m])), 1e-9)"
            ),
            threshold=DEAD_LETTER_RATIO,
            for_="5m",
            labels={
                **_BASE_LABELS,
                "team": "data-platform",
                "component": "pipeline",
                "severity": "warning",
            },
            summary="{{ humanizePercentage .Values.A.Value }} of consumed messages are "
            "dead letters",
            description="More than 2 % of the messages consumed over 5 minutes were rejected. "
            "See the Pipeline health dashboard (dead letters by reason) and the dead_letters "
            "table.",
        ),
        AlertRule(
            uid="tokenmeter-consumer-lag-growing",
            title="Consumer lag growing for 5 minutes",
            group="tokenmeter-pipeline",
            query=Query(expr="sum by (topic) (deriv(tokenmeter_consumer_lag_messages[5m]))"),
            threshold=0.0,
            for_="5m",
            labels={
                **_BASE_LABELS,
                "team": "data-platform",
                "component": "pipeline",
                "severity": "warning",
            },
            summary="Lag on {{ .Labels.topic }} keeps growing "
            "({{ humanize .Values.A.Value }} messages/s)",
            description="The worker's consumer lag (end offset - committed offset) has risen "
            "for 5 minutes: it processes less than is produced, or it is stuck.",
        ),
        AlertRule(
            uid="tokenmeter-sink-failing",
            title="Sink failing",
            group="tokenmeter-pipeline",
            query=Query(expr="max by (table) (tokenmeter_sink_consecutive_failures)"),
            threshold=float(SINK_FAILURE_STREAK),
            for_="1m",
            labels={
                **_BASE_LABELS,
                "team": "data-platform",
                "component": "sink",
                "severity": "critical",
            },
            summary="Inserts into {{ .Labels.table }} keep failing "
            "({{ .Values.A.Value }} attempts in a row)",
            description="The sink cannot write to ClickHouse and is retrying with backoff; "
            "nothing is committed meanwhile, so lag grows. Check the warehouse.",
        ),
        AlertRule(
            uid="tokenmeter-worker-down",
            title="Worker not scraped",
            group="tokenmeter-pipeline",
            query=Query(expr='max(up{job="tokenmeter-worker"})'),
            threshold=0.5,
            for_="2m",
            labels={
                **_BASE_LABELS,
                "team": "data-platform",
                "component": "pipeline",
                "severity": "critical",
            },
            summary="The tokenmeter worker's /metrics endpoint is down",
            description="Prometheus cannot scrape the worker: it is stopped or unreachable; "
            "no other pipeline alert can fire meanwhile.",
            no_data="Alerting",
        ),
    ),
)

# The worker-down rule fires when the value is *below* its threshold.
_BELOW = {"tokenmeter-worker-down"}

RULE_GROUPS: tuple[RuleGroup, ...] = (QUOTA_RULES, PIPELINE_RULES)


# ---- JSON / YAML models ------------------------------------------------------------------


def _datasource_ref(uid: str) -> dict[str, str]:
    kind = CLICKHOUSE_TYPE if uid == CLICKHOUSE_UID else PROMETHEUS_TYPE
    return {"type": kind, "uid": uid}


def _target(query: Query, ref: str) -> dict[str, Any]:
    if query.sql:
        return {
            "refId": ref,
            "datasource": _datasource_ref(CLICKHOUSE_UID),
            "editorType": "sql",
            "format": 0 if query.time_series else 1,
            "queryType": "timeseries" if query.time_series else "table",
            "pluginVersion": CLICKHOUSE_PLUGIN_VERSION,
            "rawSql": query.sql,
        }
    return {
        "refId": ref,
        "datasource": _datasource_ref(PROMETHEUS_UID),
        "editorMode": "code",
        "expr": query.expr,
        "legendFormat": query.legend or "__auto",
        "range": True,
        "instant": False,
    }


def _field_config(panel: Panel) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.decimals is not None:
        defaults["decimals"] = panel.decimals
    if panel.max is not None:
        defaults["min"] = 0
        defaults["max"] = panel.max
    steps = panel.thresholds or ((None, "green"),)
    defaults["thresholds"] = {
        "mode": "absolute",
        "steps": [{"color": color, "value": value} for value, color in steps],
    }
    if panel.thresholds:
        defaults["color"] = {"mode": "thresholds"}
    else:
        defaults["color"] = {"mode": "palette-classic"}
    if panel.type == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if panel.stacked else 5,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if panel.stacked else "none", "group": "A"},
        }
    return {"defaults": defaults, "overrides": []}


def _options(panel: Panel) -> dict[str, Any]:
    legend = {"displayMode": "list", "placement": "bottom", "showLegend": True, "calcs": []}
    if panel.type == "timeseries":
        return {"legend": legend, "tooltip": {"mode": "multi", "sort": "desc"}}
    if panel.type == "stat":
        return {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "none",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
        }
    if panel.type == "bargauge":
        return {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": True},
            "displayMode": "gradient",
            "orientation": "horizontal",
            "showUnfilled": True,
            "valueMode": "color",
            "namePlacement": "auto",
        }
    if panel.type == "barchart":
        return {
            "xField": panel.columns[0],
            "orientation": "auto",
            "stacking": "normal" if panel.stacked else "none",
            "showValue": "auto",
            "groupWidth": 0.7,
            "barWidth": 0.9,
            "xTickLabelRotation": 0,
            "legend": legend,
            "tooltip": {"mode": "multi", "sort": "none"},
        }
    if panel.type == "table":
        return {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}}
    raise ValueError(f"unknown panel type {panel.type!r}")


def _layout(items: Iterable[Panel | Row]) -> list[tuple[Panel | Row, dict[str, int]]]:
    """Grid positions: panels flow left to right in 24 columns; rows start a line."""
    out: list[tuple[Panel | Row, dict[str, int]]] = []
    x = y = line_h = 0
    for item in items:
        if isinstance(item, Row):
            y += line_h
            out.append((item, {"h": 1, "w": 24, "x": 0, "y": y}))
            y += 1
            x = line_h = 0
            continue
        if x + item.w > 24:
            y += line_h
            x = line_h = 0
        out.append((item, {"h": item.h, "w": item.w, "x": x, "y": y}))
        x += item.w
        line_h = max(line_h, item.h)
    return out


def _variable_json(var: Variable) -> dict[str, Any]:
    return {
        "name": var.name,
        "label": var.label,
        "type": "query",
        "datasource": _datasource_ref(CLICKHOUSE_UID),
        "definition": var.sql,
        "query": var.sql,
        "refresh": 1,
        "multi": True,
        "includeAll": True,
        "allValue": f"'{ALL}'",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "sort": 1,
        "hide": 0,
    }


def dashboard_json(dash: Dashboard) -> dict[str, Any]:
    """The dashboard in Grafana's JSON model (no ``id``/``version``: Grafana owns them)."""
    panels: list[dict[str, Any]] = []
    for number, (item, grid) in enumerate(_layout(dash.items), start=1):
        if isinstance(item, Row):
            panels.append(
                {
                    "id": number,
                    "type": "row",
                    "title": item.title,
                    "collapsed": False,
                    "gridPos": grid,
                    "panels": [],
                }
            )
            continue
        sources = {q.datasource for q in item.queries}
        if len(sources) != 1:
            raise ValueError(f"panel {item.title!r} mixes data sources")
        refs = "ABCDEFGHIJ"
        panels.append(
            {
                "id": number,
                "type": item.type,
                "title": item.title,
                "description": item.description,
                "datasource": _datasource_ref(sources.pop()),
                "gridPos": grid,
                "targets": [_target(q, refs[i]) for i, q in enumerate(item.queries)],
                "fieldConfig": _field_config(item),
                "options": _options(item),
            }
        )
    return {
        "uid": dash.uid,
        "title": dash.title,
        "description": dash.description,
        "tags": list(dash.tags),
        "timezone": "browser",
        "editable": False,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "time": {"from": dash.time_from, "to": "now"},
        "refresh": dash.refresh,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "links": [],
        "annotations": {"list": []},
        "templating": {"list": [_variable_json(v) for v in dash.variables]},
        "panels": panels,
    }


def _rule_data(rule: AlertRule) -> list[dict[str, Any]]:
    q = rule.query
    if q.sql:
        model: dict[str, Any] = {
            "refId": "A",
            "datasource": _datasource_ref(CLICKHOUSE_UID),
            "editorType": "sql",
            "format": 1,
            "queryType": "table",
            "pluginVersion": CLICKHOUSE_PLUGIN_VERSION,
            "rawSql": q.sql,
            "intervalMs": 1000,
            "maxDataPoints": 43200,
        }
    else:
        model = {
            "refId": "A",
            "datasource": _datasource_ref(PROMETHEUS_UID),
            "editorMode": "code",
            "expr": q.expr,
            "instant": True,
            "range": False,
            "legendFormat": "__auto",
            "intervalMs": 1000,
            "maxDataPoints": 43200,
        }
    evaluator = "lt" if rule.uid in _BELOW else "gt"
    return [
        {
            "refId": "A",
            "queryType": "",
            "relativeTimeRange": {"from": rule.range_s, "to": 0},
            "datasourceUid": q.datasource,
            "model": model,
        },
        {
            "refId": "C",
            "queryType": "",
            "relativeTimeRange": {"from": 0, "to": 0},
            "datasourceUid": "__expr__",
            "model": {
                "refId": "C",
                "type": "threshold",
                "expression": "A",
                "datasource": {"type": "__expr__", "uid": "__expr__"},
                "conditions": [
                    {"type": "query", "evaluator": {"type": evaluator, "params": [rule.threshold]}}
                ],
            },
        },
    ]


def _rule_body(rule: AlertRule) -> dict[str, Any]:
    """The fields a rule has both in provisioning files and in the HTTP API."""
    return {
        "uid": rule.uid,
        "title": rule.title,
        "condition": "C",
        "data": _rule_data(rule),
        "noDataState": rule.no_data,
        "execErrState": rule.exec_err,
        "for": rule.for_,
        "annotations": {"summary": rule.summary, "description": rule.description},
        "labels": dict(rule.labels),
        "isPaused": False,
    }


def rule_group_api(group: RuleGroup) -> dict[str, Any]:
    """A rule group as the alerting provisioning API takes it."""
    return {
        "title": group.name,
        "folderUid": FOLDER_UID,
        "interval": group.interval_s,
        "rules": [
            {**_rule_body(r), "folderUID": FOLDER_UID, "ruleGroup": group.name, "orgID": 1}
            for r in group.rules
        ],
    }


def _duration(seconds: int) -> str:
    return f"{seconds // 60}m" if seconds % 60 == 0 else f"{seconds}s"


def alerting_provisioning() -> dict[str, Any]:
    """``provisioning/alerting/tokenmeter.yaml``."""
    return {
        "apiVersion": 1,
        "groups": [
            {
                "orgId": 1,
                "name": g.name,
                "folder": FOLDER_TITLE,
                "interval": _duration(g.interval_s),
                "rules": [_rule_body(r) for r in g.rules],
            }
            for g in RULE_GROUPS
        ],
    }


def datasources_api(config: DataSourceConfig) -> list[dict[str, Any]]:
    """The two data sources as the HTTP API takes them (without secrets)."""
    return [
        {
            "uid": CLICKHOUSE_UID,
            "name": "tokenmeter ClickHouse",
            "type": CLICKHOUSE_TYPE,
            "access": "proxy",
            "url": "",
            "isDefault": False,
            "jsonData": {
                "host": config.clickhouse_host,
                "port": config.clickhouse_port,
                "protocol": config.clickhouse_protocol,
                "secure": False,
                "username": config.clickhouse_user,
                "defaultDatabase": config.clickhouse_database,
            },
        },
        {
            "uid": PROMETHEUS_UID,
            "name": "tokenmeter Prometheus",
            "type": PROMETHEUS_TYPE,
            "access": "proxy",
            "url": config.prometheus_url,
            "isDefault": True,
            "jsonData": {"timeInterval": "15s", "httpMethod": "POST"},
        },
    ]


def datasources_provisioning(config: DataSourceConfig) -> dict[str, Any]:
    """``provisioning/datasources/tokenmeter.yaml``; the password comes from Grafana's
    environment (``$TOKENMETER_GRAFANA_CLICKHOUSE_PASSWORD``), never from the file."""
    sources = []
    for ds in datasources_api(config):
        entry = {"orgId": 1, **ds, "editable": False}
        if ds["uid"] == CLICKHOUSE_UID:
            entry["secureJsonData"] = {"password": f"${{{PASSWORD_ENV}}}"}
        sources.append(entry)
    return {"apiVersion": 1, "prune": False, "datasources": sources}


def dashboards_provisioning() -> dict[str, Any]:
    """``provisioning/dashboards/tokenmeter.yaml``: a file provider into our folder."""
    return {
        "apiVersion": 1,
        "providers": [
            {
                "name": "tokenmeter",
                "orgId": 1,
                "folder": FOLDER_TITLE,
                "folderUid": FOLDER_UID,
                "type": "file",
                "disableDeletion": False,
                "allowUiUpdates": False,
                "updateIntervalSeconds": 60,
                "options": {"path": DASHBOARDS_PATH, "foldersFromFilesStructure": False},
            }
        ],
    }


def layout_text(dash: Dashboard) -> str:
    """The dashboard's grid as text (3 characters per grid column), for the docs:
    one box per panel with its title and its kind and data source."""
    out = [f"{dash.title}  (uid {dash.uid}, default range {dash.time_from} .. now)"]
    lines: dict[int, list[tuple[Panel | Row, dict[str, int]]]] = {}
    for item, grid in _layout(dash.items):
        lines.setdefault(grid["y"], []).append((item, grid))
    for y in sorted(lines):
        items = sorted(lines[y], key=lambda pair: pair[1]["x"])
        first = items[0][0]
        if isinstance(first, Row):
            out.append(f"== {first.title} " + "=" * (72 - len(first.title) - 4))
            continue
        rows = ["", "", "", ""]
        cursor = 0
        for item, grid in items:
            assert isinstance(item, Panel)
            inner = grid["w"] * 3 - 2
            source = "ClickHouse" if item.queries[0].sql else "Prometheus"
            pad = " " * ((grid["x"] - cursor) * 3)
            rows[0] += pad + "+" + "-" * inner + "+"
            rows[1] += pad + "|" + item.title[:inner].ljust(inner) + "|"
            rows[2] += pad + "|" + f"{item.type}, {source}"[:inner].ljust(inner) + "|"
            rows[3] += pad + "+" + "-" * inner + "+"
            cursor = grid["x"] + grid["w"]
        out.extend(rows)
    return "\n".join(out) + "\n"


# ---- export ------------------------------------------------------------------------------


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (SQL) as YAML literal blocks, so the files read like the code."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_representer)

_HEADER = (
    "# Generated by `tokenmeter grafana export` from pipeline/grafana.py: edit the Python,\n"
    "# not this file (tests/unit/test_grafana.py checks that they agree).\n"
)


def _yaml(obj: Any) -> str:
    return _HEADER + yaml.dump(
        obj, Dumper=_BlockDumper, sort_keys=False, allow_unicode=True, width=100
    )


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def provisioning_files(config: DataSourceConfig | None = None) -> dict[str, str]:
    """Every provisioning file: relative path -> text."""
    config = config or DataSourceConfig()
    files = {
        "provisioning/datasources/tokenmeter.yaml": _yaml(datasources_provisioning(config)),
        "provisioning/dashboards/tokenmeter.yaml": _yaml(dashboards_provisioning()),
        "provisioning/alerting/tokenmeter.yaml": _yaml(alerting_provisioning()),
    }
    for dash in DASHBOARDS:
        files[f"dashboards/{dash.uid}.json"] = _json(dashboard_json(dash))
    return files


def export(directory: Path, config: DataSourceConfig | None = None) -> list[Path]:
    """Write the provisioning files under ``directory`` (created if needed); a file whose
    content is unchanged is not rewritten. Returns the paths written."""
    written = []
    for rel, text in provisioning_files(config).items():
        path = directory / rel
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


# ---- deploy ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """What deploy did (or, in a dry run, would do) to one object."""

    kind: str  # folder, datasource, dashboard, rule-group
    uid: str
    title: str
    action: str  # created, updated, unchanged


@dataclass
class _Plan:
    changes: list[Change] = field(default_factory=list)
    dry_run: bool = False

    def apply(
        self, kind: str, uid: str, title: str, existing: Any, same: bool, write: Callable[[], Any]
    ) -> None:
        if existing is not None and same:
            self.changes.append(Change(kind, uid, title, "unchanged"))
            return
        if not self.dry_run:
            write()
        self.changes.append(Change(kind, uid, title, "created" if existing is None else "updated"))


def contains(stored: Any, wanted: Any) -> bool:
    """True if ``stored`` holds everything in ``wanted`` (extra keys Grafana adds, like
    ids and versions, do not count; a wanted ``None`` matches a missing key)."""
    if isinstance(wanted, dict):
        return isinstance(stored, dict) and all(
            (v is None and stored.get(k) is None) or (k in stored and contains(stored[k], v))
            for k, v in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(stored, list)
            and len(stored) == len(wanted)
            and all(contains(s, w) for s, w in zip(stored, wanted, strict=True))
        )
    if isinstance(wanted, bool) or isinstance(stored, bool):
        return stored is wanted
    if isinstance(wanted, int | float) and isinstance(stored, int | float):
        return float(stored) == float(wanted)
    return bool(stored == wanted)


def _get(fetch: Callable[..., Any], *args: Any) -> Any:
    """``fetch(*args)``, or None when Grafana answers 404."""
    from grafana_client.client import GrafanaClientError

    try:
        return fetch(*args)
    except GrafanaClientError as exc:
        if exc.status_code == 404:
            return None
        raise


def deploy(
    api: Any,
    config: DataSourceConfig | None = None,
    *,
    clickhouse_password: str | None = None,
    dry_run: bool = False,
) -> list[Change]:
    """Upsert the folder, data sources, dashboards and alert-rule groups into the Grafana
    behind ``api`` (a ``grafana_client.GrafanaApi``). Each object is read first and
    written only if it differs, so deploying twice writes nothing the second time.

    ``clickhouse_password`` is sent only when the ClickHouse data source has no password
    yet (Grafana never returns secrets, so an existing one cannot be compared). Raises
    ``grafana_client.client.GrafanaException`` on any other API error."""
    config = config or DataSourceConfig()
    plan = _Plan(dry_run=dry_run)

    folder = _get(api.folder.get_folder, FOLDER_UID)
    plan.apply(
        "folder",
        FOLDER_UID,
        FOLDER_TITLE,
        folder,
        folder is not None and folder.get("title") == FOLDER_TITLE,
        lambda: (
            api.folder.create_folder(FOLDER_TITLE, uid=FOLDER_UID)
            if folder is None
            else api.folder.update_folder(FOLDER_UID, title=FOLDER_TITLE, overwrite=True)
        ),
    )

    for wanted in datasources_api(config):
        uid = wanted["uid"]
        stored = _get(api.datasource.get_datasource_by_uid, uid)
        body = dict(wanted)
        needs_secret = (
            uid == CLICKHOUSE_UID
            and clickhouse_password is not None
            and not (stored or {}).get("secureJsonFields", {}).get("password")
        )
        if needs_secret:
            body["secureJsonData"] = {"password": clickhouse_password}
        plan.apply(
            "datasource",
            uid,
            wanted["name"],
            stored,
            stored is not None and contains(stored, wanted) and not needs_secret,
            partial(api.datasource.create_datasource, body)
            if stored is None
            else partial(api.datasource.update_datasource_by_uid, uid, body),
        )

    for dash in DASHBOARDS:
        model = dashboard_json(dash)
        stored = _get(api.dashboard.get_dashboard, dash.uid)
        same = (
            stored is not None
            and (stored.get("meta") or {}).get("folderUid") == FOLDER_UID
            and contains(stored.get("dashboard"), model)
        )
        payload = {
            "dashboard": model,
            "folderUid": FOLDER_UID,
            "overwrite": True,
            "message": "tokenmeter grafana deploy",
        }
        plan.apply(
            "dashboard",
            dash.uid,
            dash.title,
            stored,
            same,
            partial(api.dashboard.update_dashboard, payload),
        )

    for group in RULE_GROUPS:
        wanted_group = rule_group_api(group)
        stored = _get(api.alertingprovisioning.get_rule_group, FOLDER_UID, group.name)
        same = stored is not None and _same_group(stored, wanted_group)
        plan.apply(
            "rule-group",
            group.name,
            group.name,
            stored,
            same,
            partial(
                api.alertingprovisioning.update_rule_group, FOLDER_UID, group.name, wanted_group
            ),
        )
    return plan.changes


def _same_group(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    if int(stored.get("interval") or 0) != wanted["interval"]:
        return False
    by_uid = {r.get("uid"): r for r in stored.get("rules") or []}
    if set(by_uid) != {r["uid"] for r in wanted["rules"]}:
        return False
    return all(contains(by_uid[r["uid"]], r) for r in wanted["rules"])


# ---- what Grafana sends to ClickHouse ----------------------------------------------------

_MACRO = re.compile(r"\$__(timeFilter|timeInterval)\(([^()]*)\)")
_VARIABLE = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\$(\w+)")


def expand_sql(
    sql: str,
    *,
    time_from: datetime,
    time_to: datetime,
    interval_s: int = 60,
    variables: Mapping[str, Sequence[str] | None] | None = None,
) -> str:
    """The SQL Grafana and the ClickHouse plugin send for ``sql``: variables first
    (``None`` = All, which is the raw custom all value ``'__all'``; a list = those
    values, single-quoted), then the plugin's macros as it expands them
    (``$__timeFilter(c)`` -> ``c >= toDateTime(from) AND c <= toDateTime(to)``,
    ``$__timeInterval(c)`` -> ``toStartOfInterval(toDateTime(c), INTERVAL n second)``,
    ``$__fromTime``/``$__toTime``, ``$__interval_s``). Raises ``ValueError`` for any
    ``$`` reference it does not know, so a typo cannot slip through a test."""
    variables = variables or {}
    start, end = int(time_from.timestamp()), int(time_to.timestamp())

    def macro(m: re.Match[str]) -> str:
        column = m.group(2).strip()
        if m.group(1) == "timeFilter":
            return f"{column} >= toDateTime({start}) AND {column} <= toDateTime({end})"
        return f"toStartOfInterval(toDateTime({column}), INTERVAL {max(interval_s, 1)} second)"

    def variable(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        if name.startswith("__"):
            return m.group(0)
        if name not in variables:
            raise ValueError(f"unknown variable ${name}")
        values = variables[name]
        if values is None:
            return f"'{ALL}'"
        if m.group(2) not in (None, "singlequote"):
            raise ValueError(f"unsupported variable format {m.group(2)!r}")
        return ", ".join("'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'" for v in values)

    text = _VARIABLE.sub(variable, sql)
    text = _MACRO.sub(macro, text)
    text = text.replace("$__fromTime", f"toDateTime({start})")
    text = text.replace("$__toTime", f"toDateTime({end})")
    text = text.replace("$__interval_s", str(max(interval_s, 1)))
    if "$" in text:
        raise ValueError(f"unexpanded reference in: {text[text.index('$') :][:40]!r}")
    return text


def clickhouse_queries() -> list[tuple[str, str, tuple[str, ...]]]:
    """Every ClickHouse statement Grafana will run: (where, SQL, expected columns).
    Variable queries return one column of any name."""
    out: list[tuple[str, str, tuple[str, ...]]] = []
    for dash in DASHBOARDS:
        for var in dash.variables:
            out.append((f"{dash.uid} variable ${var.name}", var.sql, ()))
        for panel in dash.panels:
            for q in panel.queries:
                if q.sql:
                    out.append((f"{dash.uid} / {panel.title}", q.sql, panel.columns))
    for group in RULE_GROUPS:
        for rule in group.rules:
            if rule.query.sql:
                out.append((f"alert {rule.uid}", rule.query.sql, rule.columns))
    return out


def prometheus_exprs() -> list[tuple[str, str]]:
    """Every PromQL expression in dashboards and alert rules: (where, expr)."""
    out: list[tuple[str, str]] = []
    for dash in DASHBOARDS:
        for panel in dash.panels:
            out.extend((f"{dash.uid} / {panel.title}", q.expr) for q in panel.queries if q.expr)
    for group in RULE_GROUPS:
        out.extend((f"alert {r.uid}", r.query.expr) for r in group.rules if r.query.expr)
    return out


__all__ = [
    "DASHBOARDS",
    "RULE_GROUPS",
    "Change",
    "DataSourceConfig",
    "clickhouse_queries",
    "contains",
    "dashboard_json",
    "deploy",
    "expand_sql",
    "export",
    "layout_text",
    "prometheus_exprs",
    "provisioning_files",
]
