"""Predictions as an Apache Iceberg table (`--table <namespace>.<name>`), the other output of batch inference.

- `catalog`: which catalog (pyiceberg's SqlCatalog on SQLite or PostgreSQL, or a REST catalog) and which table:
  created with the output columns of `inference.rows`, partitioned by day of `inferred_at`, sorted by
  `image_uri`; a table of another tool refused by name when its columns differ; `--embeddings` added later
  as a nullable column (schema evolution).
- `snapshots`: what the table already holds (a pushed-down projection at the snapshot a run planned on), the
  run ids and marks in snapshot summaries, and the commit: one snapshot per run, validated against every
  snapshot since the one it planned on, so no input version is ever committed twice.
- `table_run`: the job with a table as its output; `maintenance`: expiring snapshots, removing the data files
  of killed runs that no snapshot references.
This package imports `pipeline.core`, `pipeline.data`, the rest of `pipeline.inference` and pyiceberg; Iceberg
metadata is written only by pyiceberg, never by hand.
"""
