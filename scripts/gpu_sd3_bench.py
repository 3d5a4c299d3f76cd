"""flowflash's SD3 path on a GPU: an SD3.5-Medium-shaped pipeline with random weights (the 2.2B-class MMDiT
with dual attention in blocks 0-12 and RMS qk-norm, SD3's VAE), 4 steps without CFG, bf16, eager and with
torch.compile of the transformer and the VAE decoder, at 1024 and 512 px. Text encoding is left out of the
times (the text encoders are dropped: their embeddings are zeros, which costs nothing); each image is timed
from the start of denoising to its uint8 pixels on the host.

    python scripts/gpu_sd3_bench.py --out $OUT            # on the GPU machine
    python scripts/gpu_sd3_bench.py --out /tmp/x --smoke  # here: the same code path on a tiny model, CPU
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD3_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               layers_per_block=2, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
               use_post_quant_conv=False)


def build(smoke: bool, device: str, dtype):
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from flowflash.models.protocol import SamplingDefaults
    from flowflash.models.sd3 import SD3Model, SD3TextEncoders, vae_layout

    tcfg = dict(SD35_MEDIUM)
    vcfg = dict(SD3_VAE)
    widths = {"clip_l": (768, 768), "clip_g": (1280, 1280)}
    if smoke:  # same structure, tiny
        tcfg.update(num_layers=2, num_attention_heads=2, attention_head_dim=8, joint_attention_dim=32,
                    caption_projection_dim=16, pooled_projection_dim=24, dual_attention_layers=(0,),
                    pos_embed_max_size=64)
        vcfg.update(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
        widths = {"clip_l": (8, 8), "clip_g": (16, 16)}
    torch.manual_seed(0)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**tcfg).to(dtype).eval().requires_grad_(False)
        vae = AutoencoderKL(**vcfg).to(dtype).eval().requires_grad_(False)
    params = sum(p.numel() for p in transformer.parameters())
    vae = vae.to(memory_format=vae_layout(vae.device))  # as SD3Model.load leaves it
    text = SD3TextEncoders({}, widths, 256, tcfg["joint_attention_dim"], dtype).to(device)  # every encoder dropped
    model = SD3Model(transformer, vae, FlowMatchEulerDiscreteScheduler(shift=3.0), text, "sd3.5-medium-shaped",
                     SamplingDefaults(steps=4, guidance=1.0, shift=3.0))
    return model, params


def components(model, size: int, reps: int, sync) -> dict:
    """Milliseconds of one transformer forward and one VAE decode at this size (synchronised, median of reps
    after one warm-up): where the time of an image goes."""
    import torch

    cond = model.condition(["a photo of a red apple"], frozenset(("clip_l", "clip_g", "t5")), False)
    x = model.noise([0], (size, size))
    t = torch.ones(1, device=x.device)

    def timed(fn):
        out = []
        for _ in range(reps + 1):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            out.append(1000 * (time.perf_counter() - t0))
        return statistics.median(out[1:])

    with torch.inference_mode():
        return {"transformer_ms": timed(lambda: model.velocity(x, t, cond)),
                "decode_ms": timed(lambda: model.decode(x))}


def attention(name: str):
    """The scaled-dot-product-attention backends tried first: "default" is torch's own order (flash first);
    "cudnn" puts cuDNN's fused attention first (Hopper's fastest in torch, not its default), with the rest behind
    it so that a shape cuDNN refuses still runs."""
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = {"cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                       SDPBackend.MATH]}[name]
    return sdpa_kernel(order, set_priority=True)


def time_size(pipe, size: int, reps: int, sync) -> dict:
    runs = []
    for r in range(reps + 2):  # two warm-ups
        sync()
        gen = pipe.run(["a photo of a red apple"], [r], steps=4, guidance=1.0, size=size)
        # decode ends with a copy to the host, so denoise + decode is the synchronised time from the first step
        runs.append(gen.timings.denoise_s + gen.timings.decode_s)
    return {"size": size, "sec_per_image": statistics.median(runs[2:]), "runs": runs[2:]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sizes", default=None, help="comma-separated sizes (default 1024,512; smoke 64,32)")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode of the transformer "
                    "(default, reduce-overhead = CUDA graphs, max-autotune-no-cudagraphs)")
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--compile-sizes", default=None, help="sizes to time compiled (default: --sizes)")
    ap.add_argument("--vae-layout", default="auto", choices=["auto", "channels_last", "contiguous"],
                    help="the VAE's layout for the compiled rows (auto: the faster of the eager rows at the first "
                    "size, or the device's own, vae_layout, with --skip-eager)")
    ap.add_argument("--sdpa", default="default", choices=["default", "cudnn", "compare"],
                    help="attention backend order; compare times an eager transformer forward and VAE decode at "
                    "the first size under (default, cudnn.benchmark off) and (cudnn, cudnn.benchmark on) and keeps "
                    "the faster attention (by the forward) and benchmark setting (by the decode) for the rest")
    a = ap.parse_args()

    import torch

    from flowflash.runtime.pipeline import Pipeline

    device = "cpu" if a.smoke else "cuda"
    dtype = torch.float32 if a.smoke else torch.bfloat16
    sync = (lambda: None) if a.smoke else torch.cuda.synchronize
    sizes = [int(x) for x in a.sizes.split(",")] if a.sizes else [64, 32] if a.smoke else [1024, 512]
    a.out.mkdir(parents=True, exist_ok=True)
    model, params = build(a.smoke, device, dtype)
    pipe = Pipeline(model, None, drop=("clip_l", "clip_g", "t5"))
    res = {"device": "cpu" if a.smoke else torch.cuda.get_device_name(0), "torch": torch.__version__,
           "transformer_params": params, "dtype": str(dtype), "steps": 4, "rows": []}

    def save():
        (a.out / "gpu-sd3.json").write_text(json.dumps(res, indent=1))

    backend = a.sdpa
    if a.sdpa == "compare":
        # the attention order moves mainly the transformer (the VAE's one mid-block attention, head size 512, takes
        # the same kernel either way) and cuDNN's conv autotuning mainly the VAE, whose convolutions dominate it:
        # one A/B pair of calls answers both (the pair runs in this order, each after its own warm-up)
        cmp = res["sdpa_compare"] = {}
        for name, bench_convs in (("default", False), ("cudnn", True)):
            torch.backends.cudnn.benchmark = bench_convs
            with attention(name):
                cmp[name] = components(model, sizes[0], a.reps, sync)
        backend = min(cmp, key=lambda k: cmp[k]["transformer_ms"])
        torch.backends.cudnn.benchmark = cmp["cudnn"]["decode_ms"] < cmp["default"]["decode_ms"]
        print(json.dumps({"sdpa_compare": cmp, "kept": backend, "cudnn_benchmark": torch.backends.cudnn.benchmark}),
              flush=True)
    res["sdpa"], res["cudnn_benchmark"] = backend, torch.backends.cudnn.benchmark
    save()
    with attention(backend):
        timed_rows(a, res, model, pipe, sizes, sync, save)


def timed_rows(a, res, model, pipe, sizes, sync, save):
    import torch

    # the VAE's layout on this device: SD3Model.load gives it vae_layout's (contiguous on CUDA, else channels-last)
    from flowflash.models.sd3 import vae_layout

    layouts = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
    own = next(k for k, v in layouts.items() if v == vae_layout(model.vae.device))  # without eager rows
    best = (own, float("inf"))
    for size in [] if a.skip_eager else sizes:
        for name in ([*layouts] if size == sizes[0] else [best[0]]):
            model.vae.to(memory_format=layouts[name])
            row = {"mode": "eager", "vae_layout": name, **time_size(pipe, size, a.reps, sync),
                   **components(model, size, a.reps, sync)}
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            save()
            if size == sizes[0] and row["sec_per_image"] < best[1]:
                best = (name, row["sec_per_image"])
    if a.vae_layout != "auto":
        best = (a.vae_layout, None)
    model.vae.to(memory_format=layouts[best[0]])
    res["vae_layout_compiled"] = best[0]
    t0 = time.perf_counter()
    model.transformer.compile(mode=None if a.compile_mode == "default" else a.compile_mode)
    model.vae.decoder.compile()
    for size in [int(x) for x in a.compile_sizes.split(",")] if a.compile_sizes else sizes:
        t1 = time.perf_counter()
        row = {"mode": f"compile ({a.compile_mode})", "vae_layout": best[0], **time_size(pipe, size, a.reps, sync),
               "compile_and_warmup_s": None}
        row["compile_and_warmup_s"] = time.perf_counter() - t1 - sum(row["runs"])
        row.update(components(model, size, a.reps, sync))
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()
    res["compile_total_s"] = time.perf_counter() - t0
    save()


if __name__ == "__main__":
    main()
