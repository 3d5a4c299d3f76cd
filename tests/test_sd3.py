"""SD3/SD3.5 pipelines from a local diffusers folder (the project's own tiny fixture): same image as diffusers
for the same seed, encoders dropped, sizes, negative prompts, img2img, single files and bad input."""
import json
import shutil

import numpy as np
import pytest
import torch

from flowflash.cli import main
from flowflash.errors import FlowflashError
from flowflash.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    from flowflash.testing.sd3_fixture import write_tiny_sd3
    return write_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3.5", "sd3.5-medium")


@pytest.fixture(scope="module")
def reference(sd3):
    from diffusers import StableDiffusion3Pipeline
    return StableDiffusion3Pipeline.from_pretrained(sd3, local_files_only=True)


def diffusers_image(ref, seed, **kw):
    out = ref(generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images[0]
    return (out * 255).round().astype(np.uint8)


def mad(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


@pytest.mark.parametrize("steps, guidance", [(4, 1.0), (28, 5.0)])
def test_same_seed_same_image_as_diffusers(sd3, reference, steps, guidance):
    """SD3.5 Medium's structure (dual attention, RMS qk-norm); the other variants below."""
    pipe = Pipeline.load(sd3)
    for seed in (0, 7):
        ours = pipe.generate("a red apple on a table", steps=steps, guidance=guidance, seed=seed, size=64)[0]
        theirs = diffusers_image(reference, seed, prompt="a red apple on a table", num_inference_steps=steps,
                                 guidance_scale=guidance, height=64, width=64)
        assert mad(ours, theirs) <= 1.0  # at most 1/255 on average (fp32, CPU)
    assert pipe.last.params.timesteps[0] == 1.0 and pipe.last.params.timesteps[-1] == 0.0


def test_non_square_size_and_negative_prompt_match_diffusers(sd3, reference):
    pipe = Pipeline.load(sd3)
    ours = pipe.generate("a dog", steps=3, guidance=4.0, seed=2, size=(64, 32), negative_prompt="blurry")[0]
    theirs = diffusers_image(reference, 2, prompt="a dog", num_inference_steps=3, guidance_scale=4.0, height=32,
                             width=64, negative_prompt="blurry")
    assert ours.size == (64, 32) and mad(ours, theirs) <= 1.0
    plain = pipe.generate("a dog", steps=3, guidance=4.0, seed=2, size=(64, 32))[0]
    assert mad(ours, plain) > 0  # the negative prompt is used


def test_dropping_t5_never_loads_it_and_matches_diffusers_without_it(sd3):
    from diffusers import StableDiffusion3Pipeline
    pipe = Pipeline.load(sd3, drop=["t5"])
    assert set(pipe.model.encoders) == {"clip_l", "clip_g"}
    ref = StableDiffusion3Pipeline.from_pretrained(sd3, text_encoder_3=None, tokenizer_3=None, local_files_only=True)
    ours = pipe.generate("a cat", steps=4, guidance=1.0, seed=1, size=64)[0]
    assert mad(ours, diffusers_image(ref, 1, prompt="a cat", num_inference_steps=4, guidance_scale=1.0,
                                     height=64, width=64)) <= 1.0
    full = Pipeline.load(sd3).generate("a cat", steps=4, guidance=1.0, seed=1, size=64)[0]
    assert mad(ours, full) > 0
    clip = Pipeline.load(sd3, drop=["clip_g"]).generate("a cat", steps=4, guidance=1.0, seed=1, size=64)[0]
    assert mad(clip, full) > 0 and clip.size == (64, 64)


def test_a_folder_without_t5_needs_drop_t5(tmp_path):
    from flowflash.testing.sd3_fixture import write_tiny_sd3
    folder = write_tiny_sd3(tmp_path / "no-t5", with_t5=False)
    with pytest.raises(FlowflashError, match="has no T5 text encoder.*--drop t5"):
        Pipeline.load(folder)
    assert Pipeline.load(folder, drop=["t5"]).generate("x", steps=2, size=32)[0].size == (32, 32)


def test_img2img_matches_diffusers_img2img(sd3):
    from diffusers import StableDiffusion3Img2ImgPipeline
    pipe = Pipeline.load(sd3)
    init = pipe.generate("a red apple", steps=4, guidance=1.0, seed=0, size=64)[0]
    ref = StableDiffusion3Img2ImgPipeline.from_pretrained(sd3, local_files_only=True)
    for strength, guidance in ((0.6, 1.0), (1.0, 4.0)):
        ours = pipe.generate("a blue car", steps=5, guidance=guidance, seed=5, size=64, init_image=init,
                             strength=strength)[0]
        theirs = diffusers_image(ref, 5, prompt="a blue car", image=init, strength=strength, num_inference_steps=5,
                                 guidance_scale=guidance, height=64, width=64)
        assert mad(ours, theirs) <= 1.0
    assert len(pipe.last.params.timesteps) == 6  # strength 1: every step
    pipe.generate("a blue car", steps=5, seed=5, size=64, init_image=init, strength=0.6)
    assert len(pipe.last.params.timesteps) == 4  # int(5 - 0.6 * 5) = 2 steps skipped
    txt = pipe.generate("a blue car", steps=5, guidance=1.0, seed=5, size=64)[0]
    low = pipe.generate("a blue car", steps=5, guidance=1.0, seed=5, size=64, init_image=init, strength=0.4)[0]
    assert mad(low, init) < mad(txt, init)  # starting late keeps more of the image
    with pytest.raises(FlowflashError, match="strength must lie in"):
        pipe.generate("x", init_image=init, strength=0.0)


def test_batches_several_images_bf16_and_dynamic_shift_match_diffusers(sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    ref = StableDiffusion3Pipeline.from_pretrained(sd3, local_files_only=True)
    pipe = Pipeline.load(sd3)
    # two prompts x two images with CFG: image k of a prompt uses seed + k, as a list of generators in diffusers
    ours = pipe.generate(["a red apple", "a dog"], steps=3, guidance=4.0, seed=10, num_images=2, size=64)
    gens = [torch.Generator().manual_seed(s) for s in (10, 11, 10, 11)]
    theirs = ref(prompt=["a red apple", "a dog"], num_images_per_prompt=2, num_inference_steps=3, guidance_scale=4.0,
                 height=64, width=64, generator=gens, output_type="np").images
    assert len(ours) == 4 and all(mad(o, (t * 255).round().astype(np.uint8)) <= 1.0 for o, t in zip(ours, theirs))
    # bf16 from fp32 files: the transformer is cast too, the step is taken in fp32 as diffusers does
    bf = Pipeline.load(sd3, dtype="bf16")
    assert bf.model.transformer.dtype == torch.bfloat16
    ref16 = StableDiffusion3Pipeline.from_pretrained(sd3, local_files_only=True).to(torch.bfloat16)  # (diffusers'
    # own bf16 load of fp32 files leaves its VAE in fp32 and fails; cast after loading)
    a = bf.generate("a red apple", steps=4, guidance=1.0, seed=1, size=64)[0]
    b = diffusers_image(ref16, 1, prompt="a red apple", num_inference_steps=4, guidance_scale=1.0, height=64, width=64)
    assert mad(a, b) <= 1.0
    # a scheduler that shifts by resolution
    dyn = tmp_path / "dyn"
    shutil.copytree(sd3, dyn)
    cfg_path = dyn / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256, base_shift=0.5, max_shift=1.15)
    cfg_path.write_text(json.dumps(cfg))
    refd = StableDiffusion3Pipeline.from_pretrained(dyn, local_files_only=True)
    for w, h in ((64, 32), (128, 64)):
        a = Pipeline.load(dyn).generate("a cat", steps=4, guidance=1.0, seed=2, size=(w, h))[0]
        b = diffusers_image(refd, 2, prompt="a cat", num_inference_steps=4, guidance_scale=1.0, height=h, width=w)
        assert mad(a, b) <= 1.0


def test_emoji_img2img_and_negative_prompt(tiny_model_dir):
    pipe = Pipeline.load(tiny_model_dir)
    init = pipe.generate("a red apple", steps=4, seed=0)[0]
    low = pipe.generate("dog face", steps=4, seed=3, init_image=init, strength=0.25)[0]
    fresh = pipe.generate("dog face", steps=4, seed=3)[0]
    assert pipe.last.params.steps == 4 and mad(low, init) < mad(fresh, init)
    neg = pipe.generate("dog face", steps=4, guidance=3.0, seed=3, negative_prompt="apple")[0]
    null = pipe.generate("dog face", steps=4, guidance=3.0, seed=3)[0]
    assert mad(neg, null) > 0
    # guidance <= 1 turns CFG off, as diffusers
    one = pipe.generate("dog face", steps=4, guidance=1.0, seed=3)[0]
    half = pipe.generate("dog face", steps=4, guidance=0.5, seed=3)[0]
    assert mad(one, half) == 0


def test_single_file_with_config_gives_the_same_image(sd3, tmp_path):
    from flowflash.testing.sd3_fixture import write_single_file
    ckpt = write_single_file(sd3, tmp_path / "tiny.safetensors")
    a = Pipeline.load(sd3).generate("a red apple", steps=2, seed=4, size=32)[0]
    b = Pipeline.load(ckpt, config=sd3).generate("a red apple", steps=2, seed=4, size=32)[0]
    assert mad(a, b) == 0
    with pytest.raises(FlowflashError, match="single checkpoint file: name a local diffusers folder"):
        Pipeline.load(ckpt)


def test_cli_generate_and_its_one_line_errors(sd3, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["generate", "a red apple", "--model", str(sd3), "--size", "64x32", "--steps", "2",
                 "--negative-prompt", "blurry", "--guidance", "3", "-o", str(out)]) == 0
    from PIL import Image
    im = Image.open(out)
    assert im.size == (64, 32) and "Negative prompt: blurry" in im.info["parameters"]
    init = tmp_path / "init.png"
    im.save(init)
    assert main(["generate", "a cat", "--model", str(sd3), "--init-image", str(init), "--strength", "0.6",
                 "--steps", "4", "-o", str(tmp_path / "b.png")]) == 0
    assert "Denoising strength: 0.6" in Image.open(tmp_path / "b.png").info["parameters"]
    capsys.readouterr()
    bad = tmp_path / "bad"
    shutil.copytree(sd3, bad)
    cases = [(["--size", "40"], "not a positive multiple of 16"),
             (["--size", "4096"], "larger than this model's position embedding allows"),
             (["--init-image", str(tmp_path / "missing.png")], "cannot read the init image"),
             (["--init-image", str(init), "--strength", "0"], "strength must lie in (0, 1]"),
             (["--device", "cuda"], "sees no CUDA GPU") if not torch.cuda.is_available() else (["--size", "40"], "multiple"),
             (["--drop", "minilm"], "cannot drop minilm"),
             (["--model", str(tmp_path / "x.safetensors")], "single checkpoint file")]
    for extra, needle in cases:
        argv = ["generate", "x", "--model", str(sd3), "-o", str(tmp_path / "c.png"), *extra]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, (extra, err)
    assert not (tmp_path / "c.png").exists()


def test_folder_errors_name_the_problem(sd3, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(sd3, bad)
    index = json.loads((bad / "model_index.json").read_text())
    (bad / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(FlowflashError, match="holds a FluxPipeline pipeline"):
        Pipeline.load(bad)
    (bad / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(bad / "vae")
    with pytest.raises(FlowflashError, match="lacks the vae/ component"):
        Pipeline.load(bad)
    shutil.copytree(sd3 / "vae", bad / "vae")
    for f in (bad / "transformer").glob("*.safetensors"):
        f.unlink()
    torch.save({}, bad / "transformer" / "diffusion_pytorch_model.bin")
    with pytest.raises(FlowflashError, match="holds pickle weights"):
        Pipeline.load(bad)
    with pytest.raises(FlowflashError, match="give the file with --model"):
        Pipeline.load(None, config=sd3)
    with pytest.raises(FlowflashError, match="is not a diffusers pipeline folder"):
        Pipeline.load(tmp_path / "x.safetensors", config=tmp_path)
    shutil.rmtree(bad / "transformer")
    shutil.copytree(sd3 / "transformer", bad / "transformer")
    for sub in ("transformer", "text_encoder_3"):  # a truncated file, in a diffusers and a transformers component
        f = next((bad / sub).glob("*.safetensors"))
        keep = f.read_bytes()
        f.write_bytes(keep[:1000])
        with pytest.raises(FlowflashError, match=f"{sub}.*(corrupt|Unable to load)"):
            Pipeline.load(bad)
        f.write_bytes(keep)


def test_export_runs_in_vanilla_diffusers_with_the_models_steps(sd3, tmp_path, capsys, tiny_model_dir):
    from diffusers import StableDiffusion3Pipeline
    student = tmp_path / "student"
    shutil.copytree(sd3, student)
    (student / "flowflash.json").write_text(json.dumps({"sampling": {"steps": 4, "guidance": 1.0}}))
    ours = Pipeline.load(student).generate("a red apple", seed=6, size=64)[0]  # the student's own defaults
    assert main(["export", str(student), "--to", str(tmp_path / "exported")]) == 0
    out = tmp_path / "exported"
    assert not (out / "flowflash.json").exists() and "num_inference_steps=4" in (out / "README.md").read_text()
    ref = StableDiffusion3Pipeline.from_pretrained(out, local_files_only=True)
    theirs = diffusers_image(ref, 6, prompt="a red apple", num_inference_steps=4, guidance_scale=1.0, height=64, width=64)
    assert mad(ours, theirs) <= 1.0
    capsys.readouterr()
    assert main(["export", str(tiny_model_dir), "--to", str(tmp_path / "e2")]) == 2
    assert "pixel-space flowflash model" in capsys.readouterr().err and not (tmp_path / "e2").exists()
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert main(["export", str(student), "--to", str(keep)]) == 2  # an existing folder is never replaced
    assert "exists" in capsys.readouterr().err and (keep / "notes.txt").read_text() == "mine"
    (student / "flowflash.json").write_text("{broken")
    with pytest.raises(FlowflashError, match="flowflash.json is not valid JSON"):
        Pipeline.load(student)


@pytest.mark.parametrize("variant", ["sd3-medium", "sd3.5-large"])
def test_the_other_transformer_variants_match_diffusers(variant, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from flowflash.testing.sd3_fixture import write_tiny_sd3
    folder = write_tiny_sd3(tmp_path / variant, variant)
    ref = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)
    ours = Pipeline.load(folder).generate("a red apple", steps=4, guidance=3.0, seed=2, size=64)[0]
    theirs = diffusers_image(ref, 2, prompt="a red apple", num_inference_steps=4, guidance_scale=3.0, height=64, width=64)
    assert mad(ours, theirs) <= 1.0


def test_the_vae_takes_each_devices_fast_layout_and_decode_follows_it(sd3):
    from flowflash.models.sd3 import vae_layout

    assert vae_layout(torch.device("cpu")) == torch.channels_last  # oneDNN's
    assert vae_layout("cuda") == torch.contiguous_format
    assert vae_layout(torch.device("cuda", 1)) == torch.contiguous_format
    model = Pipeline.load(sd3).model
    assert model.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x = model.noise([0], (64, 64))
    last = model.decode(x)
    model.vae.to(memory_format=torch.contiguous_format)  # as `to("cuda")` leaves it
    assert not model.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert (last.int() - model.decode(x).int()).abs().max() <= 1  # the same image in either layout
    model.to("cpu")
    assert model.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


# torch's own warning when compile is set up
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_wraps_the_transformer_and_the_vae_decoder_only_on_cuda(sd3, tiny_model_dir, monkeypatch):
    from flowflash.models.sd3 import SD3Model

    model = Pipeline.load(sd3, compile=True).model  # compiled lazily: nothing is traced until a call
    assert model.transformer._compiled_call_impl is not None
    assert model.vae.decoder._compiled_call_impl is None  # on a CPU it did not pay
    on_gpu = Pipeline.load(sd3).model
    monkeypatch.setattr(SD3Model, "device", property(lambda self: torch.device("cuda")))  # as placed on one
    on_gpu.compile()
    assert on_gpu.transformer._compiled_call_impl is not None and on_gpu.vae.decoder._compiled_call_impl is not None
    emoji = Pipeline.load(tiny_model_dir, compile=True).model
    assert emoji.denoiser._compiled_call_impl is not None
