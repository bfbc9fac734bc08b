"""The batch-inference job's configuration: one schema, every field a flag (`--batch-size`, `--since-last-run`)."""

from __future__ import annotations

from pydantic import Field, field_validator

from pipeline.data.shards_config import RULE_ALIASES, DecodeRuleFields


class InferConfig(DecodeRuleFields):
    model: str | None = Field(None, description="exported model folder URI (model.safetensors + config.json)")
    input: str | None = Field(
        None, description="images: S3 prefix or folder, a class-folder tree, or a shards manifest"
    )
    output: str | None = Field(None, description="where prediction runs are published (S3 prefix or folder)")
    table: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$",
        description="publish to this Iceberg table instead (<namespace>.<name>), one snapshot per run",
    )
    catalog: str | None = Field(
        None,
        description="with --table: sqlite:///<path>.db (pyiceberg SqlCatalog), postgresql://... or rest+https://... "
        "(a REST catalog: Polaris, Nessie, Unity, Glue, S3 Tables); default $VITRAY_CATALOG (`make up` sets it)",
    )
    warehouse: str | None = Field(
        None, description="with --table: where a new table's files go (s3://...); default $VITRAY_WAREHOUSE"
    )
    table_lease: bool = Field(
        False,
        description="with --table: also hold a lease on the table's location, so overlapping schedules do not "
        "predict the same inputs twice (the table's commits alone keep one row per input version)",
    )
    maintain_every: int = Field(
        0, ge=0, description="with --table: every N runs, expire old snapshots and remove orphan files (0: never)"
    )
    snapshot_retention_days: float = Field(30.0, gt=0, description="maintenance: keep snapshots this many days")
    orphan_grace_h: float = Field(
        24.0, gt=0, description="maintenance: remove unreferenced data files older than this (a killed run's)"
    )
    batch_size: int = Field(64, ge=1, description="images per model call")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica (0: CPU)")
    replicas: tuple[int, int] = Field((1, 2), description="model replicas min,max (actor pool autoscaling)")
    cpus_per_replica: float = Field(1.0, gt=0, description="CPU slots per model replica")
    decode_cpus: float = Field(1.0, gt=0, description="CPUs per decode task")
    reads: int = Field(16, ge=1, description="concurrent GETs within one read+decode task")
    top_k: int = Field(5, ge=1, description="classes kept per image")
    embeddings: bool = Field(False, description="also write the pooled representation")
    since_last_run: bool = Field(
        False, description="skip inputs that a published run already predicted with this model"
    )
    input_append_only: bool = Field(
        False,
        description="with --since-last-run: the input prefix only gains keys that sort after the existing ones "
        "(time-stamped names), so list only the keys after the last run's high-water mark (S3 StartAfter) plus "
        "the inputs whose last attempt failed transiently; a late key that sorts earlier is never seen",
    )
    limit: int | None = Field(None, ge=1, description="at most this many (new) inputs")
    split: str | None = Field(None, description="shards input: only this split (default: all)")
    run_id: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]+$", description="run id (default: UTC time + random)")
    retry_errors: bool = Field(
        True,
        description="with --since-last-run: inputs whose last attempt failed transiently (a read timeout) are "
        "tried again, and any input whose object changed; an unchanged input that failed for good (does not "
        "decode) is not (--no-retry-errors: no failed input is tried again until its object changes)",
    )
    max_error_rate: float | None = Field(
        None,
        ge=0,
        le=1,
        description="fail, publishing nothing, when more than this "
        "fraction of the inputs could not be predicted (default: off)",
    )
    max_run_s: float | None = Field(
        None,
        gt=0,
        description="stop and give the output up after this many seconds (set it below the schedule's period; "
        "default: no limit)",
    )
    stall_s: float = Field(
        1800.0,
        gt=0,
        description="stop and give the output up when the run makes no progress (no stage, no new staged file) for "
        "this long: a run waiting for GPUs that never come does not block the next ones",
    )
    unsafe_no_lease: bool = Field(
        False,
        description="write without the output's lease on a store that does not honour conditional writes (the "
        "start-up probe refuses it otherwise): safe only when a single run can ever write --output",
    )
    lease_ttl_s: float = Field(
        600.0,
        ge=3,
        description="the output's lease is taken over once it was seen unchanged this long "
        "(the next run watches a crashed run's lease this long, then goes on)",
    )

    @field_validator("replicas", mode="before")
    @classmethod
    def _pair(cls, v):
        if isinstance(v, str):
            v = [int(x) for x in v.split(",")]
        if isinstance(v, int):
            v = (v, v)
        if len(v) != 2 or v[0] < 1 or v[1] < v[0]:
            raise ValueError("replicas must be MIN,MAX with 1 <= MIN <= MAX, e.g. 1,4")
        return tuple(v)


ALIASES = {
    "model": "model",
    "input": "input",
    "output": "output",
    "table": "table",
    "catalog": "catalog",
    "warehouse": "warehouse",
    "table-lease": "table_lease",
    "maintain-every": "maintain_every",
    "batch-size": "batch_size",
    "num-gpus": "num_gpus",
    "replicas": "replicas",
    "top-k": "top_k",
    "embeddings": "embeddings",
    "since-last-run": "since_last_run",
    "input-append-only": "input_append_only",
    "limit": "limit",
    "retry-errors": "retry_errors",
    "max-error-rate": "max_error_rate",
    "lease-ttl": "lease_ttl_s",
    "max-run-s": "max_run_s",
    "stall-s": "stall_s",
    "unsafe-no-lease": "unsafe_no_lease",
    "run-id": "run_id",
    **RULE_ALIASES,
}
