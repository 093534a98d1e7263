"""Is one row of a PerVL table better than another on the same queries? MRR(A) - MRR(B) with a 95% interval from a
bootstrap over concepts (`benchmarks.pervl.paired_mrr_difference`), for two rank files of one split and seed:

    python benchmarks/diagnostics/paired.py OUT/ranks.parquet:ours OUT/ranks.parquet:pt
    python benchmarks/diagnostics/paired.py OUT/cache/ranks/ours-seed0-KEY.parquet OUT/ranks.parquet:text+image

Each argument is a ranks parquet written by `benchmarks/pervl.py` (its `--out`'s ranks.parquet, or one file of its
cache), with `:METHOD` where the file holds several methods and `@SEED` where it holds several seeds.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import pandas as pd

from benchmarks.pervl import metrics, paired_mrr_difference


def read_rows(spec: str) -> pd.DataFrame:
    """The ranks of one method and seed from PATH[:METHOD][@SEED], one row per query, in image order."""
    path, seed = spec.rsplit("@", 1) if "@" in spec else (spec, None)
    path, method = path.rsplit(":", 1) if ":" in Path(path).name else (path, None)
    frame = pd.read_parquet(path)
    if method is not None:
        frame = frame[frame["method"] == method]
    if seed is not None:
        frame = frame[frame["seed"] == int(seed)]
    kinds = frame[["method", "seed"]].drop_duplicates()
    if len(kinds) != 1:
        raise SystemExit(f"{spec}: holds {len(kinds)} (method, seed) pairs; name one as PATH:METHOD@SEED")
    return frame.sort_values("image_name").reset_index(drop=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="PATH[:METHOD][@SEED]")
    p.add_argument("b", help="PATH[:METHOD][@SEED]")
    p.add_argument("--draws", type=int, default=5000, help="bootstrap draws (default 5000)")
    args = p.parse_args(argv)
    a, b = read_rows(args.a), read_rows(args.b)
    if not a["image_name"].equals(b["image_name"]):
        raise SystemExit("the two files rank different queries: compare runs of one split and one --concepts")
    out = paired_mrr_difference(a["rank"], b["rank"], a["pair_id"], draws=args.draws)
    print(
        f"MRR {metrics(a['rank'])['mrr']:.1f} - {metrics(b['rank'])['mrr']:.1f} = {out['diff']:+.1f} "
        f"(95% interval {out['low']:+.1f} to {out['high']:+.1f}; {len(a)} queries, "
        f"{a['pair_id'].nunique()} concepts resampled, {args.draws} draws)"
    )
    return out


if __name__ == "__main__":
    main()
