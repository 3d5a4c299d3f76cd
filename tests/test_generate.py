"""End-to-end `flowflash generate` on a tiny model: files, metadata, determinism, bad input, no sockets."""
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from flowflash.cli import main
from flowflash.errors import FlowflashError
from flowflash.runtime.pipeline import Pipeline


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_writes_png_with_parameters(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "a.png"
    code, stdout, err = run(capsys, "generate", "a red apple", "--model", str(tiny_model_dir), "--steps", "3",
                            "--guidance", "2.5", "--seed", "7", "-o", str(out))
    assert code == 0 and str(out) in stdout and "1 image(s) in " in err and "since start" in err
    im = Image.open(out)
    assert im.size == (16, 16)
    params = im.info["parameters"]
    assert params.startswith("a red apple\nSteps: 3,") and "CFG scale: 2.5" in params and "Seed: 7" in params
    assert "Model: tiny" in params and "Size: 16x16" in params and "Model hash: " in params


def test_num_images_to_directory_and_seeds(tiny_model_dir, tmp_path, capsys):
    code, stdout, _ = run(capsys, "generate", "dog face", "--model", str(tiny_model_dir), "--steps", "2",
                          "--num-images", "3", "--seed", "5", "-o", str(tmp_path) + "/")
    files = sorted(tmp_path.glob("*.png"))
    assert code == 0 and len(files) == 3
    seeds = [Image.open(f).info["parameters"].split("Seed: ")[1].split(",")[0] for f in files]
    assert seeds == ["5", "6", "7"]


def test_numbered_outputs_never_overwrite_across_a_gap(tmp_path):
    from flowflash.runtime.output import output_paths
    (tmp_path / "flowflash-0001.png").write_bytes(b"mine")
    paths = output_paths(str(tmp_path) + "/", 3)
    assert [p.name for p in paths] == ["flowflash-0002.png", "flowflash-0003.png", "flowflash-0004.png"]


def test_many_images_go_in_batches_each_written_before_the_next(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Memory must not grow with --num-images: batches of --batch-size, each batch on disk before the next runs."""
    real, calls = Pipeline.run, []

    def spy(self, prompts, seeds, *a, **kw):
        calls.append((list(seeds), len(list(tmp_path.glob("*.png")))))
        return real(self, prompts, seeds, *a, **kw)
    monkeypatch.setattr(Pipeline, "run", spy)
    code, stdout, err = run(capsys, "generate", "dog face", "--model", str(tiny_model_dir), "--steps", "2",
                            "--num-images", "7", "--batch-size", "3", "--threads", "1", "-o", str(tmp_path) + "/")
    assert code == 0 and len(list(tmp_path.glob("*.png"))) == 7
    assert calls == [([0, 1, 2], 0), ([3, 4, 5], 3), ([6], 6)]
    assert "7 image(s)" in err
    with pytest.raises(SystemExit) as exc:
        main(["generate", "dog", "--model", str(tiny_model_dir), "--threads", "0"])
    assert exc.value.code == 2 and "--threads: expected a positive integer, got '0'" in capsys.readouterr().err


def test_determinism_by_seed(tiny_model_dir):
    pipe = Pipeline.load(tiny_model_dir)
    a = np.asarray(pipe.generate("a red apple", steps=3, seed=1)[0])
    b = np.asarray(pipe.generate("a red apple", steps=3, seed=1)[0])
    c = np.asarray(pipe.generate("a red apple", steps=3, seed=2)[0])
    assert (a == b).all() and (a != c).any()
    # image k of a batch equals the same seed generated alone
    batch = pipe.generate("a red apple", steps=3, seed=1, num_images=2)
    assert (np.asarray(batch[1]) == np.asarray(pipe.generate("a red apple", steps=3, seed=2)[0])).all()


def test_each_text_encoder_drops_and_changes_the_image(tiny_model_dir):
    gen = lambda **kw: np.asarray(Pipeline.load(tiny_model_dir, **kw).generate("a red apple", steps=2, guidance=1.0)[0])
    full, no_mini, no_light = gen(), gen(drop=["minilm"]), gen(drop=["light"])
    assert full.shape == no_mini.shape == no_light.shape
    assert (full != no_mini).any() and (full != no_light).any() and (no_mini != no_light).any()
    assert Pipeline.load(tiny_model_dir, drop=["minilm"]).model.minilm is None  # not even loaded
    with pytest.raises(FlowflashError, match="cannot drop t5: this model's text encoders are light, minilm"):
        Pipeline.load(tiny_model_dir, drop=["t5"])


def test_run_returns_the_images_parameters_and_timings(tiny_model_dir):
    pipe = Pipeline.load(tiny_model_dir, drop=["minilm"])
    gen = pipe.run(["a red apple", "dog face"], [3, 9], steps=2, guidance=2.0)
    assert len(gen.images) == 2 and gen.params.seeds == [3, 9] and gen.params.steps == 2
    assert gen.params.guidance == 2.0 and gen.params.size == (16, 16) and gen.params.dropped == ("minilm",)
    assert gen.params.timesteps == [1.0, 0.5, 0.0] and gen.timings.denoise_s > 0 and gen.warnings == []
    assert pipe.last is gen
    images = pipe.generate("a red apple", steps=2, seed=4, size=(16, 16))
    assert pipe.last.images == images and pipe.last.params.seeds == [4]
    with pytest.raises(FlowflashError, match="2 prompts but 1 seeds"):
        pipe.run(["a", "b"], [0])


def test_explicit_timesteps_replace_the_schedule(tiny_model_dir, tmp_path, capsys):
    pipe = Pipeline.load(tiny_model_dir)
    default = pipe.run(["a red apple"], [3], steps=2)  # the tiny model's 2 steps: 1, 0.5, 0
    same = pipe.run(["a red apple"], [3], timesteps=[1, 0.5, 0])
    other = pipe.run(["a red apple"], [3], timesteps=[1, 0.2, 0])
    assert np.array_equal(np.asarray(default.images[0]), np.asarray(same.images[0]))
    assert not np.array_equal(np.asarray(default.images[0]), np.asarray(other.images[0]))
    assert other.params.timesteps == [1.0, 0.2, 0.0] and other.params.steps == 2
    with pytest.raises(FlowflashError, match="not both"):
        pipe.run(["a red apple"], [3], steps=2, timesteps=[1, 0.5, 0])
    # any sequence of numbers (an array, a tensor) is the same schedule
    for times in (np.array([1, 0.2, 0], dtype=np.float32), torch.tensor([1.0, 0.2, 0.0])):
        again = pipe.run(["a red apple"], [3], timesteps=times)
        assert np.array_equal(np.asarray(again.images[0]), np.asarray(other.images[0]))
    # img2img: the strength picks where along the given times to start, as along the model's own schedule
    init = tmp_path / "init.png"
    other.images[0].save(init)
    i2i = pipe.run(["a red apple"], [3], timesteps=[1, 0.75, 0.5, 0.25, 0], init_image=init, strength=0.5)
    assert i2i.params.timesteps == [0.5, 0.25, 0.0] and i2i.params.steps == 4
    # the CLI: the times go into the PNG's parameters, so the image can be made again
    out = tmp_path / "t.png"
    code, _, _ = run(capsys, "generate", "a red apple", "--model", str(tiny_model_dir), "--timesteps", "1,0.2,0",
                     "--seed", "3", "-o", str(out))
    assert code == 0 and np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(other.images[0]))
    assert "Steps: 2," in Image.open(out).info["parameters"] and "Timesteps: 1 0.2 0" in Image.open(out).info["parameters"]
    with pytest.raises(SystemExit):  # argparse: one or the other
        main(["generate", "x", "--model", str(tiny_model_dir), "--steps", "2", "--timesteps", "1,0"])


@pytest.mark.parametrize("args,needle", [
    (["   "], "prompt is empty"),
    (["x", "--steps", "0"], "positive integer"),
    (["x", "--steps", "-3"], "positive integer"),
    (["x", "--steps", "2.5"], "positive integer"),
    (["x", "--num-images", "0"], "positive integer"),
    (["x", "--seed", "-1"], "non-negative integer"),
    (["x", "--guidance", "-1"], "number >= 0"),
    (["x", "--guidance", "nan"], "number >= 0"),
    (["x", "--size", "32"], "16x16 images only"),
    (["x", "--size", "16x8"], "16x16 images only"),
    (["x", "--size", "16y"], "size N or WxH"),
    (["x", "--drop", "t5"], "cannot drop t5"),
    (["x", "-o", "/nonexistent/dir/a.png"], "does not exist"),
    (["x", "-o", "out.jpg"], "must end in .png"),
    (["x", "--model", "/no/such/model"], "unknown model"),
    (["x", "--timesteps", "1,0.5,0.7,0"], "strictly decreasing"),
    (["x", "--timesteps", "1,0.5"], "down to 0"),
    (["x", "--timesteps", "1,a,0"], "times separated by commas"),
    (["x", "--timesteps", "1,nan,0"], "strictly decreasing"),
    (["x", "--timesteps", "0.6,0.3,0"], "start at 1"),
])
def test_bad_input_one_line_exit_2_no_file(tiny_model_dir, tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    argv = ["generate", *args]
    if "--model" not in args:
        argv += ["--model", str(tiny_model_dir)]
    if needle in ("positive integer", "non-negative integer", "number >= 0", "size N or WxH", "times separated by commas"):
        with pytest.raises(SystemExit) as exc:  # argparse's own usage error
            main(argv)
        code = exc.value.code
    else:
        code = main(argv)
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("*.tmp"))


def test_unwritable_output(tiny_model_dir, tmp_path, capsys, monkeypatch):
    # root ignores permission bits, so ask the same question the code asks, and answer "no"
    import os
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if m == os.W_OK else real(p, m))
    code, _, err = run(capsys, "generate", "x", "--model", str(tiny_model_dir), "-o", str(tmp_path / "a.png"))
    assert code == 2 and "not writable" in err and not list(tmp_path.glob("*.png"))


def test_long_prompt_warns_once(tiny_model_dir, tmp_path, capsys):
    prompt = " ".join(["apple"] * 40)
    code, _, err = run(capsys, "generate", prompt, "--model", str(tiny_model_dir), "--steps", "1",
                       "-o", str(tmp_path / "a.png"))
    assert code == 0
    warns = [l for l in err.splitlines() if l.startswith("warning:")]
    assert len(warns) == 1 and "truncated" in warns[0]


def test_generation_opens_no_socket(tiny_model_dir, tmp_path, capsys, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("generation tried to open a socket")
    monkeypatch.setattr(socket.socket, "__init__", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    code, _, _ = run(capsys, "generate", "a red apple", "--model", str(tiny_model_dir), "--steps", "2",
                     "-o", str(tmp_path / "a.png"))
    assert code == 0 and (tmp_path / "a.png").exists()


def test_the_default_model_is_the_shipped_four_step_student_and_the_teacher_stays():
    from flowflash.models.flow_model import read_config
    from flowflash.runtime.pipeline import resolve_model
    student, teacher = read_config(resolve_model(None)), read_config(resolve_model("teacher"))
    assert resolve_model(None) == resolve_model("student") != resolve_model("teacher")
    assert student.kind == "student" and len(student.sampling.schedule) == 5 and student.sampling.guidance == 1.0
    assert teacher.kind == "teacher" and teacher.sampling.steps == 50 and teacher.sampling.schedule is None
