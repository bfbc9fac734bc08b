"""MAE pretraining (He et al. 2021) and fine-tuning from it: masks, the loss, the export, layer-wise lr decay,
and a 2-worker MAE run on the real stack that resumes from its checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

import vit_model
from pipeline.core import exported, storage
from pipeline.core.runs import RunLayout
from pipeline.training import trainer
from pipeline.training.knn import knn_votes
from pipeline.training.loop import train
from pipeline.training.objectives.masked_image import mask_generator
from pipeline.training.sessions import LocalSession
from pipeline.training.train_config import PretrainConfig
from vit_model.mae import DECODER_NAME, MAEConfig, create_mae, mae_from_parts, random_masking, visible_count
from vit_model.mae import MaskedAutoencoder as MAE

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
SMALL_MAE = {"decoder_depth": 1, "decoder_width": 32, "decoder_heads": 2}


def _mae(ratio=0.75) -> MAE:
    torch.manual_seed(0)
    return create_mae(vit_model.variant_config("vit_micro_patch4_32"), MAEConfig(mask_ratio=ratio, **SMALL_MAE))


@pytest.mark.parametrize("n,ratio", [(64, 0.75), (49, 0.75), (64, 0.5), (196, 0.9), (10, 0.75)])
def test_masking_keeps_exactly_round_n_times_one_minus_ratio_and_restore_inverts_the_shuffle(n, ratio):
    g = torch.Generator().manual_seed(3)
    m = random_masking(8, n, ratio, g)
    k = round(n * (1 - ratio))
    assert visible_count(n, ratio) == k and m.keep.shape == (8, k)
    assert (m.mask.sum(dim=1) == n - k).all() and set(m.mask.unique().tolist()) <= {0.0, 1.0}
    assert (m.mask.gather(1, m.keep) == 0).all()  # the kept ones are the unmasked ones
    shuffle = m.restore.argsort(dim=1)
    assert torch.equal(shuffle[:, :k], m.keep)
    tokens = torch.arange(n).expand(8, n)
    assert torch.equal(tokens.gather(1, shuffle).gather(1, m.restore), tokens)  # [visible; masked] -> patch order
    assert len({tuple(row.tolist()) for row in m.keep.sort(dim=1).values}) == 8  # every sample its own mask


def test_masks_differ_across_ranks_and_repeat_for_the_same_step():
    dev = torch.device("cpu")

    def keep(rank, step, micro=0):
        return random_masking(4, 64, 0.75, mask_generator(7, rank, step, micro, dev)).keep

    assert not torch.equal(keep(0, 5), keep(1, 5))  # each rank its own draws
    assert not torch.equal(keep(0, 5), keep(0, 6)) and not torch.equal(keep(0, 5, 0), keep(0, 5, 1))
    assert torch.equal(keep(1, 5), keep(1, 5))  # a resumed run draws the same masks again


def test_loss_is_on_masked_patches_only():
    model = _mae()
    x = torch.randn(2, 64, 48)
    m = random_masking(2, 64, 0.75, torch.Generator().manual_seed(0))
    pred = torch.randn(2, 64, 48)
    base = model.loss(x, pred, m.mask)
    visible = (1 - m.mask).bool()
    x2, pred2 = x.clone(), pred.clone()
    x2[visible] += 5.0  # a visible patch's pixels (the target side)
    pred2[visible] = 0.0  # and what the decoder says about it
    assert torch.allclose(model.loss(x2, pred2, m.mask), base)
    x3 = x.clone()
    x3[m.mask.bool()] += 1.0 * torch.randn_like(x3[m.mask.bool()])
    assert not torch.allclose(model.loss(x3, pred, m.mask), base)  # a masked patch's pixels do count
    # per-patch normalised targets: each target patch has mean 0, variance 1
    t = model.targets(x)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 64), atol=1e-5)
    assert torch.allclose(t.var(-1), torch.ones(2, 64), atol=1e-3)
    # the value is MSE over the masked patches
    want = ((pred - t) ** 2).mean(-1)[m.mask.bool()].reshape(2, -1).mean(-1)
    assert torch.allclose(base, want, atol=1e-6)


def test_encoder_sees_only_the_class_token_and_the_visible_patches():
    model = _mae()
    seen = []
    model.encoder.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    model(torch.randint(0, 255, (3, 64, 48), dtype=torch.uint8), torch.Generator().manual_seed(0))
    assert seen == [torch.Size([3, 1 + 16, 64])]


def test_knn_vote_weights_neighbours_by_similarity():
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=-1)
    labels = torch.tensor([0, 0, 1])
    q = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=-1)
    assert knn_votes(bank, labels, q, k=3, num_classes=2).tolist() == [0, 1]


def test_layer_decay_gives_the_head_the_full_lr_and_the_patch_embedding_decay_to_depth_plus_one(monkeypatch):
    model = vit_model.create_model("vit_micro_patch4_32")  # depth 4
    groups = vit_model.param_groups(model, 0.05, layer_decay=0.75)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["head.weight"])] == 1.0 and scale[id(named["norm.weight"])] == 1.0
    assert scale[id(named["patch_embed.proj.weight"])] == pytest.approx(0.75**5)
    assert scale[id(named["pos_embed"])] == pytest.approx(0.75**5)
    assert scale[id(named["blocks.0.attn.qkv.weight"])] == pytest.approx(0.75**4)
    assert scale[id(named["blocks.3.mlp.fc2.weight"])] == pytest.approx(0.75)
    assert {g["weight_decay"] for g in groups if any(p.ndim < 2 for p in g["params"])} == {0.0}
    # the training step applies it: after one step every group's lr is the schedule's times its scale
    cfg = PretrainConfig.model_validate(
        {
            "train": {"batch_size": 8, "max_steps": 1, "report_every_s": 0},
            "optim": {"layer_decay": 0.75, "warmup_steps": 0},
            "data": {"val_split": None},
        }
    )
    data = _random_batches(16)
    s = LocalSession(lambda *a: data(*a), None, device=torch.device("cpu"))
    from pipeline.training import loop

    seen, real = {}, loop.build_run

    def spy(*a, **k):
        run = real(*a, **k)
        seen["opt"] = run.optimizer
        return run

    monkeypatch.setattr(loop, "build_run", spy)
    train(cfg, s, num_classes=10, train_count=16)
    lrs = {round(g["lr"] / g["lr_scale"], 12) for g in seen["opt"].param_groups}
    assert len(lrs) == 1 and max(g["lr"] for g in seen["opt"].param_groups) == pytest.approx(lrs.pop())


def _random_batches(n, labels=10):
    rng = np.random.default_rng(0)
    data = {
        "patches": rng.integers(0, 255, (n, 64, 48), dtype=np.uint8),
        "label": rng.integers(0, labels, n) if labels else np.full(n, -1),
        "valid": np.ones(n, bool),
    }

    def batches(split, bs, epoch, train_):
        for i in range(0, n - bs + 1, bs):
            yield {k: v[i : i + bs] for k, v in data.items()}

    return batches


def test_config_rules_for_mae():
    cfg = PretrainConfig.model_validate(
        {"train": {"objective": "mae", "batch_size": 512}, "optim": {"base_lr": 1.5e-4, "betas": [0.9, 0.95]}}
    )
    assert cfg.optim.lr == pytest.approx(1.5e-4 * 512 / 256)
    for bad, match in [
        ({"data": {"mixup_alpha": 0.8}}, "mixup_alpha"),
        ({"data": {"random_erase": 0.25}}, "random_erase"),
        ({"optim": {"layer_decay": 0.75}}, "fine-tuning"),
        ({"mae": {"decoder_width": 30, "decoder_heads": 4}}, "divisible"),
    ]:
        with pytest.raises(ValueError, match=match):
            PretrainConfig.model_validate({"train": {"objective": "mae"}, **bad})
    for name in ("cifar10_mae", "cifar10_finetune", "cifar10_vit", "mae_vit_b16_in1k", "mae_vit_b16_ft_in1k"):
        PretrainConfig.model_validate(yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text()))


def test_mae_export_is_a_headless_timm_vit_that_fine_tunes_with_init_from(tmp_path):
    """Pretrain a few steps in-process, export, and load the encoder three ways: as a plain ViT (timm's keys
    and config), through --init-from into a 10-class classifier (new head), and back into an autoencoder."""
    cfg = PretrainConfig.model_validate(
        {
            "train": {"objective": "mae", "batch_size": 8, "max_steps": 2, "output": str(tmp_path), "name": "m"},
            "data": {"val_split": None},
            "mae": SMALL_MAE,
        }
    )
    train(
        cfg,
        LocalSession(_random_batches(16, labels=0), None, device=torch.device("cpu")),
        num_classes=0,
        train_count=16,
    )
    folder = tmp_path / "m" / "model"
    meta = json.loads((folder / "config.json").read_text())
    assert meta["pretraining"]["objective"] == "mae" and meta["model_args"]["num_classes"] == 0
    assert meta["architecture"].startswith("vit_") and (folder / DECODER_NAME).is_file()
    encoder, _ = vit_model.load_pretrained(folder)
    from safetensors.torch import load_file

    keys = set(load_file(str(folder / "model.safetensors")))
    timm_keys = {k for k in vit_model.create_model("vit_micro_patch4_32", num_classes=0).state_dict()}
    assert keys == timm_keys and not any(k.startswith(("head", "decoder", "mask_token")) for k in keys)
    classifier = vit_model.create_model("vit_micro_patch4_32", num_classes=10)
    exported.load_init_weights(classifier, str(folder))
    assert torch.equal(classifier.blocks[2].mlp.fc1.weight, encoder.blocks[2].mlp.fc1.weight)
    assert classifier.head.weight.shape == (10, 64) and not classifier.head.weight.any()  # a fresh head
    mae = mae_from_parts(encoder, (folder / DECODER_NAME).read_bytes())
    assert mae.cfg.decoder_width == 32 and len(mae.decoder_blocks) == 1


@pytest.mark.e2e
def test_two_worker_mae_run_resumes_and_reports_knn(ray_cluster, digits_shards, bucket):
    """MAE on the real stack: 2 workers, a checkpoint at step 3, stopped at 4; the second submission resumes from
    step 4 (masks drawn per rank), the k-NN monitor runs over the digits' labelled splits, and the exported encoder
    fine-tunes through --init-from."""
    base = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    base["data"].update(manifest=digits_shards, scale_min=0.2)
    base["train"].update(output=f"{bucket}/runs", name="mae", objective="mae", max_steps=4, checkpoint_every_steps=3)
    base["mae"] = {**SMALL_MAE, "knn_k": 5}
    base["optim"]["betas"] = [0.9, 0.95]
    first = trainer.run(PretrainConfig.model_validate(base))
    assert first["step"] == 4 and first["knn_top1"] is not None and first["knn_top1"] > 0.1  # 10 classes
    base["train"]["max_steps"] = 6
    second = trainer.run(PretrainConfig.model_validate(base))
    assert second["step"] == 6
    metrics = RunLayout.at(f"{bucket}/runs/mae").read_metrics()
    starts = {m["start_step"] for m in metrics if "start_step" in m}
    assert starts == {0, 4}, starts  # the second attempt began at the checkpoint, not at 0
    files = [f.path for f in storage.list_files(f"{bucket}/runs/mae")]
    assert any(p.endswith(f"/model/{DECODER_NAME}") for p in files)
    # fine-tuning from it: the preflight loads the encoder into a 10-class model
    ft = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    ft["data"]["manifest"] = digits_shards
    ft["train"].update(output=f"{bucket}/runs", name="ft", init_from=f"{bucket}/runs/mae/model", max_steps=2)
    ft["optim"]["layer_decay"] = 0.75
    assert trainer.run(PretrainConfig.model_validate(ft))["step"] == 2
