"""Pure metric functions on feature tensors: Fréchet distance, KID, bootstrap, R-precision."""
from __future__ import annotations

import numpy as np
import torch


def mean_and_se(values) -> tuple[float, float]:
    """Mean of a few numbers (per-seed scores) and the standard error of that mean (nan for one number)."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("mean_and_se of no values")
    m = sum(v) / len(v)
    se = (sum((x - m) ** 2 for x in v) / (len(v) - 1) / len(v)) ** 0.5 if len(v) > 1 else float("nan")
    return m, se


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between Gaussian fits of two feature sets.

    With centred, scaled data A, B (S_a = A^T A, S_b = B^T B) the non-zero eigenvalues of S_a S_b are the
    squared singular values of A B^T, so Tr (S_a S_b)^1/2 is the sum of those singular values: exact,
    no matrix square root, and an (n_a x n_b) SVD instead of a (d x d) one (d = 1280 here).
    """
    a, b = a.double(), b.double()
    mu1, mu2 = a.mean(0), b.mean(0)
    A = (a - mu1) / max(len(a) - 1, 1) ** 0.5
    B = (b - mu2) / max(len(b) - 1, 1) ** 0.5
    tr_cross = torch.linalg.svdvals(A @ B.T).sum()
    return float(((mu1 - mu2) ** 2).sum() + (A * A).sum() + (B * B).sum() - 2 * tr_cross)


def kid(a: torch.Tensor, b: torch.Tensor, subsets: int = 20, subset_size: int = 100, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance analogue (unbiased MMD^2, cubic polynomial kernel): mean and std over subsets."""
    a, b = a.double(), b.double()
    d = a.shape[1]
    m = min(subset_size, len(a), len(b))
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=g)[:m]]
        y = b[torch.randperm(len(b), generator=g)[:m]]
        k = lambda p, q: (p @ q.T / d + 1) ** 3
        kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
        mmd = ((kxx.sum() - kxx.diag().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diag().sum()) / (m * (m - 1))
               - 2 * kxy.mean())
        vals.append(float(mmd))
    return float(np.mean(vals)), float(np.std(vals))


def bootstrap_fd(a: torch.Tensor, b: torch.Tensor, n: int = 20, seed: int = 0) -> tuple[float, float]:
    """90% bias-corrected bootstrap interval of FD, resampling both sets with replacement.

    Resampled sets hold duplicates, which biases resampled FDs upward; the percentiles are shifted
    by that mean bias so the interval describes the spread around the estimate itself.
    """
    g = torch.Generator().manual_seed(seed)
    vals = [frechet_distance(a[torch.randint(len(a), (len(a),), generator=g)],
                             b[torch.randint(len(b), (len(b),), generator=g)]) for _ in range(n)]
    fd = frechet_distance(a, b)
    bias = float(np.mean(vals)) - fd
    return float(np.percentile(vals, 5)) - bias, float(np.percentile(vals, 95)) - bias


def r_precision(img_emb: torch.Tensor, txt_emb: torch.Tensor, true_idx: torch.Tensor, k: int = 10,
                seed: int = 0) -> float:
    """Share of images whose own caption scores highest among itself and k-1 random other captions.

    img_emb (N, D) and txt_emb (M, D) are unit vectors; true_idx (N,) indexes each image's caption.
    """
    return float(r_precision_hits(img_emb, txt_emb, true_idx, k, seed).float().mean())


def r_precision_hits(img_emb: torch.Tensor, txt_emb: torch.Tensor, true_idx: torch.Tensor, k: int = 10,
                     seed: int = 0) -> torch.Tensor:
    """Per image, whether its own caption wins among k (bool, N): r_precision before the mean. The distractors
    depend only on the seed and the prompts, so two models' hits on one prompt set are paired."""
    g = torch.Generator().manual_seed(seed)
    hits = torch.zeros(len(img_emb), dtype=torch.bool)
    for i in range(len(img_emb)):
        others = torch.randperm(len(txt_emb), generator=g)
        others = others[others != true_idx[i]][: k - 1]
        cand = torch.cat([true_idx[i: i + 1], others])
        s = txt_emb[cand] @ img_emb[i]
        hits[i] = bool(s.argmax() == 0)
    return hits


def caption_ranks(img_emb: torch.Tensor, txt_emb: torch.Tensor, true_idx: torch.Tensor,
                  groups: torch.Tensor | None = None) -> torch.Tensor:
    """1-based rank of each image's own caption among all M captions (1 = scored highest).

    With groups (M,) (e.g. the concept of each caption), rank groups instead, a group scoring as its best
    caption. Ties count against the image, so a constant embedding cannot look good.
    """
    s = img_emb @ txt_emb.T
    if groups is not None:
        s = torch.full((len(s), int(groups.max()) + 1), -torch.inf).scatter_reduce(
            1, groups.expand_as(s), s, "amax")
        true_idx = groups[true_idx]
    own = s.gather(1, true_idx[:, None])
    others = torch.ones_like(s, dtype=torch.bool).scatter_(1, true_idx[:, None], False)
    return 1 + ((s >= own) & others).sum(1)
