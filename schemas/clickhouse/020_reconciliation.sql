-- Cross-carrier reconciliation (contract section 5; jobs/reconcile.py, docs/settlement.md).
-- Every table here is written once per run id (plain MergeTree, no background merges
-- that change results): a run id is a hash of the run's inputs, so a re-run on the same
-- inputs finds its rows already there and writes nothing.

-- The price card, resolved per (version, serving carrier, model), in integer pico-CNY
-- per token (CNY per million tokens x 10^6), for pricing records in SQL. Keyed by
-- price_book_id, a hash of the rows; a book is loaded once.
CREATE TABLE IF NOT EXISTS recon_prices
(
    price_book_id     String,
    version           String,
    effective_from    DateTime64(3, 'UTC'),
    serving_carrier   LowCardinality(String),
    model_id          String,
    price_line        String COMMENT 'the line used, e.g. CTCC/deepseek-v3 or */qwen-max',
    p_input           UInt64 COMMENT 'pico-CNY per token',
    p_cached_input    UInt64,
    p_output          UInt64,
    p_reasoning       UInt64,
    billable_statuses Array(String)
)
ENGINE = MergeTree
ORDER BY (price_book_id, version, serving_carrier, model_id);

-- One row per reconciliation run (written last: a run without this row is incomplete).
CREATE TABLE IF NOT EXISTS recon_runs
(
    run_id            String,
    period            String COMMENT 'YYYY-MM, a calendar month in Beijing time (UTC+08:00)',
    carriers          Array(String),
    period_start      DateTime64(3, 'UTC'),
    period_end        DateTime64(3, 'UTC'),
    token_tolerance   UInt64,
    amount_tolerance  Decimal(18, 9) COMMENT 'relative, e.g. 0.001 = 0.1 %',
    boundary_window_s UInt32,
    price_book_id     String,
    input_records     UInt64,
    input_fingerprint UInt64,
    transactions      UInt64,
    unpriced_records  UInt64,
    params            String COMMENT 'the hashed inputs, as JSON',
    created_at        DateTime64(6, 'UTC'),
    duration_s        Float64
)
ENGINE = MergeTree
ORDER BY (period, run_id);

-- Which run is current for a (period, carriers): the latest activation wins. A re-run
-- whose inputs match an older run re-activates it instead of writing it again.
CREATE TABLE IF NOT EXISTS recon_activations
(
    period       String,
    carriers     Array(String),
    run_id       String,
    activated_at DateTime64(6, 'UTC')
)
ENGINE = MergeTree
ORDER BY (period, activated_at);

-- One row per cross-carrier transaction per run: both carriers' records side by side.
CREATE TABLE IF NOT EXISTS recon_results
(
    run_id                 String,
    period                 String,
    transaction_id         String,
    serving_carrier        LowCardinality(String),
    home_carrier           LowCardinality(String),
    category               LowCardinality(String),
    tenant_id              String,
    model_id               LowCardinality(String),
    provider               LowCardinality(String),
    channel                LowCardinality(String),
    serving_records        UInt32,
    home_records           UInt32,
    serving_event_id       String COMMENT 'the canonical serving record (earliest); empty if none',
    home_event_id          String,
    serving_event_ids      Array(String) COMMENT 'all serving records, sorted (more than one: duplicate)',
    home_event_ids         Array(String),
    serving_event_time     Nullable(DateTime64(3, 'UTC')),
    home_event_time        Nullable(DateTime64(3, 'UTC')),
    serving_input_tokens   UInt64,
    serving_output_tokens  UInt64,
    serving_cached_tokens  UInt64,
    serving_reasoning_tokens UInt64,
    home_input_tokens      UInt64,
    home_output_tokens     UInt64,
    home_cached_tokens     UInt64,
    home_reasoning_tokens  UInt64,
    token_diff             UInt64 COMMENT 'sum over the four token counts of |serving - home|',
    serving_amount         Decimal(18, 6) COMMENT 'list amount (CNY) of the canonical serving record',
    home_amount            Decimal(18, 6),
    amount_diff            Decimal(18, 6) COMMENT 'serving_amount - home_amount',
    serving_priced         UInt8,
    home_priced            UInt8
)
ENGINE = MergeTree
ORDER BY (run_id, category, serving_carrier, home_carrier, transaction_id);

-- Counts and amounts per category per carrier pair, per run.
CREATE TABLE IF NOT EXISTS recon_summary
(
    run_id          String,
    period          String,
    serving_carrier LowCardinality(String),
    home_carrier    LowCardinality(String),
    category        LowCardinality(String),
    transactions    UInt64,
    serving_records UInt64,
    home_records    UInt64,
    token_diff      UInt64,
    serving_amount  Decimal(38, 6),
    home_amount     Decimal(38, 6),
    amount_diff     Decimal(38, 6)
)
ENGINE = MergeTree
ORDER BY (run_id, serving_carrier, home_carrier, category);

-- A clerk's decision on a discrepancy: a whole category of a run (transaction_id = '')
-- or one transaction. The latest decision wins; a transaction's own decision wins over
-- its category's.
CREATE TABLE IF NOT EXISTS recon_decisions
(
    run_id         String,
    period         String,
    category       LowCardinality(String),
    transaction_id String COMMENT 'empty: the whole category',
    decision       LowCardinality(String) COMMENT 'accept or dispute',
    note           String,
    decided_by     String,
    decided_at     DateTime64(6, 'UTC'),
    seq            UInt64
)
ENGINE = MergeTree
ORDER BY (run_id, category, transaction_id, decided_at, seq);
