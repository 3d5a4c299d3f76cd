"""Issue 15's rule for the students, applied (docs/benchmarks.md, "Teacher v5 and its students: the rules fixed
before training"): among candidate students of one method, the best alignment on 256 *training* prompts
(CLIP-score analogue) whose core-grid concept top-5 is at least 0.9x the teacher's.

For each candidate (and the teacher: its grids only, the reference of the 0.9x), one seed-0 grid of
`grid64-core` and of `grid64-plain` scored by the judge, and for the candidates the alignment on the merge
sweep's fixed training sample (seed 0). Writes OUT.json and OUT.md; the grids go to --grids (not docs/: a
grid PNG is a few hundred KB).

    python scripts/pick_students.py --data data/emoji64 --out docs/bench/pick-students15 \
        runs/students15/dmd2-4-lr1e-4-at300 runs/students15/dmd2-4-lr1e-4 ...
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from flowflash.eval.generate import Setting, generate_set
from flowflash.eval.grid import draw_grid
from flowflash.eval.judge import Judge
from flowflash.eval.prompt_set import sweep_prompt_set
from flowflash.fsutil import write_text_atomic


def grid_scores(model: str, prompts: str, out: Path, judge_data: Path, steps: int | None = None,
                seeds: tuple[int, ...] = (0,)) -> dict:
    """The judge's concept top-1/top-5 on one grid per seed, averaged over the seeds (each seed's kept)."""
    per = []
    for seed in seeds:
        png = out if seed == 0 else out.with_name(f"{out.stem}-seed{seed}{out.suffix}")
        g = draw_grid(prompts, str(png), model=model, steps=steps, seed=seed, score=judge_data)["scores"]["generated"]
        per.append({"concept_top1": g["groups"]["top1"], "concept_top5": g["groups"]["top5"], "png": str(png)})
    mean = lambda k: sum(p[k] for p in per) / len(per)
    return {"concept_top1": mean("concept_top1"), "concept_top5": mean("concept_top5"), "png": per[0]["png"],
            **({"seeds": dict(zip(map(str, seeds), per))} if len(seeds) > 1 else {})}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("candidates", nargs="+", help="student model folders")
    ap.add_argument("--teacher", default="teacher")
    ap.add_argument("--data", type=Path, default=Path("data/emoji64"))
    ap.add_argument("--out", type=Path, required=True, help="results stem")
    ap.add_argument("--ratio", type=float, default=0.9, help="core top-5 needed, as a fraction of the teacher's")
    ap.add_argument("--cache", type=Path, default=Path("runs/eval-cache"))
    ap.add_argument("--grids", type=Path, default=Path("runs/pick-grids"), help="where the grid PNGs go")
    ap.add_argument("--steps", type=int, default=None,
                    help="sample the candidates at this many steps (default: each one's own; e.g. 2 for a student "
                         "trained with also_steps [2]); the teacher keeps its 50 CFG steps")
    ap.add_argument("--seeds", default="0", help="grid seeds whose top-5 is averaged (e.g. 0,1,2), for the teacher "
                    "and the candidates alike; one 48-prompt grid moves by 0.02 an image")
    ap.add_argument("--teacher-core-top5", type=float, default=None,
                    help="the teacher's core top-5 over the same seeds, measured before (`flowflash grid --prompts "
                         "grid64-core --model teacher --steps 50 --score DATA --seed K`): its 50 CFG-step grids are "
                         "then not redrawn")
    a = ap.parse_args()
    seeds = tuple(int(x) for x in a.seeds.split(","))

    judge = Judge.load()
    ps = sweep_prompt_set(a.data, 256, 0)
    name = lambda m: Path(m).name if Path(m).exists() else m
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.grids.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, m in enumerate([a.teacher, *a.candidates]):
        if i == 0 and a.teacher_core_top5 is not None:
            rows.append({"model": m, "teacher": True, "steps": None, "given": True,
                         "grid64-core": {"concept_top5": a.teacher_core_top5, "concept_top1": None},
                         "grid64-plain": {"concept_top5": None, "concept_top1": None}})
            continue
        steps = a.steps if i > 0 else None
        row = {"model": m, "teacher": i == 0, "steps": steps}
        tag = f"-s{steps}" if steps else ""
        for grid in ("grid64-core", "grid64-plain"):
            row[grid] = grid_scores(m, grid, a.grids / f"{a.out.name}-{name(m)}{tag}-{grid}.png", a.data, steps, seeds)
        if i > 0:  # the teacher's 50 CFG steps on 256 prompts are not part of the rule
            imgs, _ = generate_set(Setting(name=name(m) + tag, model=m, steps=steps), ps, seed=0, cache=a.cache)
            row.update(judge.alignment(judge.features(imgs), ps.captions, ps.captions))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items()}), flush=True)
    floor = a.ratio * rows[0]["grid64-core"]["concept_top5"]
    eligible = [r for r in rows[1:] if r["grid64-core"]["concept_top5"] >= floor]
    best = max(eligible, key=lambda r: r["clip_score"]) if eligible else None
    res = {"prompt_set": ps.name, "grid_seeds": list(seeds), "floor_core_top5": floor, "picked": best and best["model"], "rows": rows}
    write_text_atomic(a.out.with_suffix(".json"), json.dumps(res, indent=1))
    lines = [f"# Student pick: {', '.join(name(c) for c in a.candidates)}"
             + (f", sampled at {a.steps} steps" if a.steps else ""), "",
             f"Rule: the best CLIP-score analogue on {ps.name} among candidates whose grid64-core concept top-5 is "
             f">= {a.ratio:g} x the teacher's ({floor:.3f}; grid top-5 averaged over seeds {a.seeds}). Picked: **{name(best['model']) if best else 'none'}**.",
             "", "| model | CLIP-score analogue (train 256) | R-prec@10 (train 256) | core top-5 | core top-1 | "
             "plain top-5 | plain top-1 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        c, p = r["grid64-core"], r["grid64-plain"]
        al = (f"{r['clip_score']:.1f} | {r['r_precision']:.3f}" if "clip_score" in r else "- | -")
        f = lambda v: "-" if v is None else f"{v:.3f}"  # a teacher score given on the command line has no grid
        lines.append(f"| {name(r['model'])}{' (teacher)' if r['teacher'] else ''} | {al} | {f(c['concept_top5'])} | "
                     f"{f(c['concept_top1'])} | {f(p['concept_top5'])} | {f(p['concept_top1'])} |")
    write_text_atomic(a.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
