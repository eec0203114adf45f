-- Cross-carrier settlement and revenue sharing (jobs/settle.py, docs/settlement.md).
-- A settlement id is a hash of its inputs (the reconciliation run, the agreement files
-- and the set of settled transactions); its rows are written once.

-- One row per settlement (written last: a settlement without this row is incomplete).
CREATE TABLE IF NOT EXISTS settlement_runs
(
    settlement_id          String,
    period                 String,
    run_id                 String,
    agreements_sha256      String,
    wholesale_version      String,
    revenue_share_version  String,
    items                  UInt64,
    list_amount            Decimal(38, 6),
    amount                 Decimal(38, 2),
    currency               LowCardinality(String),
    created_at             DateTime64(6, 'UTC')
)
ENGINE = MergeTree
ORDER BY (period, settlement_id);

-- Which settlement is current for a period: the latest activation wins.
CREATE TABLE IF NOT EXISTS settlement_activations
(
    period        String,
    settlement_id String,
    activated_at  DateTime64(6, 'UTC')
)
ENGINE = MergeTree
ORDER BY (period, activated_at);

-- One row per settled transaction: the line it is billed on and its event ids.
CREATE TABLE IF NOT EXISTS settlement_items
(
    settlement_id    String,
    line_id          String,
    period           String,
    run_id           String,
    transaction_id   String,
    category         LowCardinality(String),
    basis            LowCardinality(String) COMMENT 'matched or accepted',
    serving_carrier  LowCardinality(String),
    home_carrier     LowCardinality(String),
    tenant_id        String,
    model_id         LowCardinality(String),
    provider         LowCardinality(String),
    channel          LowCardinality(String),
    serving_event_id String,
    home_event_id    String,
    list_amount      Decimal(18, 6) COMMENT 'the list amount the line bills (serving record; home record if the serving one is missing)'
)
ENGINE = MergeTree
ORDER BY (settlement_id, line_id, transaction_id);

-- What a serving carrier bills a home carrier: one line per (pair, model, provider,
-- channel). amount = list_amount x rate_percent / 100, rounded half-even to the cent.
CREATE TABLE IF NOT EXISTS settlement_lines
(
    settlement_id   String,
    line_id         String,
    period          String,
    serving_carrier LowCardinality(String),
    home_carrier    LowCardinality(String),
    model_id        LowCardinality(String),
    provider        LowCardinality(String),
    channel         LowCardinality(String),
    transactions    UInt64,
    list_amount     Decimal(38, 6),
    rate_percent    Decimal(9, 4),
    amount          Decimal(38, 2),
    currency        LowCardinality(String)
)
ENGINE = MergeTree
ORDER BY (settlement_id, line_id);

-- Each line's amount split between the serving carrier, the model provider and the entry
-- channel; per line the shares add up to the line's amount exactly (largest remainder).
CREATE TABLE IF NOT EXISTS revenue_shares
(
    settlement_id   String,
    line_id         String,
    period          String,
    serving_carrier LowCardinality(String),
    home_carrier    LowCardinality(String),
    party_type      LowCardinality(String) COMMENT 'serving_carrier, model_provider or channel',
    party           String,
    share_percent   Decimal(9, 4),
    amount          Decimal(38, 2),
    currency        LowCardinality(String)
)
ENGINE = MergeTree
ORDER BY (settlement_id, line_id, party_type, party);

-- Each carrier's position: receivable (it serves) - payable (its subscribers used others).
CREATE TABLE IF NOT EXISTS settlement_positions
(
    settlement_id String,
    period        String,
    carrier       LowCardinality(String),
    receivable    Decimal(38, 2),
    payable       Decimal(38, 2),
    net           Decimal(38, 2)
)
ENGINE = MergeTree
ORDER BY (settlement_id, carrier);

-- The payments that settle the positions: bilateral (one per carrier pair, the net of
-- the two directions) and multilateral (at most n - 1 for n carriers).
CREATE TABLE IF NOT EXISTS settlement_transfers
(
    settlement_id String,
    period        String,
    scheme        LowCardinality(String) COMMENT 'bilateral or multilateral',
    payer         LowCardinality(String),
    payee         LowCardinality(String),
    amount        Decimal(38, 2)
)
ENGINE = MergeTree
ORDER BY (settlement_id, scheme, payer, payee);
