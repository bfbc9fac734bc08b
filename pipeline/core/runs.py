"""The folder of one pretraining run, built once from (output, name); every reader and writer asks it.

{output}/{name}/
  config.yaml        the resolved configuration
  data.json          the shard version the run started on (a resume reads the same one)
  checkpoint_*/      Ray Train checkpoints (the last `train.keep_checkpoints`)
  model/, best/      exported models: the final weights and the best validation top-1 so far
  metrics.jsonl      one line per report (loss, lr, images/s, val top-1, ...)
  tensorboard/       TensorBoard event files
  figures/           what jobs/visualize.py writes by default
"""

from __future__ import annotations

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
        return self.root.join("metrics.jsonl")

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
