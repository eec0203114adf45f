-- The journal of `tokenmeter rerate`: one row per event whose rating a run changed, with
-- the old and the new rating. Written before anything else is corrected, so an
-- interrupted run can be finished from it; afterwards it traces every rerate delta in
-- usage_minute/hour/day (topic = 'rerate:' || run_id) back to its events.
CREATE TABLE IF NOT EXISTS rerate_changes
(
    run_id                 String,
    reporting_carrier      LowCardinality(String),
    event_id               String,
    event_time             DateTime64(3, 'UTC'),
    tenant_id              String,
    home_carrier           LowCardinality(String),
    serving_carrier        LowCardinality(String),
    model_id               LowCardinality(String),
    channel                LowCardinality(String),
    topic                  LowCardinality(String),
    partition              UInt32,
    offset                 UInt64,
    old_token_units        Decimal(38, 6),
    new_token_units        Decimal(38, 6),
    old_amount             Decimal(38, 6),
    new_amount             Decimal(38, 6),
    old_list_amount        Decimal(38, 6),
    new_list_amount        Decimal(38, 6),
    old_price_card_version LowCardinality(String),
    new_price_card_version LowCardinality(String),
    old_price_line         LowCardinality(String),
    new_price_line         LowCardinality(String),
    old_billable           Bool,
    new_billable           Bool,
    old_tenant_plan        LowCardinality(String),
    new_tenant_plan        LowCardinality(String),
    old_plan_period        LowCardinality(String),
    new_plan_period        LowCardinality(String),
    old_tier_usage_tu      Decimal(38, 6),
    new_tier_usage_tu      Decimal(38, 6),
    old_rating_run         LowCardinality(String),
    recorded_at            DateTime64(3, 'UTC')
)
ENGINE = MergeTree
ORDER BY (run_id, reporting_carrier, event_id)
SETTINGS non_replicated_deduplication_window = 1000;
