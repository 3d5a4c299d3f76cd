"""R-precision@10 and the CLIP-score analogue of a model on a prompt set, over several seeds, split by whether each
prompt's concept is in a concept list (e.g. `core-wide`, the concepts a run's singles were drawn from): where an
alignment gap lies. The hits are those of `flowflash eval` (the same distractors), so the whole-set column equals
eval's R-prec@10 for that seed; the groups are its prompts whose first concept is listed and the rest (a scene's
other concepts are not looked at), an empty group's numbers null.

    python scripts/split_by_concepts.py --model teacher --steps 50 --guidance 4 --prompts plain_v1 \\
        --concepts core-wide --seeds 0,1,2 --out docs/bench/plain-split-teacher
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flowflash.data.dataset import load_concept_list
from flowflash.eval.generate import Setting
from flowflash.eval.judge import encode_texts
from flowflash.eval.metrics import r_precision_hits
from flowflash.eval.tasks import load_reference, setting_images
from flowflash.fsutil import write_text_atomic


@torch.no_grad()  # the judge scores: no graph to keep
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--prompts", default="plain_v1")
    ap.add_argument("--as-typed", action="store_true", help="no style completion (both shipped models complete since "
                    "stop 26: their plain_v1 numbers from before were drawn as typed)")
    ap.add_argument("--concepts", default="core-wide", help="a concept list of data/concepts/ or a file")
    ap.add_argument("--data", type=Path, default=Path("data/emoji64"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--cache", type=Path, default=Path("runs/eval-cache"))
    ap.add_argument("--out", type=Path, required=True, help="results stem: OUT.json and OUT.md")
    a = ap.parse_args()

    ref = load_reference(a.data, a.prompts)
    listed = load_concept_list(a.concepts)
    inside = torch.tensor([r["concepts"][0] in listed for r in ref.ps.rows])
    judge = ref.judge
    pool = list(dict.fromkeys(ref.ps.captions))
    txt = judge.scorer.embed_texts(encode_texts(judge.minilm, pool))
    idx = torch.tensor([pool.index(c) for c in ref.ps.captions])
    name = Path(a.model).name if Path(a.model).exists() else a.model
    setting = Setting(name=name, model=a.model, steps=a.steps, guidance=a.guidance, complete_style=not a.as_typed)
    per_seed = {}
    for seed in (int(s) for s in a.seeds.split(",")):
        imgs, _ = setting_images(setting, ref.ps, seed=seed, cache=a.cache)
        img = judge.scorer.embed_images(judge.features(imgs))
        hits = r_precision_hits(img, txt, idx, k=10).float()
        cos = 100 * (img * txt[idx]).sum(-1).clamp(min=0)
        avg = lambda v, m: float(v[m].mean()) if m.any() else None
        per_seed[seed] = {g: {"r_precision": avg(hits, m), "clip_score": avg(cos, m), "n": int(m.sum())}
                          for g, m in (("all", torch.ones_like(inside)), ("listed", inside), ("other", ~inside))}
    mean = {g: {k: (None if per_seed[next(iter(per_seed))][g]["n"] == 0
                    else sum(s[g][k] for s in per_seed.values()) / len(per_seed)) for k in ("r_precision", "clip_score")}
            for g in ("all", "listed", "other")}
    res = {"model": a.model, "steps": a.steps, "guidance": a.guidance, "prompt_set": ref.ps.name,
           "concepts": a.concepts, "per_seed": per_seed, "mean": mean}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(a.out.with_suffix(".json"), json.dumps(res, indent=1))
    n = per_seed[next(iter(per_seed))]
    lines = [f"# {name} on {ref.ps.name}, split by `{a.concepts}`", "",
             f"| seed | R-prec@10, all ({n['all']['n']}) | in {a.concepts} ({n['listed']['n']}) | other ({n['other']['n']}) "
             "| CLIP-score analogue, all | in list | other |", "|---|---|---|---|---|---|---|"]
    f = lambda v, spec: "-" if v is None else format(v, spec)
    for seed, s in [*per_seed.items(), ("mean", mean)]:
        lines.append(f"| {seed} | " + " | ".join(f(s[g]["r_precision"], ".3f") for g in ("all", "listed", "other"))
                     + " | " + " | ".join(f(s[g]["clip_score"], ".1f") for g in ("all", "listed", "other")) + " |")
    write_text_atomic(a.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
