#!/bin/bash
# Runs once, when the ClickHouse container initialises an empty data directory: creates
# the read-only user that Grafana's ClickHouse data source logs in as. readonly = 1
# refuses writes; the Grafana plugin's client needs to set max_execution_time, which
# the profile allows (CHANGEABLE_IN_READONLY), as the plugin's documentation asks.
set -euo pipefail

clickhouse client --user "${CLICKHOUSE_USER}" --password "${CLICKHOUSE_PASSWORD}" --multiquery <<SQL
CREATE SETTINGS PROFILE IF NOT EXISTS grafana_readonly
    SETTINGS readonly = 1, max_execution_time = 60 CHANGEABLE_IN_READONLY;
CREATE USER IF NOT EXISTS grafana
    IDENTIFIED WITH sha256_password BY '${TOKENMETER_GRAFANA_CLICKHOUSE_PASSWORD}'
    SETTINGS PROFILE 'grafana_readonly';
GRANT SELECT ON ${CLICKHOUSE_DB}.* TO grafana;
SQL
