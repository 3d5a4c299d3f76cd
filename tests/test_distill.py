"""Distillation methods on tiny models: who changes on which step, timestep sharing, merge, resume."""
import dataclasses
import json

import pytest
import torch

from flowflash.distill import METHODS, Batch, DistillConfig
from flowflash.distill.merge import interpolate
from flowflash.distill.schedule import student_schedule
from flowflash.distill.trainer import distill
from flowflash.errors import FlowflashError
from flowflash.models.flow_model import FlowModel, load_model, save_model
from tests.conftest import tiny_model_config


@pytest.fixture
def teacher_dir(tmp_path, tiny_corpus):
    from flowflash.data.dataset import load_corpus
    from flowflash.models.text import WordTokenizer
    torch.manual_seed(0)
    vocab = WordTokenizer.build(load_corpus(tiny_corpus).captions).vocab
    folder = tmp_path / "teacher"
    save_model(FlowModel(tiny_model_config(vocab=vocab, light_max_tokens=16, minilm_max_tokens=16)), folder)
    return folder


def cfg(teacher_dir, corpus, out, method, **kw):
    base = dict(teacher=str(teacher_dir), data=str(corpus), out=str(out), method=method, student_steps=2,
                steps=4, batch_size=2, critic_ratio=1, gan_blocks=[0], ckpt_every=2, sample_every=1000,
                log_every=1, lr=1e-3, lr_critic=1e-3, guidance=2.0)
    base.update(kw)
    return DistillConfig(**base)


def tiny_batch(teacher, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randint(2, len(teacher.cfg.vocab) + 2, (b, 16), generator=g), torch.randn(b, 16, 384, generator=g),
                 torch.randn(b, 384, generator=g), torch.randn(b, 3, 16, 16, generator=g),
                 torch.rand(b, 3, 16, 16, generator=g) * 2 - 1)


def snapshot(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def changed(before, m):
    return {k for k, v in m.state_dict().items() if not torch.equal(before[k], v)}


def make(method, teacher_dir, tmp_path, tiny_corpus, **kw):
    teacher = load_model(teacher_dir)
    return METHODS[method](cfg(teacher_dir, tiny_corpus, tmp_path, method, **kw), teacher), teacher


def test_tg_moves_only_the_student(teacher_dir, tmp_path, tiny_corpus):
    m, teacher = make("tg", teacher_dir, tmp_path, tiny_corpus)
    t0, s0 = snapshot(teacher), snapshot(m.student)
    losses = m.train_step(tiny_batch(teacher), 0)
    assert set(losses) == {"tg"} and torch.isfinite(losses["tg"])
    assert not changed(t0, teacher) and changed(s0, m.student)


@pytest.mark.parametrize("method", ["flash", "dmd2"])
def test_critic_step_then_student_step(method, teacher_dir, tmp_path, tiny_corpus):
    m, teacher = make(method, teacher_dir, tmp_path, tiny_corpus, head_reinit_p=0.0)
    b = tiny_batch(teacher)
    t0, s0, c0, h0 = snapshot(teacher), snapshot(m.student), snapshot(m.critic), snapshot(m.heads)
    assert not m.is_student_step(0) and m.is_student_step(1)
    losses = m.train_step(b, 0)  # critic step
    assert set(losses) == {"critic", "gan_d"}
    assert not changed(t0, teacher) and not changed(s0, m.student)
    assert changed(c0, m.critic) and changed(h0, m.heads)
    c1, h1 = snapshot(m.critic), snapshot(m.heads)
    losses = m.train_step(b, 1)  # student step
    assert set(losses) == {"dm", "gan_g"}
    assert not changed(t0, teacher) and not changed(c1, m.critic) and not changed(h1, m.heads)
    assert changed(s0, m.student)


def test_timestep_sharing_uses_schedule_times_and_no_fresh_noise(teacher_dir, tmp_path, tiny_corpus):
    m, teacher = make("flash", teacher_dir, tmp_path, tiny_corpus, adversarial=False, student_steps=4)
    for step in range(1, 12, 2):
        m.train_step(tiny_batch(teacher, seed=step), step)
        assert all(float(t) in m.schedule[:-1] for t in m.last_match_t)
    assert m.fresh_noise_draws == 0
    d, _ = make("dmd2", teacher_dir, tmp_path, tiny_corpus, adversarial=False, student_steps=4)
    d.train_step(tiny_batch(teacher), 1)
    assert d.fresh_noise_draws == 1 and not any(float(t) in d.schedule for t in d.last_match_t)


def test_split_branch_trains_only_its_range(teacher_dir, tmp_path, tiny_corpus):
    m, _ = make("flash", teacher_dir, tmp_path, tiny_corpus, split="low", student_steps=4, student_shift=1.0)
    assert m.train_steps == [2, 3] and all(m.schedule[i] <= 0.5 for i in m.train_steps)
    m, _ = make("flash", teacher_dir, tmp_path, tiny_corpus, split="high", student_steps=4, student_shift=1.0)
    assert m.train_steps == [0, 1]


def test_merge_is_the_stated_interpolation():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor([3])}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor([3])}
    out = interpolate(a, b, 0.3)
    assert torch.allclose(out["w"], 0.3 * a["w"] + 0.7 * b["w"]) and torch.equal(out["n"], a["n"])
    with pytest.raises(ValueError, match="ratio"):
        interpolate(a, b, 1.5)


def test_schedule_errors():
    assert student_schedule(2, 1.0) == [1.0, 0.5, 0.0]
    with pytest.raises(FlowflashError, match=r"\(0, 1\]"):
        student_schedule(2, 1.0, [1.5, 0.5, 0.0])
    with pytest.raises(FlowflashError, match="ends at 0"):
        student_schedule(2, 1.0, [1.0, 0.5])


def test_resume_reproduces_the_same_next_losses(teacher_dir, tmp_path, tiny_corpus):
    distill(cfg(teacher_dir, tiny_corpus, tmp_path / "full", "flash"))
    distill(cfg(teacher_dir, tiny_corpus, tmp_path / "split", "flash"), max_steps=2)
    distill(cfg(teacher_dir, tiny_corpus, tmp_path / "split", "flash"), resume=True)
    read = lambda p: [json.loads(l) for l in (p / "log.jsonl").read_text().splitlines()]
    full, split = read(tmp_path / "full"), read(tmp_path / "split")
    assert [{k: v for k, v in r.items() if k != "time"} for r in full] == \
           [{k: v for k, v in r.items() if k != "time"} for r in split]
    student = load_model(tmp_path / "full" / "student")
    assert student.cfg.kind == "student" and len(student.cfg.schedule) == 3 and student.cfg.default_guidance == 1.0


def test_naive_exports_the_teacher_with_the_schedule(teacher_dir, tmp_path, tiny_corpus):
    out = distill(cfg(teacher_dir, tiny_corpus, tmp_path / "naive", "naive"))
    s, t = load_model(out), load_model(teacher_dir)
    assert s.cfg.schedule == [1.0, 0.5, 0.0] and s.cfg.default_guidance == t.cfg.default_guidance
    assert all(torch.equal(a, b) for a, b in zip(s.state_dict().values(), t.state_dict().values()))


def test_unknown_method_and_mismatched_data(teacher_dir, tmp_path, tiny_corpus):
    with pytest.raises(FlowflashError, match="unknown method"):
        distill(cfg(teacher_dir, tiny_corpus, tmp_path / "x", "magic"))
    big = load_model(teacher_dir)
    big.cfg.image_size = 32
    bad = tmp_path / "bigteacher"
    save_model(FlowModel(dataclasses.replace(big.cfg, image_size=32, patch_size=4)), bad)
    with pytest.raises(FlowflashError, match="teacher and data do not match"):
        distill(cfg(bad, tiny_corpus, tmp_path / "y", "tg"))


def test_gradient_variance_sharing_vs_renoise(teacher_dir, tmp_path, tiny_corpus):
    from flowflash.distill.diagnostics import compare_sharing, gradient_variance
    # One trainable student step (split high of a 2-step schedule): with timestep sharing nothing is left
    # to sample, so the draws agree exactly; re-noising draws fresh noise and times, so they do not.
    m, teacher = make("flash", teacher_dir, tmp_path, tiny_corpus, split="high", adversarial=False)
    b = tiny_batch(teacher)
    s0 = snapshot(m.student)
    res = compare_sharing(m, b, draws=4)
    assert res["sharing"]["total_variance"] == 0.0 and res["sharing"]["mean_grad_sq_norm"] > 0
    assert res["renoise"]["total_variance"] > 0
    assert changed(s0, m.student) == set()  # measuring does not train
    with pytest.raises(ValueError, match="at least 2"):
        gradient_variance(m, b, draws=1)


def test_measure_variance_from_a_config(teacher_dir, tmp_path, tiny_corpus):
    from flowflash.distill.trainer import measure_variance
    res = measure_variance(cfg(teacher_dir, tiny_corpus, tmp_path / "v", "flash", adversarial=False), draws=3,
                           batch_size=2)
    assert res["sharing"]["draws"] == 3 and res["renoise"]["total_variance"] > 0
    assert res["ratio_renoise_over_sharing"] > 0
    with pytest.raises(FlowflashError, match="no distribution-matching gradient"):
        measure_variance(cfg(teacher_dir, tiny_corpus, tmp_path / "w", "tg"), draws=3)
