"""Shared training machinery: config files, distributed set-up, EMA, atomic checkpoints.

Checkpoints are safetensors (model, EMA, optimizer tensors, RNG states) plus a JSON file for
everything else, so resuming never unpickles anything.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file, save_file

from ..errors import FlowflashError
from ..fsutil import atomic_dir


# ---------------------------------------------------------------- config files
def load_config(cls, path: str | Path | None, overrides: dict | None = None):
    """A dataclass from a YAML file; unknown keys are an error, not silently ignored."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FlowflashError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
    data.update(overrides or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise FlowflashError(f"unknown keys in {path}: {unknown}; known: {sorted(names)}")
    return cls(**data)


# ---------------------------------------------------------------- distributed
@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_dist(device: str = "cpu") -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: gloo on CPU, NCCL with one GPU per process. A single
    process needs nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.device(device).type == "cuda"
    if cuda and world > 1:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if world > 1 and not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    return Dist(int(os.environ.get("RANK", "0")), world)


def close_dist(d: Dist):
    """End a run's process group together: every rank waits for the main rank's export, then the group is
    torn down before interpreter exit (a gloo group left to the exit handlers may abort a rank)."""
    if d.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= d.world
    return x


def sync_grads(params: list[torch.nn.Parameter]):
    """Average gradients across ranks (what DDP does), in one flattened all-reduce per call."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    from torch.distributed.tensor import DTensor
    params = [p for p in params if not isinstance(p, DTensor)]  # FSDP2 reduced those in backward already
    if not params:
        return
    # A parameter that some rank's batch reached and this one's did not counts here as a zero gradient (as in
    # DDP), so every rank reduces a buffer of the same layout (unequal buffers abort gloo); one no rank
    # reached keeps no gradient, so its optimizer skips it as in a single process.
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(has)
    params = [p for p, h in zip(params, has.tolist()) if h]
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    i = 0
    for p in params:
        p.grad.copy_(flat[i: i + p.numel()].view_as(p))
        i += p.numel()


def barrier(d: Dist):
    if d.world > 1:
        dist.barrier()


class GracefulStop:
    """Ctrl-C / SIGTERM finish the current step, checkpoint and export, instead of dying mid-write.
    Single-process only: under torchrun the ranks could stop at different steps, so there a kill
    falls back to the last periodic checkpoint."""

    def __init__(self, enabled: bool):
        self.requested = False
        self.enabled = enabled

    def _handler(self, signum, frame):
        if self.requested:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        import signal
        if self.enabled:
            self._old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        import signal
        if self.enabled:
            for s, h in self._old.items():
                signal.signal(s, h)
        return False


# ---------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of parameters, with warm-up so short runs are not dominated by init."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    def rate(self, step: int) -> float:
        # without warm-up the average stays anchored to where training started (split-timestep branches)
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int):
        d = self.rate(step)
        groups: dict[type, tuple[list, list]] = {}  # FSDP2's sharded tensors and plain ones go separately
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                avg, now = groups.setdefault(type(v), ([], []))
                avg.append(self.shadow[k])
                now.append(v.detach().float())
            else:
                self.shadow[k].copy_(v)
        # one fused update per group: on a GPU, a launch per tensor (~280 for the emoji model) costs more than the
        # arithmetic at the batch sizes distillation runs
        for avg, now in groups.values():
            torch._foreach_lerp_(avg, now, 1 - d)

    def copy_to(self, model: torch.nn.Module):
        load_cast(model, self.shadow)


def load_cast(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Load `weights` (e.g. an fp32 EMA) into `model`, each tensor cast to the dtype the model keeps it in."""
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()})
    return model


# ---------------------------------------------------------------- optimizer state <-> tensors
def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{idx}.{name}"] = val.cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict):
    state: dict[int, dict[str, Any]] = {}
    for key, val in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(folder: Path, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                    emas: dict[str, EMA], rng: dict[str, torch.Tensor], state: dict):
    """Write everything needed to resume into `folder`, atomically (a crash leaves the previous one).
    `rng`: named generator states (every rank's, see `rank_states`)."""
    with atomic_dir(folder) as tmp:
        meta: dict[str, Any] = {"state": state, "optimizers": {}}
        for name, m in modules.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}, tmp / f"{name}.safetensors")
        for name, e in emas.items():
            save_file({k: v.cpu() for k, v in e.shadow.items()}, tmp / f"{name}_ema.safetensors")
        for name, o in optimizers.items():
            t, m = optimizer_tensors(o)
            save_file(t, tmp / f"{name}_optim.safetensors")
            meta["optimizers"][name] = m
        save_file({"torch": torch.get_rng_state(), **{f"gen.{k}": v for k, v in rng.items()}}, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))


def rank_states(generators: dict[str, torch.Generator], d: Dist, device: torch.device) -> dict[str, torch.Tensor]:
    """Every rank's generator states, gathered for rank 0 to write, so that after a resume each rank goes
    on with its own stream (not rank 0's). Collective: all ranks call it."""
    out = {}
    for name, g in generators.items():
        s = g.get_state()
        if d.world == 1:
            out[f"{name}.rank0"] = s
            continue
        via = device if device.type == "cuda" else torch.device("cpu")  # NCCL gathers GPU tensors only
        parts = [torch.empty_like(s, device=via) for _ in range(d.world)]
        dist.all_gather(parts, s.to(via))
        out.update({f"{name}.rank{r}": p.cpu() for r, p in enumerate(parts)})
    return out


def checkpoint_folder(folder: Path) -> Path | None:
    """Where a checkpoint written by save_checkpoint lies: the folder, or after a crash between its two renames the
    previous one under .old; None when there is none."""
    folder = Path(folder)
    for f in (folder, folder.with_name(folder.name + ".old")):
        if (f / "state.json").exists():
            return f
    return None


def load_checkpoint(folder: Path, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                    emas: dict[str, EMA], generators: dict[str, torch.Generator], rank: int = 0) -> dict:
    found = checkpoint_folder(folder)
    if found is None:
        raise FlowflashError(f"no checkpoint to resume from in {folder}")
    folder = found
    meta = json.loads((folder / "state.json").read_text())
    for name, m in modules.items():
        m.load_state_dict(load_file(folder / f"{name}.safetensors"))
    for name, e in emas.items():  # the average lives where its network does
        e.shadow = {k: v.to(e.shadow[k].device) for k, v in load_file(folder / f"{name}_ema.safetensors").items()}
    for name, o in optimizers.items():
        load_optimizer_tensors(o, load_file(folder / f"{name}_optim.safetensors"), meta["optimizers"][name])
    rng = load_file(folder / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    for k, g in generators.items():
        key = next((n for n in (f"gen.{k}.rank{rank}", f"gen.{k}") if n in rng), None)
        if key is None:
            raise FlowflashError(f"{folder} holds no state of the {k!r} generator for rank {rank} (written by an "
                                 "older flowflash or another number of processes); start a new run instead, e.g. "
                                 "from its exported model")
        g.set_state(rng[key])
    return meta["state"]
