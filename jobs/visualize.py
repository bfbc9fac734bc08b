"""See inside a trained ViT, as the paper's Figure 7 does, plus attention maps and training curves.

  python jobs/visualize.py --model s3://bucket/runs/digits/model --images s3://bucket/incoming/ \\
      --output s3://bucket/runs/digits/figures --run s3://bucket/runs/digits
--images: comma-separated files, a folder or prefix, or a shards manifest (its val split).
Figures: filters (embedding PCA), posemb (position-embedding similarity), distance (mean attention
distance), attention (rollout + last-layer class-token attention), curves (needs --run), reconstruction
(an MAE model: original | masked | reconstruction rows, as MAE's Figure 2; needs --images).
For notebooks: pipeline.inference.figures.compute_all(model, patches) returns the arrays.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.figures.plots import FIGURES  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="exported model folder (local or s3://)")
    ap.add_argument("--images", default=None, help="images for attention figures")
    ap.add_argument("--output", required=True, help="folder or s3:// prefix for the PNGs")
    ap.add_argument("--figures", default=",".join(FIGURES), help=f"comma-separated subset of {','.join(FIGURES)}")
    ap.add_argument("--run", default=None, help="run folder (its metrics/*.jsonl), for the curves")
    ap.add_argument("--max-images", type=int, default=16)
    args = ap.parse_args(argv)
    which = [f for f in args.figures.split(",") if f]
    unknown = set(which) - set(FIGURES)
    if unknown:
        ap.error(f"unknown figure(s) {sorted(unknown)}; choose from {', '.join(FIGURES)}")
    from pipeline.core.exits import run_job
    from pipeline.figures import plots as figures

    def body() -> None:
        images = figures.resolve_images(args.images, args.max_images) if args.images else []
        result = figures.write_figures(args.model, images, args.output, which, args.run)
        g = result["arrays"]["grid_structure"]
        structure = "grid structure present" if g["score"] > figures.GRID_THRESHOLD else "no grid structure"
        print(
            f"position embeddings: grid neighbours {g['neighbours']:.3f} vs other pairs {g['other']:.3f}, "
            f"score {g['score']:.2f} ({structure})"
        )
        for name, uri in result["figures"].items():
            print(f"{name:14s} {uri}")
        for name, why in result["skipped"].items():
            print(f"{name:14s} skipped: {why}")

    return run_job("visualize", body)


if __name__ == "__main__":
    sys.exit(main())
