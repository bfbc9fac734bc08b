"""The pretraining job's one config schema (`configs/*.yaml` are instances of it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.core.config import Section
from pipeline.data.transforms import Augment
from pipeline.training.objectives import OBJECTIVES, MaeSection


class ModelSection(Section):
    name: str = Field("vit_micro_patch4_32", description="variant name (vit_model.list_models())")
    img_size: int | None = Field(None, description="input size in pixels; default: the variant's")
    patch_size: int | None = Field(None, description="patch size; default: the variant's")
    embed_dim: int | None = Field(None, ge=1, description="width D; default: the variant's")
    depth: int | None = Field(None, ge=1, description="encoder blocks L; default: the variant's")
    num_heads: int | None = Field(None, ge=1, description="attention heads; default: the variant's")
    mlp_ratio: float | None = Field(None, gt=0, description="MLP hidden width / D; default: the variant's (4)")
    global_pool: Literal["token", "avg"] | None = Field(None, description="token (class token) or avg (gap)")
    pos_embed: Literal["learn", "sincos2d"] | None = Field(None, description="learned or fixed 2-D sin-cos")
    fc_norm: bool | None = Field(
        None, description="LayerNorm after the pool, not on every token (default: on for avg, as timm)"
    )
    pre_logits: bool | None = Field(
        None, description="Linear+tanh before the head, as the paper's pretraining (timm has no slot)"
    )
    mean: tuple[float, float, float] | None = Field(
        None, description="input mean per channel; default the paper's (0.5,)*3"
    )
    std: tuple[float, float, float] | None = Field(
        None, description="input std per channel; default (0.5,)*3; ImageNet's for DeiT/torchvision weights"
    )
    crop_pct: float | None = Field(None, gt=0, le=1, description="eval center-crop fraction (default 0.9, timm's ViT)")
    interpolation: Literal["bicubic", "bilinear"] | None = Field(
        None, description="resize interpolation (default bicubic)"
    )
    drop_path_rate: float = Field(0.0, ge=0, lt=1, description="stochastic depth, linear in depth")
    drop_rate: float = Field(0.0, ge=0, lt=1, description="dropout")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from vit_model import list_models

        if v not in list_models():
            raise ValueError(f"unknown variant {v!r}; known: {', '.join(list_models())}")
        return v

    def overrides(self, num_classes: int) -> dict:
        o = {k: v for k, v in self.model_dump().items() if k != "name" and v is not None}
        o["num_classes"] = num_classes
        return o


class DataSection(Augment):
    """The data and its augmentations: `Augment`'s fields (scale_min, hflip, randaug_*) run on CPU workers,
    random erasing and Mixup/CutMix (below) on the device."""

    manifest: str | None = Field(None, description="shards manifest URI (s3://.../manifest.json or a local path)")
    train_split: str = Field("train", description="split to train on")
    val_split: str | None = Field("val", description="split to evaluate every epoch (null: none)")
    window_shards: int = Field(
        4,
        ge=1,
        description="shards whose samples are shuffled together (one read task's window, pipeline/data/order.py)",
    )
    shuffle_seed: int = Field(0, description="the order's seed (shards and samples reshuffled every epoch)")
    prefetch_batches: int = Field(2, ge=0, description="batches prefetched per worker")
    prefetch_next_epoch: bool = Field(
        True,
        description="start the next epoch's stream (and take its first batch) "
        "while the current epoch evaluates and checkpoints",
    )
    decode_cpus: float = Field(1.0, gt=0, description="CPUs per decode task")
    random_erase: float = Field(
        0.0, ge=0, le=1, description="random erasing probability per image (DeiT: 0.25), on the device"
    )
    mixup_alpha: float = Field(0.0, ge=0, description="Mixup Beta(alpha, alpha); 0: off (DeiT: 0.8), on the device")
    cutmix_alpha: float = Field(0.0, ge=0, description="CutMix Beta(alpha, alpha); 0: off (DeiT: 1.0), on the device")
    mix_prob: float = Field(1.0, ge=0, le=1, description="probability a batch is mixed at all (Mixup or CutMix)")
    mix_switch_prob: float = Field(0.5, ge=0, le=1, description="with both on: probability of CutMix instead of Mixup")
    object_store_fraction: float | None = Field(None, gt=0, le=1, description="cap Ray Data's object store use")


class OptimSection(Section):
    lr: float = Field(1e-3, gt=0, description="peak learning rate at the global batch size")
    min_lr: float = Field(1e-6, ge=0, description="learning rate at the end of the cosine")
    weight_decay: float = Field(0.05, ge=0, description="AdamW decoupled weight decay (matrices only)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    warmup_steps: int | None = Field(None, ge=0, description="linear warmup steps (overrides warmup_epochs)")
    warmup_epochs: float = Field(1.0, ge=0, description="linear warmup in epochs")
    clip_grad: float | None = Field(1.0, gt=0, description="global gradient-norm clip (null: off)")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="cross-entropy label smoothing")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of weights, e.g. 0.9999 (null: off)")
    base_lr: float | None = Field(
        None, gt=0, description="lr per 256 images: lr = base_lr x batch_size / 256 (MAE's blr; overrides lr)"
    )
    layer_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="layer-wise lr decay for fine-tuning: block i gets lr x decay^(depth - i) "
        "(MAE/BEiT: 0.65-0.75; null: off)",
    )


class TrainSection(Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9._-]+$", description="run name: same output + name resumes")
    output: str | None = Field(None, description="where runs go: s3://bucket/runs or a local folder")
    objective: str = Field(
        "supervised",
        description="what the run optimises (pipeline/training/objectives/): supervised (cross-entropy on labels) "
        "or mae (masked-autoencoder pretraining, the mae section)",
    )
    epochs: int = Field(10, ge=1, description="training epochs")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (smoke tests)")
    eval_every_epochs: int = Field(
        1, ge=1, description="evaluate the val split every N epochs (and after the last): small sets train in seconds"
    )
    batch_size: int = Field(256, ge=1, description="global batch size (all workers, after accumulation)")
    micro_batch_size: int | None = Field(
        None, ge=1, description="per-worker batch per forward; accumulation fills the rest"
    )
    num_workers: int = Field(1, ge=1, description="training workers (one per GPU)")
    use_gpu: bool = Field(False, description="one GPU per worker, NCCL, bf16 autocast")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPU slots each training worker reserves")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    deterministic: bool = Field(
        False,
        description="bitwise-repeatable training with the same config, data and workers, killed and resumed or "
        "not: torch's deterministic algorithms, fixed threads, cuDNN/cuBLAS settings (costs speed)",
    )
    record_keys: bool = Field(
        False, description="audit: each rank writes the sample keys of its steps under {run}/consumed/"
    )
    compile: bool = Field(False, description="torch.compile the model")
    seed: int = Field(0, description="initialisation and RNG seed")
    init_from: str | None = Field(
        None, description="weights to start from: a model folder/URI of this project or timm-format .safetensors"
    )
    checkpoint_every_steps: int | None = Field(None, ge=1, description="checkpoint every N steps (epoch ends always)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept (the best model is exported separately)")
    checkpoint_upload: Literal["async", "sync"] = Field(
        "async", description="async: training goes on while rank 0's checkpoint uploads (its local copy removed after)"
    )
    fresh_start_if_checkpoints_bad: bool = Field(
        False, description="when every checkpoint of the run is damaged: start over instead of stopping with an error"
    )
    log_every_steps: int = Field(20, ge=1, description="check every N steps whether a progress report is due")
    report_every_s: float = Field(
        2.0,
        ge=0,
        description="progress to Ray Train (and the log) at most this often: a faster report blocks every worker "
        "(0: at every check, for tests that follow a run step by step)",
    )
    controller_poll_s: float = Field(
        0.25,
        gt=0,
        description="Ray Train's controller poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S; "
        "Ray's default 2 s takes one report per poll)",
    )
    max_failures: int = Field(2, ge=0, description="restarts of the worker group from the latest checkpoint")
    max_cluster_cpus: float | None = Field(
        None,
        gt=0,
        description="CPU slots the cluster can grow to, when Ray does not report its autoscaler's node types",
    )
    max_cluster_gpus: float | None = Field(None, ge=0, description="GPUs the cluster can grow to (as max_cluster_cpus)")
    emulate_step_s: float | None = Field(
        None,
        gt=0,
        description="benchmarks: each step sleeps this long instead of computing (a GPU step's time); "
        "data, reports and checkpoints run as usual, so what Ray adds shows",
    )
    peak_tflops: float | None = Field(
        None, gt=0, description="per-device peak for the MFU estimate (default: known GPUs)"
    )
    mlflow_tracking_uri: str | None = Field(None, description="log metrics to MLflow too")

    @field_validator("name")
    @classmethod
    def _one_folder(cls, v: str) -> str:
        if v in (".", ".."):  # the run would be train.output itself, or its parent
            raise ValueError(f"{v!r} is not a run name: a run is one folder under train.output; name it")
        return v

    @model_validator(mode="after")
    def _batch_divides(self):
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by num_workers {self.num_workers}: "
                f"use a multiple of {self.num_workers}"
            )
        per_worker = self.batch_size // self.num_workers
        if self.micro_batch_size and per_worker % self.micro_batch_size:
            raise ValueError(
                f"per-worker batch {per_worker} (batch_size / num_workers) is not divisible by micro_batch_size "
                f"{self.micro_batch_size}"
            )
        return self

    @property
    def per_worker_batch(self) -> int:
        return self.batch_size // self.num_workers

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or self.per_worker_batch

    @property
    def accum_steps(self) -> int:
        return self.per_worker_batch // self.micro_batch


class PretrainConfig(Section):
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    mae: MaeSection = MaeSection()

    @model_validator(mode="after")
    def _objective_fits(self):
        if self.train.objective not in OBJECTIVES:
            raise ValueError(f"unknown train.objective {self.train.objective!r}; known: {', '.join(OBJECTIVES)}")
        if self.optim.base_lr is not None:
            self.optim.lr = self.optim.base_lr * self.train.batch_size / 256
        OBJECTIVES[self.train.objective].check(self)
        return self


ALIASES = {
    "data": "data.manifest",
    "output": "train.output",
    "name": "train.name",
    "epochs": "train.epochs",
    "batch-size": "train.batch_size",
    "num-workers": "train.num_workers",
    "use-gpu": "train.use_gpu",
    "model": "model.name",
    "img-size": "model.img_size",
    "patch-size": "model.patch_size",
    "init-from": "train.init_from",
    "lr": "optim.lr",
    "objective": "train.objective",
}
