"""The worker's stages, in data order: ingest (decode, validate, pseudonymise) -> dedup ->
rate -> window -> quota -> sink. Each stage is plain functions over a batch; the faust
agents in ``pipeline/app.py`` only move batches between them."""
