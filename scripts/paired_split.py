"""The paired difference of two `split_by_concepts.py` results over the same eval seeds: per seed, B's R-prec@10 minus
A's (whole set, listed and other groups), their mean and the standard error of that mean. Two models drawn on the
same seeds share their starting noise, so the paired SE is the one to read a difference against.

    python scripts/paired_split.py docs/bench/plain-split-look6-merge-r25.json docs/bench/plain-split-look7-X.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from flowflash.eval.metrics import mean_and_se


def paired(a: dict, b: dict, group: str = "all") -> dict:
    seeds = sorted(set(a["per_seed"]) & set(b["per_seed"]), key=int)
    if len(seeds) < 2:
        raise SystemExit(f"the two results share {len(seeds)} seed(s); a paired SE needs two or more")
    d = [b["per_seed"][s][group]["r_precision"] - a["per_seed"][s][group]["r_precision"] for s in seeds]
    mean, se = mean_and_se(d)
    return {"seeds": seeds, "diffs": d, "mean": mean, "se": se}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="the reference result (JSON)")
    ap.add_argument("b", type=Path, help="the compared result (JSON)")
    x = ap.parse_args(argv)
    a, b = (json.loads(p.read_text()) for p in (x.a, x.b))
    for group in ("all", "listed", "other"):
        r = paired(a, b, group)
        print(f"{group:6s} B - A = {r['mean']:+.3f} (paired SE {r['se']:.3f}; seeds {','.join(r['seeds'])}; "
              f"per seed {' '.join(f'{v:+.3f}' for v in r['diffs'])})")


if __name__ == "__main__":
    main()
