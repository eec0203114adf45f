-- recon_results and settlement_items were sorted down to the transaction id, so a run of
-- ten million transactions spent about a third of its time sorting them by that string
-- on insert, for lookups that the run/settlement id and the category (or line) already
-- narrow down. Rebuild both with shorter sorting keys, keeping their rows. Each rebuild
-- starts by dropping a leftover copy, so an interrupted migration can simply run again.
DROP TABLE IF EXISTS recon_results_022;
CREATE TABLE recon_results_022 AS recon_results
ENGINE = MergeTree
ORDER BY (run_id, category);
INSERT INTO recon_results_022 SELECT * FROM recon_results;
EXCHANGE TABLES recon_results AND recon_results_022;
DROP TABLE recon_results_022;

DROP TABLE IF EXISTS settlement_items_022;
CREATE TABLE settlement_items_022 AS settlement_items
ENGINE = MergeTree
ORDER BY (settlement_id, serving_carrier, home_carrier);
INSERT INTO settlement_items_022 SELECT * FROM settlement_items;
EXCHANGE TABLES settlement_items AND settlement_items_022;
DROP TABLE settlement_items_022;
