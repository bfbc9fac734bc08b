"""Keeping a prediction table small: expire old snapshots, remove the data files no snapshot references.

A run killed before its commit (or one that lost a conflict) leaves data files under
`<table location>/data/vitray-run=<id>/` that no snapshot names; readers never see them. `maintain` removes
those older than a grace period (a run still writing is younger), and expires snapshots older than the
retention (the current one is always kept; pyiceberg's expire_snapshots). Metadata is changed by pyiceberg
only; what is deleted here are data files that no snapshot left in the table references.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable

from pipeline.core import storage

log = logging.getLogger(__name__)


def referenced_files(table) -> set[str]:
    """Every data file any snapshot of the table still references (all manifests of all snapshots)."""
    out: set[str] = set()
    seen_manifests: set[str] = set()
    for snap in table.snapshots():
        for manifest in snap.manifests(table.io):
            if manifest.manifest_path in seen_manifests:
                continue
            seen_manifests.add(manifest.manifest_path)
            for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=False):
                out.add(entry.data_file.file_path)
    return out


def remove_orphans(table, grace_h: float, clock: Callable[[], float] = time.time) -> list[str]:
    """Delete the Parquet files under the table's `data/` that no snapshot references and that are older than
    `grace_h` hours by their modification time. Returns their URIs."""
    data = storage.parse_uri(table.location()).join("data")
    keep = {storage.parse_uri(p).uri for p in referenced_files(table)}
    cutoff = clock() - grace_h * 3600
    removed = []
    for f in storage.list_files(data.uri):
        uri = storage.to_uri(data, f.path)
        if uri in keep or f.mtime is None or f.mtime.timestamp() > cutoff:
            continue
        storage.delete(uri)
        removed.append(uri)
    if removed:
        log.warning("removed %d data files that no snapshot of the table references", len(removed))
    return removed


def expire_snapshots(table, retention_days: float, clock: Callable[[], float] = time.time) -> int:
    """Expire the snapshots older than `retention_days` (never the current one). Returns how many."""
    before = len(table.snapshots())
    older = dt.datetime.fromtimestamp(clock() - retention_days * 86400, tz=dt.timezone.utc)
    table.maintenance.expire_snapshots().older_than(older).commit()
    table.refresh()
    return before - len(table.snapshots())


def maintain(table, retention_days: float, grace_h: float, clock: Callable[[], float] = time.time) -> dict:
    """Expire, then remove orphans (files only the expired snapshots named become orphans only when no
    snapshot left references them)."""
    expired = expire_snapshots(table, retention_days, clock)
    removed = remove_orphans(table, grace_h, clock)
    return {"expired_snapshots": expired, "removed_files": len(removed)}
