"""The ground floor that every other room stands on; it imports no other room of `pipeline`.

- `storage`: the one place that opens a URI (S3 or local), reads, writes, lists; imports nothing of the
  project, so everything may import it. `conditional`: compare-and-swap writes on top of it; `lease`: one
  writer per prefix on those, renewed while the run makes progress, its generation the fencing token.
- `ray_runtime`: which Ray a job runs on (RAY_ADDRESS, or a private one it starts and cleans up).
- `config`: the pydantic base of every job's schema, YAML + dotted command-line overrides.
- `exits`: the jobs' exit codes, one table; `signals`: SIGTERM unwinds a job, a thread interrupts the main one;
  `runs`: the folder of one pretraining run, built once;
  `exported`: an exported model on storage (safetensors + config.json), read and written;
  `scratch`: what a killed process leaves on local disk (pid-named temp folders, `_tmp/`), removed by the next.
Modules here import only `storage`, each other and `vit_model`.
"""
