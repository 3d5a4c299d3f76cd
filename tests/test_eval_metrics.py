"""Metric code on tiny inputs: each metric must move the way it claims to."""
import numpy as np
import pytest
import torch

from flowflash.eval import compose
from flowflash.eval.bench import parse_setting
from flowflash.eval.metrics import bootstrap_fd, caption_ranks, frechet_distance, kid, r_precision
from flowflash.eval.scorer import clip_loss, train_scorer
from flowflash.errors import FlowflashError


def feats(n=400, d=16, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_fd_self_is_zero_and_grows_with_noise():
    a = feats()
    assert abs(frechet_distance(a, a)) < 1e-6
    g = torch.Generator().manual_seed(1)
    fds = [frechet_distance(a, a + s * torch.randn(a.shape, generator=g, dtype=torch.float64)) for s in (0.1, 0.5, 1.0)]
    assert fds[0] < fds[1] < fds[2]
    assert frechet_distance(a, a + 3.0) == pytest.approx(9.0 * a.shape[1], rel=1e-6)  # pure mean shift


def test_kid_and_bootstrap():
    a, b = feats(seed=0), feats(seed=1)
    same, _ = kid(a, b)
    far, _ = kid(a, b + 1.0)
    assert abs(same) < far
    lo, hi = bootstrap_fd(a, b + 0.5, n=10)
    assert lo <= frechet_distance(a, b + 0.5) <= hi and lo < hi


def test_r_precision_real_beats_shuffled():
    g = torch.Generator().manual_seed(0)
    txt = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=-1)
    img = torch.nn.functional.normalize(txt + 0.3 * torch.randn(50, 8, generator=g), dim=-1)
    idx = torch.arange(50)
    real = r_precision(img, txt, idx, k=10)
    shuffled = r_precision(img, txt, idx[torch.randperm(50, generator=g)], k=10)
    assert real > 0.8 and shuffled < 0.4
    # per-image hits: their mean is the score, and an image set that differs in one image differs in one hit only
    from flowflash.eval.metrics import r_precision_hits
    hits = r_precision_hits(img, txt, idx, k=10)
    assert hits.dtype == torch.bool and hits.float().mean().item() == real
    other = img.clone()
    other[int(hits.nonzero()[0])] = -txt[int(hits.nonzero()[0])]  # the first hit made a sure miss
    changed = (r_precision_hits(other, txt, idx, k=10) != hits).nonzero().flatten().tolist()
    assert changed == [int(hits.nonzero()[0])]


def test_scorer_learns_pairs():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(40, 12, generator=g)
    proj = torch.randn(12, 20, generator=g)
    i = t @ proj + 0.1 * torch.randn(40, 20, generator=g)
    m = train_scorer(i, t, torch.arange(40), steps=200, batch=40)
    sims = m.embed_images(i) @ m.embed_texts(t).T
    assert (sims.argmax(1) == torch.arange(40)).float().mean() > 0.9


def test_clip_loss_leaves_duplicate_captions_out_of_the_negatives():
    """clip_loss promises: for each image (and, transposed, each caption) the softmax runs over its own
    pair and the pairs of *other* captions only; rows sharing its caption are neither positives nor
    negatives. So it equals InfoNCE with those rows removed from each anchor's candidates, is strictly
    lower than counting them as negatives, and is plain symmetric InfoNCE when all captions differ."""
    F = torch.nn.functional
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 4, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 4, generator=g), dim=-1)
    ids = torch.tensor([0, 0, 1, 2, 1, 3])
    scale = torch.tensor(1.5)
    logits = scale.exp() * img @ txt.T

    def without_duplicates(lg: torch.Tensor) -> torch.Tensor:
        terms = []
        for i in range(len(ids)):
            keep = (ids != ids[i]) | (torch.arange(len(ids)) == i)
            own = int(keep[:i].sum())  # where anchor i's own pair sits among the kept candidates
            terms.append(-torch.log_softmax(lg[i][keep], 0)[own])
        return torch.stack(terms).mean()

    loss = clip_loss(img, txt, scale, ids)
    assert loss.item() == pytest.approx(((without_duplicates(logits) + without_duplicates(logits.T)) / 2).item(),
                                        rel=1e-6)
    target = torch.arange(len(ids))
    as_negatives = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    assert loss < as_negatives
    assert clip_loss(img, txt, scale, torch.arange(6)).item() == pytest.approx(as_negatives.item(), rel=1e-6)


def draw(bg, blobs, size=64):
    img = np.zeros((size, size, 3), np.uint8)
    img[:] = bg
    for (y, x, r, col) in blobs:
        yy, xx = np.ogrid[:size, :size]
        img[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = col
    return img


def test_compositional_pixel_checks():
    from flowflash.data.constants import COLORS
    img = draw(COLORS["blue"], [(32, 12, 6, (250, 250, 0)), (32, 32, 6, (250, 0, 0)), (32, 52, 6, (0, 200, 0))])
    assert compose.background_name(img) == "blue"
    assert compose.count_objects(img) == 3
    assert compose.count_objects(draw(COLORS["pink"], [(20, 20, 8, (0, 0, 0))])) == 1
    left, right = compose.halves(img, "lr")
    assert left.shape == img.shape and (left[32, 12 + 16] == (250, 250, 0)).all()  # left half, centred
    top, bottom = compose.halves(draw(COLORS["red"], [(10, 32, 5, (0, 0, 0))]), "tb")
    assert (top == 0).all(-1).any() and not (bottom == 0).all(-1).any()


def test_setting_parser_errors():
    s = parse_setting("t4=model:teacher,steps:4,guidance:1")
    assert (s.name, s.model, s.steps, s.guidance) == ("t4", "teacher", 4, 1.0)
    with pytest.raises(FlowflashError, match="unknown option 'stepz'"):
        parse_setting("t4=stepz:4")
    with pytest.raises(FlowflashError, match="bad value for steps"):
        parse_setting("t4=steps:four")


def test_effnet_architecture_matches_packaged_weights():
    from flowflash.eval.effnet import effnet_features, load_effnet
    m = load_effnet()  # strict load: every tensor name and shape of the lukemelas layout must match
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    f = effnet_features(m, x, size=64)
    assert f.shape == (2, 1280) and torch.isfinite(f).all()


def test_fd_matches_the_matrix_square_root_formula():
    from scipy import linalg
    a, b = feats(60, 8, 0).numpy(), (feats(50, 8, 1) * 1.5 + 0.2).numpy()
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(ref, rel=1e-8)


def test_caption_ranks_counts_ties_against_the_image():
    txt = torch.eye(4)
    img = torch.tensor([[1.0, 0, 0, 0], [0.6, 0.8, 0, 0], [0.25, 0.25, 0.25, 0.25]])
    ranks = caption_ranks(img, txt, torch.tensor([0, 0, 2]))
    # image 0 picks its own caption; image 1 prefers caption 1; image 2 scores all four equally.
    assert ranks.tolist() == [1, 2, 4]
    # grouped: captions 0 and 1 are one concept, so image 1 now finds its group first.
    groups = torch.tensor([0, 0, 1, 2])
    assert caption_ranks(img, txt, torch.tensor([0, 0, 2]), groups).tolist() == [1, 1, 3]


def test_mean_and_se_over_seeds():
    import math

    from flowflash.eval.metrics import mean_and_se
    m, se = mean_and_se([0.25, 0.5, 0.75])
    assert m == 0.5 and abs(se - math.sqrt(0.0625 / 3)) < 1e-12  # sample variance / n, square-rooted
    assert math.isnan(mean_and_se([0.3])[1])
    with pytest.raises(ValueError, match="no values"):
        mean_and_se([])
