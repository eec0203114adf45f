-- One row per webhook delivery attempt of a quota event. status: ok (2xx), retry (a
-- failure that will be retried with backoff), failed (given up: a 4xx other than
-- 408/429, or the last attempt failed). A quota event has reached a webhook once a row
-- with status = 'ok' exists for (event_id, webhook).
CREATE TABLE IF NOT EXISTS webhook_deliveries
(
    event_id      String,
    webhook       LowCardinality(String) COMMENT 'the name in the webhooks file',
    url           String COMMENT 'without user info or query string',
    attempt       UInt32,
    status        LowCardinality(String) COMMENT 'ok | retry | failed',
    http_status   Nullable(UInt16),
    error         String,
    duration_ms   Float64,
    attempted_at  DateTime64(3, 'UTC'),
    next_attempt_at Nullable(DateTime64(3, 'UTC'))
)
ENGINE = MergeTree
ORDER BY (event_id, webhook, attempt)
SETTINGS non_replicated_deduplication_window = 1000;
