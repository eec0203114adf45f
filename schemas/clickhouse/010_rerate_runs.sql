-- One row per `tokenmeter rerate` run (after FINAL): the range it re-rated, the price
-- cards it used, how many events changed and the range's totals before and after.
-- A run first writes status = 'applying', then 'done' once the rollups, usage_events
-- and price_cards are corrected; a run interrupted in between is finished by the next
-- `tokenmeter rerate` (or 'abandoned' if it had not changed anything yet). Query with
-- FINAL, or WHERE status = 'done' (one such row per finished run).
CREATE TABLE IF NOT EXISTS rerate_runs
(
    run_id              String COMMENT 'rr_ + hash of the exact (event, old rating, new rating) list',
    status              LowCardinality(String) COMMENT 'applying | done | abandoned',
    range_from          DateTime64(3, 'UTC') COMMENT 'event_time range re-rated: [range_from, range_to)',
    range_to            DateTime64(3, 'UTC'),
    price_card_versions Array(String),
    price_card_source   String COMMENT 'the price card directory or files used',
    events_in_range     UInt64,
    events_rerated      UInt64 COMMENT 'events whose rating changed',
    old_token_units     Decimal(38, 6),
    new_token_units     Decimal(38, 6),
    old_amount          Decimal(38, 6) COMMENT 'CNY, the range before the run',
    new_amount          Decimal(38, 6) COMMENT 'CNY, the range after the run',
    old_list_amount     Decimal(38, 6),
    new_list_amount     Decimal(38, 6),
    started_at          DateTime64(3, 'UTC'),
    finished_at         Nullable(DateTime64(3, 'UTC')),
    updated_at          DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY run_id
SETTINGS non_replicated_deduplication_window = 1000;
