"""The folder of one pretraining run, built once from (output, name); every reader and writer asks it.

{output}/{name}/
  config.yaml        the resolved configuration
  data.json          the shard version the run started on (a resume reads the same one)
  checkpoint_*/      Ray Train checkpoints (the last `train.keep_checkpoints`)
  model/, best/      exported models: the final weights and the best validation top-1 so far
  metrics/*.jsonl    one line per report (loss, lr, images/s, val top-1, ...), one object per flush:
                     every step once, also after a resume (`read_metrics`; runs from before: metrics.jsonl)
  tensorboard/       TensorBoard event files
  figures/           what jobs/visualize.py writes by default
  consumed/          train.record_keys: the sample keys each rank trained on, one object per checkpoint
                     interval (e<epoch>-s<first step>-<last step>-r<rank>.json; a resumed attempt
                     writes the same names again)
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

from pipeline.core import storage

CHECKPOINT_PREFIX = "checkpoint_"


@dataclass(frozen=True)
class RunLayout:
    root: storage.Location

    @classmethod
    def of(cls, output: str, name: str) -> RunLayout:
        return cls(storage.parse_uri(output).join(name))

    @classmethod
    def at(cls, run_uri: str) -> RunLayout:
        """The layout of a run folder given by its own URI (`--run s3://bucket/runs/b16`)."""
        return cls(storage.parse_uri(run_uri))

    @property
    def uri(self) -> str:
        return self.root.uri

    @property
    def config(self) -> storage.Location:
        return self.root.join("config.yaml")

    @property
    def data_pin(self) -> storage.Location:
        return self.root.join("data.json")

    @property
    def model(self) -> storage.Location:
        return self.root.join("model")

    @property
    def best(self) -> storage.Location:
        return self.root.join("best")

    def export(self, kind: str) -> storage.Location:
        """`model` or `best`."""
        if kind not in ("model", "best"):
            raise ValueError(f"an exported model is 'model' or 'best', not {kind!r}")
        return self.root.join(kind)

    @property
    def metrics(self) -> storage.Location:
        """The single file of runs from before the metrics folder (read, never written)."""
        return self.root.join("metrics.jsonl")

    def consumed(self, epoch: int, first: int, last: int, rank: int) -> storage.Location:
        return self.root.join(f"consumed/e{epoch:05d}-s{first:09d}-{last:09d}-r{rank:03d}.json")

    @property
    def metrics_dir(self) -> storage.Location:
        return self.root.join("metrics")

    def metric_objects(self) -> list[str]:
        """URIs of the metrics objects in the order they were written (their names sort so)."""
        files = [f for f in storage.list_files(self.metrics_dir.uri) if f.path.endswith(".jsonl")]
        return [storage.to_uri(self.root, f.path) for f in sorted(files, key=lambda f: f.path)]

    def read_metrics(self) -> list[dict]:
        """Every report of the run as one table (a list of rows), oldest first. Other readers: duckdb
        `read_json('<run>/metrics/*.jsonl')`, or pandas over the same objects."""
        uris = ([self.metrics.uri] if storage.exists(self.metrics.uri) else []) + self.metric_objects()
        return [json.loads(line) for u in uris for line in storage.read_bytes(u).decode().splitlines() if line.strip()]

    @property
    def tensorboard(self) -> storage.Location:
        return self.root.join("tensorboard")

    @property
    def figures(self) -> storage.Location:
        return self.root.join("figures")

    def checkpoints(self) -> list[str]:
        """URIs of the run's checkpoint folders, newest first (Ray's own snapshot files are not candidates)."""
        folders = set()
        for f in storage.list_files(self.root.uri):
            first, inside, _ = posixpath.relpath(f.path, self.root.path).partition("/")
            if inside and first.startswith(CHECKPOINT_PREFIX):
                folders.add(first)
        return [self.root.join(n).uri for n in sorted(folders, reverse=True)]
