"""Batch jobs over the warehouse: reconcile, settle, rerate, backfill."""
