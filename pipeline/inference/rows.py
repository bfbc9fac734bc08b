"""One prediction row, column by column: the single list that the listing, the pass-through from an input to
its row, the published Parquet (and table) schema and the `--since-last-run` ledger are all cut from.

Each column says who knows its value first:
    listing  known when the input is listed (or read, for a shard sample) and carried unchanged to its row
    read     found while fetching and decoding (an error and its kind), carried to the row
    model    the Predictor's
    run      the same for every row of a run
A missing value is a null all the way through, never a placeholder. A new input-derived column is one entry
here plus the line in `inputs` that fills it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    by: str  # "listing", "read", "model" or "run"
    ledger: bool = False  # kept per input in the ledger (what tells whether it is done)
    nullable: bool = True
    optional: bool = False  # only with --embeddings

    @property
    def carried(self) -> bool:
        """Passed from the input's batch to its row as it is."""
        return self.by in ("listing", "read")


COLUMNS = (
    Column("image_uri", pa.string(), "listing", ledger=True, nullable=False),
    Column("label_id", pa.int64(), "listing"),  # the known label (a class tree, a shard's label), else null
    Column("label", pa.string(), "model"),  # label_id's class name, by the model's class list
    Column("pred_id", pa.int64(), "model"),
    Column("pred", pa.string(), "model"),
    Column("score", pa.float32(), "model"),
    Column("topk_ids", pa.list_(pa.int64()), "model"),
    Column("topk_scores", pa.list_(pa.float32()), "model"),
    Column("embedding", pa.list_(pa.float32()), "model", optional=True),  # the pre-logits feature
    Column("error", pa.string(), "read", ledger=True),  # why the input has no prediction
    Column("error_kind", pa.string(), "read", ledger=True),  # "transient": retried by a later run; "permanent"
    Column("input_version", pa.string(), "listing", ledger=True),  # `size:mtime` of the object listed (images)
    Column("input_size", pa.int64(), "listing"),  # bytes of the input: listed, or counted when read
    Column("model_uri", pa.string(), "run", nullable=False),
    Column("model_sha256", pa.string(), "run", nullable=False),
    Column("run_id", pa.string(), "run", ledger=True, nullable=False),
    Column("inferred_at", pa.timestamp("us", tz="UTC"), "run", nullable=False),
)
BY_NAME = {c.name: c for c in COLUMNS}
CARRIED = [c.name for c in COLUMNS if c.carried]
INPUT_SCHEMA = pa.schema([pa.field(c.name, c.type) for c in COLUMNS if c.by == "listing"])
LEDGER_SCHEMA = pa.schema([pa.field(c.name, c.type) for c in COLUMNS if c.ledger])
TRANSIENT, PERMANENT = "transient", "permanent"  # error kinds: retried by a later run, or final for this version


def output_schema(embeddings: bool) -> pa.Schema:
    """The schema of a published prediction row."""
    return pa.schema([pa.field(c.name, c.type, nullable=c.nullable) for c in COLUMNS if embeddings or not c.optional])


def input_table(columns: dict[str, list], n: int | None = None) -> pa.Table:
    """The listing's table from the columns known (the others null)."""
    n = len(next(iter(columns.values()))) if n is None else n
    return pa.table(
        [pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(n, f.type) for f in INPUT_SCHEMA],
        schema=INPUT_SCHEMA,
    )


def values(batch: dict, name: str, n: int) -> list:
    """One column of a numpy batch as Python values with None where the value is missing (absent from the
    batch too). Ray Data hands an integer column that holds nulls to numpy as floats with NaN."""
    col = batch.get(name)
    if col is None:
        return [None] * n
    out = []
    for v in col:
        if v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, np.floating) and np.isnan(v)):
            out.append(None)
        elif isinstance(v, np.generic):
            out.append(v.item())
        else:
            out.append(v)
    if BY_NAME[name].type == pa.int64():
        out = [None if v is None else int(v) for v in out]
    return out


def carried(batch: dict, n: int) -> dict[str, np.ndarray]:
    """The carried columns of a batch, nulls as None, as object arrays a next step passes on untouched."""
    return {name: np.asarray(values(batch, name, n), dtype=object) for name in CARRIED}


def table(columns: dict[str, list], schema: pa.Schema) -> pa.Table:
    """A batch of rows in `schema`'s column order, each column typed by it."""
    return pa.table([pa.array(columns[f.name], f.type) for f in schema], schema=schema)
