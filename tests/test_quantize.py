"""Weight-only quantization at 8, 6 and 4 bits: packing, storage, quantize -> load -> generate, bad input."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from flowflash.cli import main
from flowflash.errors import FlowflashError
from flowflash.models.storage import dequantize_packed, quantize_packed, quantized_bits
from flowflash.release.card import quantize
from flowflash.runtime.pipeline import Pipeline

# Mean absolute uint8 difference to the unquantized model's image (tiny random model, 3 steps): measured
# 0.15 / 0.60 / 2.39; the bounds leave 2.5-3x for other CPUs' arithmetic and still order the widths.
TOLERANCE = {8: 0.5, 6: 1.5, 4: 6.0}


@pytest.mark.parametrize("bits", [6, 4])
def test_packing_round_trips_exactly_on_the_grid(bits):
    torch.manual_seed(0)
    qmax = 2 ** (bits - 1) - 1
    q = torch.randint(-qmax, qmax + 1, (8, 64)).float()
    q[:, ::32] = qmax  # each group reaches its top, so the scale is exactly 0.5 / 0.25
    scale = torch.tensor([0.5, 0.25]).repeat(4)[:, None]
    w = q * scale
    packed, s, meta = quantize_packed(w, bits, 32)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 64 * bits // 8)
    assert torch.equal(dequantize_packed(packed, s, meta, torch.float32), w)


@pytest.mark.parametrize("bits, rel", [(6, 0.03), (4, 0.11)])
def test_packed_error_on_gaussian_weights(bits, rel):
    torch.manual_seed(1)
    w = torch.randn(64, 256)
    d = dequantize_packed(*quantize_packed(w, bits, 32), torch.float32)
    assert float((d - w).pow(2).mean().sqrt() / w.std()) < rel


def test_quantize_load_generate_each_width(tiny_model_dir, tmp_path, capsys):
    base = Pipeline.load(tiny_model_dir)
    ref = np.asarray(base.generate("red apple", steps=3, seed=2, num_images=2)[1], dtype=np.float64)
    fp_bytes = sum(p.stat().st_size for p in tiny_model_dir.glob("*.safetensors"))
    sizes = {}
    for bits in (8, 6, 4):
        out = tmp_path / f"q{bits}"
        assert main(["quantize", str(tiny_model_dir), "--bits", str(bits), "--to", str(out)]) == 0
        assert quantized_bits(out) == bits
        sizes[bits] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        img = np.asarray(Pipeline.load(out).generate("red apple", steps=3, seed=2, num_images=2)[1], dtype=np.float64)
        diff = np.abs(img - ref).mean()
        assert diff <= TOLERANCE[bits], (bits, diff)
    assert fp_bytes > sizes[8] > sizes[6] > sizes[4]
    # the same seed gives the same image from a quantized folder
    again = np.asarray(Pipeline.load(tmp_path / "q4").generate("red apple", steps=3, seed=3)[0])
    assert np.array_equal(again, np.asarray(Pipeline.load(tmp_path / "q4").generate("red apple", steps=3, seed=3)[0]))


def test_quantize_refusals(tiny_model_dir, tmp_path, capsys):
    q = quantize(tiny_model_dir, tmp_path / "q4", 4)
    with pytest.raises(FlowflashError, match=r"already quantized \(4-bit weight-only\).*flowflash convert"):
        quantize(q, tmp_path / "again", 8)
    with pytest.raises(FlowflashError, match="exists; quantize writes a new folder"):
        quantize(tiny_model_dir, q, 6)
    assert not (tmp_path / "again").exists()
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(tiny_model_dir), "--bits", "3", "--to", str(tmp_path / "q3")])
    assert exc.value.code == 2 and "invalid choice: 3" in capsys.readouterr().err
    assert not (tmp_path / "q3").exists()
    # a quantized folder that lost a scale tensor fails by name at load
    (f,) = q.glob("*.safetensors")
    sd = load_file(f)
    gone = next(k for k in sd if k.endswith("_scale"))
    del sd[gone]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(FlowflashError, match=f"has no '{gone}'"):
        Pipeline.load(q)


def test_card_storage_line_says_bits(tiny_model_dir, tmp_path):
    (tiny_model_dir / "README.md").write_text("# tiny\n\n- **Storage**: fp16.\n- **Data**: none.\n")
    q = quantize(tiny_model_dir, tmp_path / "q6", 6)
    card = (q / "README.md").read_text()
    assert "- **Storage**: int6 weight-only (every linear layer's weight, packed" in card and "**Data**" in card
    assert json.loads((q / "config.json").read_text()) == json.loads((tiny_model_dir / "config.json").read_text())


def test_low_memory_keeps_weights_quantized_with_the_same_images(tiny_model_dir, tmp_path):
    from flowflash.models.emoji import EmojiModel
    from flowflash.models.qlinear import QLinear

    for bits in (8, 4):
        q = quantize(tiny_model_dir, tmp_path / f"q{bits}", bits)
        full, low = EmojiModel.load(q), EmojiModel.load(q, low_memory=True)
        layers = [m for m in low.net.modules() if isinstance(m, QLinear)]
        assert layers and all(m.q.dtype == torch.int8 for m in layers)
        assert not any(isinstance(m, QLinear) for m in full.net.modules())
        a = Pipeline(full, q).generate("red apple", steps=3, seed=1, num_images=2)
        b = Pipeline(low, q).generate("red apple", steps=3, seed=1, num_images=2)
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    # an unquantized folder loads as usual
    assert not any(isinstance(m, QLinear) for m in EmojiModel.load(tiny_model_dir, low_memory=True).net.modules())


def test_sd3_pipeline_quantized_transformer_and_t5(tmp_path, capsys):
    from flowflash.models.storage import storage_of
    from flowflash.release.quantize_sd3 import MARKER
    from flowflash.testing.sd3_fixture import write_tiny_sd3

    base = write_tiny_sd3(tmp_path / "base")
    gen = lambda folder: np.asarray(Pipeline.load(folder).generate("a red apple", steps=4, guidance=1.0, seed=0,
                                                                   size=64)[0], dtype=np.float64)
    ref = gen(base)
    # measured on the fixture: 0.15 / 0.69 / 2.56 mean uint8 levels
    for bits, tol in ((8, 0.5), (6, 2.0), (4, 7.0)):
        out = tmp_path / f"q{bits}"
        assert main(["quantize", str(base), "--bits", str(bits), "--to", str(out)]) == 0
        for comp in ("transformer", "text_encoder_3"):
            assert json.loads((out / comp / MARKER).read_text())["bits"] == bits
            info = storage_of(out / comp)
            assert (info["packed_bits"] == [bits]) if bits < 8 else info["int8_tensors"] > 0
        assert (out / "vae").is_dir() and not (out / "vae" / MARKER).exists()  # the rest as it was
        assert np.abs(gen(out) - ref).mean() <= tol
    with pytest.raises(FlowflashError, match="already quantized"):
        from flowflash.release.quantize_sd3 import quantize_sd3
        quantize_sd3(tmp_path / "q8", tmp_path / "again", 4)
    assert main(["quantize", str(base), "--bits", "8", "--to", str(tmp_path / "q8")]) == 2
    assert "exists; quantize writes a new folder" in capsys.readouterr().err
    assert main(["quantize", str(base), "--bits", "8", "--to", str(base / "inside")]) == 2
    assert "lies inside the pipeline folder" in capsys.readouterr().err and not (base / "inside").exists()
