"""Per-GPU memory plan for distilling SD3.5 Medium (DMD2-style) with three transformer roles: a frozen teacher,
a trainable student and a trainable critic ("fake score"); the adversarial heads are counted as ~0.

Parameters are counted exactly by building diffusers' SD3Transformer2DModel on the meta device. Weights, grads,
AdamW states and the EMA follow from the policy below; activations come from a simple formula (an estimate:
nothing here was measured on a GPU). DDP and FSDP2 layouts, 1/2/8 GPUs of 80 GB. Offline, a few seconds:

    .venv/bin/python scripts/memory_plan.py      # writes docs/bench/memory-plan.json and .md
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel

SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
GB, GPU_GB, HEADROOM = 1e9, 80.0, 0.10   # decimal GB; plan against 90% of 80 GB
BUDGET = GPU_GB * (1 - HEADROOM)
GRAPHS = 2  # autograd graphs alive per sample: student step = student + critic (GAN term); critic step = fake + real
# bf16 tensors of (tokens x hidden) a block keeps for backward, per token (SDPA flash: no tokens^2 term)
JOINT = {"adaLN norm + modulate": 2, "q, k, v": 3, "RMS-normed q, k": 2, "joint concat of q, k, v": 3,
         "attention out": 1, "gated residual": 1, "norm2 + modulate": 2, "MLP up (4x hidden)": 4, "GELU out (4x)": 4}
DUAL = {"norm + modulate": 1, "q, k, v": 3, "RMS-normed q, k": 2, "attention out": 1, "gated residual": 1}
WORK_BLOCKS = 2  # working set: one block recomputed in backward, or the no-grad teacher's CFG pass (2x batch)
IMG_TOKENS, TEXT_TOKENS = {512: 1024, 1024: 4096}, {"T5": 333, "CLIP only": 77}


def count() -> tuple[int, int, list[int]]:
    with torch.device("meta"):
        m = SD3Transformer2DModel(**SD35_MEDIUM)
    blocks = [sum(p.numel() for p in b.parameters()) for b in m.transformer_blocks]
    return sum(p.numel() for p in m.parameters()), sum(b.numel() for b in m.buffers()), blocks


def activations(px: int, text: int, ckpt: bool, hidden: int = 1536, layers: int = 24, dual: int = 13) -> float:
    """Bytes per sample for one DMD2 step: GRAPHS graphs kept, plus a WORK_BLOCKS-block working set."""
    ti = IMG_TOKENS[px]
    t = ti + text
    block = lambda d: (sum(JOINT.values()) * t + (sum(DUAL.values()) * ti if d else 0)) * hidden * 2
    kept = layers * t * hidden * 2 if ckpt else sum(block(i < dual) for i in range(layers))
    return GRAPHS * kept + WORK_BLOCKS * block(True)


def plan(p: int, buf: int, blocks: list[int], layout: str, n: int) -> dict:
    shard = n if layout == "FSDP2" else 1
    teacher = (2 * p / shard + 2 * buf) / GB                 # bf16 weights; buffers are never sharded
    trainable = 2 * (16 * p / shard + 4 * buf) / GB          # student + critic: fp32 master/grad/exp_avg/exp_avg_sq
    ema = 4 * p / shard / GB
    if layout == "FSDP2":   # 2 largest blocks all-gathered in bf16 + root (non-block) params + 1 block's fp32 grads
        top2 = sorted(blocks)[-2:]
        transient = (2 * sum(top2) + 2 * (p - sum(blocks)) + 4 * top2[-1]) / GB
    else:                   # autocast's bf16 weight casts stay saved for backward: one model's worth per graph
        transient = GRAPHS * 2 * p / GB
    static = teacher + trainable + ema + transient
    act1 = activations(512, TEXT_TOKENS["T5"], True) / GB
    fit = lambda ckpt: max(0, int((BUDGET - static) // (activations(512, TEXT_TOKENS["T5"], ckpt) / GB)))
    return dict(layout=layout, gpus=n, teacher_gb=teacher, trainable_gb=trainable, ema_gb=ema,
                transient_gb=transient, act_b1_512_ckpt_gb=act1, total_gb=static + act1,
                fits=static + act1 <= BUDGET, max_batch_512_ckpt=fit(True), max_batch_512_no_ckpt=fit(False))


def markdown(p: int, buf: int, rows: list[dict], acts: list[dict]) -> str:
    f = lambda x: f"{x:.2f}"
    out = [
        "# SD3.5 Medium distillation: per-GPU memory plan", "",
        "Computed by `.venv/bin/python scripts/memory_plan.py`. **Nothing here was measured on a GPU**: weights, "
        "grads, optimizer and EMA follow exactly from the parameter count and the policy; **activations are an "
        "estimate** from the formula below, not a measurement (treat them as +/-50%).", "",
        f"- Transformer (diffusers `SD3Transformer2DModel`, SD3.5 Medium config, built on the meta device): "
        f"**{p:,} parameters** ({p / 1e9:.3f} B), plus a {buf:,}-element `pos_embed` buffer per copy "
        "(fp32 in fp32 models, bf16 in the teacher; FSDP2 does not shard buffers).",
        "- Teacher: frozen, bf16 (2 bytes/param), no grads or optimizer state.",
        "- Student and critic: fp32 master weights (4) + fp32 grads (4) + AdamW exp_avg and exp_avg_sq in fp32 (8) "
        "= 16 bytes/param each; bf16 autocast for compute. Student EMA: fp32 copy (4 bytes/param). "
        "Adversarial heads (small MLPs): counted as 0.",
        "- DDP: every GPU holds everything (assumes `gradient_as_bucket_view=True`, so no second grad copy in "
        "the buckets). Transient: autocast's bf16 weight casts stay saved for backward, one model's worth "
        f"(2 bytes/param) per kept graph ({GRAPHS}).",
        "- FSDP2: `fully_shard` per transformer block and on the root, on all three transformers; weights, grads, "
        "Adam states and EMA sharded 1/N (`MixedPrecisionPolicy(param_dtype=bf16)`). Transient: the 2 largest "
        "blocks all-gathered in bf16 (compute + prefetch), the root's non-block params in bf16, and one block's "
        "unsharded fp32 grads before reduce-scatter.",
        f"- Planning budget: {GPU_GB:.0f} GB per GPU minus {HEADROOM:.0%} headroom = {BUDGET:.0f} GB (decimal GB; "
        "the headroom stands in for the CUDA context, allocator fragmentation, NCCL buffers and the VAE/text "
        "encoders if they share the GPU). \"fits\" and the batch columns use this budget; batches are per GPU, "
        "512 px, 333 text tokens (T5).", "",
        "| layout | GPUs | teacher GB | student+critic weights/grads/Adam GB | EMA GB | transient GB | "
        "activations GB (b=1, 512 px, ckpt) | total GB | fits in 80 GB | max batch 512 px (ckpt) | "
        "max batch 512 px (no ckpt) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['layout']} | {r['gpus']} | {f(r['teacher_gb'])} | {f(r['trainable_gb'])} | "
                   f"{f(r['ema_gb'])} | {f(r['transient_gb'])} | {f(r['act_b1_512_ckpt_gb'])} | "
                   f"{f(r['total_gb'])} | {'yes' if r['fits'] else 'no'} | {r['max_batch_512_ckpt']} | "
                   f"{r['max_batch_512_no_ckpt']} |")
    out += ["", "DDP rows do not change with N (every GPU holds everything); FSDP2 with N=1 shards nothing. Only "
            "FSDP2 on 2+ GPUs fits; with checkpointing the batch is bound by activations, not by weights."]
    out += ["", "## Activations (estimate, per sample, per DMD2 step)", "",
            f"Per block, bf16 (tokens x 1536) tensors kept for backward: {sum(JOINT.values())} over image + text "
            f"tokens ({', '.join(f'{k} {v}' for k, v in JOINT.items())}), plus {sum(DUAL.values())} over image "
            f"tokens in the 13 dual-attention blocks ({', '.join(f'{k} {v}' for k, v in DUAL.items())}). "
            "Attention is SDPA flash/memory-efficient, so no tokens^2 term. With gradient checkpointing only each "
            "block's input (image + text tokens) is kept. "
            f"{GRAPHS} graphs are alive per sample (student step: student + critic for the GAN term; critic step: "
            f"fake + real forwards), plus a working set of {WORK_BLOCKS} full blocks (one block recomputed in "
            "backward, or the no-grad teacher/critic passes, CFG doubling the teacher's batch). Small tensors "
            "(timestep embeddings, patchify, final layer, losses, head features) are ignored; LayerNorm outputs "
            "that autocast keeps in fp32 are counted as bf16, one reason this may be low.", "",
            "| resolution | image tokens | text tokens | no checkpointing GB | with checkpointing GB |",
            "|---|---|---|---|---|"]
    out += [f"| {a['px']} px | {a['image_tokens']} | {a['text_tokens']} ({a['text']}) | {f(a['no_ckpt_gb'])} | "
            f"{f(a['ckpt_gb'])} |" for a in acts]
    return "\n".join(out) + "\n"


def main() -> None:
    p, buf, blocks = count()
    print(f"SD3.5 Medium transformer: {p:,} parameters, {buf:,} buffer elements, {len(blocks)} blocks")
    rows = [plan(p, buf, blocks, lay, n) for lay in ("DDP", "FSDP2") for n in (1, 2, 8)]
    acts = [dict(px=px, image_tokens=IMG_TOKENS[px], text=k, text_tokens=v,
                 no_ckpt_gb=activations(px, v, False) / GB, ckpt_gb=activations(px, v, True) / GB)
            for px in IMG_TOKENS for k, v in TEXT_TOKENS.items()]
    out = Path(__file__).resolve().parents[1] / "docs" / "bench"
    meta = dict(config={k: list(v) if isinstance(v, tuple) else v for k, v in SD35_MEDIUM.items()}, params=p,
                buffer_elements=buf, block_params=blocks, gpu_gb=GPU_GB, headroom=HEADROOM, graphs=GRAPHS,
                measured=False, activations_are_estimates=True)
    (out / "memory-plan.json").write_text(json.dumps(dict(meta, rows=rows, activations=acts), indent=2) + "\n")
    md = markdown(p, buf, rows, acts)
    (out / "memory-plan.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
