"""Style completion: a prompt naming no style gets the model's default style (SamplingDefaults.complete), on every
path that draws a prompt (Python, CLI and its PNG, eval and its cache), and can be turned off."""
import time

import numpy as np
import pytest
import torch
from PIL import Image

from flowflash.cli import main
from flowflash.errors import FlowflashError
from flowflash.models.protocol import SamplingDefaults
from flowflash.runtime.pipeline import Pipeline

from .conftest import tiny_model_config

STYLES = {"styles": ["twemoji style", "fluent flat style"], "default_style": "twemoji style"}


@pytest.fixture
def styled_model_dir(tmp_path):
    from flowflash.models.flow_model import FlowModel, save_model

    torch.manual_seed(0)
    folder = tmp_path / "styled"
    save_model(FlowModel(tiny_model_config(sampling=STYLES)), folder)
    return folder


@pytest.mark.parametrize("prompt, drawn", [
    ("a dog face", "a dog face, twemoji style"),
    ("red apple.", "red apple, twemoji style"),  # a trailing full stop does not end up before the comma
    ("dog face, twemoji style", "dog face, twemoji style"),
    ("Dog face in FLUENT", "Dog face in FLUENT"),  # a style's first word, any case
    ("dog face, pixel art style", "dog face, pixel art style"),  # a style the model does not know: left alone
    ("a stylish dog", "a stylish dog, twemoji style"),  # words, not substrings
    ("a dog?, ", "a dog, twemoji style"),  # trailing punctuation and spaces go
    ("...", "twemoji style"),  # nothing but punctuation: the style alone, no leading comma
])
def test_complete_appends_the_default_style_only_when_none_is_named(prompt, drawn):
    assert SamplingDefaults(**STYLES).complete(prompt) == drawn


def test_without_a_default_style_prompts_are_drawn_as_typed():
    assert SamplingDefaults().complete("a dog face") == "a dog face"
    assert SamplingDefaults(styles=("twemoji style",)).complete("a dog face") == "a dog face"


@pytest.mark.parametrize("kw, needle", [
    ({"styles": ["twemoji style"], "default_style": "fluent flat style"}, "not one of its styles"),
    ({"default_style": "twemoji style"}, "not one of its styles"),
    ({"styles": "twemoji style"}, "list of style names"),
    ({"styles": ["twemoji style", ""]}, "list of style names"),
])
def test_bad_style_settings_are_one_clear_error(kw, needle):
    with pytest.raises(FlowflashError, match=needle):
        SamplingDefaults(**kw)


def test_styles_round_trip_through_config_json_and_older_configs_have_none(styled_model_dir, tiny_model_dir):
    from flowflash.models.flow_model import read_config

    s = read_config(styled_model_dir).sampling
    assert s.styles == ("twemoji style", "fluent flat style") and s.default_style == "twemoji style"
    assert read_config(tiny_model_dir).sampling.default_style is None
    assert "default_style" not in read_config(tiny_model_dir).sampling.to_dict()  # old folders stay as written


def test_a_student_knows_its_teachers_styles_but_not_its_default():
    from flowflash.methods.student import student_model
    from flowflash.models.flow_model import FlowModel

    student = student_model(FlowModel(tiny_model_config(sampling=STYLES)), [1.0, 0.5, 0.0], "s")
    assert student.cfg.sampling.styles == ("twemoji style", "fluent flat style")
    assert student.cfg.sampling.default_style is None  # completion is judged per model, a student's too


def test_both_shipped_models_complete_the_style():
    from flowflash.models.flow_model import read_config
    from flowflash.runtime.pipeline import resolve_model

    for name in ("teacher", "student"):  # each earned it on fresh seeds (docs/benchmarks.md, looks 10 and 11)
        sampling = read_config(resolve_model(name)).sampling
        assert sampling.complete("a red apple") == "a red apple, twemoji style"
        assert sampling.complete("red apple, fluent flat style") == "red apple, fluent flat style"


def test_run_draws_the_completed_prompt_and_records_it(styled_model_dir):
    pipe = Pipeline.load(styled_model_dir)
    done = pipe.run(["a dog face"], [3], steps=2)
    typed = pipe.run(["a dog face"], [3], steps=2, complete_style=False)
    spelled = pipe.run(["a dog face, twemoji style"], [3], steps=2, complete_style=False)
    assert done.params.prompts == ["a dog face, twemoji style"] and typed.params.prompts == ["a dog face"]
    a, b, c = (torch.from_numpy(np.asarray(g.images[0]).copy()) for g in (done, typed, spelled))
    assert torch.equal(a, c) and not torch.equal(a, b)  # completion is exactly the spelled-out prompt


def test_the_style_is_not_added_where_the_encoders_would_cut_it(styled_model_dir):
    pipe = Pipeline.load(styled_model_dir, drop=["minilm"])  # the light encoder alone: 8 words at most
    assert pipe.complete("a red dog face a red") == "a red dog face a red, twemoji style"  # 8 words: fits
    seven = "a red dog face a red apple"  # the style would make 9 words and be cut
    gen = pipe.run([seven], [0], steps=2)
    assert gen.params.prompts == [seven] and gen.warnings == []  # drawn as typed, nothing cut
    cut = "a red dog face a red apple dog face"  # cut as typed already: the suffix costs none of its words
    assert pipe.complete(cut) == f"{cut}, twemoji style"
    with pytest.raises(FlowflashError, match="empty"):
        pipe.complete(" ")
    with pytest.warns(UserWarning, match="truncated"):
        assert any("truncated" in w for w in pipe.run([cut], [0], steps=2).warnings)


@pytest.mark.parametrize("drop", [(), ("minilm",), ("light",), ("light", "minilm")])
def test_fits_agrees_with_the_encoders_own_truncation_warnings(styled_model_dir, drop):
    model = Pipeline.load(styled_model_dir, drop=drop).model
    for prompt in ["a dog", "a red dog face, twemoji style", "a red dog face a red apple", "a " * 9 + "dog"]:
        warned = model.condition([prompt], frozenset(drop), False).warnings != []
        assert model.fits(prompt, frozenset(drop)) is not warned, prompt
    assert model.fits("a " * 9 + "dog", frozenset(drop)) is (drop == ("light", "minilm"))  # a dropped one never cuts


def test_cli_records_the_drawn_prompt_and_as_typed_turns_it_off(styled_model_dir, tmp_path, capsys):
    out, raw = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["generate", "a dog face", "--model", str(styled_model_dir), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "drawn as 'a dog face, twemoji style'" in err and "--as-typed" in err
    assert Image.open(out).info["parameters"].startswith("a dog face, twemoji style\nSteps:")
    assert main(["generate", "a dog face", "--model", str(styled_model_dir), "--as-typed", "-o", str(raw)]) == 0
    assert "drawn as" not in capsys.readouterr().err
    assert Image.open(raw).info["parameters"].startswith("a dog face\nSteps:")


def test_eval_cache_keys_what_was_drawn(styled_model_dir, tmp_path):
    from flowflash.eval.bench import parse_setting
    from flowflash.eval.generate import Setting, cache_path
    from flowflash.eval.prompt_set import PromptSet

    pipe = Pipeline.load(styled_model_dir)
    plain = PromptSet("p", "sha1", [{"caption": "a dog face"}])
    styled = PromptSet("s", "sha2", [{"caption": "dog face, fluent flat style"}])
    on, off = Setting("x", str(styled_model_dir)), Setting("x", str(styled_model_dir), complete_style=False)
    assert cache_path(tmp_path, pipe, on, 0, plain) != cache_path(tmp_path, pipe, off, 0, plain)
    # a set whose prompts all name a style draws the same either way, under the key it always had
    assert cache_path(tmp_path, pipe, on, 0, styled) == cache_path(tmp_path, pipe, off, 0, styled)
    # so does a set the style would not fit (the light encoder alone takes 8 words): eval draws as Pipeline does
    lean = Pipeline.load(styled_model_dir, drop=["minilm"])
    long = PromptSet("l", "sha3", [{"caption": "a red dog face a red apple"}])
    on, off = (Setting("x", str(styled_model_dir), drop=("minilm",), complete_style=c) for c in (True, False))
    assert cache_path(tmp_path, lean, on, 0, long) == cache_path(tmp_path, lean, off, 0, long)
    assert parse_setting("s=model:teacher,style:0").complete_style is False
    assert parse_setting("s=model:teacher").complete_style is True


def test_jobs_batch_only_with_jobs_that_complete_alike():
    from flowflash.app.jobs import JobSpec

    assert JobSpec("a", "m").batch_key() == JobSpec("b", "m").batch_key()
    assert JobSpec("a", "m").batch_key() != JobSpec("a", "m", complete_style=False).batch_key()


def test_results_say_when_prompts_were_drawn_as_typed():
    from flowflash.eval.generate import Setting
    from flowflash.eval.tasks import setting_columns

    assert "as_typed" not in setting_columns(Setting("x"))  # rows as they always were
    assert setting_columns(Setting("x", complete_style=False))["as_typed"] is True


def test_a_web_job_records_the_prompt_as_drawn(styled_model_dir):
    from flowflash.app.jobs import JobSpec, Worker

    worker = Worker({"styled": Pipeline.load(styled_model_dir)}).start()
    try:
        job = worker.submit(JobSpec("a dog face", "styled", steps=2, previews=False))
        deadline = time.time() + 60  # bounded: a stuck worker fails the test, never hangs it
        while not job.finished and time.time() < deadline:
            time.sleep(0.05)
        assert job.status == "done", job.error
        assert job.params["prompt"] == "a dog face" and job.params["drawn_as"] == "a dog face, twemoji style"
    finally:
        worker.stop()


def test_the_http_apis_draw_as_typed_on_request_and_say_what_was_drawn(styled_model_dir):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient  # in process: no socket

    from flowflash.app.jobs import Worker
    from flowflash.app.server import create_app

    worker = Worker({"styled": Pipeline.load(styled_model_dir)}).start()
    try:
        client = TestClient(create_app(worker), base_url="http://127.0.0.1")  # the server answers loopback only
        r = client.post("/v1/images/generations", json={"prompt": "a dog face", "steps": 2, "seed": 1})
        assert r.status_code == 200, r.text
        done = r.json()
        typed = client.post("/v1/images/generations", json={"prompt": "a dog face", "steps": 2, "seed": 1,
                                                             "as_typed": True}).json()
        assert done["data"][0]["revised_prompt"] == "a dog face, twemoji style"  # OpenAI's field for a rewrite
        assert typed["data"][0]["revised_prompt"] == "a dog face"
        assert done["data"][0]["b64_json"] != typed["data"][0]["b64_json"]
        job = client.post("/api/jobs", json={"prompt": "a dog face", "steps": 2, "as_typed": True}).json()
        deadline = time.time() + 60
        while (state := client.get(f"/api/jobs/{job['id']}").json())["status"] not in ("done", "failed") \
                and time.time() < deadline:
            time.sleep(0.05)
        assert state["status"] == "done" and state["parameters"]["drawn_as"] == "a dog face"
        assert state["parameters"]["as_typed"] is True
        assert client.get("/api/models").json()["models"][0]["default_style"] == "twemoji style"  # the page's cue
    finally:
        worker.stop()


def test_a_grid_draws_as_generate_does_unless_as_typed(styled_model_dir, tmp_path):
    from flowflash.eval.grid import draw_grid

    (tmp_path / "p.txt").write_text("a dog face\nred apple, fluent flat style\n")
    done = draw_grid(tmp_path / "p.txt", str(tmp_path / "a.png"), model=str(styled_model_dir), steps=2)
    typed = draw_grid(tmp_path / "p.txt", str(tmp_path / "b.png"), model=str(styled_model_dir), steps=2,
                      complete_style=False)
    a, b = (np.asarray(Image.open(r["path"])) for r in (done, typed))
    w = a.shape[1] // 8  # one column per prompt: the first drawn otherwise, the styled second the same
    assert not np.array_equal(a[:, :w], b[:, :w]) and np.array_equal(a[:, w:2 * w], b[:, w:2 * w])
