-- Quota definitions, mirrored by the worker from the compacted Kafka topic
-- tokenmeter-quota-definitions (the source of truth; `tokenmeter quota set|delete`
-- write there). One row per definition change; `version` is the change's offset in
-- that topic, so mirroring the same change twice collapses to one row. The current
-- definitions: SELECT ... FROM quotas FINAL WHERE NOT deleted.
CREATE TABLE IF NOT EXISTS quotas
(
    tenant_id      String,
    subscriber_id  String COMMENT 'empty for a tenant quota; else the pseudonym sub_<32 hex>',
    period         LowCardinality(String) COMMENT 'day | month, Beijing time',
    limit_tu       Decimal(38, 6) COMMENT 'Token Units per period',
    limit_cny      Nullable(Decimal(38, 6)) COMMENT 'optional CNY limit per period',
    thresholds     Array(Decimal(9, 2)) COMMENT 'percent of the limit, e.g. [50, 80, 100]',
    hard           Bool COMMENT 'hard: grants never pass the limit; soft: granted and flagged',
    deleted        Bool COMMENT 'true for a `quota delete` (a tombstone in the topic)',
    updated_at     DateTime64(3, 'UTC') COMMENT 'when the change was written to the topic',
    version        UInt64 COMMENT 'offset of the change in tokenmeter-quota-definitions'
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (tenant_id, subscriber_id);
