"""The tiny SD3/SD3.5 pipeline fixture: it loads and samples offline for every variant, is deterministic,
small and safetensors-only, and its single-file transformer round-trips through diffusers' from_single_file."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flowflash.testing.sd3_fixture import VARIANTS, write_single_file, write_tiny_sd3  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, tuple[Path, float]]:
    """Each variant's folder and its build time, built once for the module."""
    # Import first: the time budget is for the build, not for a cold diffusers/transformers import.
    for module, name in (("diffusers", "StableDiffusion3Pipeline"), ("transformers", "CLIPTextModelWithProjection"),
                         ("transformers", "T5EncoderModel")):
        getattr(importlib.import_module(module), name)  # both packages load lazily, on attribute access

    out = {}
    for variant in VARIANTS:
        start = time.perf_counter()
        folder = write_tiny_sd3(tmp_path_factory.mktemp(variant) / "pipe", variant=variant)
        out[variant] = folder, time.perf_counter() - start
    return out


def _load(folder: Path, **kw):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, **kw) -> np.ndarray:
    args = dict(prompt="a red apple", num_inference_steps=2, guidance_scale=1.0, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="np")
    return pipe(**{**args, **kw}).images


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_loads_and_samples(built, variant):
    folder, seconds = built[variant]
    assert seconds < 5
    pipe = _load(folder)
    image = _sample(pipe)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    cfg = _sample(pipe, guidance_scale=5.0, negative_prompt="")
    assert cfg.shape == (1, 64, 64, 3) and np.isfinite(cfg).all()
    np.testing.assert_array_equal(_sample(pipe), image)  # same seed, same image


def test_variant_architectures(built):
    from diffusers.models.normalization import RMSNorm

    blocks = _load(built["sd3.5-medium"][0]).transformer.transformer_blocks
    assert blocks[0].use_dual_attention and blocks[0].attn2 is not None
    assert not blocks[1].use_dual_attention
    for attn in (blocks[0].attn, blocks[0].attn2):
        assert isinstance(attn.norm_q, RMSNorm) and isinstance(attn.norm_k, RMSNorm)
    large = _load(built["sd3.5-large"][0]).transformer.transformer_blocks
    assert isinstance(large[0].attn.norm_q, RMSNorm) and not any(b.use_dual_attention for b in large)
    sd3 = _load(built["sd3-medium"][0]).transformer.transformer_blocks
    assert sd3[0].attn.norm_q is None and not any(b.use_dual_attention for b in sd3)


def test_folder_small_and_safetensors_only(built):
    for folder, _ in built.values():
        files = _files(folder)
        assert sum(p.stat().st_size for p in files) < 10_000_000
        assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".ckpt"}]
        weights = {p.parent.name for p in files if p.suffix == ".safetensors"}
        assert weights == {"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}


def test_same_seed_same_weights(tmp_path):
    a, b, c = (write_tiny_sd3(tmp_path / n, "sd3-medium", seed=s) for n, s in (("a", 0), ("b", 0), ("c", 1)))
    for rel in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder_3/model.safetensors"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
        assert (a / rel).read_bytes() != (c / rel).read_bytes()


def test_without_t5(tmp_path):
    folder = write_tiny_sd3(tmp_path / "no-t5", "sd3-medium", with_t5=False)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    assert not (folder / "text_encoder_3").exists() and not (folder / "tokenizer_3").exists()
    image = _sample(_load(folder, text_encoder_3=None, tokenizer_3=None), guidance_scale=5.0)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_tokenizers_pad_and_truncate(built):
    pipe = _load(built["sd3.5-large"][0])
    odd = "A Photo of a GREEN dog-face, Ünïcode ✓ emoji 123! " * 40  # unknown words, non-ASCII, too long
    for tok, encoder, length in ((pipe.tokenizer, pipe.text_encoder, 77), (pipe.tokenizer_2, pipe.text_encoder_2, 77),
                                 (pipe.tokenizer_3, pipe.text_encoder_3, 256)):
        for prompt in ("a red apple", odd, ""):
            ids = tok(prompt, padding="max_length", max_length=length, truncation=True).input_ids
            assert len(ids) == length and max(ids) < encoder.config.vocab_size
            assert ids.count(tok.eos_token_id) >= 1
    apple = pipe.tokenizer("a red apple").input_ids  # whole words, CLIP framing
    assert pipe.tokenizer.convert_ids_to_tokens(apple) == ["<|startoftext|>", "a</w>", "red</w>", "apple</w>",
                                                           "<|endoftext|>"]
    assert pipe.tokenizer_3("a red apple").input_ids[-1] == 1 and pipe.tokenizer_3.pad_token_id == 0


def test_single_file_round_trip(built, tmp_path):
    from diffusers import SD3Transformer2DModel

    folder = built["sd3.5-medium"][0]
    path = write_single_file(folder, tmp_path / "sd35m.safetensors")
    loaded = SD3Transformer2DModel.from_single_file(str(path), config=str(folder), subfolder="transformer",
                                                    local_files_only=True)
    ref = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", local_files_only=True).state_dict()
    got = loaded.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert tuple(loaded.config.dual_attention_layers) == (0,) and loaded.config.qk_norm == "rms_norm"


def test_cli(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_sd3_fixture", ROOT / "scripts" / "make_sd3_fixture.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "cli"
    assert cli.main([str(out), "--variant", "sd3-medium", "--seed", "3", "--single-file", str(tmp_path / "t.sft")]) == 0
    assert json.loads((out / "transformer" / "config.json").read_text())["qk_norm"] is None
    assert (tmp_path / "t.sft").is_file() and "sd3-medium (seed 3)" in capsys.readouterr().out
