#!/bin/bash
# Runs once, when the ClickHouse container initialises an empty data directory: creates
# the read-only user that Grafana's ClickHouse data source (analysts' dashboards) logs in
# as. readonly = 1 refuses writes and any change of the settings below; the Grafana
# plugin's client needs to set max_execution_time, which the profile allows
# (CHANGEABLE_IN_READONLY, as the plugin's documentation asks) up to 60 s only. The
# limits match the worker's TOKENMETER_QUERY_MAX_* defaults (README, "limits").
# Introspection functions are off, and the system tables with other users' query text
# (system.processes, system.query_log) need a grant it does not have
# (../config.d/system-tables-need-grants.xml).
set -euo pipefail

clickhouse client --user "${CLICKHOUSE_USER}" --password "${CLICKHOUSE_PASSWORD}" --multiquery <<SQL
CREATE SETTINGS PROFILE IF NOT EXISTS grafana_readonly
    SETTINGS readonly = 1,
        max_execution_time = 60 MIN 1 MAX 60 CHANGEABLE_IN_READONLY,
        timeout_overflow_mode = 'throw',
        max_memory_usage = 2147483648,
        max_result_rows = 1000000,
        max_result_bytes = 268435456,
        result_overflow_mode = 'throw',
        max_rows_to_read = 10000000000,
        max_bytes_to_read = 1099511627776,
        read_overflow_mode = 'throw',
        allow_introspection_functions = 0;
CREATE USER IF NOT EXISTS grafana
    IDENTIFIED WITH sha256_password BY '${TOKENMETER_GRAFANA_CLICKHOUSE_PASSWORD}'
    SETTINGS PROFILE 'grafana_readonly';
GRANT SELECT ON ${CLICKHOUSE_DB}.* TO grafana;
SQL
