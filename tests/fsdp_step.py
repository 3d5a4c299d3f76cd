"""Two critic steps and two student steps of `flash` (4 student steps, one drawn per sample) on the SD3 fixture, alone or under torchrun with FSDP2
(the config's fsdp: sharded; else replicated on FSDP2's engine, i.e. data parallel).

    python tests/fsdp_step.py CONFIG_JSON OUT            # one process, the reference
    torchrun --nproc-per-node 2 tests/fsdp_step.py CONFIG_JSON OUT   # sharded

The optimizers are swapped for plain SGD, so the updated weights are a linear function of the gradients and
compare within fp32 tolerance (Adam's first step is lr * sign(g), which a rounding flips where g ~ 0).
Rank 0 writes OUT/losses.json and OUT/weights.safetensors (whole tensors of the student and the critic).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from flowflash.train.common import all_reduce_mean, close_dist, init_dist
from flowflash.train.configs import DistillConfig
from flowflash.train.loop import apply_step
from flowflash.train.run import distill_setup
from flowflash.train.scale import full_weights, shard_method


def main(cfg_path: str, out: str):
    fields = json.loads(Path(cfg_path).read_text())
    if "WORLD_SIZE" not in os.environ:  # the one-process reference: nothing to shard
        fields["fsdp"] = False
    cfg = DistillConfig(**fields)
    d = init_dist()
    su = distill_setup(cfg, d)
    m = su.method
    for name, opt in list(m.optimizers.items()):
        m.optimizers[name] = torch.optim.SGD([p for g in opt.param_groups for p in g["params"]], lr=0.5)
    if d.world > 1:
        shard_method(m, d, torch.device("cpu"), bf16=False, replicate=not cfg.fsdp)
    m.share_draws(d.rank, d.world)
    m.gen.manual_seed(7)
    gen = torch.Generator().manual_seed(3)
    losses = []
    for step in range(4):  # critic_ratio 1: even steps train the critic, odd ones the student
        res = m.train_step(su.draw(cfg.batch_size // d.world, gen), step)
        apply_step(m, res, cfg.grad_clip)
        losses.append({k: all_reduce_mean(v.detach(), d).item() for k, v in res.logs.items()})
    weights = {f"{n}.{k}": v for n in ("student", "critic") for k, v in
               full_weights(m.networks[n].state_dict()).items()}
    if d.main:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "losses.json").write_text(json.dumps(losses))
        save_file({k: v.contiguous() for k, v in weights.items()}, Path(out) / "weights.safetensors")
    close_dist(d)


if __name__ == "__main__":
    main(*sys.argv[1:3])
