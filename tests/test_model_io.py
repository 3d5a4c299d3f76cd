import json

import pytest
import torch

from flowflash.errors import FlowflashError
from flowflash.models.flow_model import FlowModel, load_model
from tests.conftest import tiny_model_config


def test_roundtrip_is_fp16_and_exact(tiny_model_dir):
    m = load_model(tiny_model_dir)
    from safetensors.torch import load_file
    sd = load_file(tiny_model_dir / "model.safetensors")
    assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k].float())
    assert m.cfg.name == "tiny" and not any(p.requires_grad for p in m.parameters())


def test_missing_folder(tmp_path):
    with pytest.raises(FlowflashError, match="model folder not found"):
        load_model(tmp_path / "nope")


def test_truncated_weights(tiny_model_dir):
    w = tiny_model_dir / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(FlowflashError, match="truncated or corrupt"):
        load_model(tiny_model_dir)


def test_config_does_not_match(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg["num_heads"] = 3
    (tiny_model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FlowflashError, match="does not match the weights"):
        load_model(tiny_model_dir)


def test_unknown_config_field(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg["frobnicate"] = 1
    (tiny_model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FlowflashError, match="unknown fields"):
        load_model(tiny_model_dir)


def test_pickle_weights_are_refused(tiny_model_dir):
    (tiny_model_dir / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, tiny_model_dir / "model.pt")
    with pytest.raises(FlowflashError, match="pickle weights"):
        load_model(tiny_model_dir)


def test_forward_shape():
    torch.manual_seed(0)
    m = FlowModel(tiny_model_config())
    x = torch.randn(2, 3, 16, 16)
    out = m(x, torch.rand(2), torch.randn(2, 16, 384), torch.randn(2, 768))
    assert out.shape == x.shape


def test_x_prediction_is_converted_to_velocity():
    torch.manual_seed(0)
    m = FlowModel(tiny_model_config(prediction="x"))
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([1.0, 0.5, 0.01])
    ctx, pooled = torch.randn(3, 16, 384), torch.randn(3, 768)
    raw = m.transformer(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                        timestep=t * 1000, return_dict=False)[0]
    v = m(x, t, ctx, pooled)
    assert torch.allclose(v[0], x[0] - raw[0], atol=1e-5)  # t = 1: v = eps - x0
    assert torch.allclose(v[1], (x[1] - raw[1]) / 0.5, atol=1e-5)
    assert torch.allclose(v[2], (x[2] - raw[2]) / 0.05, atol=1e-4)  # t clamped at t_min
    with pytest.raises(FlowflashError, match="prediction must be"):
        FlowModel(tiny_model_config(prediction="eps"))


def test_large_models_are_sharded_with_an_index_and_load_back(tmp_path, monkeypatch):
    from flowflash.models import storage
    from flowflash.models.flow_model import save_model
    monkeypatch.setattr(storage, "SHARD_BYTES", 20_000)  # force several shards on the tiny model
    torch.manual_seed(0)
    m = FlowModel(tiny_model_config())
    save_model(m, tmp_path / "m")
    shards = sorted((tmp_path / "m").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "m" / "model.safetensors").exists()
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    back = load_model(tmp_path / "m")
    assert all(torch.equal(v.half().float(), back.state_dict()[k]) for k, v in m.state_dict().items())
    shards[-1].unlink()
    with pytest.raises(FlowflashError, match="names shards the folder lacks"):
        load_model(tmp_path / "m")


def test_int8_storage_quantizes_linear_weights_only_and_stays_close(tmp_path):
    from safetensors.torch import load_file
    from flowflash.models.flow_model import save_model
    torch.manual_seed(0)
    m = FlowModel(tiny_model_config())
    save_model(m, tmp_path / "q", "int8")
    raw = load_file(tmp_path / "q" / "model.safetensors")
    int8 = {k for k, v in raw.items() if v.dtype == torch.int8}
    assert int8 == set(m.int8_keys()) and all(f"{k}_scale" in raw for k in int8)
    assert "light.embed.weight" not in int8 and "transformer.pos_embed.proj.weight" not in int8
    assert any(k.endswith("in_proj_weight") for k in int8)  # the light encoder's fused attention matrix
    back = load_model(tmp_path / "q")
    for k, v in m.state_dict().items():
        if k in int8:  # per output channel: error at most half a quantization step
            step = v.abs().amax(dim=1, keepdim=True) / 127
            assert ((back.state_dict()[k] - v).abs() <= step / 2 + 1e-6).all()
        else:
            assert torch.equal(back.state_dict()[k], v.half().float())
    x = torch.randn(2, 3, 16, 16)
    args = (x, torch.rand(2), torch.randn(2, 16, 384), torch.randn(2, 768))
    assert (back(*args) - m(*args)).abs().max() < 0.05 * m(*args).abs().max()


def test_first_format_folder_converts_once_and_generates_the_same(tmp_path):
    """A folder of the first layout (flat sampling fields in config.json, shards without an index) is
    rewritten by `flowflash convert` and then gives the same images (fp16) or close ones (int8)."""
    import json
    import numpy as np
    from safetensors.torch import save_file
    from flowflash.cli import main
    from flowflash.runtime.pipeline import Pipeline
    torch.manual_seed(0)
    m = FlowModel(tiny_model_config(sampling={"steps": 3, "guidance": 2.0, "shift": 1.0}))
    old = tmp_path / "old"
    old.mkdir()
    cfg = m.cfg.to_dict()
    s = cfg.pop("sampling")
    cfg.update(format="flowflash-model-v1", shift=s["shift"], default_steps=s["steps"],
               default_guidance=s["guidance"], schedule=s["schedule"])
    (old / "config.json").write_text(json.dumps(cfg))
    sd = {k: v.half().contiguous() for k, v in m.state_dict().items()}
    keys = sorted(sd)
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), 1):
        save_file({k: sd[k] for k in part}, old / f"model-{i:05d}-of-00002.safetensors")
    (old / "README.md").write_text("# old\n\nA model.\n\n- **Kind**: teacher.\n")  # a card with no Storage line yet
    with pytest.raises(FlowflashError, match="pre-index shard layout"):
        load_model(old)
    assert main(["convert", str(old), "--storage", "fp16", "--to", str(tmp_path / "fp16")]) == 0
    assert main(["convert", str(old), "--to", str(tmp_path / "int8")]) == 0
    new = json.loads((tmp_path / "fp16" / "config.json").read_text())
    assert new["format"] == "flowflash-model-v2" and new["sampling"]["steps"] == 3 and "default_steps" not in new
    card = (tmp_path / "int8" / "README.md").read_text()
    assert card.startswith("# old\n\nA model.\n\n- **Storage**: int8 weight-only") and "- **Kind**: teacher." in card
    ref = np.asarray(Pipeline.load(old).generate("a red apple", seed=1)[0], dtype=int)
    same = np.asarray(Pipeline.load(tmp_path / "fp16").generate("a red apple", seed=1)[0], dtype=int)
    close = np.asarray(Pipeline.load(tmp_path / "int8").generate("a red apple", seed=1)[0], dtype=int)
    assert (ref == same).all() and np.abs(ref - close).mean() < 8


@pytest.mark.parametrize("sampling, needle", [
    ({"steps": 0}, "steps must be a positive integer"),
    ({"guidance": -1}, "guidance must be a number >= 0"),
    ({"shift": 0}, "shift must be a number > 0"),
    ({"schedule": ["x", 0]}, "sampling schedule runs from"),
    ({"schedule": [0.5, 0.7, 0.0]}, "sampling schedule runs from"),
    ({"schedule": [1.0, 0.5]}, "sampling schedule runs from"),
    ({"steps": 4, "schedule": [1.0, 0.5, 0.0]}, r"sampling steps \(4\) differ from the schedule's count \(2"),
    ({"steps": 2, "schedule": [1.0, 0.5, 0.0], "other_schedules": [[1.0, 0.3, 0.0]]}, "one step count twice"),
    ({"warp": 2}, "unknown fields"),
])
def test_a_bad_sampling_block_is_one_clear_error(tiny_model_dir, sampling, needle):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg["sampling"].update(sampling)
    (tiny_model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FlowflashError, match=needle):
        load_model(tiny_model_dir)


def test_convert_keeps_every_shard_under_a_given_limit_and_the_weights_equal(tmp_path, tiny_model_dir):
    """A device run's students must come back in files under its limit: convert's shard_bytes is that limit."""
    from flowflash.release.card import convert
    whole = convert(tiny_model_dir, tmp_path / "whole", "int8")
    small = convert(tiny_model_dir, tmp_path / "small", "int8", shard_bytes=500_000)  # > its largest tensor
    assert len(list(whole.glob("*.safetensors"))) == 1
    shards = sorted(small.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and all(p.stat().st_size <= 500_000 + 8192 for p in shards)  # + the header
    a, b = load_model(whole), load_model(small)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
