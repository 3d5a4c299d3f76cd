"""The one training loop, for teacher training (`rf`) and every distillation method.

The method computes losses and names the optimizers to step (methods/base.py); this loop does the rest:
learning-rate schedule, backward, gradient sync across ranks, clipping, optimizer steps, EMA of the
exported network, the NaN stop, checkpoints and resume, Ctrl-C/SIGTERM, the progress bar, log.jsonl,
exports and sample grids.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..errors import FlowflashError
from ..methods.base import Method, StepOutput
from .common import (EMA, Dist, GracefulStop, all_reduce_mean, barrier, load_checkpoint, rank_states,
                     save_checkpoint, sync_grads)
from .data import Batch

Sampler = Callable[[int, torch.Generator], Batch]


@dataclass
class LoopConfig:
    """What the loop reads; teacher and distillation configs extend it with their method's fields."""
    data: str = "data/emoji64"
    out: str = "runs/run"
    steps: int = 1000
    batch_size: int = 16  # global, split across ranks
    lr: float = 1e-4
    warmup: int = 0  # linear warm-up steps (0: none)
    # Cosine decay from lr to min_lr over [decay_start, steps]; None keeps lr constant after warm-up.
    decay_start: int | None = None
    min_lr: float = 0.0
    ema: float = 0.99
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    sample_every: int = 200  # 0: no sample grids (e.g. where MiniLM is not installed)
    ckpt_every: int = 50
    device: str = "cpu"  # "cuda" (one GPU per process under torchrun)
    precision: str = "fp32"  # "bf16": autocast to bf16 on the device, fp32 master weights and optimizer state


PRECISIONS = ("fp32", "bf16")
CHECK_EACH_STEP_ON = ("cpu",)  # device types where reading a loss back each step costs nothing
LOOP_FIELDS = {f.name for f in dataclasses.fields(LoopConfig)}


def lr_factor(cfg: LoopConfig, step: int) -> float:
    """Warm-up then optional cosine decay, as a factor of each optimizer's base learning rate."""
    warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else 1.0
    if cfg.decay_start is None or step < cfg.decay_start:
        return warm
    frac = min(1.0, (step - cfg.decay_start) / max(1, cfg.steps - cfg.decay_start))
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    return floor + (warm - floor) * 0.5 * (1 + math.cos(math.pi * frac))


def nonfinite(out: StepOutput) -> torch.Tensor:
    """A 0-d bool per loss term (logs first, then the total), without leaving the device."""
    return torch.stack([~torch.isfinite(v.detach()).all() for v in (*out.logs.values(), out.loss)])


def check_finite(out: StepOutput, bad: torch.Tensor, steps: str, ckpt: Path):
    """Raise if any step since the last check had a non-finite loss, naming the first bad term of this step's
    (the only one whose terms are at hand) when it is one of them."""
    if bool(bad):
        now = nonfinite(out)
        k = [*out.logs, "total"][int(now.nonzero()[0])] if bool(now.any()) else "a"
        raise FlowflashError(f"non-finite {k} loss at step {steps}; stopped without writing a checkpoint. "
                             f"Last good checkpoint: {ckpt if Path(ckpt).exists() else 'none'}")


def apply_step(method: Method, out: StepOutput, grad_clip: float) -> dict[str, torch.Tensor]:
    """Backward, then for each named optimizer: average its gradients across ranks, clip, step. Gradients
    are cleared before and after, so a network that took part in the loss but was not stepped keeps none."""
    unknown = [n for n in out.step if n not in method.optimizers]
    if unknown:
        raise ValueError(f"{method.name} asked to step unknown optimizer(s) {unknown}")
    for opt in method.optimizers.values():
        opt.zero_grad(set_to_none=True)
    out.loss.backward()
    method.after_backward()
    norms = {}
    for name in out.step:
        opt = method.optimizers[name]
        params = [p for g in opt.param_groups for p in g["params"]]
        sync_grads(params)
        norms[f"grad_norm_{name}"] = torch.nn.utils.clip_grad_norm_(params, grad_clip)  # a tensor: no sync here
        opt.step()
    for opt in method.optimizers.values():
        opt.zero_grad(set_to_none=True)
    return norms


def run_step(method: Method, batch: Batch, step: int, grad_clip: float = 1.0) -> StepOutput:
    """One iteration without the loop's bookkeeping (tests and diagnostics)."""
    out = method.train_step(batch, step)
    apply_step(method, out, grad_clip)
    return out


class JsonlLog:
    """log.jsonl of the main rank, closed on exit."""

    def __init__(self, path: Path, enabled: bool):
        self.f = open(path, "a") if enabled else None

    def write(self, row: dict):
        if self.f:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.f:
            self.f.close()
        return False


def export(method: Method, ema: EMA, folder: Path, d: Dist | None = None, sharded: bool = False) -> Path:
    """The main rank writes the exported model; sharded weights are gathered first (every rank takes part)."""
    weights = ema.shadow
    if sharded:
        from .scale import full_weights
        weights = full_weights(weights, keep=d is None or d.main)
    if d is None or d.main:
        method.save_export(weights, folder)
    return folder


def full(v: torch.Tensor) -> torch.Tensor:
    """A whole tensor of a (possibly) sharded result (FSDP2's gradient norms are DTensors)."""
    return v.full_tensor() if hasattr(v, "full_tensor") else v


def train_loop(method: Method, draw: Sampler, cfg: LoopConfig, d: Dist, *, resume: bool = False,
               max_steps: int | None = None, until: int | None = None, ema_warmup: bool = True,
               sample: Callable[[Path, Path], None] | None = None) -> Path:
    """Run `method` from step 0 (or the checkpoint) to cfg.steps; returns the exported model folder. `max_steps`
    counts this invocation's steps; `until` is a step number (stop there, e.g. to export a run at fixed points).
    `sample(model_folder, png_path)` draws a grid from an export every `sample_every` steps."""
    out = Path(cfg.out)
    if cfg.precision not in PRECISIONS:
        raise FlowflashError(f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlowflashError("device 'cuda' asked for, but this torch sees no CUDA GPU")
    # A method whose set-up asks for PyTorch's FSDP2 engine ("shard", or "replicate": data parallel) runs on it
    # under torchrun; otherwise gradients are averaged across ranks by sync_grads.
    parallel = getattr(method, "parallel", None) if d.world > 1 else None
    sharded = parallel is not None
    if sharded:  # before the EMA and the learning rates are taken: the optimizers are rebuilt on the shards. Also
        # before the move: fully_shard places each rank's shards on the device, so no GPU holds a whole role
        from .scale import shard_method
        shard_method(method, d, device, cfg.precision == "bf16", replicate=parallel == "replicate")
    method.to(device)  # before the checkpoint, so optimizer state lands next to its parameters
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    # Each group's base rate as the config sets it now: a resume with a changed lr takes the new one.
    base_lrs = [[g["lr"] for g in opt.param_groups] for opt in method.optimizers.values()]
    net = method.networks[method.ema_network]
    ema = EMA(net, cfg.ema, warmup=ema_warmup)
    # Draws are per rank, unless the sampler draws for the global batch and slices (then alike on every rank,
    # and the method does the same), which makes a run independent of its number of processes.
    shared = getattr(draw, "global_draws", False)
    rank_seed = 0 if shared else d.rank
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank_seed)
    method.gen.manual_seed(cfg.seed * 1000 + 17 + rank_seed)
    if shared:
        method.share_draws(d.rank, d.world)
    ckpt = out / "checkpoint"
    emas, gens = {method.ema_network: ema}, {"data": gen, "method": method.gen}
    if sharded:  # a sharded checkpoint keeps torch's own generator per rank too (single-process ones always did)
        gens["torch"] = torch.default_generator
    place = getattr(draw, "place", None)
    if place is not None and device.type != "cpu":  # batches gathered and noise drawn on the accelerator
        gens.update(place(device, cfg.seed * 1000 + 31 + d.rank))
    step = 0
    if resume and sharded:
        from .scale import load_sharded
        step = load_sharded(ckpt, method, emas, gens, d)["step"]
    elif resume:
        step = load_checkpoint(ckpt, method.networks, method.optimizers, emas, gens, d.rank)["step"]
    for opt, lrs in zip(method.optimizers.values(), base_lrs):
        for g, lr in zip(opt.param_groups, lrs):
            g["base_lr"] = lr
    ema_opt = next(n for n, o in method.optimizers.items()
                   if any(p is q for g in o.param_groups for p in g["params"] for q in net.parameters()))
    local_b = cfg.batch_size // d.world
    end = cfg.steps if max_steps is None else min(cfg.steps, step + max_steps)
    if until is not None:
        if until <= step:
            raise FlowflashError(f"{ckpt} is at step {step}, not before --until-step {until}: an earlier point "
                                 "of this run cannot be exported any more")
        end = min(end, until)
    bar = tqdm(total=cfg.steps, initial=step, disable=not d.main, desc=method.name, dynamic_ncols=True)
    t0, seen = time.time(), 0
    # On the CPU every step is checked for a non-finite loss before its update. On an accelerator a check is
    # a device sync, so the flags gather on the device and are read when logging or saving: a bad step then
    # still stops the run before any checkpoint could hold its weights.
    check_each_step = device.type in CHECK_EACH_STEP_ON
    bad, since = torch.zeros((), dtype=torch.bool, device=device), step
    with GracefulStop(d.world == 1) as stop, JsonlLog(out / "log.jsonl", d.main) as log:
        stopping = False
        while step < end and not stopping:
            f = lr_factor(cfg, step)
            for opt in method.optimizers.values():
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * f
            batch = draw(local_b, gen).to(device)  # data stays in its own dtypes: autocast is for the networks
            with autocast:
                res = method.train_step(batch, step)
            bad = bad | nonfinite(res).any()
            if check_each_step:
                check_finite(res, bad, str(step), ckpt)
            else:
                last = res
            norms = apply_step(method, res, cfg.grad_clip)
            if ema_opt in res.step:  # an average of the network's updates, not of the steps it sat out
                ema.update(net, step)
            step += 1
            seen += cfg.batch_size
            if d.main:
                bar.update(1)
            # read once a step: the loop ends only after a step that saw the stop, so that step checkpoints (a
            # signal landing later in a step is seen by the next one)
            stopping = stop.requested
            saving = step % cfg.ckpt_every == 0 or step == end or stopping
            if not check_each_step and (saving or step % cfg.log_every == 0):
                check_finite(last, bad, f"{since}-{step - 1}", ckpt)
                bad, since = torch.zeros_like(bad), step
            if step % cfg.log_every == 0:  # the only place the loop reads values back from the device
                vals = {k: all_reduce_mean(v.detach(), d).item() for k, v in res.logs.items()}
                if d.main:
                    rate = seen / (time.time() - t0)
                    bar.set_postfix({**{k: f"{v:.4f}" for k, v in vals.items()}, "img_s": f"{rate:.1f}"})
                    lrs = {f"lr_{n}": o.param_groups[0]["lr"] for n, o in method.optimizers.items()}
                    log.write({"step": step, **vals, **{k: float(full(v)) for k, v in norms.items()}, **lrs,
                               "img_s": rate, "time": time.time()})
            # the draw before the checkpoint of the same step: a run killed while it draws resumes from the
            # previous checkpoint and draws again, instead of resuming past a draw that never finished
            if sample is not None and cfg.sample_every > 0 and (step % cfg.sample_every == 0 or step == cfg.steps):
                folder = export(method, ema, out / method.export_dir, d, sharded)
                if d.main:
                    sample(folder, out / f"samples/step{step:06d}.png")
                barrier(d)
            if saving:
                rng = rank_states(gens, d, device)
                if sharded:
                    from .scale import save_sharded
                    save_sharded(ckpt, method, emas, rng, {"step": step}, d)
                elif d.main:
                    save_checkpoint(ckpt, method.networks, method.optimizers, emas, rng, {"step": step})
                barrier(d)
    bar.close()
    export(method, ema, out / method.export_dir, d, sharded)
    return out / method.export_dir
