"""The model side of batch inference: the Predictor that one replica of the actor pool runs, patches in,
prediction rows (`rows.output_schema`) out. Plain PyTorch + pyarrow; Ray appears only to fetch the weights
the driver put in the object store."""

from __future__ import annotations

import datetime as dt
import hashlib
import time
import uuid

import numpy as np
import pyarrow as pa

from pipeline.inference import rows


class Predictor:
    """One model replica: builds the model from the driver's weights once, then maps patch batches to rows."""

    def __init__(
        self,
        weights,
        config: bytes,
        sha256: str,
        model_uri: str,
        top_k: int,
        embeddings: bool,
        run_id: str,
        inferred_at: dt.datetime,
        use_gpu: bool,
        threads: int,
        timeline: str | None = None,
    ):
        """`timeline`: a folder URI where this replica notes when it was built and when its first batch
        was done (the job's time-to-first-batch line); the folder is the run's staging, removed at commit."""
        t0 = time.time()
        import torch

        import vit_model

        if not isinstance(weights, bytes):  # an ObjectRef: the one copy the driver read
            import ray

            weights = ray.get(weights)
        self.sha = hashlib.sha256(weights).hexdigest()
        if self.sha != sha256:
            raise RuntimeError(f"model weights changed in transit: sha256 {self.sha} != {sha256}")
        torch.set_num_threads(max(1, threads))  # as many as the CPU slots this replica holds
        self.model, meta = vit_model.model_from_bytes(weights, config)
        self.class_names = meta.get("class_names") or [str(i) for i in range(self.model.cfg.num_classes)]
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.amp = torch.bfloat16 if self.device.type == "cuda" else None
        self.k = min(top_k, self.model.cfg.num_classes)
        self.embeddings, self.model_uri, self.run_id, self.inferred_at = embeddings, model_uri, run_id, inferred_at
        self.schema = rows.output_schema(embeddings)
        self.timeline = timeline and {
            "uri": f"{timeline}/{uuid.uuid4().hex}.json",
            "started_at": t0,
            "ready_at": time.time(),
        }

    def threads(self) -> int:
        import torch

        return torch.get_num_threads()

    def __call__(self, batch: dict) -> pa.Table:
        import torch

        n = len(batch["image_uri"])
        valid = np.asarray(batch["valid"], bool)
        cols: dict[str, list] = {
            "pred_id": [None] * n,
            "pred": [None] * n,
            "score": [None] * n,
            "topk_ids": [None] * n,
            "topk_scores": [None] * n,
        }
        if self.embeddings:
            cols["embedding"] = [None] * n
        idx = np.flatnonzero(valid)
        if len(idx):
            x = torch.from_numpy(np.ascontiguousarray(batch["patches"][idx])).to(self.device, non_blocking=True)
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                feats = self.model.forward_features(x)
                probs = self.model.forward_head(feats).float().softmax(-1)
            scores, ids = probs.topk(self.k, dim=-1)
            scores, ids, feats = scores.cpu().numpy(), ids.cpu().numpy(), feats.float().cpu().numpy()
            for j, i in enumerate(idx):
                cols["pred_id"][i] = int(ids[j, 0])
                cols["pred"][i] = self.class_names[ids[j, 0]]
                cols["score"][i] = float(scores[j, 0])
                cols["topk_ids"][i] = ids[j].tolist()
                cols["topk_scores"][i] = scores[j].tolist()
                if self.embeddings:
                    cols["embedding"][i] = feats[j].tolist()
        data = rows.carried(batch, n)
        data["label"] = [
            self.class_names[v] if v is not None and v < len(self.class_names) else None for v in data["label_id"]
        ]
        data.update(
            cols,
            model_uri=[self.model_uri] * n,
            model_sha256=[self.sha] * n,
            run_id=[self.run_id] * n,
            inferred_at=[self.inferred_at] * n,
        )
        table = rows.table(data, self.schema)
        if self.timeline:
            self._note_first_batch()
        return table

    def _note_first_batch(self) -> None:
        """One small object per replica, written beside the batches (a lost note loses a summary figure only)."""
        import json
        import threading

        from pipeline.core import storage

        note, self.timeline = {**self.timeline, "first_batch_at": time.time()}, None

        def write():
            try:
                storage.write_bytes(note.pop("uri"), json.dumps(note).encode())
            except Exception:  # noqa: BLE001 - timings are for the summary line only
                pass

        threading.Thread(target=write, daemon=True).start()
