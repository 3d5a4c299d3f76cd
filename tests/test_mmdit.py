"""Our MMDiT (models/mmdit.py) against diffusers' SD3Transformer2DModel, which it replaces in FlowModel.

Measured on CPU (torch 2.13, diffusers 0.42): outputs and gradients are bit-identical at fp32, under bf16
autocast and with bf16/fp16 weights, so every comparison here is exact (atol = rtol = 0). The contract is
looser (fp32 outputs within 1e-5, gradients within 1e-5 relative): should a torch or diffusers upgrade
change an op order, check the size of the difference against it before loosening a tolerance here.
"""
from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from flowflash.errors import FlowflashError
from flowflash.models.mmdit import MMDiT

SD3Transformer2DModel = pytest.importorskip("diffusers.models.transformers.transformer_sd3").SD3Transformer2DModel
EXACT = dict(atol=0, rtol=0)
PROMPT = "red apple, twemoji style"


def kwargs(patch: int = 4, layers: int = 3, heads: int = 2, head_dim: int = 8, size: int = 16) -> dict:
    """transformer_kwargs()'s shape of config, small."""
    return dict(sample_size=size, patch_size=patch, in_channels=3, out_channels=3, num_layers=layers,
                attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=24,
                caption_projection_dim=heads * head_dim, pooled_projection_dim=20, pos_embed_max_size=size // patch,
                qk_norm="rms_norm")


CONFIGS = {"p2-1layer": kwargs(patch=2, layers=1, size=8), "p4-3layers": kwargs(),
           "p8-3layers-wide": kwargs(patch=8, heads=4, head_dim=16, size=32)}


def pair(k: dict, seed: int = 0) -> tuple[torch.nn.Module, MMDiT]:
    """diffusers' model and ours with the same weights (ours loaded strictly from diffusers' state dict)."""
    torch.manual_seed(seed)
    ref = SD3Transformer2DModel(**k)
    ours = MMDiT(**k)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def inputs(k: dict, batch: int, size: int | None = None, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = size or k["sample_size"]
    return dict(hidden_states=torch.randn(batch, k["in_channels"], s, s, generator=g),
                encoder_hidden_states=torch.randn(batch, 5, k["joint_attention_dim"], generator=g),
                pooled_projections=torch.randn(batch, k["pooled_projection_dim"], generator=g),
                timestep=torch.rand(batch, generator=g) * 1000)


def run(model, x: dict) -> torch.Tensor:
    return model(**x, return_dict=False)[0]


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_names_shapes_and_order_are_diffusers(name):
    ref, ours = pair(CONFIGS[name])
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b)  # same names, same order (the order of saved files)
    assert all(a[n].shape == b[n].shape and a[n].dtype == b[n].dtype for n in a)
    torch.testing.assert_close(b["pos_embed.pos_embed"], a["pos_embed.pos_embed"], **EXACT)  # computed, not copied
    assert {n for n, _ in ours.named_buffers()} == {n for n, _ in ref.named_buffers()} == {"pos_embed.pos_embed"}
    ref.load_state_dict(ours.state_dict(), strict=True)  # and back
    assert len(ours.transformer_blocks) == CONFIGS[name]["num_layers"]
    pre_only = [[blk.context_pre_only for blk in m.transformer_blocks] for m in (ref, ours)]
    assert pre_only[0] == pre_only[1] == [False] * (len(ours.transformer_blocks) - 1) + [True]


@pytest.mark.parametrize("name", CONFIGS)
def test_a_fresh_model_has_diffusers_initial_weights_for_the_same_seed(name):
    k = CONFIGS[name]
    torch.manual_seed(7)
    a = SD3Transformer2DModel(**k).state_dict()
    after_a = torch.rand(3)
    torch.manual_seed(7)
    b = MMDiT(**k).state_dict()
    after_b = torch.rand(3)
    for n in a:
        torch.testing.assert_close(b[n], a[n], **EXACT, msg=n)
    torch.testing.assert_close(after_b, after_a, **EXACT)  # the same random draws consumed: later draws agree too


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_matches_diffusers_fp32_and_bf16_autocast(name, batch):
    k = CONFIGS[name]
    ref, ours = pair(k)
    x = inputs(k, batch)
    with torch.no_grad():
        out = run(ours, x)
        assert out.shape == x["hidden_states"].shape
        torch.testing.assert_close(out, run(ref, x), **EXACT)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = run(ref, x), run(ours, x)
        assert b.dtype == a.dtype == torch.bfloat16
        torch.testing.assert_close(b, a, **EXACT)


def test_forward_matches_diffusers_with_half_weights_and_a_cropped_position_table():
    k = CONFIGS["p4-3layers"]
    ref, ours = pair(k)
    with torch.no_grad():
        small = inputs(k, 2, size=8)  # 2x2 patches: the centre of the 4x4 table
        torch.testing.assert_close(run(ours, small), run(ref, small), **EXACT)
        for dtype in (torch.bfloat16, torch.float16):
            ref.to(dtype), ours.to(dtype)
            x = {n: (v if n == "timestep" else v.to(dtype)) for n, v in inputs(k, 2).items()}
            a, b = run(ref, x), run(ours, x)
            assert b.dtype == dtype
            torch.testing.assert_close(b, a, **EXACT)


@pytest.mark.parametrize("autocast", [False, True])
def test_gradients_match_diffusers(autocast):
    k = CONFIGS["p4-3layers"]
    ref, ours = pair(k)
    grads = []
    for model in (ref, ours):
        x = inputs(k, 3)
        x["hidden_states"].requires_grad_(True)
        x["encoder_hidden_states"].requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = run(model, x)
        (out.float() ** 2).mean().backward()
        grads.append({**{n: p.grad for n, p in model.named_parameters()},
                      "<image>": x["hidden_states"].grad, "<text>": x["encoder_hidden_states"].grad})
    a, b = grads
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(b[n], a[n], **EXACT, msg=n)


def test_block_outputs_feed_the_dmd2_feature_tap_as_diffusers_blocks_do():
    from flowflash.methods.dmd2 import FeatureTap

    k = CONFIGS["p4-3layers"]
    ref, ours = pair(k)
    taps = [FeatureTap(types.SimpleNamespace(transformer=m), [0, 2]) for m in (ref, ours)]
    x = inputs(k, 2)
    with torch.no_grad():
        run(ref, x), run(ours, x)
    a, b = (t.take() for t in taps)
    assert len(a) == len(b) == 2
    for fa, fb in zip(a, b):
        torch.testing.assert_close(fb, fa, **EXACT)


def test_shipped_weights_load_strictly_and_the_student_makes_the_same_image():
    from flowflash.models import storage
    from flowflash.runtime.pipeline import Pipeline, resolve_model

    for name in ("student", "teacher"):
        from flowflash.models.flow_model import read_config

        folder = resolve_model(name)
        sd = storage.load_weights(folder)
        own = {n[len("transformer."):]: v for n, v in sd.items() if n.startswith("transformer.")}
        MMDiT(**read_config(folder).transformer_kwargs()).load_state_dict(own, strict=True)

    pipe = Pipeline.load("student")
    assert isinstance(pipe.model.net.transformer, MMDiT)
    ours = np.asarray(pipe.generate(PROMPT, seed=0)[0]).astype(int)
    net = pipe.model.net  # the same FlowModel with diffusers' transformer holding the same weights
    ref = SD3Transformer2DModel(**net.cfg.transformer_kwargs())
    ref.load_state_dict(net.transformer.state_dict(), strict=True)
    net.transformer = ref.eval().requires_grad_(False)
    theirs = np.asarray(pipe.generate(PROMPT, seed=0)[0]).astype(int)
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() == 0  # measured: identical pixels


def test_generating_with_an_emoji_model_imports_neither_diffusers_nor_transformers(tmp_path):
    code = ("import sys\n"
            "from flowflash.runtime.pipeline import Pipeline\n"
            f"Pipeline.load('student').generate({PROMPT!r}, seed=0)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers'}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("change, match", [
    (dict(qk_norm=None), "qk_norm='rms_norm' only"),
    (dict(qk_norm="layer_norm"), "qk_norm='rms_norm' only"),
    (dict(dual_attention_layers=(0,)), "no dual-attention"),
    (dict(use_pos_embed=False), "does not take use_pos_embed"),
    (dict(caption_projection_dim=32), "caption_projection_dim must equal"),
    (dict(num_layers=0), "num_layers must be a positive integer"),
    (dict(pos_embed_max_size=None), "pos_embed_max_size must be a positive integer"),
    (dict(attention_head_dim=3, caption_projection_dim=6), "divisible by 4"),
])
def test_unsupported_options_are_refused(change, match):
    with pytest.raises(FlowflashError, match=match):
        MMDiT(**{**CONFIGS["p4-3layers"], **change})


def test_unsupported_calls_are_refused():
    k = CONFIGS["p4-3layers"]
    model = MMDiT(**k)
    x = inputs(k, 1)
    with pytest.raises(FlowflashError, match="return_dict=False"):
        model(**x, return_dict=True)
    with pytest.raises(FlowflashError, match="one value per image"):
        model(**{**x, "timestep": torch.tensor(500.0)})
    with pytest.raises(FlowflashError, match="position table holds 4x4"):
        model(**inputs(k, 1, size=32))
