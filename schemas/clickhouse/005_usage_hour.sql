-- Usage per hour: the same columns, engine and sort key as usage_minute (see 004), with
-- period_start the start of the hour in Beijing time. Written by the worker in the same
-- batch as the minute rows, with its own offset marks.
CREATE TABLE IF NOT EXISTS usage_hour AS usage_minute;
