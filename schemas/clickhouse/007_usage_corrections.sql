-- One row per event that arrived after its minute window closed (window end + grace,
-- judged by the broker's receive time). Its contributions are also in the rollups, as
-- kind = 'late' rows: nothing is dropped, and this table says which numbers moved late.
CREATE TABLE IF NOT EXISTS usage_corrections
(
    event_id          String,
    reporting_carrier LowCardinality(String),
    event_time        DateTime64(3, 'UTC'),
    window_start      DateTime('Asia/Shanghai'),
    arrived_at        DateTime64(3, 'UTC'),
    lateness_s        Float64 COMMENT 'seconds after window end + grace',
    tenant_id         String,
    home_carrier      LowCardinality(String),
    serving_carrier   LowCardinality(String),
    model_id          LowCardinality(String),
    channel           LowCardinality(String),
    input_tokens      Int64,
    output_tokens     Int64,
    cached_tokens     Int64,
    reasoning_tokens  Int64,
    token_units       Decimal(38, 6),
    amount            Decimal(38, 6),
    topic             LowCardinality(String),
    partition         UInt32,
    offset            UInt64,
    ingested_at       DateTime64(3, 'UTC')
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ingested_at)
ORDER BY (window_start, tenant_id, event_id)
SETTINGS non_replicated_deduplication_window = 10000;
