-- One row per accepted event: its rating under the price card in force at its own
-- event_time. The rating is stored with the event (usage_events), so an event and its
-- price can never be half-written; `tokenmeter rerate` updates both in one place.
CREATE VIEW IF NOT EXISTS rated_usage AS
SELECT
    event_id, reporting_carrier, event_time, tenant_id, home_carrier, serving_carrier,
    model_id, provider, channel, status,
    token_units, amount, list_amount, currency, price_card_version, price_line, billable,
    tenant_plan, plan_period, tier_usage_tu, rating_run,
    topic, partition, offset, ingested_at
FROM usage_events;
