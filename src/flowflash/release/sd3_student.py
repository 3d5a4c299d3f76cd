"""A student distilled from an SD3 teacher, written as a diffusers StableDiffusion3Pipeline folder.

The teacher's folder with the transformer replaced by the student's weights: the other components are
hard-linked (copied across file systems), T5 is left out when the student was trained without it (its
model_index entry is null, which diffusers loads as no T5, i.e. zero embeddings, as in training), and
`flowflash.json` records the student's steps and guidance (1: no CFG) for `flowflash generate`. The student's
times are the teacher scheduler's for that many steps, so vanilla diffusers with num_inference_steps=<steps>
and guidance_scale=1.0 draws the same image for the same seed.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import Tensor

from ..errors import FlowflashError
from ..fsutil import atomic_dir
from .export import link_tree, no_t5_kwargs

DTYPE_NAMES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DROPPABLE_IN_DIFFUSERS = {"t5": ("text_encoder_3", "tokenizer_3")}  # diffusers' SD3 runs without T5 only


def stored_dtype(transformer_dir: Path) -> torch.dtype:
    """The dtype the teacher's transformer weights are stored in (the student is stored alike)."""
    from safetensors import safe_open

    files = sorted(Path(transformer_dir).glob("*.safetensors"))
    if not files:
        return torch.float32
    with safe_open(files[0], "pt") as f:
        key = next(iter(f.keys()), None)
        return DTYPE_NAMES.get(f.get_slice(key).get_dtype(), torch.float32) if key else torch.float32


def save_sd3_student(latent_cfg, weights: dict[str, Tensor], schedule: list[float], guidance: float, run_cfg,
                     folder: Path) -> Path:
    """`weights`: the student role's state (keys "transformer.*", e.g. its EMA), written as the folder's
    transformer/; everything else comes from the teacher's folder `latent_cfg.folder`."""
    from diffusers import SD3Transformer2DModel

    from ..models.sd3 import quiet_loaders

    quiet_loaders()  # save_pretrained shows a progress bar per shard
    teacher, folder = Path(latent_cfg.folder), Path(folder)
    index = json.loads((teacher / "model_index.json").read_text())
    config = SD3Transformer2DModel.load_config(teacher, subfolder="transformer", local_files_only=True)
    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(config)
    dtype = stored_dtype(teacher / "transformer")
    prefix = "transformer."
    sd = {k[len(prefix):]: v.detach().to("cpu", dtype) for k, v in weights.items() if k.startswith(prefix)}
    missing = set(model.state_dict()) - set(sd)
    if missing:
        raise FlowflashError(f"student weights lack {len(missing)} transformer tensors (e.g. {sorted(missing)[0]})")
    model.load_state_dict(sd, assign=True)
    drop = set(latent_cfg.drop)
    left_out = {part for name in drop for part in DROPPABLE_IN_DIFFUSERS.get(name, ())}
    steps = len(schedule) - 1
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp / "transformer", safe_serialization=True)
        for name, value in index.items():
            if name.startswith("_") or name == "transformer" or not (isinstance(value, list) and value[0]):
                continue
            if name in left_out:
                index[name] = [None, None]
                continue
            link_tree(teacher, name, tmp)
        shift = getattr(run_cfg, "student_shift", None)
        if shift is not None:  # the student's times come from this shift: the folder's scheduler says so
            sc_path = tmp / "scheduler" / "scheduler_config.json"
            sc = json.loads(sc_path.read_text())
            sc_path.unlink()  # a hard link to the teacher's file: replace it, never write through it
            sc_path.write_text(json.dumps({**sc, "shift": float(shift)}, indent=1))
        (tmp / "model_index.json").write_text(json.dumps(index, indent=1))
        settings = {"sampling": {"steps": steps, "guidance": guidance}, "trained_without": sorted(drop),
                    "schedule": schedule, "trained_size": list(latent_cfg.size), "distilled_from": str(teacher),
                    "run": {k: v for k, v in dataclasses.asdict(run_cfg).items()} if run_cfg is not None else None}
        (tmp / "flowflash.json").write_text(json.dumps(settings, indent=1))
        (tmp / "README.md").write_text(card(teacher, folder, steps, guidance, drop, run_cfg))
    return folder


def card(teacher: Path, folder: Path, steps: int, guidance: float, drop: set[str], run_cfg) -> str:
    c = run_cfg
    clip_note = ("\nTrained without " + ", ".join(sorted(drop - {"t5"})) + ": flowflash runs it without them; vanilla "
                 "diffusers has no way to, so its image differs.\n") if drop - {"t5"} else ""
    return f"""# {folder.name}

A {steps}-step student distilled by flowflash from the SD3 pipeline `{teacher}`{
    f" with method `{c.method}`" if c is not None else ""}, as a diffusers `StableDiffusion3Pipeline` folder.
{"T5 was dropped: the student was trained and runs with zero T5 embeddings (diffusers: no text_encoder_3)." if "t5" in drop else ""}
{clip_note}
- Data: {f"the prompts of `{c.prompts}`" if c is not None else "-"}; no images{
    f" except the real images of `{c.real_images}`" if c is not None and c.real_images else ""}.
- Training: {f"{c.steps} iterations at batch {c.batch_size}, lr {c.lr} (critic {c.lr_critic}), size {c.size or 'default'}, "
             f"precision {c.precision}, device {c.device}" if c is not None else "none (the teacher's weights)"}.
- Reproduce: `flowflash distill --method {c.method if c is not None else "naive"} --config <run>/config.json`
  (the run folder holds the config this student was trained with).

```python
import torch
from diffusers import StableDiffusion3Pipeline
pipe = StableDiffusion3Pipeline.from_pretrained("{folder}", local_files_only=True{no_t5_kwargs(drop)})
image = pipe("a red apple", num_inference_steps={steps}, guidance_scale={guidance},
             generator=torch.Generator().manual_seed(0)).images[0]
```

or `flowflash generate "a red apple" --model {folder} --seed 0` (the same image at fp32 on the CPU).
"""
