"""Distilling an SD3.5-Medium-shaped teacher on one GPU: seconds per student and per critic update and peak
GPU memory of `flash` and `dmd2` (stage 2: distribution matching + adversarial heads), bf16 autocast, with
and without gradient checkpointing, at batch 1 and at the largest batch that fits; projected to a full
SD3.5-Flash-like run on 8 GPUs.

The teacher is a random-weight SD3Transformer2DModel with SD3.5-Medium's config (2.24 B parameters, as in
scripts/gpu_sd3_bench.py), built directly on the GPU in bf16 and wrapped as a `LatentFlow` at 512 px
(latents 16x64x64); the student and the critic are fp32 `trainable_copy`s of it, as `latent_setup`
(train/run.py) builds them, with `enable_gradient_checkpointing()` when asked. Batches are random
`LatentBatch`es of SD3's shapes (context 77 CLIP + 256 T5 = 333 tokens x 4096, pooled 2048, real latents for
the heads' real branch) on the device. An update is the loop's own: `method.train_step(batch, step)` under
`torch.autocast(bfloat16)`, then `apply_step(method, out, 1.0)` (backward, clipping, AdamW), timed between
`torch.cuda.synchronize()` calls; a student update is a step index with `method.is_student_step`, a critic
update one without. The method's config is DistillConfig's defaults (adversarial on) plus --set overrides;
it is written into the JSON.

* Student schedule: `schedule_from` reads the teacher's scheduler from `teacher.cfg.folder` (an SD3 teacher
  refuses an explicit `schedule`), so the script writes a folder holding only
  `scheduler/scheduler_config.json` (FlowMatchEulerDiscreteScheduler, shift 3.0, SD3.5-Medium's) into a
  temporary directory and names it in `LatentConfig.folder`. Nothing else of the folder is read.
* Student step index: a student update's cost is set by the deepest student step index of its batch (the
  no-grad rollout runs every sample that deep). Each timed repetition fixes that depth (the method's
  `pick_steps`/`pick_step` is replaced by a constant); s_student is the expectation over the method's draw
  (one uniform index per sample, step_per_sample, whose batch maximum nears the last step as the batch
  grows; or one per batch), from a straight-line fit of time against depth. Both expectations are reported.
* Largest batch: the batch doubles from 1 (one student and one critic update each, also the warm-up at that
  shape) until torch.OutOfMemoryError, --max-batch or the time left; then one bisection step between the last
  fit and the first failure; the largest batch that fit is timed with repetitions. A later method with the
  same checkpointing starts at the batch the first one reached (their graphs are nearly the same size).
* Budget (--budget, seconds of this process from its start): checked between configs and before every probe;
  each config gets a share of what is left. The JSON is rewritten after every measurement.
* --engine replicate: the roles (and the teacher, rebuilt per config) run on FSDP2's replicate engine
  (scale.shard_method(replicate=True), bf16 MixedPrecisionPolicy) in a one-process group: what each GPU of a
  multi-GPU run executes (train/run.py sets method.parallel = "replicate" without fsdp), minus the all-reduce
  traffic. The default, single, is the one-process loop (autocast over fp32 master weights).
* Projection: student_updates x (critic_ratio + 1) iterations (per student update, critic_ratio critic
  updates and one student update), on --gpus GPUs with data parallelism at per-GPU batch b (global batch
  gpus x b), each GPU's iteration taking the time measured here (linear scaling; communication not
  measured, an unoverlapped fp32 all-reduce of the stepped role's gradients at --bus-gbps is given beside it).

Writes $OUT/gpu_sd3_distill.json (rows, per-config summaries with the DistillConfig used, projection) and
$OUT/gpu_sd3_distill.md (the tables it prints).

    # on the GPU machine (diffusers carried as a wheel; the script names any module still missing):
    pip install -q --no-deps --target /tmp/site wheels/diffusers-*.whl && \
        PYTHONPATH=/tmp/site:src python scripts/gpu_sd3_distill.py --out $OUT
    PYTHONPATH=src python scripts/gpu_sd3_distill.py --tiny --out /tmp/gpu-distill-tiny   # here, CPU, ~10 s
    PYTHONPATH=src python scripts/gpu_sd3_distill.py --meta --out /tmp/gpu-distill-meta   # full size, meta, ~40 s
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()

# SD3.5-Medium's transformer (as in scripts/gpu_sd3_bench.py)
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
TINY = dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, joint_attention_dim=32,
            caption_projection_dim=16, pooled_projection_dim=24, dual_attention_layers=(0,), pos_embed_max_size=64)
SHAPES = {  # latent (C, H, W), image size (px), text tokens, context width, pooled width
    "full": dict(latent=(16, 64, 64), size=(512, 512), tokens=333, ctx=4096, pooled=2048),
    "tiny": dict(latent=(16, 8, 8), size=(64, 64), tokens=20, ctx=32, pooled=24),
}


def elapsed() -> float:
    return time.perf_counter() - T0


# ------------------------------------------------------------------ building
def scheduler_folder(root: Path) -> Path:
    """A teacher 'folder' holding only what schedule_from reads: scheduler/scheduler_config.json."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(root / "scheduler")
    return root


def build_teacher(tiny: bool, device, folder: Path, dtype=None):
    import torch
    from diffusers import SD3Transformer2DModel

    from flowflash.models.latent import LatentConfig, LatentFlow
    from flowflash.models.protocol import SamplingDefaults

    tcfg = {**SD35_MEDIUM, **(TINY if tiny else {})}
    s = SHAPES["tiny" if tiny else "full"]
    torch.manual_seed(0)
    with torch.device(device):  # random init on the device: no 9 GB host copy
        transformer = SD3Transformer2DModel(**tcfg).to(dtype or torch.bfloat16).eval().requires_grad_(False)
    cfg = LatentConfig(folder=str(folder), sampling=SamplingDefaults(steps=28, guidance=7.0, shift=3.0),
                       latent_shape=s["latent"], size=s["size"], num_heads=tcfg["num_attention_heads"],
                       head_dim=tcfg["attention_head_dim"])
    return LatentFlow(transformer, cfg)


def distill_config(name: str, ckpt: bool, device, args, extra: dict | None = None):
    from flowflash.train.configs import DistillConfig

    return DistillConfig(**{"method": name, "out": str(Path(tempfile.gettempdir()) / "gpu-sd3-distill-run"),
                            "device": str(device), "precision": "bf16", "adversarial": True,
                            "critic_ratio": args.critic_ratio, "grad_checkpointing": ckpt, **args.overrides,
                            **(extra or {})})


def build_method(name: str, teacher, ckpt: bool, device, args, extra: dict | None = None):
    """The method as latent_setup builds it for an SD3 teacher (trainable copies, then the class), moved to the
    device as train_loop moves it, with the student step index made settable (see the module docstring)."""
    import torch

    from flowflash.methods.dmd2 import DMD2
    from flowflash.methods.flash import Flash
    from flowflash.train.loop import LOOP_FIELDS
    from flowflash.train.scale import trainable_copy

    cls = {"dmd2": DMD2, "flash": Flash}[name]
    cfg = distill_config(name, ckpt, device, args, extra)
    cls.check_config(cfg, LOOP_FIELDS)
    student, critic = trainable_copy(teacher), trainable_copy(teacher)
    if ckpt:
        for role in (student, critic):
            role.transformer.enable_gradient_checkpointing()
    method = cls(cfg, teacher, student, critic=critic)
    method.to(device)  # the heads (built on the CPU) join the roles
    method.forced_i = method.train_steps[0]
    if hasattr(method, "pick_steps"):  # one index per sample
        # (on the meta device the indices stay on the CPU: the rollout reads their maximum)
        method.pick_steps = lambda n: torch.full((n,), method.forced_i, dtype=torch.long,
                                                 device="cpu" if method.device.type == "meta" else method.device)
    else:  # one index per batch (older methods)
        method.pick_step = lambda: method.forced_i
    method.student_index = next(s for s in range(1000) if method.is_student_step(s))
    method.critic_index = next(s for s in range(1000) if not method.is_student_step(s))
    return method


def make_batch(b: int, shape: dict, device):
    import torch

    from flowflash.train.latent_data import LatentBatch

    g = torch.Generator(device="cpu").manual_seed(b)
    rn = lambda *s: torch.randn(*s, generator=g).to(device)
    L, D, P, lat = shape["tokens"], shape["ctx"], shape["pooled"], shape["latent"]
    return LatentBatch(ctx=rn(b, L, D), pooled=rn(b, P), null_ctx=rn(1, L, D), null_pooled=rn(1, P),
                       noise=rn(b, *lat), real=rn(b, *lat))


# ------------------------------------------------------------------ student step depth
def depth_weights(steps: list[int], b: int, per_sample: bool) -> dict[int, float]:
    """P(deepest student step index of a batch of b = d): one uniform draw per sample, or one per batch."""
    n = len(steps)
    if not per_sample:
        return {d: 1 / n for d in steps}
    return {d: ((k + 1) / n) ** b - (k / n) ** b for k, d in enumerate(sorted(steps))}


def depth_plan(steps: list[int], reps: int, b: int, per_sample: bool) -> list[int]:
    """Depths of the timed student repetitions: all (cycled), evenly spread (extremes first), or the one
    nearest the expected depth."""
    steps = sorted(steps)
    if reps >= len(steps):
        return [steps[k % len(steps)] for k in range(reps)]
    if reps == 1:
        mean = sum(d * w for d, w in depth_weights(steps, b, per_sample).items())
        return [min(steps, key=lambda d: abs(d - mean))]
    return [steps[round(k * (len(steps) - 1) / (reps - 1))] for k in range(reps)]


def expected(runs: list[tuple[int, float]], steps: list[int], b: int, per_sample: bool) -> float:
    """Expected seconds of a student update under the draw, from a straight-line fit of time on depth."""
    ds = sorted({d for d, _ in runs})
    if len(ds) == 1:
        return sum(s for _, s in runs) / len(runs)
    n = len(runs)
    md, ms = sum(d for d, _ in runs) / n, sum(s for _, s in runs) / n
    slope = sum((d - md) * (s - ms) for d, s in runs) / sum((d - md) ** 2 for d, _ in runs)
    return sum(w * (ms + slope * (d - md)) for d, w in depth_weights(steps, b, per_sample).items())


# ------------------------------------------------------------------ timing
class Env:
    def __init__(self, device, tiny_oom: int | None, autocast: bool = True):
        import torch

        self.torch = torch
        self.device = device
        self.cuda = device.type == "cuda"
        self.autocast = autocast  # off only for the meta check (autocast has no meta device)
        self.tiny_oom = tiny_oom  # CPU only: raise OutOfMemoryError at batches >= this (tests the OOM path)

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def mem(self) -> dict:
        if not self.cuda:
            return {"peak_alloc_gib": 0.0, "peak_reserved_gib": 0.0}
        c = self.torch.cuda
        return {"peak_alloc_gib": c.max_memory_allocated() / 2**30,
                "peak_reserved_gib": c.max_memory_reserved() / 2**30}

    def allocated_gib(self) -> float:
        return self.torch.cuda.memory_allocated() / 2**30 if self.cuda else 0.0

    def free(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()


def one_update(env: Env, method, batch, student: bool, depth: int | None = None) -> tuple[float, float]:
    """(loss s, update s): train_step under autocast, then apply_step (backward, clip, AdamW), synchronised."""
    from flowflash.train.loop import apply_step

    torch = env.torch
    if depth is not None:
        method.forced_i = depth
    env.sync()
    t0 = time.perf_counter()
    with torch.autocast(env.device.type if env.autocast else "cpu", dtype=torch.bfloat16, enabled=env.autocast):
        out = method.train_step(batch, method.student_index if student else method.critic_index)
    env.sync()
    t1 = time.perf_counter()
    if env.tiny_oom is not None and batch.noise.shape[0] >= env.tiny_oom:  # the graph is alive here, as in a real OOM
        raise torch.OutOfMemoryError(f"simulated: batch {batch.noise.shape[0]} >= --tiny-oom {env.tiny_oom}")
    apply_step(method, out, 1.0)
    env.sync()
    return t1 - t0, time.perf_counter() - t1


def recover(env: Env, method):
    """After an OOM: unfreeze the critic (a student step froze it), drop tapped features and gradients."""
    method.after_backward()
    if method.tap is not None:
        method.tap.take()
    for opt in method.optimizers.values():
        opt.zero_grad(set_to_none=True)
    env.free()


def attempt(env: Env, method, fn):
    """fn() or, on OutOfMemoryError, None and the message (memory freed outside the except block, where the
    traceback no longer holds the step's tensors)."""
    try:
        return fn(), None
    except env.torch.OutOfMemoryError as e:
        msg = (str(e).strip().splitlines() or ["OutOfMemoryError"])[0][:300]
    recover(env, method)
    return None, msg


def timed_row(env: Env, method, b: int, shape: dict, reps_s: int, reps_c: int, warmup: bool, kind: str) -> dict:
    """reps_s student and reps_c critic updates at batch b (after a warm-up of one each when asked)."""
    per_sample = bool(getattr(method.cfg, "step_per_sample", False))
    steps = method.train_steps
    plan = depth_plan(steps, reps_s, b, per_sample)
    batch = make_batch(b, shape, env.device)
    if warmup:
        one_update(env, method, batch, True, plan[0])
        one_update(env, method, batch, False)
    static = env.allocated_gib()
    env.reset_peak()
    s_runs = [(d, *one_update(env, method, batch, True, d)) for d in plan]
    c_runs = [one_update(env, method, batch, False) for _ in range(reps_c)]
    del batch
    mean = lambda xs: sum(xs) / len(xs)
    by_depth = [(d, a + u) for d, a, u in s_runs]
    return {"batch": b, "kind": kind, "reps_student": reps_s, "reps_critic": reps_c,
            "s_student": expected(by_depth, steps, b, per_sample), "s_critic": mean([a + u for a, u in c_runs]),
            "s_student_per_sample_draw": expected(by_depth, steps, b, True),
            "s_student_per_batch_draw": expected(by_depth, steps, b, False),
            "s_student_loss": mean([a for _, a, _ in s_runs]),
            "s_student_backward_opt": mean([u for _, _, u in s_runs]),
            "s_critic_loss": mean([a for a, _ in c_runs]), "s_critic_backward_opt": mean([u for _, u in c_runs]),
            "s_student_runs": [{"depth": d, "s": s} for d, s in by_depth], "s_critic_runs": [a + u for a, u in c_runs],
            "static_gib": static if env.cuda else None, **env.mem()}


def s_iter(row: dict, ratio: int) -> float:
    return (ratio * row["s_critic"] + row["s_student"]) / (ratio + 1)


# ------------------------------------------------------------------ one config
class Engine:
    """single: the roles as built; replicate: FSDP2's data-parallel engine in a one-process group."""

    def __init__(self, kind: str, device, tmp: Path):
        self.kind, self.device = kind, device
        if kind == "replicate":
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                        init_method=f"file://{tmp / 'pg'}", rank=0, world_size=1)

    def wrap(self, method):
        if self.kind == "replicate":
            from flowflash.train.common import Dist
            from flowflash.train.scale import shard_method

            shard_method(method, Dist(0, 1), self.device, bf16=True, replicate=True)

    def close(self):
        if self.kind == "replicate":
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def run_config(env: Env, engine: Engine, args, res: dict, name: str, ckpt: bool, teacher_of, shape: dict,
               share_end: float, deadline: float, known: dict, save) -> dict:
    summary = {"method": name, "grad_ckpt": ckpt, "engine": engine.kind, "status": "started", "max_batch": None,
               "stop": None, "oom_at": None, "oom_message": None, "started_at_s": elapsed()}
    res["configs"].append(summary)
    t_build = time.perf_counter()
    method = None
    try:
        method = build_method(name, teacher_of(), ckpt, env.device, args)
        engine.wrap(method)
        summary["distill_config"] = {k: v for k, v in dataclasses.asdict(method.cfg).items()
                                     if k not in ("out", "data", "teacher", "prompts")}
        summary["schedule"] = [round(float(t), 5) for t in method.schedule]
        from flowflash.train.scale import is_sharded
        summary["fsdp_wrapped"] = is_sharded(method.student)  # True under --engine replicate
    except Exception as e:  # e.g. OOM while copying the roles: recorded, the next config may still fit
        summary["status"] = f"build error: {type(e).__name__}: {e}"[:500]
    if summary["status"] != "started":
        method = None
        env.free()
        summary["wall_s"] = elapsed() - summary["started_at_s"]
        save()
        return summary
    summary["build_s"] = time.perf_counter() - t_build
    n_steps = len(method.train_steps)

    def add(row):
        row = {"method": name, "grad_ckpt": ckpt, "engine": engine.kind, **row,
               "s_iter": s_iter(row, args.critic_ratio), "img_s": row["batch"] / s_iter(row, args.critic_ratio)}
        res["rows"].append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                          if k not in ("s_student_runs", "s_critic_runs")}), flush=True)
        save()
        return row

    def probe(b: int):
        env.free()
        return attempt(env, method, lambda: timed_row(env, method, b, shape, 1, 1, False, "probe"))

    try:
        r1, why = attempt(env, method, lambda: timed_row(env, method, 1, shape, n_steps, args.reps_critic, True,
                                                         "measured"))
        if r1 is None:
            summary.update(status="oom at batch 1", stop="oom", oom_at=1, oom_message=why)
            return summary  # (the finally block still frees the roles)
        rows = {1: add(r1)}
        best, fail, stop = 1, None, None
        cost = lambda b: (rows[best]["s_student"] + rows[best]["s_critic"]) * b / best  # one probe, linear in b
        limit = lambda: min(share_end, deadline)
        prev = known.get(ckpt)  # (largest batch, why it stopped, first failing batch) of the other method
        descending = bool(prev and prev[0] > 1)  # start at its batch, halve on OOM
        b = prev[0] if descending else 2
        while True:
            if b > args.max_batch:
                stop = "max_batch"
                break
            if time.perf_counter() + cost(b) * 4 > limit():  # the probe and, after it, the timed repetitions
                stop = "budget"
                break
            row, why = probe(b)
            if row is None:
                fail, summary["oom_message"] = b, why
                print(f"# {name} grad_ckpt={ckpt}: OOM at batch {b}", flush=True)
                if descending and b // 2 > best:
                    b //= 2
                    continue
                stop = "oom"
                break
            rows[b] = add(row)
            best = b
            if descending and fail is not None:  # fit after halving
                stop = "oom"
                break
            if descending and str(prev[1]).startswith("oom"):  # the other method found the bound above
                fail, stop = prev[2], "oom (other method)"
                break
            descending = False
            b *= 2
        if stop == "oom" and fail and fail > best + 1:  # one bisection step between the last fit and the failure
            mid = (best + fail) // 2
            if time.perf_counter() + cost(mid) * 4 <= limit():
                row, why = probe(mid)
                if row is None:
                    fail, summary["oom_message"] = mid, why
                else:
                    rows[mid], best = add(row), mid
        summary.update(max_batch=best, stop=stop, oom_at=fail)
        known.setdefault(ckpt, (best, stop, fail))
        # timed repetitions at the largest batch, as many as this config's share allows (when none fit, the
        # probe's single student and critic update, taken after the warm-up at smaller batches, stands)
        if best > 1:
            one = rows[best]["s_student"] + rows[best]["s_critic"]
            for reps_s, reps_c in ((n_steps, args.reps_critic), (2, 1)):
                if time.perf_counter() + one * (reps_s + reps_c) / 2 * 1.2 <= min(share_end + 15, deadline):
                    r, why = attempt(env, method, lambda: timed_row(env, method, best, shape, reps_s, reps_c, False,
                                                                    "measured"))
                    if r is not None:
                        add(r)
                    else:
                        summary["measure_oom"] = why
                    break
        summary["status"] = "done"
    except Exception as e:  # one config's failure (an OOM is caught above) leaves the others to run
        import traceback

        traceback.print_exc()
        summary["status"] = f"error: {type(e).__name__}: {e}"[:500]
    finally:
        summary["wall_s"] = elapsed() - summary["started_at_s"]
        # free this config's roles, gradients and optimizer states before the next config builds its own
        for opt in method.optimizers.values():
            opt.state.clear()
        method = None
        env.free()
        summary["left_allocated_gib"] = env.allocated_gib()
        save()
    return summary


# ------------------------------------------------------------------ projection and report
def projection(res: dict, args) -> dict:
    """Hours of a full run from each config's row at batch 1 and at its largest batch."""
    P, g, r, n = res["trainable_params_per_role"], args.gpus, args.critic_ratio, args.student_updates
    comm = 2 * (g - 1) / g * 4 * P / (args.bus_gbps * 1e9) if g > 1 else 0.0  # one fp32 ring all-reduce
    it = n * (r + 1)
    out = {"assumptions": (f"{n} student updates x (critic_ratio {r} + 1) = {it} iterations on {g} GPUs, data "
                           f"parallel, per-GPU batch b (global batch {g} x b); every GPU's iteration takes the "
                           f"one-GPU time measured here (engine: {res['engine']}; linear scaling, communication not "
                           f"measured). comm_s_per_iter_est: one unoverlapped ring all-reduce of the stepped role's "
                           f"fp32 gradients ({P / 1e9:.2f} B parameters) at {args.bus_gbps:g} GB/s bus bandwidth "
                           f"(FSDP2 overlaps it with backward: an upper bound)."),
           "student_updates": n, "iterations": it, "gpus": g, "critic_ratio": r, "comm_s_per_iter_est": comm,
           "rows": []}
    picked = {}
    for row in res["rows"]:  # the measured row over the probe at the same (config, batch)
        key = (row["method"], row["grad_ckpt"], row["batch"])
        if key not in picked or row["kind"] == "measured":
            picked[key] = row
    for c in res["configs"]:
        mine = {k[2]: v for k, v in picked.items() if k[:2] == (c["method"], c["grad_ckpt"])}
        for b in sorted({1, c.get("max_batch") or 1} & set(mine)):
            row = mine[b]
            si = s_iter(row, r)
            out["rows"].append({"method": c["method"], "grad_ckpt": c["grad_ckpt"], "per_gpu_batch": b,
                                "global_batch": g * b, "from": row["kind"], "s_iter": si, "hours": it * si / 3600,
                                "hours_with_comm_est": it * (si + comm) / 3600, "gpu_hours": g * it * si / 3600,
                                "student_images": n * g * b, "peak_alloc_gib": row["peak_alloc_gib"]})
    return out


def markdown(res: dict) -> str:
    r = res["critic_ratio"]
    lines = [f"engine: {res['engine']}; s / student update is the expectation over the method's step-index draw",
             "", f"| method | grad ckpt | batch | s / student update | s / critic update | s / iter (ratio {r}) | "
             f"img/s | peak GiB (alloc / reserved) | from |", "|---|---|---|---|---|---|---|---|---|"]
    for row in res["rows"]:
        lines.append(f"| {row['method']} | {'on' if row['grad_ckpt'] else 'off'} | {row['batch']} | "
                     f"{row['s_student']:.3f} | {row['s_critic']:.3f} | {row['s_iter']:.3f} | {row['img_s']:.2f} | "
                     f"{row['peak_alloc_gib']:.1f} / {row['peak_reserved_gib']:.1f} | {row['kind']} "
                     f"({row['reps_student']}+{row['reps_critic']} updates) |")
    p = res.get("projection")
    if p and p["rows"]:
        lines += ["", f"Projection: {p['assumptions']}", "",
                  "| method | grad ckpt | per-GPU batch | global batch | s / iter | hours | hours + comm est | "
                  "GPU-hours |", "|---|---|---|---|---|---|---|---|"]
        for q in p["rows"]:
            lines.append(f"| {q['method']} | {'on' if q['grad_ckpt'] else 'off'} | {q['per_gpu_batch']} | "
                         f"{q['global_batch']} | {q['s_iter']:.3f} | {q['hours']:.1f} | "
                         f"{q['hours_with_comm_est']:.1f} | "
                         f"{q['gpu_hours']:.0f} |")
    lines += ["", "| method | grad ckpt | status | largest batch | stopped by | OOM at | wall s |",
              "|---|---|---|---|---|---|---|"]
    for c in res["configs"]:
        lines.append(f"| {c['method']} | {'on' if c['grad_ckpt'] else 'off'} | {c['status']} | {c['max_batch']} | "
                     f"{c['stop']} | {c['oom_at']} | {c.get('wall_s', 0):.0f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ meta check
def meta_check(args):
    """The full-size path on the meta device: one student and one critic update of each method (no memory, no
    arithmetic; fp32 teacher and no autocast, which has no meta device): catches shape and wiring errors."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        teacher = build_teacher(False, "meta", scheduler_folder(Path(tmp)), torch.float32)
        device = torch.device("meta")
        env = Env(device, None, autocast=False)
        for name in args.methods.split(","):
            # flash's adversarial floor asks whether any point lies below t_min: no meta tensor can answer
            method = build_method(name, teacher, True, device, args,
                                  {"adversarial_floor": False} if name == "flash" else None)
            batch = make_batch(2, SHAPES["full"], device)
            for depth in (method.train_steps[0], method.train_steps[-1]):
                one_update(env, method, batch, True, depth)
            one_update(env, method, batch, False)
            print(f"meta: {name}: student and critic updates ran at full size; schedule "
                  f"{[round(t, 4) for t in method.schedule]}, heads on blocks {method.tap and len(method.tap.handles)}")
        n = sum(p.numel() for p in teacher.parameters())
        print(f"meta: teacher {n / 1e9:.3f} B params; on a GPU: teacher bf16 {2 * n / 2**30:.1f} GiB, student and "
              f"critic fp32 {4 * n / 2**30:.1f} GiB each + AdamW {8 * n / 2**30:.1f} GiB each (+ gradients)")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_sd3_distill_meta.json").write_text(json.dumps({"teacher_params": n, "ok": True}))


# ------------------------------------------------------------------ main
def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        k, _, v = item.partition("=")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="the same code path on CPU with a tiny transformer")
    ap.add_argument("--meta", action="store_true", help="full-size roles on the meta device: a wiring check only")
    ap.add_argument("--budget", type=float, default=420.0, help="wall-clock seconds of this process (default 420)")
    ap.add_argument("--methods", default="flash,dmd2")
    ap.add_argument("--ckpt", default="off,on", help="gradient checkpointing settings, in order (off,on)")
    ap.add_argument("--engine", choices=("single", "replicate"), default="single")
    ap.add_argument("--max-batch", type=int, default=None, help="largest batch tried (default 128; tiny 16)")
    ap.add_argument("--reps-critic", type=int, default=2, help="timed critic updates per row (student: one per "
                    "student step index)")
    ap.add_argument("--critic-ratio", type=int, default=5, help="critic updates per student update (DMD2: 5)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a DistillConfig field for both methods, e.g. dm_norm=matching, step_per_sample=false")
    ap.add_argument("--student-updates", type=int, default=3000, help="projection: student updates of a full run")
    ap.add_argument("--gpus", type=int, default=8, help="projection: data-parallel GPUs")
    ap.add_argument("--bus-gbps", type=float, default=300.0, help="projection: all-reduce bus bandwidth (GB/s) of "
                    "the unmeasured communication estimate")
    ap.add_argument("--tiny-oom", type=int, default=4, help="tiny: simulate OutOfMemoryError from this batch (0: off)")
    args = ap.parse_args()
    args.overrides = parse_set(args.set)
    if args.meta:
        return meta_check(args)

    try:  # everything the run imports, first: a missing module fails in seconds, naming itself
        for mod in ("flowflash.methods.dmd2", "flowflash.methods.flash", "flowflash.models.sd3",
                    "flowflash.train.latent_data", "flowflash.train.loop", "flowflash.train.scale"):
            importlib.import_module(mod)
        for cls in ("SD3Transformer2DModel", "FlowMatchEulerDiscreteScheduler"):  # diffusers imports lazily
            getattr(importlib.import_module("diffusers"), cls)
    except ImportError as e:
        raise SystemExit(f"cannot import {getattr(e, 'name', None) or e} ({e}); run with PYTHONPATH=/tmp/site:src "
                         "after pip install --target /tmp/site of the diffusers wheel (and what it lacks)")
    import torch

    import diffusers

    if args.tiny:
        torch.set_num_threads(1)  # two shared cores: more threads only add contention noise to the times
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny (CPU) or --meta")
    args.max_batch = args.max_batch or (16 if args.tiny else 128)
    deadline = T0 + args.budget
    env = Env(device, (args.tiny_oom or None) if args.tiny else None)
    shape = SHAPES["tiny" if args.tiny else "full"]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_sd3_distill.json"
    res = {"device": "cpu (tiny)" if args.tiny else torch.cuda.get_device_name(0), "torch": torch.__version__,
           "diffusers": diffusers.__version__, "tiny": args.tiny, "engine": args.engine, "budget_s": args.budget,
           "critic_ratio": args.critic_ratio, "overrides": args.overrides, "complete": False, "configs": [], "rows": []}

    def save():
        res["elapsed_s"] = elapsed()
        if res.get("trainable_params_per_role"):
            res["projection"] = projection(res, args)
        path.write_text(json.dumps(res, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        folder = scheduler_folder(Path(tmp))
        engine = Engine(args.engine, device, Path(tmp))
        t = time.perf_counter()
        holder = {"teacher": build_teacher(args.tiny, device, folder)}
        env.sync()

        def teacher_of():
            # the replicate engine shards the teacher in place: each config gets a fresh one
            if engine.kind == "replicate" and holder.get("used"):
                holder["teacher"] = None
                env.free()
                holder["teacher"] = build_teacher(args.tiny, device, folder)
            holder["used"] = True
            return holder["teacher"]

        n = sum(p.numel() for p in holder["teacher"].parameters())
        res.update(teacher_build_s=time.perf_counter() - t, transformer_params=n, trainable_params_per_role=n,
                   teacher_gib=env.allocated_gib(),
                   setup=dict(shapes={k: list(v) if isinstance(v, tuple) else v for k, v in shape.items()},
                              teacher="bf16, frozen (random weights)", roles="student and critic: fp32 trainable "
                              "copies, AdamW", autocast="bf16",
                              transformer={**SD35_MEDIUM, **(TINY if args.tiny else {})}))
        print(f"# teacher: {n / 1e9:.3f} B params, built in {res['teacher_build_s']:.1f} s "
              f"(process at {elapsed():.0f} s of {args.budget:.0f})", flush=True)
        save()
        configs = [(m, c == "on") for m in args.methods.split(",") for c in args.ckpt.split(",")]
        known: dict = {}  # grad_ckpt -> (largest batch, why it stopped, first failing batch)
        for k, (name, ckpt) in enumerate(configs):
            left = deadline - time.perf_counter()
            # the first config of a checkpointing setting searches; a later one starts from its batch: half the time
            weights = [2 if all(c2 != c for _, c2 in configs[:k + j]) else 1 for j, (_, c) in enumerate(configs[k:])]
            share_end = time.perf_counter() + left * weights[0] / sum(weights)
            if left < (25 if not args.tiny else 1):  # batch 1 alone: a build and 8 updates
                res["configs"].append({"method": name, "grad_ckpt": ckpt, "engine": args.engine,
                                       "status": "skipped (budget)", "max_batch": None, "stop": "budget",
                                       "oom_at": None})
                save()
                continue
            run_config(env, engine, args, res, name, ckpt, teacher_of, shape, share_end, deadline, known, save)
        res["complete"] = all(c["status"] == "done" for c in res["configs"])
        save()
        engine.close()
    md = markdown(res)
    (args.out / "gpu_sd3_distill.md").write_text(md + "\n")
    print(md)
    print(f"# total {elapsed():.0f} s -> {path}", flush=True)


if __name__ == "__main__":
    main()
