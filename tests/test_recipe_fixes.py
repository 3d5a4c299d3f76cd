"""The stage-2 confounds the review found (issue 14), each fixed behind a switch whose old value is an
ablation arm; every test here fails on the old behaviour."""
import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from flowflash.errors import FlowflashError
from flowflash.methods.dmd2 import DMD2
from flowflash.methods.flash import Flash
from flowflash.sampling import x0_from_v
from flowflash.train.loop import LOOP_FIELDS, run_step
from flowflash.train.run import distill
from tests.test_distill import cfg, make, snapshot, teacher_dir, tiny_batch  # noqa: F401 (teacher_dir: a fixture)


# ------------------------------------------------------------------ 1. the critic is carried, and warmed up
def test_the_critic_carried_into_the_next_stage_is_the_one_saved_at_the_end_of_the_last(teacher_dir, tmp_path,
                                                                                       tiny_corpus):
    from flowflash.train.common import init_dist
    from flowflash.train.run import distill_setup

    first = tmp_path / "stage2"
    distill(cfg(teacher_dir, tiny_corpus, first, "flash", steps=4))
    saved = {n: load_file(first / "checkpoint" / f"{n}.safetensors") for n in ("critic", "heads")}
    su = distill_setup(cfg(teacher_dir, tiny_corpus, tmp_path / "branch", "flash", split="low", student_steps=4,
                           student_shift=1.0, init_critic=str(first)), init_dist())
    for name in ("critic", "heads"):
        own = su.method.networks[name].state_dict()
        assert own.keys() == saved[name].keys()
        assert all(torch.equal(own[k], saved[name][k]) for k in own)
    teacher = su.method.teacher.state_dict()
    assert any(not torch.equal(su.method.critic.state_dict()[k], teacher[k]) for k in teacher)  # not the teacher
    with pytest.raises(FlowflashError, match="holds no critic checkpoint"):
        distill_setup(cfg(teacher_dir, tiny_corpus, tmp_path / "x", "flash", init_critic=str(tmp_path)), init_dist())


def test_critic_warmup_runs_critic_only_iterations_first(teacher_dir, tmp_path, tiny_corpus):
    m, _ = make("dmd2", teacher_dir, tmp_path, tiny_corpus, critic_ratio=2, critic_warmup=5)
    assert [m.is_student_step(s) for s in range(12)] == [False] * 5 + [False, False, True] * 2 + [False]
    with pytest.raises(FlowflashError, match="critic_warmup"):
        DMD2.check_config(cfg(teacher_dir, tiny_corpus, tmp_path, "dmd2", critic_warmup=-1), LOOP_FIELDS)


# ------------------------------------------------------------------ 2. the DM normaliser under sharing
def test_shared_normaliser_is_taken_at_a_renoised_point_not_the_matching_point(teacher_dir, tmp_path, tiny_corpus):
    seen = []
    for norm in ("matching", "renoised"):
        m, teacher = make("flash", teacher_dir, tmp_path, tiny_corpus, adversarial=False, dm_norm=norm)
        inputs = []
        hook = m.teacher.register_forward_hook(lambda mod, args, out: inputs.append(args[0].detach().clone()))
        b = tiny_batch(teacher)
        m.dm_loss(b)
        hook.remove()
        seen.append(len(inputs))
        if norm == "renoised":  # the second teacher call is not at the student's trajectory point
            assert not torch.equal(inputs[0][: b.noise.shape[0]], inputs[1][: b.noise.shape[0]])
    assert seen == [1, 2]


def test_a_normaliser_apart_from_the_matching_point_does_not_blow_up_a_converged_student():
    from flowflash.methods.losses import dmd_direction

    x0 = torch.randn(2, 3, 4, 4)
    real, fake = x0.clone(), x0 + 0.01  # the student already agrees with the real score at the shared point
    old = dmd_direction(x0, real, fake)
    new = dmd_direction(x0, real, fake, norm_real=x0 + 0.5)
    assert old.abs().mean() > 1e3 and new.abs().mean() < 0.1
    assert torch.equal(dmd_direction(x0, real, fake, normalise=False), fake - real)


# ------------------------------------------------------------------ 3. the in-interval matching point
def test_interval_matching_point_lies_inside_the_step_on_the_students_line(teacher_dir, tmp_path, tiny_corpus):
    m, teacher = make("flash", teacher_dir, tmp_path, tiny_corpus, adversarial=False, match_point="interval",
                      student_steps=4)
    b = tiny_batch(teacher, b=8)
    i = m.pick_steps(8)
    x_i, v, x0_hat = m.student_x0(b, i)
    x, t = m.matching_point(x_i, v, x0_hat, i)
    t_i, t_next = m.times(i, x_i), m.times(i, x_i, 1)
    assert bool(((t <= t_i) & (t >= t_next.clamp(min=m.t_min))).all()) and not bool((t == t_i).all())
    torch.testing.assert_close(x0_from_v(x, t, v.detach()), x0_hat.detach(), atol=1e-5, rtol=1e-5)
    with pytest.raises(FlowflashError, match="match_point"):
        DMD2.check_config(cfg(teacher_dir, tiny_corpus, tmp_path, "dmd2", match_point="interval"), LOOP_FIELDS)
    with pytest.raises(FlowflashError, match="match_point must be one of"):
        Flash.check_config(cfg(teacher_dir, tiny_corpus, tmp_path, "flash", match_point="middle"), LOOP_FIELDS)


# ------------------------------------------------------------------ 4. critic times and the adversarial floor
def test_critic_trains_wherever_it_is_asked(teacher_dir, tmp_path, tiny_corpus):
    """`full`: uniform on [t_min, 1], so the first step's t = 1 and the adversarial floor t_min are trained;
    the old `uniform` never reaches t > 1 - t_min; `teacher` leaves low times nearly untrained."""
    m, teacher = make("flash", teacher_dir, tmp_path, tiny_corpus)
    assert m.t_min == teacher.cfg.t_min == 0.05  # not 0.02: below the x-prediction clamp
    t = m.critic_times(4000)
    assert float(t.min()) >= 0.05 and float(t.max()) > 0.99 and abs(float(t.mean()) - 0.525) < 0.02
    assert float((t < 0.1).float().mean()) > 0.04  # the floor's neighbourhood is trained, ~5 % of draws
    old, _ = make("flash", teacher_dir, tmp_path, tiny_corpus, critic_t="uniform", t_match_min=0.02)
    assert old.t_min == 0.02 and float(old.critic_times(4000).max()) <= 0.98 + 1e-6
    shifted, _ = make("flash", teacher_dir, tmp_path, tiny_corpus, critic_t="teacher")
    shifted.teacher.cfg.sampling = dataclasses.replace(shifted.teacher.cfg.sampling, shift=3.0)
    ts = shifted.critic_times(4000)
    assert float(ts.mean()) > 0.65 and float((ts < 0.1).float().mean()) < 0.02  # leans to noise, as in training


def test_the_last_steps_adversarial_point_is_not_at_t_zero(teacher_dir, tmp_path, tiny_corpus):
    for floor in (True, False):
        m, teacher = make("flash", teacher_dir, tmp_path, tiny_corpus, adversarial_floor=floor, student_steps=2)
        b = tiny_batch(teacher, b=4)
        last = torch.full((4,), len(m.schedule) - 2)
        x_i, v, x0_hat = m.student_x0(b, last)
        _, t = m.adversarial_point(x_i, v, x0_hat, None, last)
        assert bool((t == m.t_min).all()) if floor else bool((t == 0).all())


# ------------------------------------------------------------------ 5. per-sample step indices
def test_step_indices_are_drawn_per_sample(teacher_dir, tmp_path, tiny_corpus):
    m, teacher = make("flash", teacher_dir, tmp_path, tiny_corpus, student_steps=4)
    assert len(set(m.pick_steps(64).tolist())) == 4
    old, _ = make("flash", teacher_dir, tmp_path, tiny_corpus, student_steps=4, step_per_sample=False)
    assert len(set(old.pick_steps(64).tolist())) == 1
    # each sample's rollout stops at its own index: the same states as rolling each out alone
    b = tiny_batch(teacher, b=3)
    i = torch.tensor([0, 3, 1])
    got = m.rollout(b, i)
    for k in range(3):
        torch.testing.assert_close(got[k], m.rollout(b, int(i[k]))[k])


def test_tg_trains_each_sample_at_its_own_step(teacher_dir, tmp_path, tiny_corpus):
    m, teacher = make("tg", teacher_dir, tmp_path, tiny_corpus, student_steps=4)
    s0 = snapshot(m.student)
    out = run_step(m, tiny_batch(teacher, b=6), 0)
    assert torch.isfinite(out.loss) and any(not torch.equal(s0[k], v) for k, v in m.student.state_dict().items())


# ------------------------------------------------------------------ the gradient-noise measurement
def test_gradient_noise_compares_the_arms_on_the_same_roles(teacher_dir, tmp_path, tiny_corpus):
    from flowflash.methods.diagnostics import gradient_noise
    from flowflash.train.common import init_dist
    from flowflash.train.run import distill_setup

    su = distill_setup(cfg(teacher_dir, tiny_corpus, tmp_path / "n", "flash", adversarial=False, student_steps=4),
                       init_dist())
    s0 = snapshot(su.method.student)
    res = gradient_noise(su.method, su.draw, ["A_renoise", "B_sharing_start", "C_sharing_interval"], k=3,
                         ref_draws=4, batch=2)
    assert set(res["arms"]) == {"A_renoise", "B_sharing_start", "C_sharing_interval"}
    for r in res["arms"].values():
        assert r["snr"] > 0 and -1 <= r["cos_draw_to_ref"] <= 1 and -1 <= r["cos_mean_to_ref"] <= 1
    assert all(torch.equal(s0[k], v) for k, v in su.method.student.state_dict().items())  # measuring trains nothing
    assert su.method.sharing  # the arms are copies; the method keeps its own switches
    again = gradient_noise(su.method, su.draw, ["A_renoise"], k=3, ref_draws=4, batch=2)
    assert again["arms"]["A_renoise"] == pytest.approx(res["arms"]["A_renoise"])  # seeded: reproducible


def test_heads_reading_other_blocks_are_not_carried(teacher_dir, tmp_path, tiny_corpus, capsys):
    from flowflash.train.common import init_dist
    from flowflash.train.run import distill_setup

    tiny = dict(student_steps=2)
    first = tmp_path / "first"
    distill(cfg(teacher_dir, tiny_corpus, first, "flash", steps=2, **tiny))  # heads on block [0]
    saved = load_file(first / "checkpoint" / "critic.safetensors")
    # the tiny teacher has one block: the same count, so shapes alone could not tell; the saved config can
    (first / "config.json").write_text((first / "config.json").read_text().replace('"gan_blocks": [\\n  0\\n ]',
                                                                                  '"gan_blocks": [\\n  5\\n ]'))
    import json
    c = json.loads((first / "config.json").read_text())
    c["gan_blocks"] = [7]
    (first / "config.json").write_text(json.dumps(c))
    with pytest.raises(FlowflashError, match="gan_blocks"):  # blocks the teacher lacks: named, not guessed
        distill_setup(cfg(teacher_dir, tiny_corpus, tmp_path / "b", "flash", init_critic=str(first), **tiny),
                      init_dist())
    c["gan_blocks"] = [0]
    (first / "config.json").write_text(json.dumps(c))
    su = distill_setup(cfg(teacher_dir, tiny_corpus, tmp_path / "c", "flash", init_critic=str(first), **tiny),
                       init_dist())
    assert all(torch.equal(su.method.critic.state_dict()[k], v) for k, v in saved.items())
    assert "start fresh" not in capsys.readouterr().out


def test_tg_regresses_each_sample_onto_its_own_next_state(teacher_dir, tmp_path, tiny_corpus, monkeypatch):
    from flowflash.methods.base import velocity
    from flowflash.methods.losses import trajectory_regression
    from flowflash.sampling import euler_step

    m, teacher = make("tg", teacher_dir, tmp_path, tiny_corpus, student_steps=4)
    b = tiny_batch(teacher, b=3)
    i = torch.tensor([3, 0, 2])
    monkeypatch.setattr(m, "pick_steps", lambda n: i)
    states = m.teacher_states(b)
    with torch.no_grad():
        loss = m.train_step(b, 0).loss
        s = m.schedule
        preds = [euler_step(states[int(i[k])][k:k + 1], velocity(m.student, states[int(i[k])][k:k + 1],
                                                                  torch.tensor([s[int(i[k])]]), b.rows(torch.tensor([k]))),
                            s[int(i[k])], s[int(i[k]) + 1]) for k in range(3)]
        want = trajectory_regression(torch.cat(preds), torch.stack([states[int(i[k]) + 1][k] for k in range(3)]))
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)


def test_a_shared_point_below_t_min_moves_up_the_students_line(teacher_dir, tmp_path, tiny_corpus):
    """An SD3-like schedule whose last step starts below the critic's range (t_min 0.05): the matching point is
    moved to t_min along the student's own velocity, the same x0."""
    m, teacher = make("flash", teacher_dir, tmp_path, tiny_corpus, adversarial=False, student_steps=3,
                      student_shift=None, schedule=[1.0, 0.5, 0.02, 0.0])
    b = tiny_batch(teacher, b=2)
    i = torch.tensor([2, 1])
    x_i, v, x0 = m.student_x0(b, i)
    x, t = m.matching_point(x_i, v, x0, i)
    assert t.tolist() == pytest.approx([0.05, 0.5])
    torch.testing.assert_close(x0_from_v(x, t, v.detach()), x0.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(x[1], x_i[1])  # a point inside the range stays where it is


def test_noise_stats_recover_a_known_signal_to_noise_ratio():
    from flowflash.methods.diagnostics import noise_stats

    gen = torch.Generator().manual_seed(0)
    true = torch.zeros(1000, dtype=torch.float64)
    true[0] = 3.0  # ||E g||^2 = 9
    for k in (4, 64):
        snrs = []
        for _ in range(200):
            g = true + torch.randn(k, 1000, generator=gen, dtype=torch.float64)  # E||g - E g||^2 = 1000
            snrs.append(noise_stats(g.sum(0), g.pow(2).sum().item(), k)["snr"])
        assert sum(snrs) / len(snrs) == pytest.approx(9 / 1000, abs=0.003)  # unbiased, even at k = 4


# ------------------------------------------------------------------ one student for several step counts (issue 15)
def test_also_steps_draws_a_schedule_per_sample_and_rolls_each_out_on_its_own(teacher_dir, tmp_path, tiny_corpus):
    from flowflash.methods.schedule import student_schedule
    from flowflash.sampling import sample
    from flowflash.methods.base import velocity

    m, teacher = make("dmd2", teacher_dir, tmp_path, tiny_corpus, student_steps=4, also_steps=[2])
    shift = teacher.cfg.sampling.shift
    assert m.schedules == [student_schedule(4, shift), student_schedule(2, shift)] and m.schedule == m.schedules[0]
    i = m.pick_steps(256)
    s = m.cur_sched
    assert set(s.tolist()) == {0, 1} and set(i[s == 0].tolist()) == {0, 1, 2, 3} and set(i[s == 1].tolist()) == {0, 1}
    # each sample's time is its own schedule's
    t = m.times(i, torch.zeros(256, 1))
    want = torch.tensor([m.schedules[int(a)][int(b)] for a, b in zip(s, i)], dtype=torch.float32)
    torch.testing.assert_close(t, want)
    # the final samples: a 2-step sample equals the 2-step sampler's output, a 4-step one the 4-step sampler's
    b = tiny_batch(teacher, b=16)
    x0 = m.final_samples(b)
    for k in range(16):
        sched = m.schedules[int(m.cur_sched[k])]
        ref = sample(lambda x, t_: velocity(m.student, x, t_, b), b.noise, torch.tensor(sched, dtype=torch.float64))
        torch.testing.assert_close(x0[k], ref[k], atol=1e-5, rtol=1e-4)
    assert len(set(m.cur_sched.tolist())) == 2  # both counts present in this draw (seeded)


def test_also_steps_trains_the_student_and_refuses_what_it_cannot_mix(teacher_dir, tmp_path, tiny_corpus):
    m, teacher = make("dmd2", teacher_dir, tmp_path, tiny_corpus, student_steps=4, also_steps=[2], adversarial=False,
                      critic_ratio=1)
    s0 = snapshot(m.student)
    run_step(m, tiny_batch(teacher, b=4), 0)  # critic
    assert all(torch.equal(s0[k], v) for k, v in m.student.state_dict().items())
    out = run_step(m, tiny_batch(teacher, b=4), 1)
    assert out.step == ("student",) and any(not torch.equal(s0[k], v) for k, v in m.student.state_dict().items())
    for bad, msg in (({"also_steps": [4]}, "must not repeat"), ({"also_steps": [0]}, "step counts >= 1"),
                     ({"also_steps": [2], "split": "low"}, "does not use split"),
                     ({"also_steps": [2], "schedule": [1.0, 0.5, 0.0]}, "does not use also_steps")):
        with pytest.raises(FlowflashError, match=msg):
            DMD2.check_config(cfg(teacher_dir, tiny_corpus, tmp_path, "dmd2", student_steps=4, **bad), LOOP_FIELDS)
    from flowflash.methods.tg import TrajectoryGuidance
    with pytest.raises(FlowflashError, match="does not use also_steps"):
        TrajectoryGuidance.check_config(cfg(teacher_dir, tiny_corpus, tmp_path, "tg", also_steps=[1]), LOOP_FIELDS)


def test_also_times_set_each_counts_times_and_the_export_samples_them(teacher_dir, tmp_path, tiny_corpus):
    from flowflash.methods.schedule import student_schedule
    from flowflash.models.flow_model import load_model
    from flowflash.runtime.pipeline import Pipeline

    m, teacher = make("dmd2", teacher_dir, tmp_path, tiny_corpus, student_steps=4, also_steps=[2],
                      also_times=[[1.0, 0.3, 0.0]])
    assert m.schedules == [student_schedule(4, teacher.cfg.sampling.shift), [1.0, 0.3, 0.0]]
    i = m.pick_steps(256)
    t = m.times(i, torch.zeros(256, 1))
    assert sorted({round(x, 5) for x in t[m.cur_sched == 1].tolist()}) == [0.3, 1.0]  # the 2-step side: 1 and 0.3
    folder = tmp_path / "exp"
    m.save_export({k: v.detach() for k, v in m.student.state_dict().items()}, folder)
    assert load_model(folder).cfg.sampling.other_schedules == ((1.0, 0.3, 0.0),)
    pipe = Pipeline.load(str(folder))
    assert pipe.timesteps(2).tolist() == [1.0, 0.3, 0.0] and len(pipe.timesteps(4)) == 5
    assert pipe.timesteps(3).tolist() == student_schedule(3, teacher.cfg.sampling.shift)  # untrained: shifted
    for bad, msg in (({"also_times": [[1.0, 0.3, 0.0]]}, "set also_steps too"),
                     ({"also_steps": [2], "also_times": [[1.0, 0.0]]}, "one schedule per count"),
                     ({"also_steps": [2], "also_times": [[1.0, 0.3, 0.5]]}, "ends at 0"),
                     ({"also_steps": [2], "also_times": [[1.0, 0.3, 0.0], [1.0, 0.0]]}, "one schedule per count")):
        with pytest.raises(FlowflashError, match=msg):
            DMD2.check_config(cfg(teacher_dir, tiny_corpus, tmp_path, "dmd2", student_steps=4, **bad), LOOP_FIELDS)


def test_a_mixed_student_ships_with_its_counts_on_the_card_and_samples_each(teacher_dir, tmp_path, tiny_corpus,
                                                                             capsys):
    from flowflash.cli import main
    from flowflash.models.flow_model import load_model
    from flowflash.runtime.pipeline import Pipeline

    out = distill(cfg(teacher_dir, tiny_corpus, tmp_path / "mix", "dmd2", student_steps=4, also_steps=[2],
                      adversarial=False))
    dest = tmp_path / "emoji-student"
    assert main(["train", "ship", "--student", str(out), "--stages", f"{tmp_path / 'mix'}@2", "--to", str(dest),
                 "--command", "c", "--storage", "fp16", "--threads", "2"]) == 0
    card = (dest / "README.md").read_text()
    assert "4-step, CFG-free" in card and "also trained for 2 step(s)" in card and "trained for 2 step(s) too" in card
    assert "`mix` at step 2: method `dmd2`, 2 steps at batch" in card  # an export at a point of the run
    assert "logged wall-clock x 2 thread(s) per stage" in card
    assert main(["train", "ship", "--student", str(out), "--stages", f"{tmp_path / 'mix'}@9", "--to",
                 str(tmp_path / "x"), "--command", "c"]) == 2 and not (tmp_path / "x").exists()
    # a merge of two branches (here two points of one run) ships with a card that says how it was made
    merged = tmp_path / "merged"
    assert main(["merge", str(out), str(out), "--ratio", "0.25", "-o", str(merged)]) == 0
    assert main(["train", "ship", "--student", str(merged), "--stages", f"{tmp_path / 'mix'}@1,{tmp_path / 'mix'}@2",
                 "--to", str(tmp_path / "m-student"), "--command", "c", "--merged", "0.25"]) == 0
    mcard = (tmp_path / "m-student" / "README.md").read_text()
    assert "two branches merged by weight interpolation: 0.75 x the first listed below + 0.25 x the second" in mcard
    assert "- **Branches**:" in mcard and "`mix` at step 1:" in mcard and "`mix` at step 2:" in mcard
    assert main(["train", "ship", "--student", str(merged), "--stages", f"{tmp_path / 'mix'}@2", "--to",
                 str(tmp_path / "y"), "--command", "c", "--merged", "0.25"]) == 2 and not (tmp_path / "y").exists()
    assert load_model(dest).cfg.sampling.steps == 4
    pipe = Pipeline.load(str(dest))
    mix, _ = make("dmd2", teacher_dir, tmp_path, tiny_corpus, student_steps=4, also_steps=[2])
    for k, sched in zip((4, 2), mix.schedules):  # `--steps K` visits the times K was trained at
        torch.testing.assert_close(pipe.timesteps(k).double(), torch.tensor(sched, dtype=torch.float64))
    two, four = (pipe.generate("dog face", seed=0, steps=k)[0] for k in (2, 4))
    assert two.size == four.size and two.tobytes() != four.tobytes()
    assert pipe.last.warnings == []  # a trained count: nothing to say
    with pytest.warns(UserWarning, match="emoji-student was trained for 4 and 2 steps; 3 steps sample times it"):
        pipe.generate("dog face", seed=0, steps=3)
    assert main(["generate", "dog face", "--model", str(dest), "--steps", "3", "-o", str(tmp_path / "three.png")]) == 0
    assert "warning: emoji-student was trained for 4 and 2 steps" in capsys.readouterr().err
