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


def test_large_models_are_sharded_and_load_back(tmp_path, monkeypatch):
    import flowflash.models.flow_model as fm
    monkeypatch.setattr(fm, "SHARD_BYTES", 20_000)  # force several shards on the tiny model
    torch.manual_seed(0)
    m = FlowModel(tiny_model_config())
    fm.save_model(m, tmp_path / "m")
    shards = sorted((tmp_path / "m").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "m" / "model.safetensors").exists()
    back = load_model(tmp_path / "m")
    assert all(torch.equal(v.half().float(), back.state_dict()[k]) for k, v in m.state_dict().items())
    shards[-1].unlink()
    with pytest.raises(FlowflashError, match="lacks weight shards"):
        load_model(tmp_path / "m")
