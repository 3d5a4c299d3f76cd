"""Mean and standard error of the judge's concept top-5 over `flowflash grid --score` JSON files (one per seed),
one row per group of files: how the confirmatory checks of docs/benchmarks.md are summed up.

    python scripts/grid_means.py 'teacher=runs/look6/grids/teacher-seed1?.json' 'student=runs/look6/grids/m-seed1?.json'
"""
from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

from flowflash.eval.metrics import mean_and_se


def summarise(files: list[Path]) -> dict:
    per = {}
    for f in files:
        d = json.loads(f.read_text())
        if "groups" not in d.get("generated", {}):
            raise SystemExit(f"{f}: no concept scores (was the grid drawn with --score?)")
        per[d["seed"]] = d["generated"]["groups"]["top5"]
    vals = [per[k] for k in sorted(per)]
    mean, se = mean_and_se(vals)
    return {"seeds": sorted(per), "top5": vals, "mean": mean, "se": se}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("groups", nargs="+", metavar="NAME=GLOB",
                    help="a row's name and a glob of its grid JSON files (quoted; the first row is the reference)")
    a = ap.parse_args(argv)
    groups: dict[str, list[Path]] = {}
    for g in a.groups:
        name, eq, pattern = g.partition("=")
        files = sorted(Path(p) for p in glob.glob(pattern))
        if not eq or not files:
            raise SystemExit(f"{g}: expected NAME=GLOB matching at least one grid JSON")
        groups[name] = files
    rows = {n: summarise(fs) for n, fs in groups.items()}
    first = next(iter(rows.values()))
    print("| group | " + " | ".join(str(s) for s in first["seeds"]) + " | mean (SE) | vs first |")
    print("|---|" + "---|" * (len(first["seeds"]) + 2))
    for n, r in rows.items():
        print(f"| {n} | " + " | ".join(f"{v:.3f}" for v in r["top5"])
              + f" | {r['mean']:.3f} ({r['se']:.3f}) | {r['mean'] / first['mean']:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
