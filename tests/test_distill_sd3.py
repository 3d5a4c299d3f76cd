"""Distilling an SD3 pipeline (the project's tiny SD3.5-Medium-structured fixture): latent roles, the prompt
embedding cache, the config-free CLI, the diffusers student folder, FSDP2 equivalence, resume, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flowflash.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
HERE = Path(__file__).parent
PROMPTS = ["a red apple", "a dog face", "a blue car", "the green tree on a white background", "a cat"]


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """(teacher folder, prompt file, real image folder)."""
    from PIL import Image

    from flowflash.testing.sd3_fixture import write_tiny_sd3

    root = tmp_path_factory.mktemp("sd3-distill")
    teacher = write_tiny_sd3(root / "teacher", "sd3.5-medium")
    prompts = root / "prompts.txt"
    prompts.write_text("# training prompts\n" + "\n".join(PROMPTS) + "\n")
    real = root / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(real / f"{i}.png")
    return teacher, prompts, real


def distill_args(sd3, out: Path, cache: Path, method="dmd2", steps=4, iters=4, *extra) -> list[str]:
    teacher, prompts, _ = sd3
    return ["distill", "--method", method, "--teacher", str(teacher), "--prompts", str(prompts), "--student-steps",
            str(steps), "--iterations", str(iters), "--out", str(out), "--size", "64", "--embed-cache", str(cache),
            "--batch-size", "2", *extra]


def diffusers_image(folder: Path, prompt: str, steps: int, seed: int, no_t5: bool = False) -> np.ndarray:
    from diffusers import StableDiffusion3Pipeline

    kw = {"text_encoder_3": None, "tokenizer_3": None} if no_t5 else {}
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, **kw)
    pipe.set_progress_bar_config(disable=True)
    return np.asarray(pipe(prompt, num_inference_steps=steps, guidance_scale=1.0, height=64, width=64,
                           generator=torch.Generator().manual_seed(seed)).images[0]).astype(np.float64)


def flowflash_image(folder: Path, prompt: str, seed: int) -> np.ndarray:
    from flowflash.runtime.pipeline import Pipeline

    img = Pipeline.load(folder).generate([prompt], seed=seed, size=64)[0]
    return np.asarray(img).astype(np.float64)


# ------------------------------------------------------------------ the round trip
def test_config_free_dmd2_student_runs_in_flowflash_and_vanilla_diffusers(sd3, tmp_path):
    out = tmp_path / "run"
    assert main(distill_args(sd3, out, tmp_path / "cache", iters=6)) == 0  # critic ratio 5: step 5 updates the student
    student = out / "student"
    settings = json.loads((student / "flowflash.json").read_text())
    assert settings["sampling"] == {"steps": 4, "guidance": 1.0}
    # the student's times are the teacher scheduler's for 4 steps, so diffusers' num_inference_steps=4 matches
    from flowflash.models.sd3 import load_scheduler, scheduler_sigmas
    assert settings["schedule"] == pytest.approx(scheduler_sigmas(load_scheduler(sd3[0]), 4, 16).tolist())
    # the student's weights moved off the teacher's; everything else is the teacher's
    s = load_file(student / "transformer" / "diffusion_pytorch_model.safetensors")
    t = load_file(sd3[0] / "transformer" / "diffusion_pytorch_model.safetensors")
    assert s.keys() == t.keys() and any(not torch.equal(s[k], t[k]) for k in s)
    a, b = flowflash_image(student, "a red apple", 5), diffusers_image(student, "a red apple", 4, 5)
    assert np.abs(a - b).mean() <= 1.0  # mean absolute difference <= 1/255
    exported = tmp_path / "exported"
    assert main(["export", str(student), "--to", str(exported)]) == 0
    assert np.abs(diffusers_image(exported, "a red apple", 4, 5) - a).mean() <= 1.0


def test_two_step_flash_without_t5_drops_it_from_the_student(sd3, tmp_path):
    out = tmp_path / "run"
    (tmp_path / "cfg.yaml").write_text("log_every: 1\n")
    assert main(distill_args(sd3, out, tmp_path / "cache", "flash", 2, 6, "--drop", "t5",
                             "--real-images", str(sd3[2]), "--config", str(tmp_path / "cfg.yaml"))) == 0
    student = out / "student"
    index = json.loads((student / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and not (student / "text_encoder_3").exists()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert "gan_d" in log[0] and "gan_g" in log[5]  # the adversarial term ran: real images were given
    assert "text_encoder_3=None" in (student / "README.md").read_text()
    a = flowflash_image(student, "a dog face", 1)  # runs without T5 on its own (trained_without)
    assert np.abs(a - diffusers_image(student, "a dog face", 2, 1, no_t5=True)).mean() <= 1.0


def test_each_optimizer_step_changes_only_its_roles(sd3, tmp_path):
    from flowflash.train.common import Dist
    from flowflash.train.configs import DistillConfig
    from flowflash.train.loop import run_step
    from flowflash.train.run import distill_setup

    teacher, prompts, real = sd3
    cfg = DistillConfig(method="flash", teacher=str(teacher), prompts=str(prompts), size=64, critic_ratio=1,
                        real_images=str(real), embed_cache=str(tmp_path / "cache"), out=str(tmp_path / "run"),
                        lr=1e-3, lr_critic=1e-3)
    su = distill_setup(cfg, Dist())
    m = su.method
    assert m.adversarial and m.teacher.transformer.dtype == torch.float32
    snap = lambda: {n: {k: v.clone() for k, v in mod.state_dict().items()}
                    for n, mod in {**m.networks, "teacher": m.teacher}.items()}
    changed = lambda a, b: {n for n in a if any(not torch.equal(a[n][k], b[n][k]) for k in a[n])}
    gen = torch.Generator().manual_seed(0)
    before = snap()
    run_step(m, su.draw(2, gen), 0)  # a critic step
    mid = snap()
    assert changed(before, mid) == {"critic", "heads"}
    run_step(m, su.draw(2, gen), 1)  # a student step
    assert changed(mid, snap()) == {"student"}


def test_gradient_checkpointing_gives_the_same_steps(sd3, tmp_path):
    """Recomputed blocks give the same gradients, also in the student step whose critic pass is frozen (it stays
    frozen until after backward, so the recomputation builds the graph that was saved)."""
    from flowflash.train.common import Dist
    from flowflash.train.configs import DistillConfig
    from flowflash.train.loop import run_step
    from flowflash.train.run import distill_setup

    teacher, prompts, real = sd3
    result = {}
    for ckpt in (False, True):
        cfg = DistillConfig(method="flash", teacher=str(teacher), prompts=str(prompts), size=64, critic_ratio=1,
                            real_images=str(real), embed_cache=str(tmp_path / "cache"), out=str(tmp_path / f"r{ckpt}"),
                            grad_checkpointing=ckpt, lr=1e-3, lr_critic=1e-3)
        su = distill_setup(cfg, Dist())
        assert su.method.student.transformer.gradient_checkpointing == ckpt
        gen = torch.Generator().manual_seed(0)
        losses = [run_step(su.method, su.draw(2, gen), s).loss.item() for s in (0, 1)]
        result[ckpt] = losses, {k: v.clone() for k, v in su.method.student.state_dict().items()}
        assert all(p.requires_grad for p in su.method.critic.parameters())  # unfrozen after the student step
    assert result[False][0] == pytest.approx(result[True][0], rel=1e-6)
    for k, v in result[False][1].items():
        torch.testing.assert_close(v, result[True][1][k], atol=1e-6, rtol=1e-5)


def test_prompt_embeddings_are_cached_and_invalidated(sd3, tmp_path, monkeypatch):
    from flowflash.models import sd3 as sd3_mod
    from flowflash.train.common import Dist
    from flowflash.train.latent_data import prompt_bank

    teacher = sd3[0]
    first = prompt_bank(teacher, PROMPTS, frozenset(), 256, tmp_path, Dist())
    assert first.encoded_now

    def no_encoders(*a, **k):
        raise AssertionError("the encoders were loaded although the cache holds these prompts")

    monkeypatch.setattr(sd3_mod.SD3TextEncoders, "load", no_encoders)
    again = prompt_bank(teacher, PROMPTS, frozenset(), 256, tmp_path, Dist())
    assert not again.encoded_now
    idx = torch.tensor([3, 0])
    for x, y in zip(first.rows(idx), again.rows(idx)):
        assert torch.equal(x, y)
    ctx, pooled = again.rows(idx)
    assert ctx.shape[1] == 77 + 256 and ctx.abs().sum() > 0
    with pytest.raises(AssertionError, match="encoders were loaded"):  # another prompt list: another key
        prompt_bank(teacher, PROMPTS[:-1] + ["a changed prompt"], frozenset(), 256, tmp_path, Dist())
    with pytest.raises(AssertionError, match="encoders were loaded"):  # without T5: another key
        prompt_bank(teacher, PROMPTS, frozenset({"t5"}), 256, tmp_path, Dist())


def test_the_cached_embedding_is_the_pipelines(sd3, tmp_path):
    """What training conditions on is what generation encodes (fp16 storage aside)."""
    from flowflash.models.sd3 import SD3Model
    from flowflash.train.common import Dist
    from flowflash.train.latent_data import prompt_bank

    bank = prompt_bank(sd3[0], PROMPTS, frozenset({"t5"}), 256, tmp_path, Dist())
    model = SD3Model.load(sd3[0], drop=["t5"])
    ctx, pooled, _ = model.encode_text(PROMPTS[1:3], frozenset({"t5"}))
    got_ctx, got_pooled = bank.rows(torch.tensor([1, 2]))
    torch.testing.assert_close(got_ctx, ctx, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got_pooled, pooled, atol=2e-3, rtol=2e-3)
    null_ctx, _, _ = model.encode_text([""], frozenset({"t5"}))
    torch.testing.assert_close(bank.null_ctx, null_ctx, atol=2e-3, rtol=2e-3)


# ------------------------------------------------------------------ scale
@pytest.mark.parametrize("fsdp", [True, False], ids=["fsdp2-sharded", "data-parallel"])
def test_fsdp2_step_equals_one_process_on_the_same_global_batch(sd3, tmp_path, torchrun, fsdp):
    teacher, prompts, real = sd3
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(dict(method="flash", teacher=str(teacher), prompts=str(prompts), size=64,
                                   real_images=str(real), embed_cache=str(tmp_path / "cache"), batch_size=4,
                                   critic_ratio=1, out=str(tmp_path / "run"), sample_every=0, fsdp=fsdp)))
    script = str(HERE / "fsdp_step.py")
    subprocess.run([sys.executable, script, str(cfg), str(tmp_path / "one")], check=True, capture_output=True,
                   timeout=300)
    torchrun([str(cfg), str(tmp_path / "two")], script=script)
    one = json.loads((tmp_path / "one" / "losses.json").read_text())
    two = json.loads((tmp_path / "two" / "losses.json").read_text())
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5), k
    w1 = load_file(tmp_path / "one" / "weights.safetensors")
    w2 = load_file(tmp_path / "two" / "weights.safetensors")
    t = load_file(teacher / "transformer" / "diffusion_pytorch_model.safetensors")
    moved = max((w1[f"student.transformer.{k}"] - t[k]).abs().max().item() for k in t)
    assert moved > 1e-3  # the steps did something
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-6, rtol=1e-5)


def test_fsdp2_resume_continues_the_run_exactly(sd3, tmp_path, torchrun):
    """Split after the first (critic-only) iteration: the checkpoint then holds no student optimizer state, and
    resuming must not count a phantom Adam step for it; split again after a student update whose heads were
    re-initialised from torch's own generator, which must resume too; the student updates draw steps per sample."""
    cfg = tmp_path / "cfg.yaml"
    # heads re-initialised at every student update: they draw from torch's own generator, which must resume too
    cfg.write_text("critic_ratio: 1\nckpt_every: 100\nsample_every: 0\nlog_every: 1\nhead_reinit_p: 1.0\n")
    args = lambda out, iters: distill_args(sd3, out, tmp_path / "cache", "flash", 4, iters, "--fsdp",
                                           "--real-images", str(sd3[2]), "--config", str(cfg))
    torchrun(args(tmp_path / "whole", 5) + ["--batch-size", "4"])
    torchrun(args(tmp_path / "split", 1) + ["--batch-size", "4"])
    state = json.loads((tmp_path / "split" / "checkpoint" / "state.json").read_text())
    assert state["format"] == "dcp" and state["state"]["step"] == 1 and state["optimizers"] == ["critic"]
    assert sorted(p.name for p in (tmp_path / "split" / "checkpoint").glob("*.distcp"))  # each rank's shards
    torchrun(args(tmp_path / "split", 2) + ["--batch-size", "4", "--resume"])  # stops after a student update
    torchrun(args(tmp_path / "split", 5) + ["--batch-size", "4", "--resume"])
    logs = [[json.loads(r) for r in (tmp_path / run / "log.jsonl").read_text().splitlines()] for run in ("whole", "split")]
    assert [r["step"] for r in logs[1]] == [1, 2, 3, 4, 5]
    for a, b in zip(*logs):
        assert {k: v for k, v in a.items() if k not in ("time", "img_s")} == pytest.approx(
            {k: v for k, v in b.items() if k not in ("time", "img_s")}, rel=1e-5)
    f = "student/transformer/diffusion_pytorch_model.safetensors"
    whole, split = load_file(tmp_path / "whole" / f), load_file(tmp_path / "split" / f)
    for k in whole:
        torch.testing.assert_close(whole[k], split[k], atol=1e-6, rtol=1e-5)
    f = "student/transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "whole" / f), load_file(tmp_path / "split" / f)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_kill9_then_resume_loses_at_most_one_checkpoint_interval(sd3, tmp_path):
    out, every = tmp_path / "run", 3
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"ckpt_every: {every}\nlog_every: 1\nsample_every: 0\ncritic_ratio: 1\n")
    args = distill_args(sd3, out, tmp_path / "cache", "dmd2", 4, 100000, "--config", str(cfg))
    cmd = [sys.executable, "-m", "flowflash.cli", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "checkpoint" / "state.json"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # bounded: until a second checkpoint exists
            if state.exists() and json.loads(state.read_text())["state"]["step"] >= 2 * every:
                break
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint within 120 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    saved = json.loads(state.read_text())["state"]["step"]
    logged = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    assert max(logged) - saved < every + 1  # at most one interval (plus the step in flight) lost
    end = saved + 2
    resume = distill_args(sd3, out, tmp_path / "cache", "dmd2", 4, end, "--config", str(cfg), "--resume")
    assert main(resume) == 0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows][-2:] == [saved + 1, end]
    assert (out / "student" / "flowflash.json").exists()


# ------------------------------------------------------------------ bad input
def write_index(folder: Path, cls: str) -> Path:
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    return folder


@pytest.mark.parametrize("case, message", [
    ("flux", "FluxPipeline"),
    ("missing prompts", "prompt file not found"),
    ("empty prompts", "holds no prompts"),
    ("no prompts", "trains on prompts"),
    ("steps 0", "--student-steps must be >= 1"),
    ("size", "not a positive multiple of 16"),
    ("too large", "larger than this model's position embedding"),
    ("fsdp alone", "torchrun --nproc-per-node N -m flowflash.cli distill"),
    ("drop unknown", "cannot drop minilm"),
    ("emoji with prompts", "prompts, size, embed_cache: only for an SD3 teacher"),
    ("yaml steps 0", "student_steps must be an integer >= 1"),
    ("shift 0", "student_shift must be > 0"),
    ("measure variance", "--measure-variance runs on an emoji teacher"),
    ("init critic", "holds no critic checkpoint"),
    ("emoji rows", "p_single, p_phrasing: only for an emoji teacher"),
    ("also steps", "also_steps: only for an emoji teacher"),
])
def test_bad_input_is_one_line_exit_2_and_no_run_folder(sd3, tmp_path, capsys, case, message):
    teacher, prompts, _ = sd3
    out = tmp_path / "run"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    args = distill_args(sd3, out, tmp_path / "cache")
    swap = lambda flag, value: args.__setitem__(args.index(flag) + 1, value)
    if case == "flux":
        swap("--teacher", str(write_index(tmp_path / "flux", "FluxPipeline")))
    elif case == "missing prompts":
        swap("--prompts", str(tmp_path / "nope.txt"))
    elif case == "empty prompts":
        swap("--prompts", str(empty))
    elif case == "no prompts":
        i = args.index("--prompts")
        del args[i: i + 2]
    elif case == "steps 0":
        swap("--student-steps", "0")
    elif case == "size":
        swap("--size", "60")
    elif case == "too large":
        swap("--size", "4096")
    elif case == "fsdp alone":
        args.append("--fsdp")
    elif case == "drop unknown":
        args += ["--drop", "minilm"]
    elif case == "emoji with prompts":
        swap("--teacher", "teacher")
    elif case in ("yaml steps 0", "shift 0", "init critic", "emoji rows"):
        i = args.index("--student-steps")
        del args[i: i + 2]
        line = {"yaml steps 0": "student_steps: 0", "shift 0": "student_shift: 0",
                "init critic": f"init_critic: {tmp_path}", "emoji rows": "p_single: 0.5\np_phrasing: 0.5"}[case]
        (tmp_path / "c.yaml").write_text(line + "\n")
        args += ["--config", str(tmp_path / "c.yaml")]
    elif case == "measure variance":
        args += ["--measure-variance", "2"]
    elif case == "also steps":
        args += ["--also-steps", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not out.exists()


def test_a_local_model_folder_wins_over_a_shipped_name(sd3, tmp_path, monkeypatch):
    """`--teacher teacher` in a folder holding a model folder named teacher means that folder."""
    import shutil

    from flowflash.runtime.pipeline import WEIGHTS, resolve_model

    monkeypatch.chdir(tmp_path)
    assert resolve_model("teacher") == WEIGHTS / "emoji-teacher"  # nothing local of that name
    (tmp_path / "teacher").mkdir()
    assert resolve_model("teacher") == WEIGHTS / "emoji-teacher"  # a folder that is no model: still the shipped one
    shutil.rmtree(tmp_path / "teacher")
    shutil.copytree(sd3[0], tmp_path / "teacher")
    assert resolve_model("teacher") == Path("teacher")


def test_a_tg_student_warm_starts_flash(sd3, tmp_path):
    """Stage 1 -> stage 2 on an SD3 teacher: the tg student folder is flash's init_student."""
    from flowflash.train.common import Dist
    from flowflash.train.configs import DistillConfig
    from flowflash.train.run import distill_setup

    assert main(distill_args(sd3, tmp_path / "tg", tmp_path / "cache", "tg", 4, 2)) == 0
    tg = load_file(tmp_path / "tg" / "student" / "transformer" / "diffusion_pytorch_model.safetensors")
    teacher, prompts, _ = sd3
    su = distill_setup(DistillConfig(method="flash", teacher=str(teacher), prompts=str(prompts), size=64,
                                     init_student=str(tmp_path / "tg" / "student"),
                                     embed_cache=str(tmp_path / "cache"), out=str(tmp_path / "flash")), Dist())
    own = su.method.student.transformer.state_dict()
    assert all(torch.equal(own[k], tg[k].float()) for k in tg)
    assert any(not torch.equal(own[k], v) for k, v in su.method.teacher.transformer.state_dict().items())
