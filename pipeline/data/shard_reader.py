"""Reading a shard set: the samples of one shard file, checked against the sha256 its manifest recorded.

Layout under the output prefix (written by `shard_writer`, never changed after):
  manifest.json                          the current version, replaced in one PUT once a version is complete
  versions/<version>/manifest.json       the same manifest, kept with its version
  versions/<version>/train/shard-00000.tar ...
  versions/<version>/val/shard-00000.tar ...
A reader opens exactly the files a manifest names and checks each one's sha256 (`read_shard`, the one
reader: training, evaluation, batch inference and the figures all call it), so a job that loaded a
manifest reads the same bytes however many versions are written after it.

A sample is three members: `{key}.image` (the original bytes), `{key}.cls` (the label), `{key}.json`
({"source", "label", "format", "width", "height"}); Parquet shards hold the same as columns.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from typing import NamedTuple

from pipeline.core import storage
from pipeline.data.manifest import IMAGE_MEMBER

log = logging.getLogger(__name__)


class ShardIntegrityError(RuntimeError):
    """A shard's bytes differ from what its manifest recorded."""


def check_shard(data: bytes, path: str, want: str | None) -> None:
    got = hashlib.sha256(data).hexdigest()
    if want and got != want:
        raise ShardIntegrityError(
            f"shard {path} does not match its manifest: sha256 {got} != {want}. The file changed after the "
            "manifest was written (overwritten or damaged in storage); run make_shards again to write a new version"
        )


class Sample(NamedTuple):
    key: str
    image: bytes | None  # the original encoded bytes (None: the member is missing)
    label: int  # -1: unlabeled
    format: str  # what make_shards recorded ("" when it recorded nothing)


def read_shard(uri: str, want: str | None, fmt: str) -> list[Sample]:
    """Every sample of one shard file, in file order, read in one GET and checked against `want` (sha256) first."""
    data = storage.read_bytes(uri, large=True)
    check_shard(data, storage.parse_uri(uri).path, want)
    return [Sample(*s) for s in _samples_of(data, fmt)]


def _tar_files(data: bytes):
    """(name, content) of every regular file in a tar archive held in memory.

    Plain ustar/v7 headers (what make_shards writes) are parsed directly: tarfile's generic reader
    costs about as much per member as the sha256 of the shard. Any other entry (pax or GNU long
    names, sparse files) hands the whole archive to tarfile, which reads every format."""
    view, pos, out = memoryview(data), 0, []
    while pos + 512 <= len(data):
        header = data[pos : pos + 512]
        if header.count(0) == 512:  # end-of-archive blocks
            return out
        kind = header[156:157]
        try:
            size = int(header[124:136].rstrip(b"\0 ").decode("ascii") or "0", 8)
        except ValueError:
            break
        if kind not in (b"0", b"\0", b"5") or sum(header[:148]) + 256 + sum(header[156:]) != _checksum(header):
            break
        start = pos + 512
        if start + size > len(data):  # truncated: let tarfile say so
            break
        if kind != b"5":
            name = header[:100].split(b"\0", 1)[0]
            if header[257:262] == b"ustar" and header[345]:
                name = header[345:500].split(b"\0", 1)[0] + b"/" + name
            out.append((name.decode("utf-8", "backslashreplace"), bytes(view[start : start + size])))
        pos = start + (size + 511) // 512 * 512
    # no end-of-archive marker where one was due, or an entry of another kind: tarfile decides
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding="utf-8", errors="surrogateescape") as tar:
        out, links = [], []
        for m in tar:
            name = m.name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")  # any bytes: a key
            if m.isfile():
                out.append((name, tar.extractfile(m).read()))
            elif m.issym() or m.islnk():
                links.append(name)
        if links:  # another tool's links are not followed (a shard is self-contained): say so, never silently
            log.warning("shard member(s) left out, links are not followed: %s", ", ".join(links[:10]))
        return out


def _checksum(header: bytes) -> int:
    try:
        return int(header[148:156].rstrip(b"\0 ").decode("ascii"), 8)
    except ValueError:
        return -1


def _samples_of(data: bytes, fmt: str):
    """(key, image bytes or None, label, format) of every sample in one shard file (both layouts)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        cols = table.column_names
        fmts = table.column("format" if "format" in cols else "ext").to_pylist()
        yield from zip(
            table.column("key").to_pylist(), table.column("image").to_pylist(), table.column("label").to_pylist(), fmts
        )
        return
    members: dict[str, dict[str, bytes]] = {}
    order = []
    for name, content in _tar_files(data):
        # WebDataset's rule: the key is the path up to the first dot of the basename (`a/x.seg.png`: `a/x`)
        folder, _, base = name.rpartition("/")
        stem, _, ext = base.partition(".")
        key = f"{folder}/{stem}" if folder else stem
        if key not in members:
            members[key] = {}
            order.append(key)
        members[key][ext] = content
    for key in order:
        parts = members[key]
        label = int(parts["cls"].decode()) if "cls" in parts else -1
        meta = json.loads(parts["json"]) if "json" in parts else {}
        image = parts.get(IMAGE_MEMBER)
        if image is None:  # layout 1: the image member named by its format's extension
            image = next((v for k, v in parts.items() if k not in ("cls", "json")), None)
        yield key, image, label, meta.get("format", "")
