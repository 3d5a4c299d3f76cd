"""Scoring generated images with the judge: distribution distances, alignment, compositional checks,
and single-emoji recognition."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import FlowflashError
from .metrics import bootstrap_fd, frechet_distance, kid
from .prompt_set import PromptSet


def score(images: torch.Tensor, ps: PromptSet, judge, real_feats: torch.Tensor,
          ref_feats: dict[str, torch.Tensor] | None = None) -> tuple[dict, torch.Tensor]:
    """Every metric of one image set (uint8, in prompt order) against the real held-out features, plus
    FD to each named reference set. Returns the metrics and the images' features (for later references)."""
    feats = judge.features(images)
    lo, hi = bootstrap_fd(feats, real_feats)
    k_mean, k_std = kid(feats, real_feats)
    res = {"n_images": len(images), "fd_effnetl0": frechet_distance(feats, real_feats), "fd_ci90": [lo, hi],
           "kid_effnetl0": k_mean, "kid_std": k_std}
    for name, f in (ref_feats or {}).items():
        res[f"fd_to_{name}"] = frechet_distance(feats, f)
    res.update(judge.alignment(feats, ps.captions, ps.captions))
    res.update(judge.compositional(images, ps.rows))
    return res, feats


def score_singles(images_u8: torch.Tensor, prompts: list[str], data: Path, judge) -> dict:
    """How recognisable single-emoji images are: for each prompt that is a single-emoji caption of the
    corpus, the rank of its caption among all single-emoji captions (and of its concept among all
    concepts), for the generated image and, as the ceiling of the instrument, for the corpus's own image."""
    from ..data.dataset import load_corpus

    singles = load_corpus(Path(data), None, kinds=("single",))
    first: dict[str, int] = {}  # caption -> its first row (one image per caption is enough)
    for i, c in enumerate(singles.captions):
        first.setdefault(c, i)
    pool = list(first)
    concepts = [singles.rows[first[c]]["concepts"][0] for c in pool]
    # a prompt typed another way ("a dog face", "Dog face emoji": the rows' phrasings) stands for the first row
    # that lists it; a phrasing without a style fits either style, so read its concept ranks, not its caption's
    alias = {}
    for r in singles.rows:
        for text in r.get("phrasings", []):
            alias.setdefault(text, r["caption"])
    caption_of = lambda p: p if p in first else alias.get(p)
    keep = [i for i, p in enumerate(prompts) if caption_of(p) is not None]
    if not keep:
        raise FlowflashError(f"none of the prompts is a single-emoji caption of {data} or one of their phrasings")
    caps = [caption_of(prompts[i]) for i in keep]
    real = singles.images[[first[c] for c in caps]]
    sets = {"generated": judge.features(images_u8[keep]), "real": judge.features(real)}
    return {"prompts": [prompts[i] for i in keep], "captions": caps, **judge.recognition(sets, caps, pool, concepts)}
