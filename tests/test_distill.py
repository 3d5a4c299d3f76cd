"""Distillation methods on tiny models: who changes on which step, timestep sharing, merge, resume."""
import dataclasses
import json

import pytest
import torch

from flowflash.errors import FlowflashError
from flowflash.methods import DISTILL_METHODS as METHODS
from flowflash.methods.merge import interpolate
from flowflash.methods.schedule import student_schedule
from flowflash.train.configs import DistillConfig
from flowflash.train.data import Batch, PoolSampler
from flowflash.train.loop import run_step
from flowflash.train.run import distill
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
                steps=4, batch_size=2, ckpt_every=2, sample_every=1000, log_every=1, lr=1e-3, guidance=2.0)
    if method in ("flash", "dmd2"):  # only what the method reads: others are refused
        base.update(critic_ratio=1, lr_critic=1e-3, **({"gan_blocks": [0]} if kw.get("adversarial", True) else {}))
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
    out = run_step(m, tiny_batch(teacher), 0)
    assert set(out.logs) == {"tg"} and out.step == ("student",) and torch.isfinite(out.logs["tg"])
    assert not changed(t0, teacher) and changed(s0, m.student)


@pytest.mark.parametrize("method", ["flash", "dmd2"])
def test_critic_step_then_student_step(method, teacher_dir, tmp_path, tiny_corpus):
    m, teacher = make(method, teacher_dir, tmp_path, tiny_corpus, head_reinit_p=0.0)
    b = tiny_batch(teacher)
    t0, s0, c0, h0 = snapshot(teacher), snapshot(m.student), snapshot(m.critic), snapshot(m.heads)
    assert not m.is_student_step(0) and m.is_student_step(1)
    out = run_step(m, b, 0)  # critic step: one optimizer for the critic and its heads
    assert set(out.logs) == {"critic", "gan_d"} and out.step == ("critic",)
    assert not changed(t0, teacher) and not changed(s0, m.student)
    assert changed(c0, m.critic) and changed(h0, m.heads)
    c1, h1 = snapshot(m.critic), snapshot(m.heads)
    out = run_step(m, b, 1)  # student step
    assert set(out.logs) == {"dm", "gan_g"} and out.step == ("student",)
    assert not changed(t0, teacher) and not changed(c1, m.critic) and not changed(h1, m.heads)
    assert changed(s0, m.student)
    # the heads took part in the student's loss, but a network that did not step keeps no gradient
    assert all(p.grad is None for p in list(m.heads.parameters()) + list(m.critic.parameters()))


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
    m, _ = make("flash", teacher_dir, tmp_path, tiny_corpus, split="low", student_steps=2, student_shift=1.5, split_at=0.7)
    assert m.schedule[1] == 0.6 and m.train_steps == [1]  # a 2-step schedule (1, 0.6) split between its times
    with pytest.raises(FlowflashError, match=r"no student step"):
        make("flash", teacher_dir, tmp_path, tiny_corpus, split="low", student_steps=2, student_shift=1.5)
    with pytest.raises(FlowflashError, match="split_at"):
        make("flash", teacher_dir, tmp_path, tiny_corpus, split="low", split_at=1.0)


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
    clock = {"time", "img_s"}  # wall-clock fields differ between runs; everything else must not
    assert [{k: v for k, v in r.items() if k not in clock} for r in full] == \
           [{k: v for k, v in r.items() if k not in clock} for r in split]
    student = load_model(tmp_path / "full" / "student")
    assert student.cfg.kind == "student" and len(student.cfg.sampling.schedule) == 3
    assert student.cfg.sampling.guidance == 1.0


def test_naive_exports_the_teacher_with_the_schedule(teacher_dir, tmp_path, tiny_corpus):
    out = distill(DistillConfig(method="naive", teacher=str(teacher_dir), out=str(tmp_path / "naive"), student_steps=2))
    s, t = load_model(out), load_model(teacher_dir)
    assert s.cfg.sampling.schedule == (1.0, 0.5, 0.0) and s.cfg.sampling.guidance == t.cfg.sampling.guidance
    assert all(torch.equal(a, b) for a, b in zip(s.state_dict().values(), t.state_dict().values()))


def test_unknown_method_and_mismatched_data(teacher_dir, tmp_path, tiny_corpus):
    with pytest.raises(FlowflashError, match="unknown method"):
        distill(cfg(teacher_dir, tiny_corpus, tmp_path / "x", "magic"))
    big = load_model(teacher_dir)
    bad = tmp_path / "bigteacher"
    save_model(FlowModel(dataclasses.replace(big.cfg, image_size=32, patch_size=4)), bad)
    with pytest.raises(FlowflashError, match="model and data do not match"):
        distill(cfg(bad, tiny_corpus, tmp_path / "y", "tg"))


def test_gradient_variance_sharing_vs_renoise(teacher_dir, tmp_path, tiny_corpus):
    from flowflash.methods.diagnostics import compare_sharing, gradient_variance
    # One trainable student step (split high of a 2-step schedule): with timestep sharing and the normaliser at
    # the matching point (the old arm) nothing is left to sample, so the draws agree exactly; re-noising draws
    # fresh noise and times, so they do not.
    m, teacher = make("flash", teacher_dir, tmp_path, tiny_corpus, split="high", adversarial=False,
                      dm_norm="matching")
    b = tiny_batch(teacher)
    s0 = snapshot(m.student)
    res = compare_sharing(m, b, draws=4)
    assert res["sharing"]["total_variance"] == 0.0 and res["sharing"]["mean_grad_sq_norm"] > 0
    assert res["renoise"]["total_variance"] > 0
    assert changed(s0, m.student) == set()  # measuring does not train
    with pytest.raises(ValueError, match="at least 2"):
        gradient_variance(m, b, draws=1)


def test_measure_variance_from_a_config(teacher_dir, tmp_path, tiny_corpus):
    from flowflash.train.run import measure_variance
    res = measure_variance(cfg(teacher_dir, tiny_corpus, tmp_path / "v", "flash", adversarial=False), draws=3,
                           batch_size=2)
    assert res["sharing"]["draws"] == 3 and res["renoise"]["total_variance"] > 0
    assert res["ratio_renoise_over_sharing"] > 0
    with pytest.raises(FlowflashError, match="no distribution-matching gradient"):
        measure_variance(cfg(teacher_dir, tiny_corpus, tmp_path / "w", "tg"), draws=3)


def test_tg_pool_integrates_each_entry_once(teacher_dir, tmp_path, tiny_corpus):
    from flowflash.train.common import init_dist
    from flowflash.train.run import distill_setup
    su = distill_setup(cfg(teacher_dir, tiny_corpus, tmp_path, "tg", tg_pool=3, batch_size=4), init_dist())
    m, gen = su.method, torch.Generator().manual_seed(0)
    draw = PoolSampler(su.bank, 3, seed=5)
    assert torch.equal(draw.pool_noise, PoolSampler(su.bank, 3, seed=5).pool_noise)  # the same pool after a resume
    first = draw(4, gen)
    assert first.key is not None and torch.equal(first.noise, draw.pool_noise[first.key])
    states = m.teacher_states(first)
    assert m.teacher_rows == len(first.key.unique())  # duplicates within a batch are integrated once
    fresh = m.integrate(first)  # the memo returns the teacher's own trajectory
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(states, fresh))
    rows = m.teacher_rows
    while not bool(m.banked.all()):
        m.teacher_states(draw(4, gen))
    done = m.teacher_rows
    for _ in range(3):
        m.train_step(draw(4, gen), 0)
    assert m.teacher_rows == done and done - rows <= 3  # the pool of 3 is never integrated twice


def test_flags_a_method_ignores_are_refused(teacher_dir, tmp_path, tiny_corpus):
    with pytest.raises(FlowflashError, match="method 'flash' does not use tg_pool"):
        distill(cfg(teacher_dir, tiny_corpus, tmp_path / "f", "flash", tg_pool=3))
    with pytest.raises(FlowflashError, match="method 'tg' does not use lr_critic, critic_ratio"):
        distill(cfg(teacher_dir, tiny_corpus, tmp_path / "t", "tg", lr_critic=1.0, critic_ratio=2))
    with pytest.raises(FlowflashError, match="method 'naive' does not use guidance"):
        distill(DistillConfig(method="naive", teacher=str(teacher_dir), out=str(tmp_path / "n"), guidance=3.0))
    with pytest.raises(FlowflashError, match="does not use student_steps when an explicit schedule is given"):
        distill(cfg(teacher_dir, tiny_corpus, tmp_path / "s", "tg", schedule=[1.0, 0.4, 0.0], student_steps=3))
    with pytest.raises(FlowflashError, match="does not use split_at without a split branch"):
        distill(cfg(teacher_dir, tiny_corpus, tmp_path / "s", "tg", split_at=0.3))
    with pytest.raises(FlowflashError, match="does not use gan_weight with adversarial: false"):
        distill(cfg(teacher_dir, tiny_corpus, tmp_path / "s", "flash", adversarial=False, gan_weight=0.5))
    with pytest.raises(FlowflashError, match="'naive' does not use data, steps, batch_size"):
        distill(cfg(teacher_dir, tiny_corpus, tmp_path / "s", "naive"))  # cfg sets lr: naive trains nothing
    with pytest.raises(FlowflashError, match="timestep sharing is method flash"):
        make("dmd2", teacher_dir, tmp_path, tiny_corpus, timestep_sharing=True)
    assert not make("dmd2", teacher_dir, tmp_path, tiny_corpus)[0].sharing
    assert make("flash", teacher_dir, tmp_path, tiny_corpus)[0].sharing
    assert not make("flash", teacher_dir, tmp_path, tiny_corpus, timestep_sharing=False)[0].sharing
    assert not (tmp_path / "f").exists() and not (tmp_path / "t").exists()  # refused before the run folder


def test_ema_averages_only_the_students_own_updates(teacher_dir, tmp_path, tiny_corpus):
    from safetensors.torch import load_file
    # critic_ratio 1: steps 0 and 2 step the critic, steps 1 and 3 the student. The student's EMA must move
    # on step 1 and stay put on step 2 (a critic step), although the loop's step count went on.
    c = cfg(teacher_dir, tiny_corpus, tmp_path / "e", "dmd2", ckpt_every=1, ema=0.5)
    ema_after = []
    for k in range(3):
        distill(c, resume=k > 0, max_steps=1)
        ema_after.append(load_file(tmp_path / "e" / "checkpoint" / "student_ema.safetensors"))
    moved = lambda a, b: any(not torch.equal(a[k], b[k]) for k in a)
    assert not moved(ema_after[0], load_model(teacher_dir).state_dict())  # step 0: critic only
    assert moved(ema_after[1], ema_after[0])  # step 1: the student stepped
    assert not moved(ema_after[2], ema_after[1])  # step 2: critic only again


def test_ship_student_writes_card_and_refuses_a_teacher(teacher_dir, tmp_path, tiny_corpus, capsys):
    from flowflash.cli import main
    out = distill(cfg(teacher_dir, tiny_corpus, tmp_path / "tg", "tg", p_single=0.5, p_phrasing=0.5))
    dest = tmp_path / "emoji-student"
    code = main(["train", "ship", "--student", str(out), "--stages", str(tmp_path / "tg"), "--to", str(dest),
                 "--command", "scripts/distill-emoji.sh"])
    assert code == 0
    m = load_model(dest)
    assert m.cfg.name == "emoji-student" and m.cfg.kind == "student" and m.cfg.sampling.guidance == 1.0
    card = (dest / "README.md").read_text()
    assert "2-step, CFG-free" in card and "method `tg`" in card and "scripts/distill-emoji.sh" in card
    assert ("single emoji 0.5 of each batch, a single captioned with another phrasing 0.5 of the time (the teacher "
            "asked the corpus caption)") in card
    assert (dest / "ATTRIBUTION.md").read_text() == (tiny_corpus / "ATTRIBUTION.md").read_text()
    assert main(["train", "ship", "--student", str(teacher_dir), "--stages", str(tmp_path / "tg"),
                 "--to", str(tmp_path / "x"), "--command", "c"]) == 2
    assert "is not a student" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(teacher_dir, tmp_path, tiny_corpus,
                                                                         monkeypatch):
    import flowflash.methods.dmd2 as dmd
    real, calls = dmd.flow_matching, []

    def poisoned(*a):  # the critic's loss turns NaN on its third call (step 2 with critic_ratio 1: 0, 2 critic)
        calls.append(1)
        return real(*a) * float("nan") if len(calls) == 2 else real(*a)
    monkeypatch.setattr(dmd, "flow_matching", poisoned)
    with pytest.raises(FlowflashError, match=r"non-finite critic loss at step 2.*Last good checkpoint: .*checkpoint"):
        distill(cfg(teacher_dir, tiny_corpus, tmp_path / "nan", "flash", steps=6, ckpt_every=2))
    state = json.loads((tmp_path / "nan/checkpoint/state.json").read_text())
    assert state["state"]["step"] == 2  # the checkpoint before the bad step, not overwritten


@pytest.mark.slow
def test_sigkill_then_resume_loses_at_most_one_checkpoint_interval(teacher_dir, tmp_path, tiny_corpus):
    import os
    import signal
    import subprocess
    import sys
    import time
    import yaml
    out = tmp_path / "killed"
    c = dataclasses.asdict(cfg(teacher_dir, tiny_corpus, out, "flash", steps=400, ckpt_every=3))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(c))
    cmd = [sys.executable, "-m", "flowflash.cli", "distill", "--method", "flash", "--config", str(tmp_path / "c.yaml")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 8):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    logged = max(json.loads(l)["step"] for l in log.read_text().splitlines())
    saved = json.loads((out / "checkpoint/state.json").read_text())["state"]["step"]
    assert logged >= 8 and logged - saved <= 3  # at most one interval of work lost
    c["steps"] = saved + 2
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(c))
    assert subprocess.run(cmd + ["--resume"], capture_output=True).returncode == 0
    assert json.loads((out / "checkpoint/state.json").read_text())["state"]["step"] == saved + 2


@pytest.mark.slow
def test_torchrun_two_processes_distill_flash(teacher_dir, tmp_path, tiny_corpus, torchrun):
    """The same trainer under torchrun (gloo, 2 CPU processes) runs to the end: checkpoint and student."""
    import yaml
    c = dataclasses.asdict(cfg(teacher_dir, tiny_corpus, tmp_path / "ddp", "flash", batch_size=4))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(c))
    torchrun(["distill", "--method", "flash", "--config", str(tmp_path / "c.yaml")])
    assert json.loads((tmp_path / "ddp/checkpoint/state.json").read_text())["state"]["step"] == 4
    assert load_model(tmp_path / "ddp" / "student").cfg.kind == "student"


def test_cli_teacher_and_out_override_the_config(teacher_dir, tmp_path, tiny_corpus, capsys):
    from flowflash.cli import main

    conf = tmp_path / "c.yaml"
    conf.write_text(f"teacher: /no/such/teacher\nout: {tmp_path / 'cfg-out'}\nstudent_steps: 2\n")
    code = main(["distill", "--method", "naive", "--config", str(conf)])
    assert code == 2 and "unknown model '/no/such/teacher'" in capsys.readouterr().err
    code = main(["distill", "--method", "naive", "--config", str(conf), "--teacher", str(teacher_dir),
                 "--out", str(tmp_path / "cli-out")])
    assert code == 0 and (tmp_path / "cli-out" / "student").is_dir() and not (tmp_path / "cfg-out").exists()
    assert json.loads((tmp_path / "cli-out" / "config.json").read_text())["teacher"] == str(teacher_dir)


def test_cli_method_defaults_to_dmd2_unless_the_config_or_the_flag_names_one(tmp_path):
    """Issue 14's protocol picked re-noised matching: the config-free form runs dmd2; a YAML's method: still
    counts when --method is absent, and the flag beats both."""
    from flowflash.cli import build_parser, distill_config

    conf = tmp_path / "c.yaml"
    conf.write_text("method: naive\nstudent_steps: 2\n")
    parse = lambda *argv: distill_config(build_parser().parse_args(["distill", *argv]))
    assert parse().method == "dmd2"
    assert parse("--config", str(conf)).method == "naive"
    assert parse("--config", str(conf), "--method", "flash").method == "flash"
    assert parse("--method", "tg", "--student-steps", "2").student_steps == 2


def test_placed_samplers_draw_their_noise_from_a_generator_of_their_own(teacher_dir, tmp_path, tiny_corpus):
    """What a GPU run does (bank on the device, noise drawn there), exercised on the CPU: the rows still come
    from the data generator, the noise from the placed generator, reproducibly by its seed."""
    from flowflash.train.common import init_dist
    from flowflash.train.data import RowSampler
    from flowflash.train.run import distill_setup
    su = distill_setup(cfg(teacher_dir, tiny_corpus, tmp_path, "tg"), init_dist())
    rows = torch.arange(len(su.bank))
    plain, placed = RowSampler(su.bank, rows, rows[:0]), RowSampler(su.bank, rows, rows[:0])
    gens = placed.place(torch.device("cpu"), seed=3)
    assert set(gens) == {"noise"}
    a, b = plain(4, torch.Generator().manual_seed(0)), placed(4, torch.Generator().manual_seed(0))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.real, b.real)  # same rows
    assert not torch.equal(a.noise, b.noise)  # noise from the placed generator
    again = RowSampler(su.bank, rows, rows[:0])
    again.place(torch.device("cpu"), seed=3)
    assert torch.equal(again(4, torch.Generator().manual_seed(0)).noise, b.noise)


def test_until_step_stops_at_a_step_number_also_after_a_resume(teacher_dir, tmp_path, tiny_corpus):
    # --max-steps counts one invocation's steps; exporting a run at fixed points needs step numbers. A resumed
    # run must stop at the asked step, not that many steps later (the bug of distill-points.sh until stop 23).
    c = cfg(teacher_dir, tiny_corpus, tmp_path / "u", "dmd2", steps=6, ckpt_every=1)
    step = lambda: json.loads((tmp_path / "u" / "checkpoint" / "state.json").read_text())["state"]["step"]
    distill(c, until=2)
    assert step() == 2
    distill(c, resume=True, until=3)
    assert step() == 3
    with pytest.raises(FlowflashError, match="at step 3, not before --until-step 3"):
        distill(c, resume=True, until=3)
    distill(c, resume=True, max_steps=2)
    assert step() == 5


def test_a_draw_comes_before_the_checkpoint_of_its_step(teacher_dir, tmp_path, tiny_corpus, monkeypatch):
    """A run killed while it draws must resume before that step and draw again: when the hook runs at step k,
    the newest checkpoint is still the one before k."""
    import flowflash.train.run as run_mod
    from flowflash.train.common import checkpoint_folder

    out = tmp_path / "r"
    seen = []

    def hook(folder, prompts, png, **kw):
        ck = checkpoint_folder(out / "checkpoint")
        seen.append((int(png.stem[4:]), None if ck is None else json.loads((ck / "state.json").read_text())["state"]["step"]))

    monkeypatch.setattr(run_mod, "sample_grid", hook)
    distill(cfg(teacher_dir, tiny_corpus, out, "tg", steps=4, ckpt_every=2, sample_every=2))
    assert seen == [(2, None), (4, 2)]
