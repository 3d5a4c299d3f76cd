"""The OpenVINO backend (runtime/ov_backend.py) on the tiny emoji model: same images as torch, the IR cache
(reused, keyed by the weights, written beside the model or in the user cache), int8/int4 weights, refusals.

Tolerances, on uint8 images: fp32 IR and int8 of an int8-stored model: max abs difference 1 (the same
numbers up to float rounding, so a pixel can only flip at a rounding boundary); int8 of an fp16-stored model
(weights re-quantized): max 4, mean < 0.5; int4: mean < 3 (data-free 4 bits, lossy by design; the tiny
model measures max 4-9, mean 0.6-1.1 over four seeds)."""
import json
import os
import socket
import sys

import pytest
import torch

from flowflash.errors import FlowflashError
from flowflash.images import pil_to_u8
from flowflash.runtime import ov_backend
from flowflash.runtime.pipeline import Pipeline
from tests.conftest import tiny_model_config

with ov_backend.telemetry_off():  # a plain `import openvino` would send a usage event
    pytest.importorskip("openvino")

PROMPTS = ["red apple", "dog face", "a banana", "red dog face", "apple", "a dog"]


def images(pipe, prompts, seeds, **kw) -> torch.Tensor:
    return pil_to_u8(pipe.run(prompts, seeds, **kw).images).to(torch.int16)


def entries(folder):
    return sorted(p.name for p in (folder / ".openvino").iterdir() if not p.name.endswith((".tmp", ".old")))


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    root = tmp_path / "user-cache"
    monkeypatch.setenv(ov_backend.CACHE_ENV, str(root))
    return root


def test_same_images_as_torch_any_batch(tiny_model_dir, user_cache):
    ref = Pipeline.load(tiny_model_dir)
    ov = Pipeline.load(tiny_model_dir, backend="openvino")
    runner = ov.model.net.transformer_runner
    assert runner.info.exported and runner.info.entry.parent == tiny_model_dir / ".openvino"
    assert not user_cache.exists()
    for n, seed0, guidance in [(1, 0, None), (3, 7, None), (6, 100, 1.0), (2, 3, 1.0)]:
        prompts, seeds = PROMPTS[:n], [seed0 + k for k in range(n)]
        a, b = images(ref, prompts, seeds, guidance=guidance), images(ov, prompts, seeds, guidance=guidance)
        assert a.shape == b.shape == (n, 3, 16, 16)
        assert (a - b).abs().max() <= 1, (n, seed0, guidance)
    # the raw velocity too: same shape and dtype, float-rounding close
    x, t = torch.randn(5, 3, 16, 16), torch.rand(5)
    cond = ov.model.condition(PROMPTS[:5], frozenset(), False)
    v_ov, v_torch = ov.model.velocity(x, t, cond), ref.model.velocity(x, t, cond)
    assert v_ov.shape == v_torch.shape and v_ov.dtype == v_torch.dtype == torch.float32
    assert torch.allclose(v_ov, v_torch, atol=1e-4)


def test_second_load_reuses_the_ir(tiny_model_dir, monkeypatch):
    first = Pipeline.load(tiny_model_dir, backend="openvino")
    want = images(first, PROMPTS[:2], [0, 1])
    key = first.model.net.transformer_runner.info.key
    assert entries(tiny_model_dir) == [key]
    meta = json.loads((tiny_model_dir / ".openvino" / key / "meta.json").read_text())
    assert meta["weights_hash"] == first.hash and meta["weights"] == "fp32" and first.hash in key

    def no_export(*a, **k):
        raise AssertionError("exported again")
    monkeypatch.setattr(ov_backend, "convert", no_export)
    again = Pipeline.load(tiny_model_dir, backend="openvino")
    assert not again.model.net.transformer_runner.info.exported
    assert torch.equal(images(again, PROMPTS[:2], [0, 1]), want)


def test_changed_weights_do_not_reuse_the_ir(tiny_model_dir, monkeypatch):
    import shutil

    from flowflash.models.flow_model import FlowModel, save_model

    old = Pipeline.load(tiny_model_dir, backend="openvino")
    old_key = old.model.net.transformer_runner.info.key
    kept = tiny_model_dir.parent / "kept"
    shutil.copytree(tiny_model_dir / ".openvino", kept)
    torch.manual_seed(1)  # other weights, same config; put the old cache back beside them
    save_model(FlowModel(tiny_model_config()), tiny_model_dir)
    shutil.copytree(kept, tiny_model_dir / ".openvino")
    calls = []
    real = ov_backend.convert
    monkeypatch.setattr(ov_backend, "convert", lambda *a: calls.append(1) or real(*a))
    new = Pipeline.load(tiny_model_dir, backend="openvino")
    assert calls == [1] and new.hash != old.hash
    assert sorted(entries(tiny_model_dir)) == sorted([old_key, new.model.net.transformer_runner.info.key])
    ref = Pipeline.load(tiny_model_dir)
    assert (images(new, PROMPTS[:3], [0, 1, 2]) - images(ref, PROMPTS[:3], [0, 1, 2])).abs().max() <= 1


def test_int8_and_int4_weights(tiny_model_dir, tmp_path):
    from flowflash.models.flow_model import load_model, save_model

    prompts, seeds = PROMPTS[:4], [0, 1, 2, 3]
    fp32 = Pipeline.load(tiny_model_dir, backend="openvino")
    ref = images(fp32, prompts, seeds)
    int8 = Pipeline.load(tiny_model_dir, backend="openvino", ov_weights="int8")
    diff = (images(int8, prompts, seeds) - ref).abs()
    assert diff.max() <= 4 and diff.float().mean() < 0.5, (diff.max(), diff.float().mean())
    info8, info32 = int8.model.net.transformer_runner.info, fp32.model.net.transformer_runner.info
    assert info8.key != info32.key and info8.ir_bytes < info32.ir_bytes  # (the shipped student's: 0.27x)
    # a model stored int8 (as the shipped ones): its own grid, so int8 gives torch's images
    stored8 = tmp_path / "stored-int8"
    save_model(load_model(tiny_model_dir), stored8, "int8")
    a = images(Pipeline.load(stored8), prompts, seeds)
    b = images(Pipeline.load(stored8, backend="openvino", ov_weights="int8"), prompts, seeds)
    assert (a - b).abs().max() <= 1
    with ov_backend.telemetry_off():  # as for openvino above
        nncf = pytest.importorskip("nncf")
    int4 = Pipeline.load(tiny_model_dir, backend="openvino", ov_weights="int4")
    assert int4.model.net.transformer_runner.info.key.endswith("-int4-nncf" + nncf.__version__)
    assert (images(int4, prompts, seeds) - ref).abs().float().mean() < 3


def test_cache_falls_back_to_the_user_cache(tiny_model_dir, user_cache, monkeypatch):
    real = os.access  # root ignores permission bits: answer "not writable" as the code asks
    monkeypatch.setattr(os, "access", lambda p, m: False if m == os.W_OK else real(p, m))
    pipe = Pipeline.load(tiny_model_dir, backend="openvino")
    assert pipe.model.net.transformer_runner.info.entry.parent == user_cache
    assert not (tiny_model_dir / ".openvino").exists()
    monkeypatch.undo()
    monkeypatch.setattr(ov_backend, "PACKAGE", tiny_model_dir.parent)  # a model inside the installed package
    assert ov_backend.cache_roots(tiny_model_dir) == [ov_backend.user_cache_root()]


def test_unreadable_entry_is_exported_again(tiny_model_dir):
    key = Pipeline.load(tiny_model_dir, backend="openvino").model.net.transformer_runner.info.key
    (tiny_model_dir / ".openvino" / key / "transformer.bin").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unreadable OpenVINO cache"):
        pipe = Pipeline.load(tiny_model_dir, backend="openvino")
    assert pipe.model.net.transformer_runner.info.exported
    assert (tiny_model_dir / ".openvino" / key / "transformer.bin").stat().st_size > 1000


def test_threads_follow_torch_or_the_argument(tiny_model_dir):
    from flowflash.models.flow_model import load_model

    net = load_model(tiny_model_dir)
    assert ov_backend.load(net, None, None).info.threads == torch.get_num_threads()
    runner = ov_backend.load(net, None, None, threads=1)
    assert runner.compiled.get_property("INFERENCE_NUM_THREADS") == 1 and runner.info.key == "uncached"


def test_opens_no_socket(tiny_model_dir, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the openvino backend tried to open a socket")
    monkeypatch.setattr(socket.socket, "__init__", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    pipe = Pipeline.load(tiny_model_dir, backend="openvino", ov_weights="int8")  # an export, then a run
    pipe.generate("red apple", seed=0)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(backend="onnx"), "backend must be one of torch, openvino"),
    (dict(backend="openvino", device="cuda"), "runs on the CPU only"),
    (dict(backend="openvino", ov_weights="int2"), "ov_weights must be one of fp32, int8, int4"),
    (dict(ov_weights="int8"), "ov_weights applies to backend='openvino' only"),
    (dict(backend="openvino", dtype="bf16"), "takes dtype fp32"),
])
def test_refusals(tiny_model_dir, kwargs, needle):
    with pytest.raises(FlowflashError, match=needle) as e:
        Pipeline.load(tiny_model_dir, **kwargs)
    assert len(str(e.value).splitlines()) == 1


def test_sd3_transformer_one_ir_per_size_same_images(tmp_path, monkeypatch):
    """An SD3 pipeline folder on the openvino backend: the diffusers transformer exported once per latent
    size (cached beside the folder), the same images as torch within 1 level, with and without CFG."""
    import numpy as np

    from flowflash.testing.sd3_fixture import write_tiny_sd3
    folder = write_tiny_sd3(tmp_path / "sd3")
    torch_pipe, ov_pipe = Pipeline.load(folder), Pipeline.load(folder, backend="openvino")
    for size, guidance in ((64, 1.0), ((64, 96), 1.0), (64, 3.0)):
        kw = dict(steps=4, guidance=guidance, seed=0, size=size, num_images=2)
        a = np.stack([np.asarray(i, dtype=np.int16) for i in torch_pipe.generate("a red apple", **kw)])
        b = np.stack([np.asarray(i, dtype=np.int16) for i in ov_pipe.generate("a red apple", **kw)])
        assert np.abs(a - b).max() <= 1
    assert len(entries(folder)) == 2  # 64x64 and 64x96 (CFG reuses the 64x64 IR)
    monkeypatch.setattr(ov_backend, "convert", lambda *a, **k: pytest.fail("exported again"))
    Pipeline.load(folder, backend="openvino").generate("a red apple", steps=2, guidance=1.0, size=64)


def test_missing_openvino_names_the_extra(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(ov_backend, "_quiet", {})
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(FlowflashError, match=r"pip install 'flowflash\[openvino\]'") as e:
        Pipeline.load(tiny_model_dir, backend="openvino")
    assert len(str(e.value).splitlines()) == 1
