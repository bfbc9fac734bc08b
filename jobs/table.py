"""Look at and maintain a predictions table that `jobs/batch_infer.py --table` writes (Apache Iceberg).

  python jobs/table.py show preds.digits                  # snapshots (one per run), rows, the latest rows
  python jobs/table.py show preds.digits --snapshot ID    # the table as that run left it (time travel)
  python jobs/table.py maintain preds.digits --retention-days 30 --orphan-grace-h 24

--catalog / --warehouse as for batch_infer (default $VITRAY_CATALOG / $VITRAY_WAREHOUSE: the local stack's).
Exit codes: 0 done, 2 bad arguments or no such table, 75 the catalog did not answer.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.core.exits import run_job  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["show", "maintain"])
    ap.add_argument("table", help="<namespace>.<name>")
    ap.add_argument("--catalog", help="sqlite:///<path>.db, postgresql://... or rest+https://...")
    ap.add_argument("--warehouse")
    ap.add_argument("--snapshot", type=int, help="show: the table at this snapshot id")
    ap.add_argument("--rows", type=int, default=5, help="show: how many of the latest rows")
    ap.add_argument("--retention-days", type=float, default=30.0)
    ap.add_argument("--orphan-grace-h", type=float, default=24.0)
    args = ap.parse_args(argv)

    def body() -> None:
        from pyiceberg.exceptions import NoSuchTableError

        from pipeline.inference.iceberg import catalog, maintenance, snapshots

        cat = catalog.open_catalog(args.catalog, args.warehouse)
        try:
            table = cat.load_table(args.table)
        except NoSuchTableError:
            raise ValueError(f"no table {args.table} in the catalog (batch_infer --table creates it)") from None
        if args.command == "maintain":
            print(maintenance.maintain(table, args.retention_days, args.orphan_grace_h))
            return
        for snap in reversed(snapshots.ancestry(table)):
            s = snapshots.summary(snap)
            print(
                f"snapshot {snap.snapshot_id}  run {s.get(snapshots.RUN_ID, '-')}  rows +{s.get('added-records', '?')}"
                f"  total {s.get('total-records', '?')}  model {s.get(snapshots.MODEL_SHA, '-')[:12]}"
            )
        cols = ("image_uri", "pred", "score", "error", "run_id", "inferred_at")
        t = table.scan(selected_fields=cols, snapshot_id=args.snapshot).to_arrow()
        print(f"{t.num_rows} rows" + (f" at snapshot {args.snapshot}" if args.snapshot else ""))
        latest = t.sort_by([("inferred_at", "descending")]).slice(0, args.rows)
        for row in latest.to_pylist():
            print("  " + "  ".join(str(row[c]) for c in cols))

    return run_job("table", body)


if __name__ == "__main__":
    sys.exit(main())
