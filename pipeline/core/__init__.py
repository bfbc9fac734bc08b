"""The ground floor that every other room stands on; it imports no other room of `pipeline`.

- `storage`: the one place that opens a URI (S3 or local), reads, writes, lists; imports nothing of the
  project, so everything may import it. `conditional`: compare-and-swap writes on top of it (the lease).
- `ray_runtime`: which Ray a job runs on (RAY_ADDRESS, or a private one it starts and cleans up).
- `config`: the pydantic base of every job's schema, YAML + dotted command-line overrides.
- `exits`: the jobs' exit codes, one table; `runs`: the folder of one pretraining run, built once;
  `exported`: an exported model on storage (safetensors + config.json), read and written.
Modules here import only `storage`, each other and `vit_model`.
"""
