-- Usage per minute (period_start in Beijing time), per tenant, carriers, model and
-- channel; usage_hour and usage_day are copies of this table. Rows are additive deltas:
-- the worker writes each batch's partial sums within seconds, late events arrive as
-- kind = 'late' rows and re-ratings as kind = 'rerate' rows. Plain MergeTree, never
-- collapsed: sum() ... GROUP BY is exact whatever the merge state.
CREATE TABLE IF NOT EXISTS usage_minute
(
    period_start      DateTime('Asia/Shanghai'),
    tenant_id         String,
    reporting_carrier LowCardinality(String),
    home_carrier      LowCardinality(String),
    serving_carrier   LowCardinality(String),
    model_id          LowCardinality(String),
    channel           LowCardinality(String),
    events            Int64,
    billable_events   Int64,
    input_tokens      Int64,
    output_tokens     Int64,
    cached_tokens     Int64,
    reasoning_tokens  Int64,
    token_units       Decimal(38, 6),
    amount            Decimal(38, 6),
    kind              LowCardinality(String) COMMENT 'stream | late | rerate',
    topic             LowCardinality(String),
    partition         UInt32,
    offset            UInt64 COMMENT 'highest source offset folded into this row',
    ingested_at       DateTime64(3, 'UTC')
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ingested_at)
ORDER BY (period_start, tenant_id, reporting_carrier, serving_carrier, model_id, channel)
SETTINGS non_replicated_deduplication_window = 10000;
