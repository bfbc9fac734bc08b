"""The shard-making job's configuration, and the decode rules' fields that it shares with batch inference:
one schema each, every field a flag (`--shard-size`, `--min-size`), YAML through `--config` as for the
other jobs, a bad value refused by name with exit 2."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.core.config import Section
from pipeline.data import images


class DecodeRuleFields(Section):
    """`images.DecodeRules` as flags, declared once for both jobs that apply them (make_shards, batch_infer)."""

    min_size: int = Field(images.DEFAULT_MIN_SIDE, description="shorter side in px an input must have (default 16)")
    max_aspect: float = Field(images.DEFAULT_MAX_ASPECT, description="longer side at most this x the shorter")
    max_object_mb: float = Field(
        images.DEFAULT_MAX_OBJECT_MB,
        description="larger objects are refused by their listed size, never read (a task holds --reads x this)",
    )

    @model_validator(mode="after")
    def _rules_hold(self):
        self.rules  # noqa: B018 - DecodeRules checks its values, with the flag names in its messages
        return self

    @property
    def rules(self) -> images.DecodeRules:
        return images.DecodeRules(self.min_size, self.max_aspect, self.max_object_mb)


RULE_ALIASES = {"min-size": "min_size", "max-aspect": "max_aspect", "max-object-mb": "max_object_mb"}


class ShardsConfig(DecodeRuleFields):
    source: str | None = Field(
        None,
        description="local folder or s3:// prefix of class folders (<class>/<img>, or train|val/<class>/<img>), a "
        "flat prefix with --labels, a flat prefix without labels (an unlabeled set), or 'digits' (the embedded set)",
    )
    output: str | None = Field(None, description="s3://bucket/prefix or a local folder")
    unlabeled: bool = Field(
        False, description="every image under --source is an unlabeled sample, whatever its folders"
    )
    labels: str | None = Field(None, description='CSV (path,label) or JSON lines ({"path", "label"}), relative paths')
    val_fraction: float = Field(0.1, description="held-out fraction per class (unless the source has train/, val/)")
    seed: int = Field(0, description="fixes the split and the shard of every sample")
    shard_size: int = Field(256, description="samples per shard")
    format: Literal["webdataset", "parquet"] = Field("webdataset", description="shard format")
    max_side: int | None = Field(
        None,
        description=f"store each image with its longer side at most N px (aspect kept, antialiased; JPEG re-encoded "
        f"at quality {images.JPEG_QUALITY}, others as lossless PNG); default: as they came",
    )
    reads: int = Field(8, ge=1, description="concurrent reads within one shard task")
    keep_versions: int | None = Field(
        None,
        description="after writing, keep only the newest N versions (default: keep all); older ones that an "
        "unfinished training run reads are kept too",
    )
    prune_in_use: bool = Field(
        False, description="with --keep-versions: prune old versions even if unfinished runs read them"
    )
    local: bool = Field(False, description="no Ray: write the shards one after another in this process")
    labels_from: str | None = Field(
        None,
        description="pseudo-labels: the --output prefix of a batch inference over --source (self-training); "
        "needs --labelled",
    )
    labelled: str | None = Field(
        None, description="with --labels-from: the labelled set's manifest (its classes; none of its images is taken)"
    )
    min_confidence: float = Field(0.0, description="with --labels-from: the least top-1 probability taken")
    per_class_max: int | None = Field(
        None, description="with --labels-from: at most N per class, the most confident first (Noisy Student)"
    )
    teacher_sha256: str | None = Field(None, description="with --labels-from: this model's predictions only")
    teacher_run: str | None = Field(None, description="with --labels-from: this run's predictions only")

    @model_validator(mode="after")
    def _pseudo_labels_need_their_set(self):
        if self.labels_from and (self.labels or not self.labelled):
            raise ValueError("--labels-from needs --labelled <manifest> and excludes --labels")
        return self


SHARDS_ALIASES = {
    **{name.replace("_", "-"): name for name in ShardsConfig.model_fields if name not in RULE_ALIASES.values()},
    **RULE_ALIASES,
}
