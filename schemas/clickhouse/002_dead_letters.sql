-- Every rejected input, exactly once per (topic, partition, offset, stage).
CREATE TABLE IF NOT EXISTS dead_letters
(
    reason            LowCardinality(String),
    stage             LowCardinality(String),
    detail            String,
    event_id          Nullable(String),
    reporting_carrier LowCardinality(Nullable(String)),
    tenant_id         Nullable(String),
    event_time        Nullable(DateTime64(3, 'UTC')),
    payload           String COMMENT 'JSON (subscriber pseudonymised) when decodable, else the raw bytes',
    payload_format    LowCardinality(String),
    topic             LowCardinality(String),
    partition         UInt32,
    offset            UInt64,
    failed_at         DateTime64(3, 'UTC'),
    ingested_at       DateTime64(3, 'UTC')
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ingested_at)
ORDER BY (reason, failed_at, topic, partition, offset)
SETTINGS non_replicated_deduplication_window = 10000;
