"""Dashboards, alert rules and provisioning as code (pipeline/grafana.py).

- Every ClickHouse statement Grafana will run (panels, variables, alert queries) is
  expanded the way Grafana and the ClickHouse plugin expand it and run, read-only,
  against the shared embedded warehouse filled by the real stages; each returns the
  columns its panel expects, and the key numbers equal the warehouse's own counts.
- The dashboard JSON is checked against the essentials of Grafana's dashboard schema.
  Grafana's full schema cannot be downloaded here, so ``DASHBOARD_SCHEMA`` encodes the
  required fields of Grafana's documented JSON model (dashboard, panel, gridPos,
  target, templating, thresholds) by hand.
- No Grafana server can run on our machines: ``deploy`` is tested against a local HTTP
  server (``FakeGrafana``) that records requests and answers as Grafana's API does for
  the calls deploy makes (including its 401/404/409 answers and its check that a rule's
  data source exists).
- The committed files under infra/grafana equal a fresh export; docker-compose.yml is
  checked by YAML parsing, a hand-written schema of the Compose essentials and cross
  references (``docker compose config`` cannot run here).
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import typer
import yaml
from grafana_client import GrafanaApi
from typer.testing import CliRunner

from pipeline import grafana as g
from pipeline.cli_grafana import register
from pipeline.metrics import WorkerMetrics
from pipeline.warehouse import Warehouse
from tests.unit.warehouse_fill import Filled, fill

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
TOKEN = "glsa_test-token-0123456789abcdef"


# ---- the warehouse, filled by a simulated run ----------------------------------------


@dataclass
class Run:
    filled: Filled
    now_ms: int
    time_from: datetime
    time_to: datetime
    quota_states: dict[str, str]


def _truncate_all(wh: Warehouse) -> None:
    tables = wh.query_arrow(
        "SELECT name FROM system.tables WHERE database = currentDatabase() "
        "AND engine LIKE '%MergeTree' AND name != 'schema_migrations'"
    )
    for name in tables.column("name").to_pylist() if tables.num_rows else []:
        wh.execute(f"TRUNCATE TABLE `{name}`")


def _now_in_month() -> int:
    """Now, but at least 3 h into the Beijing month, so the simulated two hours all lie
    in the current quota month."""
    now = datetime.now(tz=UTC)
    beijing = now + timedelta(hours=8)
    month_start = datetime(beijing.year, beijing.month, 1, tzinfo=UTC) - timedelta(hours=8)
    return int(max(now, month_start + timedelta(hours=3)).timestamp() * 1000)


@pytest.fixture(scope="module")
def run(warehouse: Warehouse) -> Iterator[Run]:
    _truncate_all(warehouse)
    now_ms = _now_in_month()
    filled = fill(warehouse, events=3000, seed=11, now_ms=now_ms, tenants=30)
    used = warehouse.query_arrow(
        "SELECT tenant_id, sum(tier_usage_tu) AS used FROM usage_events "
        "WHERE event_time >= toDateTime(toStartOfMonth(now('Asia/Shanghai')), 'Asia/Shanghai') "
        "GROUP BY tenant_id HAVING used > 0 ORDER BY used DESC, tenant_id LIMIT 5"
    ).to_pylist()
    assert len(used) == 5, used
    (t_exh, u_exh), (t_warn, u_warn), (t_ok, u_ok), (t_day, _), (t_gone, _) = (
        (r["tenant_id"], Decimal(r["used"])) for r in used
    )
    six = Decimal("0.000001")
    rows = [  # (tenant, subscriber, period, limit, deleted, version), as the worker mirrors them
        (t_exh, "", "month", u_exh * 100, False, 1),  # replaced by version 2
        (t_exh, "", "month", u_exh, False, 2),  # exactly 100 %: exhausted
        (t_warn, "", "month", (u_warn * 100 / 85).quantize(six), False, 3),  # ~85 %
        (t_ok, "", "month", u_ok * 10, False, 4),  # 10 %
        (t_ok, "sub_" + "0" * 32, "month", six, False, 5),  # a subscriber quota: not shown
        (t_day, "", "day", Decimal(10) ** 12, False, 6),
        (t_gone, "", "month", six, False, 7),  # deleted by version 8
        (t_gone, "", "month", six, True, 8),
    ]
    updated = now_ms - 60_000
    values = ", ".join(
        f"('{t}', '{sub}', '{period}', toDecimal128('{limit}', 6), NULL, [50, 80, 100], "
        f"false, {str(deleted).lower()}, fromUnixTimestamp64Milli({updated}), {version})"
        for t, sub, period, limit, deleted, version in rows
    )
    warehouse.execute(
        "INSERT INTO quotas (tenant_id, subscriber_id, period, limit_tu, limit_cny, thresholds, "
        f"hard, deleted, updated_at, version) VALUES {values}"
    )
    crossed = now_ms - 600_000
    warehouse.execute(
        "INSERT INTO quota_events (event_id, kind, tenant_id, subscriber_id, period_type, "
        "period, threshold, used_tu, limit_tu, used_cny, limit_cny, hard, trigger_event_id, "
        "crossed_at, published_at) VALUES "
        + ", ".join(
            f"('qe_{i}', '{kind}', '{t_exh}', '', 'month', '2026-11', {threshold}, "
            f"toDecimal128('{u_exh}', 6), toDecimal128('{u_exh}', 6), 0, NULL, false, NULL, "
            f"fromUnixTimestamp64Milli({crossed + i}), fromUnixTimestamp64Milli({crossed + i}))"
            for i, (kind, threshold) in enumerate(
                (("threshold", 50), ("threshold", 80), ("exhausted", 100))
            )
        )
    )
    warehouse.execute(
        "INSERT INTO webhook_deliveries (event_id, webhook, url, attempt, status, http_status, "
        "error, duration_ms, attempted_at, next_attempt_at) VALUES "
        + ", ".join(
            f"('qe_2', 'ops', 'https://hooks.example/t', {n}, '{status}', {code}, '', 12.5, "
            f"fromUnixTimestamp64Milli({crossed + 1000 * n}), NULL)"
            for n, status, code in ((1, "retry", 503), (2, "ok", 200))
        )
    )
    states = {t_exh: "exhausted", t_warn: "warning", t_ok: "ok", t_day: "ok"}
    yield Run(
        filled,
        now_ms,
        datetime.fromtimestamp(now_ms / 1000 - 3 * 3600, tz=UTC),
        datetime.fromtimestamp(now_ms / 1000 + 3600, tz=UTC),
        states,
    )
    _truncate_all(warehouse)


def _readonly(wh: Warehouse, sql: str) -> Any:
    """Run ``sql`` as Grafana's read-only ClickHouse user would (``readonly = 1``).

    Not ``Warehouse.query_readonly``: the embedded backend passes the text through a
    query parameter, which does not take raw newlines (multi-line SQL fails there)."""
    return wh.query_arrow(f"SELECT * FROM (\n{sql}\n) SETTINGS readonly = 1")


def _query(
    wh: Warehouse, run: Run, sql: str, **variables: list[str] | None
) -> list[dict[str, Any]]:
    values: dict[str, list[str] | None] = {
        "tenant": None,
        "carrier": None,
        "model": None,
        "channel": None,
    }
    values.update(variables)
    text = g.expand_sql(
        sql, time_from=run.time_from, time_to=run.time_to, interval_s=60, variables=values
    )
    table = _readonly(wh, text)
    rows: list[dict[str, Any]] = table.to_pylist()
    return rows


def _panel(dash: g.Dashboard, title: str) -> g.Panel:
    return next(p for p in dash.panels if p.title == title)


def _panel_rows(
    wh: Warehouse, run: Run, dash: g.Dashboard, title: str, **variables: list[str] | None
) -> list[dict[str, Any]]:
    return _query(wh, run, _panel(dash, title).queries[0].sql, **variables)


# May legitimately be empty after a clean simulated run.
MAY_BE_EMPTY = {"tokenmeter-recon / Unmatched calls (latest 200)"}


def test_every_clickhouse_query_runs_and_returns_its_columns(
    warehouse: Warehouse, run: Run
) -> None:
    queries = g.clickhouse_queries()
    assert len(queries) >= 30
    for where, sql, columns in queries:
        text = g.expand_sql(
            sql,
            time_from=run.time_from,
            time_to=run.time_to,
            interval_s=60,
            variables={"tenant": None, "carrier": None, "model": None, "channel": None},
        )
        table = _readonly(warehouse, text)
        if columns:
            assert table.column_names == list(columns), where
        else:  # a variable query: one column of values
            assert table.num_columns == 1, where
        if where not in MAY_BE_EMPTY:
            assert table.num_rows > 0, f"{where} returned no rows"


def test_panel_numbers_equal_the_warehouse(warehouse: Warehouse, run: Run) -> None:
    truth = warehouse.query_arrow(
        "SELECT count() AS events, sum(token_units) AS tu, sum(amount) AS amount FROM usage_events"
    ).to_pylist()[0]
    assert truth["events"] == len(run.filled.rated)
    usage = g.USAGE
    assert _panel_rows(warehouse, run, usage, "Events") == [{"events": truth["events"]}]
    assert _panel_rows(warehouse, run, usage, "Token Units")[0]["token_units"] == truth["tu"]
    assert _panel_rows(warehouse, run, usage, "Amount (CNY)")[0]["amount_cny"] == truth["amount"]
    late = _panel_rows(warehouse, run, usage, "Late events (corrections)")[0]["late_events"]
    assert late == run.filled.late > 0
    series = _panel_rows(warehouse, run, usage, "Token Units by reporting carrier")
    assert sum(r["token_units"] for r in series) == truth["tu"]
    assert [r["time"] for r in series] == sorted(r["time"] for r in series)
    by_model = _panel_rows(warehouse, run, usage, "By model")
    assert sum(r["token_units"] for r in by_model) == truth["tu"]

    dead = _panel_rows(warehouse, run, g.PIPELINE, "Dead letters stored, by reason")
    assert sum(r["dead_letters"] for r in dead) == run.filled.dead_letters > 0
    corrections = _panel_rows(warehouse, run, g.PIPELINE, "Late events (corrections)")
    assert sum(r["late_events"] for r in corrections) == run.filled.late


def test_variables_narrow_the_panels(warehouse: Warehouse, run: Run) -> None:
    tenant = run.filled.rated[0].accepted.record["tenant_id"]
    rows = _panel_rows(warehouse, run, g.USAGE, "Top tenants", tenant=[tenant])
    assert [r["tenant_id"] for r in rows] == [tenant]
    expected = sum(1 for r in run.filled.rated if r.accepted.record["tenant_id"] == tenant)
    assert rows[0]["events"] == expected
    cmcc = _panel_rows(
        warehouse, run, g.USAGE, "Carriers: reporting, home and serving", carrier=["CMCC"]
    )
    assert cmcc and {r["reporting_carrier"] for r in cmcc} == {"CMCC"}
    none = _panel_rows(warehouse, run, g.USAGE, "Events", model=["no-such-model"])
    assert none == [{"events": 0}]


def test_reconciliation_panels_pair_cross_carrier_calls(warehouse: Warehouse, run: Run) -> None:
    # Expected straight from the rated events: every cross-carrier call reported once by
    # each carrier with the same tokens is matched.
    calls: dict[str, list[dict[str, Any]]] = {}
    for r in run.filled.rated:
        rec = r.accepted.record
        if rec["home_carrier"] != rec["serving_carrier"] and rec["transaction_id"]:
            calls.setdefault(rec["transaction_id"], []).append(rec)
    assert calls
    matched = sum(
        1
        for recs in calls.values()
        if sorted(x["reporting_carrier"] for x in recs)
        == sorted((recs[0]["home_carrier"], recs[0]["serving_carrier"]))
    )
    assert matched > 0
    rows = _panel_rows(warehouse, run, g.RECON, "Status per period")
    assert sum(r["calls"] for r in rows) == len(calls)
    assert sum(r["matched"] for r in rows) == matched
    for row in rows:
        assert sum(row[s] for s in g.RECON_STATUSES) == row["calls"]
        assert re.fullmatch(r"\d{4}-\d{2}", row["period"])
    rate = _panel_rows(warehouse, run, g.RECON, "Match rate")[0]["match_rate"]
    assert rate == pytest.approx(matched / len(calls))
    pairs = _panel_rows(warehouse, run, g.RECON, "By carrier pair")
    assert all(p["home_carrier"] != p["serving_carrier"] for p in pairs)
    assert sum(p["calls"] for p in pairs) == len(calls)


def test_quota_panels_and_alerts_classify_tenants(warehouse: Warehouse, run: Run) -> None:
    table = _panel_rows(warehouse, run, g.QUOTA, "Quotas")
    states = {r["tenant_id"]: r["state"] for r in table}
    assert states == run.quota_states
    by_tenant = {r["tenant_id"]: r for r in table}
    for row in table:
        assert row["remaining_tu"] == max(row["limit_tu"] - row["used_tu"], 0)
    exhausted = next(t for t, s in run.quota_states.items() if s == "exhausted")
    assert by_tenant[exhausted]["utilisation"] == pytest.approx(1.0)
    counts = _panel_rows(warehouse, run, g.QUOTA, "Tenants at warning / exhausted")
    assert counts == [{"warning": 1, "exhausted": 1}]

    rules = {r.uid: r for grp in g.RULE_GROUPS for r in grp.rules}
    for uid, state in (
        ("tokenmeter-quota-warning", "warning"),
        ("tokenmeter-quota-exhausted", "exhausted"),
    ):
        values = {
            r["tenant_id"]: r["utilisation"] for r in _query(warehouse, run, rules[uid].query.sql)
        }
        firing = {t for t, v in values.items() if v > rules[uid].threshold}
        assert firing == {t for t, s in run.quota_states.items() if s == state}, uid


# ---- the dashboard JSON against Grafana's schema essentials ---------------------------

_DS_REF = {
    "type": "object",
    "required": ["type", "uid"],
    "properties": {"type": {"type": "string"}, "uid": {"type": "string"}},
}
_GRID = {
    "type": "object",
    "required": ["h", "w", "x", "y"],
    "properties": {
        "h": {"type": "integer", "minimum": 1},
        "w": {"type": "integer", "minimum": 1, "maximum": 24},
        "x": {"type": "integer", "minimum": 0, "maximum": 23},
        "y": {"type": "integer", "minimum": 0},
    },
}
_THRESHOLDS = {
    "type": "object",
    "required": ["mode", "steps"],
    "properties": {
        "mode": {"enum": ["absolute", "percentage"]},
        "steps": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["color", "value"],
                "properties": {"color": {"type": "string"}, "value": {"type": ["number", "null"]}},
            },
        },
    },
}
_TARGET = {
    "type": "object",
    "required": ["refId", "datasource"],
    "properties": {"refId": {"type": "string", "pattern": "^[A-Z]$"}, "datasource": _DS_REF},
}
_PANEL = {
    "type": "object",
    "required": ["id", "type", "title", "gridPos"],
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "type": {"enum": ["row", "timeseries", "stat", "table", "barchart", "bargauge"]},
        "title": {"type": "string", "minLength": 1},
        "description": {"type": "string"},
        "gridPos": _GRID,
        "datasource": _DS_REF,
        "targets": {"type": "array", "minItems": 1, "items": _TARGET},
        "fieldConfig": {
            "type": "object",
            "required": ["defaults", "overrides"],
            "properties": {
                "defaults": {
                    "type": "object",
                    "properties": {"unit": {"type": "string"}, "thresholds": _THRESHOLDS},
                },
                "overrides": {"type": "array"},
            },
        },
        "options": {"type": "object"},
        "collapsed": {"type": "boolean"},
        "panels": {"type": "array"},
    },
    "if": {"properties": {"type": {"const": "row"}}},
    "then": {"required": ["collapsed", "panels"]},
    "else": {"required": ["datasource", "targets", "fieldConfig", "options"]},
}
_VARIABLE = {
    "type": "object",
    "required": ["name", "type", "current"],
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
        "type": {"enum": ["query", "custom", "constant", "datasource", "interval", "textbox"]},
        "multi": {"type": "boolean"},
        "includeAll": {"type": "boolean"},
        "allValue": {"type": ["string", "null"]},
        "refresh": {"enum": [0, 1, 2]},
        "current": {"type": "object"},
        "options": {"type": "array"},
    },
}
DASHBOARD_SCHEMA = {
    "type": "object",
    "required": [
        "uid",
        "title",
        "schemaVersion",
        "panels",
        "time",
        "templating",
        "tags",
        "timezone",
        "editable",
        "refresh",
        "annotations",
    ],
    "properties": {
        "id": {"type": ["integer", "null"]},
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "panels": {"type": "array", "minItems": 1, "items": _PANEL},
        "time": {
            "type": "object",
            "required": ["from", "to"],
            "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
        },
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {"list": {"type": "array", "items": _VARIABLE}},
        },
        "annotations": {"type": "object", "required": ["list"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "timezone": {"type": "string"},
        "editable": {"type": "boolean"},
        "graphTooltip": {"enum": [0, 1, 2]},
        "refresh": {"type": "string"},
    },
}


def _overlap(a: dict[str, int], b: dict[str, int]) -> bool:
    return (
        a["x"] < b["x"] + b["w"]
        and b["x"] < a["x"] + a["w"]
        and a["y"] < b["y"] + b["h"]
        and b["y"] < a["y"] + a["h"]
    )


@pytest.mark.parametrize("dash", g.DASHBOARDS, ids=lambda d: d.uid)
def test_dashboard_json_follows_grafana_schema(dash: g.Dashboard) -> None:
    model = g.dashboard_json(dash)
    jsonschema.validate(model, DASHBOARD_SCHEMA)
    panels = model["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for a, b in itertools.combinations(panels, 2):
        assert not _overlap(a["gridPos"], b["gridPos"]), (a["title"], b["title"])
    for p in panels:
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
    defined = {v["name"] for v in model["templating"]["list"]}
    sources = {g.CLICKHOUSE_UID: g.CLICKHOUSE_TYPE, g.PROMETHEUS_UID: g.PROMETHEUS_TYPE}
    for p in panels:
        if p["type"] == "row":
            continue
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs), p["title"]
        for t in p["targets"]:
            ds = t["datasource"]
            assert sources[ds["uid"]] == ds["type"] == p["datasource"]["type"]
            if ds["uid"] == g.CLICKHOUSE_UID:
                assert t["editorType"] == "sql" and t["rawSql"].startswith(("SELECT", "WITH"))
                assert (t["format"], t["queryType"]) in ((0, "timeseries"), (1, "table"))
                assert (t["format"] == 0) == (p["type"] == "timeseries")
                if t["format"] == 0:  # long frames must be sorted by time
                    assert re.search(r"\bAS time\b", t["rawSql"]) and "ORDER BY time" in t["rawSql"]
                used = set(re.findall(r"\$\{(\w+)(?::\w+)?\}", t["rawSql"]))
                assert used <= defined, (p["title"], used - defined)
            else:
                assert t["expr"]
    for var in model["templating"]["list"]:
        assert var["allValue"] == f"'{g.ALL}'" and var["includeAll"]


def test_prometheus_expressions_use_metrics_the_worker_exposes() -> None:
    body, _ = WorkerMetrics().render()
    exposed = set(re.findall(r"^(tokenmeter_\w+)", body.decode(), re.MULTILINE))
    exposed |= {"tokenmeter_consumer_lag_messages"}  # present once lag has been read
    exprs = g.prometheus_exprs()
    assert len(exprs) >= 15
    for where, expr in exprs:
        for name in re.findall(r"\btokenmeter_\w+", expr):
            assert name in exposed, f"{where}: {name}"


# ---- alert rules ---------------------------------------------------------------------


def test_alert_rules_carry_routing_labels_and_valid_queries() -> None:
    rules = [r for grp in g.RULE_GROUPS for r in grp.rules]
    uids = [r.uid for r in rules]
    assert len(set(uids)) == len(uids)
    assert {
        "tokenmeter-quota-warning",
        "tokenmeter-quota-exhausted",
        "tokenmeter-dead-letter-rate",
        "tokenmeter-consumer-lag-growing",
        "tokenmeter-sink-failing",
    } <= set(uids)
    for grp in g.RULE_GROUPS:
        api = g.rule_group_api(grp)
        for rule in api["rules"]:
            assert len(rule["uid"]) <= 40
            labels = rule["labels"]
            assert labels["severity"] in ("warning", "critical")
            assert labels["team"] and labels["component"] and labels["service"] == "tokenmeter"
            assert rule["condition"] in {d["refId"] for d in rule["data"]}
            assert re.fullmatch(r"\d+[smh]", rule["for"])
            assert rule["noDataState"] in ("OK", "NoData", "Alerting")
            assert rule["execErrState"] in ("OK", "Error", "Alerting")
            assert rule["annotations"]["summary"]
            for d in rule["data"]:
                assert d["datasourceUid"] in (g.CLICKHOUSE_UID, g.PROMETHEUS_UID, "__expr__")
                assert d["model"]["refId"] == d["refId"]


# ---- provisioning files --------------------------------------------------------------


def test_committed_files_equal_a_fresh_export() -> None:
    fresh = g.provisioning_files()
    base = INFRA / "grafana"
    on_disk = {
        str(p.relative_to(base)): p.read_text(encoding="utf-8")
        for p in base.rglob("*")
        if p.is_file()
    }
    assert set(on_disk) == set(fresh), "run `tokenmeter grafana export infra/grafana`"
    for rel, text in fresh.items():
        assert on_disk[rel] == text, (
            f"{rel} is stale: run `tokenmeter grafana export infra/grafana`"
        )


def test_export_is_idempotent_and_loadable(tmp_path: Path) -> None:
    first = g.export(tmp_path)
    assert len(first) == len(g.provisioning_files())
    assert g.export(tmp_path) == []  # nothing changed, nothing rewritten

    ds = yaml.safe_load((tmp_path / "provisioning/datasources/tokenmeter.yaml").read_text())
    assert ds["apiVersion"] == 1
    assert {d["uid"] for d in ds["datasources"]} == {g.CLICKHOUSE_UID, g.PROMETHEUS_UID}
    ch = next(d for d in ds["datasources"] if d["uid"] == g.CLICKHOUSE_UID)
    assert ch["type"] == "grafana-clickhouse-datasource"
    assert ch["secureJsonData"]["password"] == f"${{{g.PASSWORD_ENV}}}"  # from Grafana's env

    providers = yaml.safe_load((tmp_path / "provisioning/dashboards/tokenmeter.yaml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == g.DASHBOARDS_PATH

    alerting_text = (tmp_path / "provisioning/alerting/tokenmeter.yaml").read_text()
    # Grafana expands $VARS in provisioning files: rules must not contain any '$'
    assert "$" not in alerting_text
    alerting = yaml.safe_load(alerting_text)
    assert [grp["name"] for grp in alerting["groups"]] == [grp.name for grp in g.RULE_GROUPS]
    for file_group, grp in zip(alerting["groups"], g.RULE_GROUPS, strict=True):
        assert file_group["folder"] == g.FOLDER_TITLE
        api_rules = g.rule_group_api(grp)["rules"]
        for file_rule, api_rule in zip(file_group["rules"], api_rules, strict=True):
            assert g.contains(api_rule, file_rule)  # one definition, two shapes

    for dash in g.DASHBOARDS:
        assert json.loads((tmp_path / f"dashboards/{dash.uid}.json").read_text()) == (
            g.dashboard_json(dash)
        )


def test_expand_sql_refuses_unknown_references() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    end = start + timedelta(hours=1)
    sql = (
        "SELECT $__timeInterval(t) AS time FROM x WHERE $__timeFilter(t) "
        "AND c IN (${v:singlequote})"
    )
    out = g.expand_sql(sql, time_from=start, time_to=end, interval_s=30, variables={"v": ["a'b"]})
    assert out == (
        "SELECT toStartOfInterval(toDateTime(t), INTERVAL 30 second) AS time FROM x WHERE "
        f"t >= toDateTime({int(start.timestamp())}) AND t <= toDateTime({int(end.timestamp())})"
        " AND c IN ('a\\'b')"
    )
    assert "'__all'" in g.expand_sql(sql, time_from=start, time_to=end, variables={"v": None})
    with pytest.raises(ValueError, match="unknown variable"):
        g.expand_sql(sql, time_from=start, time_to=end)
    with pytest.raises(ValueError, match="unexpanded"):
        g.expand_sql("SELECT $__timeFilter_ms(t)", time_from=start, time_to=end)


# ---- deploy, against a recording stand-in for Grafana's HTTP API ---------------------


@dataclass
class Recorded:
    method: str
    path: str
    body: Any
    authorization: str


class FakeGrafana:
    """Answers the part of Grafana's HTTP API that ``deploy`` uses, as Grafana does
    (status codes, response shapes, ids and versions it adds, secrets it never returns),
    and records every request."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.requests: list[Recorded] = []
        self.folders: dict[str, dict[str, Any]] = {}
        self.datasources: dict[str, dict[str, Any]] = {}
        self.secure: dict[str, dict[str, str]] = {}
        self.dashboards: dict[str, dict[str, Any]] = {}
        self.groups: dict[tuple[str, str], dict[str, Any]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                auth = self.headers.get("Authorization", "")
                with fake._lock:
                    fake.requests.append(Recorded(self.command, self.path, body, auth))
                    status, answer = fake.handle(self.command, self.path, body, auth)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def writes(self) -> list[Recorded]:
        return [r for r in self.requests if r.method != "GET"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- Grafana's behaviour ------------------------------------------------------------

    def handle(self, method: str, path: str, body: Any, auth: str) -> tuple[int, Any]:
        if path == "/api/health":
            return 200, {"database": "ok", "version": "12.0.0"}
        if auth != f"Bearer {self.token}":
            return 401, {"message": "invalid API key"}
        routes: list[tuple[str, str, Callable[..., tuple[int, Any]]]] = [
            ("GET", r"/api/folders/([^/]+)", self.get_folder),
            ("POST", r"/api/folders", self.create_folder),
            ("PUT", r"/api/folders/([^/]+)", self.update_folder),
            ("GET", r"/api/datasources/uid/([^/]+)", self.get_datasource),
            ("POST", r"/api/datasources", self.create_datasource),
            ("PUT", r"/api/datasources/uid/([^/]+)", self.update_datasource),
            ("GET", r"/api/dashboards/uid/([^/]+)", self.get_dashboard),
            ("POST", r"/api/dashboards/db", self.save_dashboard),
            ("GET", r"/api/v1/provisioning/folder/([^/]+)/rule-groups/([^/]+)", self.get_group),
            ("PUT", r"/api/v1/provisioning/folder/([^/]+)/rule-groups/([^/]+)", self.put_group),
        ]
        for verb, pattern, fn in routes:
            m = re.fullmatch(pattern, path.split("?", 1)[0])
            if verb == method and m:
                return fn(body, *m.groups())
        return 404, {"message": "Not found"}

    def get_folder(self, _body: Any, uid: str) -> tuple[int, Any]:
        if uid not in self.folders:
            return 404, {"message": "folder not found", "status": "not-found"}
        return 200, self.folders[uid]

    def create_folder(self, body: Any) -> tuple[int, Any]:
        uid = body.get("uid")
        if uid in self.folders:
            return 409, {"message": "a folder with the same uid already exists"}
        self.folders[uid] = {
            "id": next(self._ids),
            "uid": uid,
            "title": body["title"],
            "version": 1,
        }
        return 200, self.folders[uid]

    def update_folder(self, body: Any, uid: str) -> tuple[int, Any]:
        if uid not in self.folders:
            return 404, {"message": "folder not found"}
        folder = self.folders[uid]
        folder["title"] = body.get("title", folder["title"])
        folder["version"] += 1
        return 200, folder

    def _datasource_view(self, uid: str) -> dict[str, Any]:
        return {
            **self.datasources[uid],
            "secureJsonFields": {k: True for k in self.secure.get(uid, {})},
        }

    def get_datasource(self, _body: Any, uid: str) -> tuple[int, Any]:
        if uid not in self.datasources:
            return 404, {"message": "Data source not found"}
        return 200, self._datasource_view(uid)

    def _store_datasource(self, uid: str, body: dict[str, Any], ident: int, version: int) -> None:
        secure = body.pop("secureJsonData", None) or {}
        self.secure.setdefault(uid, {}).update(secure)
        self.datasources[uid] = {
            "basicAuth": False,
            "readOnly": False,
            "orgId": 1,
            **body,
            "id": ident,
            "uid": uid,
            "version": version,
        }

    def create_datasource(self, body: Any) -> tuple[int, Any]:
        uid = body["uid"]
        names = {d["name"] for d in self.datasources.values()}
        if uid in self.datasources or body["name"] in names:
            return 409, {"message": "data source with the same name already exists"}
        self._store_datasource(uid, dict(body), next(self._ids), 1)
        return 200, {"datasource": self._datasource_view(uid), "message": "Datasource added"}

    def update_datasource(self, body: Any, uid: str) -> tuple[int, Any]:
        if uid not in self.datasources:
            return 404, {"message": "Data source not found"}
        old = self.datasources[uid]
        self._store_datasource(uid, dict(body), old["id"], old["version"] + 1)
        return 200, {"datasource": self._datasource_view(uid), "message": "Datasource updated"}

    def get_dashboard(self, _body: Any, uid: str) -> tuple[int, Any]:
        if uid not in self.dashboards:
            return 404, {"message": "Dashboard not found"}
        stored = self.dashboards[uid]
        return 200, {
            "dashboard": stored["dashboard"],
            "meta": {
                "folderUid": stored["folderUid"],
                "slug": uid,
                "provisioned": False,
                "version": stored["dashboard"]["version"],
            },
        }

    def save_dashboard(self, body: Any) -> tuple[int, Any]:
        dash = dict(body["dashboard"])
        uid = dash["uid"]
        if body.get("folderUid") not in self.folders:
            return 400, {"message": "folder not found"}
        if uid in self.dashboards and not body.get("overwrite"):
            return 412, {
                "message": "The dashboard has been changed by someone else",
                "status": "version-mismatch",
            }
        old = self.dashboards.get(uid)
        dash["id"] = old["dashboard"]["id"] if old else next(self._ids)
        dash["version"] = old["dashboard"]["version"] + 1 if old else 1
        self.dashboards[uid] = {"dashboard": dash, "folderUid": body["folderUid"]}
        return 200, {
            "id": dash["id"],
            "uid": uid,
            "status": "success",
            "version": dash["version"],
            "url": f"/d/{uid}",
        }

    def get_group(self, _body: Any, folder: str, group: str) -> tuple[int, Any]:
        if (folder, group) not in self.groups:
            return 404, {"message": "rule group does not exist"}
        return 200, self.groups[(folder, group)]

    def put_group(self, body: Any, folder: str, group: str) -> tuple[int, Any]:
        if folder not in self.folders:
            return 404, {"message": "folder does not exist"}
        for rule in body["rules"]:
            if rule.get("folderUID") != folder or rule.get("ruleGroup") != group:
                return 400, {"message": "rule is not in this folder / group"}
            for query in rule["data"]:
                if query["datasourceUid"] not in (*self.datasources, "__expr__"):
                    return 400, {"message": f"data source {query['datasourceUid']} not found"}
        self.groups[(folder, group)] = {
            "title": group,
            "folderUid": folder,
            "interval": body["interval"],
            "rules": [
                {**r, "id": next(self._ids), "updated": "2026-11-28T00:00:00Z", "provenance": "api"}
                for r in body["rules"]
            ],
        }
        return 200, self.groups[(folder, group)]


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    fake = FakeGrafana()
    yield fake
    fake.close()


def _api(fake: FakeGrafana, token: str = TOKEN) -> Any:
    return GrafanaApi.from_url(fake.url, credential=token, timeout=10)


N_OBJECTS = 1 + 2 + len(g.DASHBOARDS) + len(g.RULE_GROUPS)


def test_deploy_creates_everything_then_sends_no_writes(grafana: FakeGrafana) -> None:
    changes = g.deploy(_api(grafana), clickhouse_password="s3cret-pw")
    assert len(changes) == N_OBJECTS
    assert {c.action for c in changes} == {"created"}
    assert all(r.authorization == f"Bearer {TOKEN}" for r in grafana.requests)
    # what deploy stored is exactly what export writes
    for dash in g.DASHBOARDS:
        stored = grafana.dashboards[dash.uid]
        assert stored["folderUid"] == g.FOLDER_UID
        assert {k: v for k, v in stored["dashboard"].items() if k not in ("id", "version")} == (
            g.dashboard_json(dash)
        )
    for grp in g.RULE_GROUPS:
        assert g.contains(grafana.groups[(g.FOLDER_UID, grp.name)], g.rule_group_api(grp))
    assert grafana.secure[g.CLICKHOUSE_UID] == {"password": "s3cret-pw"}

    before = len(grafana.requests)
    again = g.deploy(_api(grafana), clickhouse_password="s3cret-pw")
    assert {c.action for c in again} == {"unchanged"}
    second = grafana.requests[before:]
    assert second and all(r.method == "GET" for r in second)  # deploying twice: no writes


def test_deploy_writes_only_what_differs(grafana: FakeGrafana) -> None:
    g.deploy(_api(grafana))
    grafana.dashboards["tokenmeter-usage"]["dashboard"]["title"] = "edited by hand"
    grafana.groups[(g.FOLDER_UID, "tokenmeter-pipeline")]["interval"] = 300
    before = len(grafana.requests)
    changes = g.deploy(_api(grafana))
    writes = [r for r in grafana.requests[before:] if r.method != "GET"]
    assert [(w.method, w.path) for w in writes] == [
        ("POST", "/api/dashboards/db"),
        ("PUT", f"/api/v1/provisioning/folder/{g.FOLDER_UID}/rule-groups/tokenmeter-pipeline"),
    ]
    assert writes[0].body["dashboard"]["title"] == g.USAGE.title
    assert sorted(c.uid for c in changes if c.action == "updated") == [
        "tokenmeter-pipeline",
        "tokenmeter-usage",
    ]


def test_deploy_dry_run_writes_nothing(grafana: FakeGrafana) -> None:
    changes = g.deploy(_api(grafana), dry_run=True)
    assert {c.action for c in changes} == {"created"}
    assert grafana.writes() == []


def test_cli_deploy_and_export(grafana: FakeGrafana, tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:
        """tokenmeter (test mount)."""

    runner = CliRunner()
    env = {"TOKENMETER_GRAFANA_TOKEN": TOKEN}
    first = runner.invoke(app, ["grafana", "deploy", "--url", grafana.url], env=env)
    assert first.exit_code == 0, first.output
    assert f"{N_OBJECTS} of {N_OBJECTS} object(s) changed" in first.output
    second = runner.invoke(app, ["grafana", "deploy", "--url", grafana.url], env=env)
    assert second.exit_code == 0, second.output
    assert f"0 of {N_OBJECTS} object(s) changed" in second.output
    for result in (first, second):
        assert TOKEN not in result.output

    bad = runner.invoke(
        app, ["grafana", "deploy", "--url", grafana.url, "--token", "wrong-token-xyz"]
    )
    assert bad.exit_code == 2
    assert "401" in bad.output and "wrong-token-xyz" not in bad.output

    out = runner.invoke(app, ["grafana", "export", str(tmp_path / "g")])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "g/provisioning/alerting/tokenmeter.yaml").is_file()
    again = runner.invoke(app, ["grafana", "export", str(tmp_path / "g")])
    assert f"0 of {len(g.provisioning_files())} file(s) changed" in again.output


# ---- docker-compose.yml: YAML, Compose essentials, cross references -------------------

_PORT = {"type": "string", "pattern": r"^127\.0\.0\.1:\d+:\d+$"}
_SERVICE = {
    "type": "object",
    "properties": {
        "image": {
            "type": "string",
            "pattern": r"^[\w./-]+:[\w.-]+$",
            "not": {"pattern": ":latest$"},
        },
        "build": {
            "type": "object",
            "required": ["context", "dockerfile"],
            "properties": {"context": {"type": "string"}, "dockerfile": {"type": "string"}},
        },
        "command": {"type": "array", "items": {"type": "string"}},
        "entrypoint": {"type": "array", "items": {"type": "string"}},
        "environment": {
            "type": "object",
            "additionalProperties": {"type": "string"},
        },
        "ports": {"type": "array", "items": _PORT},
        "volumes": {"type": "array", "items": {"type": "string"}},
        "depends_on": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["condition"],
                "properties": {
                    "condition": {
                        "enum": [
                            "service_started",
                            "service_healthy",
                            "service_completed_successfully",
                        ]
                    }
                },
            },
        },
        "healthcheck": {
            "type": "object",
            "required": ["test"],
            "properties": {
                "test": {"type": "array", "minItems": 2, "items": {"type": "string"}},
                "interval": {"type": "string", "pattern": r"^\d+[smh]$"},
                "timeout": {"type": "string", "pattern": r"^\d+[smh]$"},
                "start_period": {"type": "string", "pattern": r"^\d+[smh]$"},
                "retries": {"type": "integer", "minimum": 1},
            },
        },
        "restart": {"enum": ["no", "always", "on-failure", "unless-stopped"]},
        "ulimits": {"type": "object"},
    },
    "additionalProperties": False,
    "anyOf": [{"required": ["image"]}, {"required": ["build"]}],
}
COMPOSE_SCHEMA = {
    "type": "object",
    "required": ["services"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]*$"},
        "services": {"type": "object", "additionalProperties": _SERVICE, "minProperties": 1},
        "volumes": {"type": "object"},
    },
    "additionalProperties": False,
}


def test_docker_compose_file_is_valid_and_wired() -> None:
    path = INFRA / "docker-compose.yml"
    text = path.read_text()
    compose = yaml.safe_load(text)
    jsonschema.validate(compose, COMPOSE_SCHEMA)
    services = compose["services"]
    assert {"kafka", "clickhouse", "grafana", "worker", "prometheus"} <= set(services)
    # every ${VAR} uses Compose's syntax; secrets are required, never defaulted
    for ref in re.findall(r"\$\{([^}]*)\}", text):
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*(:\?[^}]+)?", ref), ref
    for name, svc in services.items():
        for key, value in (svc.get("environment") or {}).items():
            if "PASSWORD" in key or key.endswith(("_KEY", "_TOKEN")):
                assert "${" in value and ":?" in value, f"{name}.{key} must come from the env"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], dep
        for volume in svc.get("volumes") or []:
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (INFRA / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in (compose.get("volumes") or {}), f"{name}: volume {source}"
        if "build" in svc:
            context = (INFRA / svc["build"]["context"]).resolve()
            assert (context / svc["build"]["dockerfile"]).is_file()

    assert services["kafka"]["image"] == "apache/kafka:3.9.1"
    kafka_env = services["kafka"]["environment"]
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, single node
    assert "kafka:9092" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    assert services["clickhouse"]["image"].startswith("clickhouse/clickhouse-server:")
    # analysts (the grafana user) cannot read other users' query text: system tables need
    # a grant it lacks, introspection functions are off (issue 14, low)
    ch_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["clickhouse"]["volumes"]}
    config = ch_mounts["/etc/clickhouse-server/config.d/system-tables-need-grants.xml"]
    setting = ET.parse(INFRA / config).find(
        "access_control_improvements/select_from_system_db_requires_grant"
    )
    assert setting is not None and setting.text == "true"
    profile = (INFRA / "clickhouse/initdb/01-grafana-user.sh").read_text()
    assert "allow_introspection_functions = 0" in profile
    assert "GRANT SELECT ON ${CLICKHOUSE_DB}.* TO grafana;" in profile

    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana-oss:")
    assert "grafana-clickhouse-datasource" in grafana["environment"]["GF_INSTALL_PLUGINS"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    assert mounts[g.DASHBOARDS_PATH] == "./grafana/dashboards"
    assert g.PASSWORD_ENV in grafana["environment"]

    worker = services["worker"]
    env = worker["environment"]
    assert env["TOKENMETER_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert re.fullmatch(
        r"clickhouse://\w+:\$\{[^}]+\}@clickhouse:8123/\w+", env["TOKENMETER_WAREHOUSE_URL"]
    )
    assert env["TOKENMETER_WEB_HOST"] == "0.0.0.0"  # reachable by Prometheus on the network
    assert worker["command"] == ["worker"]

    prometheus = yaml.safe_load((INFRA / "prometheus/prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["job_name"] == "tokenmeter-worker"  # the worker-down alert's job label
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"worker:{env['TOKENMETER_WEB_PORT']}"]
    assert 'job="tokenmeter-worker"' in next(
        r.query.expr
        for grp in g.RULE_GROUPS
        for r in grp.rules
        if r.uid == "tokenmeter-worker-down"
    )


def test_dockerfile_builds_the_worker() -> None:
    text = (INFRA / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    stages = [ln for ln in lines if ln.startswith("FROM")]
    assert stages == ["FROM golang:1.26-bookworm AS quotad", "FROM python:3.11-slim"]
    go_version = (ROOT / "quotad" / "go.mod").read_text().split("\ngo ")[1].split()[0]
    assert stages[0].startswith(f"FROM golang:{go_version}")  # the module's Go
    assert any(ln.startswith("RUN") and "pip install" in ln for ln in lines)
    assert any(ln.startswith("RUN") and "go build" in ln for ln in lines)
    # the worker looks for the quota server next to its python (pipeline/quota/link.py)
    assert "COPY --from=quotad /out/tokenmeter-quotad /usr/local/bin/tokenmeter-quotad" in lines
    assert 'ENTRYPOINT ["tokenmeter"]' in lines and 'CMD ["worker"]' in lines
    for ln in lines:
        if ln.startswith("COPY") and "--from=" not in ln:
            for src in ln.split()[1:-1]:
                assert (ROOT / src).exists(), src


def test_the_docs_show_the_current_layouts() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    for dash in g.DASHBOARDS:
        assert g.layout_text(dash) in doc, f"docs/operations.md: refresh the layout of {dash.uid}"
    for grp in g.RULE_GROUPS:
        for rule in grp.rules:
            assert f"`{rule.uid}` | {rule.title} |" in doc, rule.uid
