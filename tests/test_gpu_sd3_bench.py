"""The GPU bench script's model and timing path on a tiny model on the CPU: the script runs only where a GPU is lent,
so a change to SD3Model that breaks it must fail here first (it once did, found only on the device)."""
import importlib.util
from pathlib import Path

import torch

spec = importlib.util.spec_from_file_location("gpu_sd3_bench", Path(__file__).parents[1] / "scripts" / "gpu_sd3_bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_the_bench_builds_its_pipeline_and_times_an_image_and_each_component():
    from flowflash.runtime.pipeline import Pipeline

    model, params = bench.build(True, "cpu", torch.float32)
    assert params == sum(p.numel() for p in model.transformer.parameters()) > 0
    assert model.transformer.config.dual_attention_layers == (0,) and model.transformer.config.qk_norm == "rms_norm"
    pipe = Pipeline(model, None, drop=("clip_l", "clip_g", "t5"))
    row = bench.time_size(pipe, 32, 1, lambda: None)
    assert row["size"] == 32 and len(row["runs"]) == 1 and row["sec_per_image"] > 0
    parts = bench.components(model, 32, 1, lambda: None)
    assert parts["transformer_ms"] > 0 and parts["decode_ms"] > 0
    assert pipe.last.images[0].size == (32, 32)
