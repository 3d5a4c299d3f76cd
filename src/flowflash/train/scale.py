"""Scaling a distillation run out: trainable copies of the teacher, gradient checkpointing, and FSDP2.

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards every transformer block and then the whole role, for the
student, the critic and the frozen teacher alike, so each process holds 1/N of every role's parameters,
gradients and optimizer state (and of the student's EMA). Without `fsdp`, a multi-process run uses the same
engine to replicate (HSDP whose shard groups are single processes: data parallelism, as DDP). Under bf16 the shards compute in bf16
(`MixedPrecisionPolicy`) and reduce gradients in fp32; master weights and optimizer state stay fp32. Sharded
checkpoints are written with `torch.distributed.checkpoint` (every rank writes its own shards).

Sharding replaces each parameter with a DTensor, so the optimizers a method built are rebuilt afterwards
over the same parameters by name (`shard_method`): methods stay unaware of how they are scaled.
"""
from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..errors import FlowflashError
from ..fsutil import swap_in
from .common import Dist, checkpoint_folder


@dataclass
class Roles:
    student: nn.Module
    critic: nn.Module | None


def trainable_copy(role: nn.Module) -> nn.Module:
    """A trainable fp32 copy of a (possibly bf16, frozen) role."""
    return copy.deepcopy(role).float().train().requires_grad_(True)


def prepare_roles(cfg, teacher: nn.Module, student: nn.Module | None, critic: bool) -> Roles:
    student = trainable_copy(student if student is not None else teacher)
    roles = Roles(student, trainable_copy(teacher) if critic else None)
    if cfg.grad_checkpointing:
        for role in (roles.student, roles.critic):
            if role is not None:
                role.transformer.enable_gradient_checkpointing()
    return roles


# ------------------------------------------------------------------ FSDP2
def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in module.parameters())


def shard_module(module: nn.Module, mesh, bf16: bool):
    """fully_shard each transformer block (the unit of all-gather and of freeing), then the module itself."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    blocks = getattr(getattr(module, "transformer", None), "transformer_blocks", None)
    for block in blocks or ():
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(module, mesh=mesh, mp_policy=mp)


def param_names(method) -> dict[int, str]:
    return {id(p): f"{net}.{n}" for net, m in method.networks.items() for n, p in m.named_parameters()}


def shard_method(method, d: Dist, device: torch.device, bf16: bool, replicate: bool = False):
    """Shard every network of `method` and its frozen teacher over all ranks, then rebuild its optimizers on
    the sharded parameters (same groups, same hyper-parameters). `replicate`: data parallelism on the same
    engine (HSDP with shards of one process: every rank holds whole roles, gradients are all-reduced), i.e. DDP."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = (d.world, 1) if replicate else (d.world,)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard")[-len(shape):])
    before = param_names(method)
    groups = {name: [[before[id(p)] for p in g["params"]] for g in opt.param_groups]
              for name, opt in method.optimizers.items()}
    for module in {id(m): m for m in [*method.networks.values(), getattr(method, "teacher", None)] if m is not None}.values():
        shard_module(module, mesh, bf16)
    after = {f"{net}.{n}": p for net, m in method.networks.items() for n, p in m.named_parameters()}
    for name, opt in list(method.optimizers.items()):
        new_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [after[n] for n in names]}
                      for g, names in zip(opt.param_groups, groups[name])]
        method.optimizers[name] = type(opt)(new_groups)  # each group carries all its hyper-parameters


def full_weights(shadow: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """Whole tensors of a (possibly) sharded state, on the CPU. Collective: every rank calls it; only a rank
    with `keep` holds the result (the others gather one tensor at a time and drop it)."""
    from torch.distributed.tensor import DTensor
    out = {}
    for k, v in shadow.items():
        whole = v.full_tensor() if isinstance(v, DTensor) else v
        if keep:
            out[k] = whole.cpu()
    return out


def _container(method) -> nn.Module:
    return nn.ModuleDict(method.networks)


def stepped(method) -> list[str]:
    """The optimizers that have stepped (hold state). torch's optimizer state-dict helpers initialise an empty
    optimizer's state by stepping it at lr 0, which would count a phantom Adam step; those are left out."""
    return [n for n, o in method.optimizers.items() if o.state]


def sharded_state(method, emas, optimizers: list[str]) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    box = _container(method)
    return {"model": get_model_state_dict(box),
            "optim": {n: get_optimizer_state_dict(box, method.optimizers[n]) for n in optimizers},
            "ema": {n: e.shadow for n, e in emas.items()}}


def save_sharded(folder: Path, method, emas, rng: dict[str, torch.Tensor], state: dict, d: Dist):
    """Every rank writes its shards into folder.tmp; then rank 0 adds the RNG states and the step and swaps
    the folder in (the previous checkpoint survives a crash as folder.old). Collective."""
    import torch.distributed.checkpoint as dcp

    tmp = folder.with_name(folder.name + ".tmp")
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    optimizers = stepped(method)
    dcp.save(sharded_state(method, emas, optimizers), checkpoint_id=str(tmp))
    dist.barrier()
    if d.main:
        save_file({f"gen.{k}": v.contiguous() for k, v in rng.items()}, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps({"state": state, "format": "dcp", "world": d.world,
                                                    "optimizers": optimizers}))
        swap_in(tmp, folder)
    dist.barrier()


def load_sharded(folder: Path, method, emas, generators: dict[str, torch.Generator], d: Dist) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    found = checkpoint_folder(folder)
    if found is None:
        raise FlowflashError(f"no checkpoint to resume from in {folder}")
    folder = found
    meta = json.loads((folder / "state.json").read_text())
    if meta.get("format") != "dcp":
        raise FlowflashError(f"{folder} was written by one process; resume it with one process (no torchrun)")
    if meta["world"] != d.world:
        raise FlowflashError(f"{folder} was written by {meta['world']} processes; resume it with as many "
                             f"(this run has {d.world})")
    optimizers = meta.get("optimizers", list(method.optimizers))
    sd = sharded_state(method, emas, optimizers)
    dcp.load(sd, checkpoint_id=str(folder))  # fills the sharded tensors in place
    box = _container(method)
    set_model_state_dict(box, sd["model"])
    for n in optimizers:
        set_optimizer_state_dict(box, method.optimizers[n], sd["optim"][n])
    rng = load_file(folder / "rng.safetensors")
    for k, g in generators.items():
        g.set_state(rng[f"gen.{k}.rank{d.rank}"])
    return meta["state"]
