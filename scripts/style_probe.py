"""plain_v1 drawn with a style appended to every prompt, judged (as always) against the prompt as typed: R-prec@10
per seed and its mean. The exploration behind issue 15's ninth and tenth looks (docs/benchmarks.md), run on the
used eval seeds 0-5; the looks' rules were then judged with `flowflash eval` on fresh seeds.

    python scripts/style_probe.py MODEL STEPS GUIDANCE MODE SEEDS
    python scripts/style_probe.py student 4 1 twemoji 0,1,2,3,4,5
    python scripts/style_probe.py teacher 50 4 twemoji 0,1,2,3,4,5

MODE: plain (as typed), twemoji, fluent, or alt (twemoji on even seeds, fluent on odd).
"""
import json
import sys
from pathlib import Path

import torch

from flowflash.eval.generate import Setting
from flowflash.eval.judge import encode_texts
from flowflash.eval.metrics import r_precision_hits
from flowflash.eval.prompt_set import PromptSet
from flowflash.eval.tasks import load_reference, setting_images

STYLES = ("twemoji style", "fluent flat style")


def main():
    model, steps, guidance, mode = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    seeds = [int(s) for s in sys.argv[5].split(",")]
    ref = load_reference(Path("data/emoji64"), "plain_v1")
    judge = ref.judge
    pool = list(dict.fromkeys(ref.ps.captions))
    txt = judge.scorer.embed_texts(encode_texts(judge.minilm, pool))
    idx = torch.tensor([pool.index(c) for c in ref.ps.captions])
    out = []
    for seed in seeds:
        style = {"alt": STYLES[seed % 2], "twemoji": STYLES[0], "fluent": STYLES[1]}.get(mode)
        rows = [dict(r, caption=r["caption"] if style is None else f'{r["caption"]}, {style}') for r in ref.ps.rows]
        # its own cache key, which follows plain_v1's contents
        ps = PromptSet(f"plain_v1-{style}", ref.ps.sha if style is None else f"{ref.ps.sha}+{style}", rows)
        # as typed here, whatever the model's config says: the probe appends the style itself
        setting = Setting(name=Path(model).name, model=model, steps=steps, guidance=guidance, complete_style=False)
        imgs, _ = setting_images(setting, ps, seed=seed, cache=Path("runs/eval-cache"))
        img = judge.scorer.embed_images(judge.features(imgs))
        out.append(float(r_precision_hits(img, txt, idx, k=10).float().mean()))
    print(json.dumps({"model": model, "mode": mode, "per_seed": out, "mean": sum(out) / len(out)}))


if __name__ == "__main__":
    main()
