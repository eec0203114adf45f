-- One row per threshold crossing: a quota's usage reached a threshold (percent of its
-- limit) in a period. Exactly one per (tenant, subscriber, period, threshold): the
-- event_id is derived from those four, the worker writes a crossing only if its id is
-- neither here nor on the quota-events topic, and retries carry the event_id as
-- insert_deduplication_token. The same record is on the quota-events topic.
CREATE TABLE IF NOT EXISTS quota_events
(
    event_id          String COMMENT 'qe_ + hash of (tenant, subscriber, period, threshold)',
    kind              LowCardinality(String) COMMENT 'threshold | exhausted (threshold >= 100)',
    tenant_id         String,
    subscriber_id     String COMMENT 'empty for a tenant quota',
    period_type       LowCardinality(String) COMMENT 'day | month',
    period            String COMMENT 'period key in Beijing time: 2026-11 or 2026-11-28',
    threshold         Decimal(9, 2) COMMENT 'percent of the limit',
    used_tu           Decimal(38, 6) COMMENT 'billable TU used in the period when crossed',
    limit_tu          Decimal(38, 6),
    used_cny          Decimal(38, 6),
    limit_cny         Nullable(Decimal(38, 6)),
    hard              Bool,
    trigger_event_id  Nullable(String) COMMENT 'the usage event that crossed it (empty after a restart re-detection)',
    crossed_at        DateTime64(3, 'UTC') COMMENT 'when the worker detected the crossing',
    published_at      DateTime64(3, 'UTC') COMMENT 'when Kafka acknowledged it on quota-events',
    recorded_at       DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (tenant_id, subscriber_id, period, threshold, event_id)
SETTINGS non_replicated_deduplication_window = 1000;
