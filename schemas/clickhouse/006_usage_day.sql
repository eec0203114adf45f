-- Usage per day: the same columns, engine and sort key as usage_minute (see 004), with
-- period_start the start of the day in Beijing time. Written by the worker in the same
-- batch as the minute rows, with its own offset marks.
CREATE TABLE IF NOT EXISTS usage_day AS usage_minute;
