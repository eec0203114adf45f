-- Accepted, deduplicated usage events: one row per (reporting_carrier, event_id), with
-- its rating (the rated_usage view shows those columns). Written only by the worker, and
-- last in each batch: a row here means its rollup rows are stored too. Every insert carries one ingested_at value, so with
-- PARTITION BY toYYYYMM(ingested_at) an insert is one part and lands atomically; the
-- worker's replay filter relies on that (see pipeline/warehouse/sink.py).
CREATE TABLE IF NOT EXISTS usage_events
(
    event_id          String,
    event_time        DateTime64(3, 'UTC'),
    source            LowCardinality(String),
    source_id         String,
    reporting_carrier LowCardinality(String),
    home_carrier      LowCardinality(String),
    serving_carrier   LowCardinality(String),
    transaction_id    Nullable(String),
    tenant_id         String,
    subscriber_id     String COMMENT 'sub_ + keyed HMAC-SHA256; never a raw id',
    channel           LowCardinality(String),
    model_id          LowCardinality(String),
    provider          LowCardinality(String),
    input_tokens      UInt64,
    output_tokens     UInt64,
    cached_tokens     UInt64,
    reasoning_tokens  UInt64,
    status            LowCardinality(String),
    routing_policy    LowCardinality(Nullable(String)),
    latency_ms        Nullable(UInt64),
    region            LowCardinality(Nullable(String)),
    attributes        Map(String, String),
    payload_hash      Int64 COMMENT 'content fingerprint used to tell exact from conflicting duplicates',
    token_units        Decimal(38, 6) COMMENT 'unified Token Units',
    amount             Decimal(38, 6) COMMENT 'CNY after plan discounts; 0 when not billable',
    list_amount        Decimal(38, 6) COMMENT 'CNY at list price, before plan discounts',
    currency           LowCardinality(String),
    price_card_version LowCardinality(String),
    price_line         LowCardinality(String) COMMENT 'the card line that priced it, e.g. CMCC/*',
    billable           Bool,
    tenant_plan        LowCardinality(String) COMMENT 'empty = list price',
    plan_period        LowCardinality(String) COMMENT 'tier period key, e.g. 2026-11 (Beijing time)',
    tier_usage_tu      Decimal(38, 6) COMMENT 'TU this event adds to the tenant''s tier usage',
    rating_run         LowCardinality(String) COMMENT 'stream, or the rerate run that last priced it',
    topic             LowCardinality(String),
    partition         UInt32,
    offset            UInt64,
    ingested_at       DateTime64(3, 'UTC')
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ingested_at)
ORDER BY (tenant_id, event_time, reporting_carrier, event_id)
SETTINGS non_replicated_deduplication_window = 10000;
