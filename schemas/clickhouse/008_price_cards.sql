-- One row per price line, token class and card version, as loaded by the worker and
-- `tokenmeter rerate` (re-loading the same version replaces nothing: rows are keyed by
-- version and written once).
CREATE TABLE IF NOT EXISTS price_cards
(
    price_card_version     LowCardinality(String),
    effective_from         DateTime64(3, 'UTC'),
    serving_carrier        LowCardinality(String),
    model_id               LowCardinality(String),
    token_class            LowCardinality(String),
    unit_price_per_million Decimal(38, 6) COMMENT 'CNY per million tokens',
    token_unit_factor      Decimal(38, 6) COMMENT 'TU per token of this class',
    card_checksum          String,
    loaded_at              DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(loaded_at)
ORDER BY (price_card_version, serving_carrier, model_id, token_class);
