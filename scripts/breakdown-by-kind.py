"""CLIP-score analogue and R-precision@10 of cached evaluation images, split into core singles, other
singles and scenes (captions drawn from the whole prompt set, as in `eval`). Reads every setting cached in
runs/eval-cache by a `flowflash bench --quality --cache runs/eval-cache` run.

Usage: .venv/bin/python scripts/breakdown-by-kind.py
"""
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open
from flowflash.eval.judge import Judge
from flowflash.eval.prompt_set import load_prompt_set
from flowflash.data.dataset import load_concept_list
core = load_concept_list("core")
ps = load_prompt_set("eval_v1")
judge = Judge.load()
sets = {}
for f in sorted(Path("runs/eval-cache").glob("*.safetensors")):
    with safe_open(str(f), "pt") as h: name = h.metadata().get("setting")
    sets[name] = load_file(str(f))["images"]
groups = {"core singles": lambda r: r["kind"] == "single" and r["concepts"][0] in core,
          "other singles": lambda r: r["kind"] == "single" and r["concepts"][0] not in core,
          "scenes": lambda r: r["kind"] != "single"}
torch.manual_seed(0)
for name, imgs in sets.items():
    feats = judge.features(imgs)
    out = []
    for g, pred in groups.items():
        idx = [i for i, r in enumerate(ps.rows) if pred(r)]
        torch.manual_seed(0)
        a = judge.alignment(feats[idx], [ps.captions[i] for i in idx], ps.captions)
        out.append(f"{g} (n={len(idx)}): CLIP {a['clip_score']:.1f} R@10 {a['r_precision']:.3f}")
    print(name, imgs.shape[0], " | ".join(out))
