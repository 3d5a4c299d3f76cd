"""Issue 15's rule for shipping teacher v5 (docs/benchmarks.md, "Teacher v5 and its students: the rules fixed before
training"), applied to a candidate against the shipped teacher (v4), both at 50 steps, CFG 4, image i at seed i:

1. plain_v1 R-prec@10 above v4's by more than the 90 % bootstrap interval of the difference (paired over prompts:
   the interval's lower end above 0);
2. eval_v1 R-prec@10 and compositional score at least v4's minus 0.02, and eval_v1 FD-EffNetL0 at most the upper
   end of v4's 90 % interval;
3. eval_v1 held-out scene R-prec@10 (the 265 scenes) at least v3's 0.645 - 0.03;
4. core-grid concept top-5 (`grid64-core`, seed 0) at least v4's.

Writes OUT.json and OUT.md with every number and the verdict. Image sets are cached (--cache), so a rerun or the
baseline's sets from an earlier `bench` cost nothing; a grid already scored (`grid --score` JSON) can be reused.

    python scripts/rule_teacher_v5.py --candidate runs/teacher-v5-cpu/ema_model --out docs/bench/teacher-v5-rule
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flowflash.eval.generate import Setting, generate_set
from flowflash.eval.grid import draw_grid
from flowflash.eval.judge import encode_texts
from flowflash.eval.metrics import r_precision_hits
from flowflash.eval.score import score
from flowflash.eval.tasks import load_reference
from flowflash.fsutil import write_text_atomic

V3_SCENES = 0.645  # teacher v3's held-out scene R-prec@10 (emoji-teacher card, v4 section)


def prompt_hits(ref, feats: torch.Tensor) -> torch.Tensor:
    """Per prompt, whether its caption wins R-precision@10 among the set's captions (as `eval` scores it)."""
    pool = list(dict.fromkeys(ref.ps.captions))
    img = ref.judge.scorer.embed_images(feats)
    txt = ref.judge.scorer.embed_texts(encode_texts(ref.judge.minilm, pool))
    return r_precision_hits(img, txt, torch.tensor([pool.index(c) for c in ref.ps.captions]))


def measure(model: str, refs: dict, data: Path, cache: Path, grid_json: Path | None, grids: Path) -> dict:
    s = Setting(name=Path(model).name, model=model, steps=50, guidance=4.0)
    row = {"model": model}
    for name, ref in refs.items():
        imgs, _ = generate_set(s, ref.ps, seed=0, cache=cache)
        res, feats = score(imgs, ref.ps, ref.judge, ref.real_feats)
        hits = prompt_hits(ref, feats)
        row[name] = {k: res[k] for k in ("fd_effnetl0", "fd_ci90", "clip_score", "r_precision", "compositional_acc")
                     if k in res}
        row[name]["hits"] = hits.tolist()
        if name == "eval_v1":  # scored as v3's 0.645 was (scripts/breakdown-by-kind.py): the scene rows alone
            idx = [i for i, r in enumerate(ref.ps.rows) if r["kind"] != "single"]
            al = ref.judge.alignment(feats[idx], [ref.ps.captions[i] for i in idx], ref.ps.captions)
            row[name]["scene_r_precision"], row[name]["n_scenes"] = al["r_precision"], len(idx)
    if grid_json is None:
        grid_json = draw_grid("grid64-core", str(grids / f"{s.name}-grid64-core.png"), model=model, steps=50,
                              guidance=4.0, score=data)["json"]
    row["core_top5"] = json.loads(Path(grid_json).read_text())["generated"]["groups"]["top5"]
    row["core_grid_json"] = str(grid_json)
    return row


def bootstrap_diff(a: list[bool], b: list[bool], resamples: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over prompts and its 90 % bootstrap interval (prompts resampled, pairs kept)."""
    d = torch.tensor(a, dtype=torch.float) - torch.tensor(b, dtype=torch.float)
    g = torch.Generator().manual_seed(seed)
    means = d[torch.randint(len(d), (resamples, len(d)), generator=g)].mean(1)
    return float(d.mean()), float(means.quantile(0.05)), float(means.quantile(0.95))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidate", required=True, help="the v5 model folder")
    ap.add_argument("--baseline", default="teacher", help="the shipped teacher (v4)")
    ap.add_argument("--data", type=Path, default=Path("data/emoji64"), help="the corpus of the held-out images")
    ap.add_argument("--cache", type=Path, default=Path("runs/eval-cache"))
    ap.add_argument("--grids", type=Path, default=Path("runs/rule-v5-grids"))
    ap.add_argument("--baseline-grid", type=Path, help="a `grid --score` JSON of the baseline on grid64-core, seed 0")
    ap.add_argument("--candidate-grid", type=Path, help="the same for the candidate")
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--out", type=Path, required=True, help="results stem")
    a = ap.parse_args()

    refs = {ps: load_reference(a.data, ps) for ps in ("eval_v1", "plain_v1")}
    a.grids.mkdir(parents=True, exist_ok=True)
    base = measure(a.baseline, refs, a.data, a.cache, a.baseline_grid, a.grids)
    cand = measure(a.candidate, refs, a.data, a.cache, a.candidate_grid, a.grids)
    diff, lo, hi = bootstrap_diff(cand["plain_v1"]["hits"], base["plain_v1"]["hits"], a.resamples)
    be, ce = base["eval_v1"], cand["eval_v1"]
    checks = {
        "1 plain_v1 R-prec above v4's beyond the 90% interval": lo > 0,
        "2a eval_v1 R-prec >= v4's - 0.02": ce["r_precision"] >= be["r_precision"] - 0.02,
        "2b eval_v1 compositional >= v4's - 0.02": ce["compositional_acc"] >= be["compositional_acc"] - 0.02,
        "2c eval_v1 FD <= the upper end of v4's 90% interval": ce["fd_effnetl0"] <= be["fd_ci90"][1],
        "3 eval_v1 scene R-prec >= v3's 0.645 - 0.03": ce["scene_r_precision"] >= V3_SCENES - 0.03,
        "4 core-grid concept top-5 >= v4's": cand["core_top5"] >= base["core_top5"],
    }
    ships = all(checks.values())
    res = {"baseline": base, "candidate": cand, "plain_v1_r_precision_diff": {"mean": diff, "ci90": [lo, hi]},
           "checks": checks, "ships": ships}
    write_text_atomic(a.out.with_suffix(".json"), json.dumps(res, indent=1))
    lines = [f"# Teacher v5 rule: {a.candidate} against {a.baseline}", "",
             "| | FD-EffNetL0 eval_v1 (90% CI) | R-prec@10 eval_v1 | scenes | compositional | R-prec@10 plain_v1 | "
             "core top-5 |", "|---|---|---|---|---|---|---|"]
    for name, r in (("baseline", base), ("candidate", cand)):
        e, p = r["eval_v1"], r["plain_v1"]
        lines.append(f"| {name} ({r['model']}) | {e['fd_effnetl0']:.1f} ({e['fd_ci90'][0]:.1f}-{e['fd_ci90'][1]:.1f}) | "
                     f"{e['r_precision']:.3f} | {e['scene_r_precision']:.3f} | {e['compositional_acc']:.3f} | "
                     f"{p['r_precision']:.3f} | {r['core_top5']:.3f} |")
    lines += ["", f"plain_v1 R-prec@10 difference (candidate - baseline): {diff:+.3f}, 90% bootstrap interval "
              f"[{lo:+.3f}, {hi:+.3f}] ({a.resamples} resamples of the prompts).", ""]
    lines += [f"- {'met' if ok else 'NOT met'}: {name}" for name, ok in checks.items()]
    lines += ["", f"**Verdict: {'v5 ships' if ships else 'v4 stays'}.**"]
    write_text_atomic(a.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
