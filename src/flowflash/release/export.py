"""`flowflash export`: a model whose teacher was an SD3 pipeline, as a plain diffusers StableDiffusion3Pipeline
folder that vanilla diffusers runs unchanged (num_inference_steps = the model's steps, guidance_scale = its
guidance), with a model card. Weights are hard-linked where the file system allows, else copied."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import FlowflashError
from ..fsutil import atomic_dir
from ..models.sd3 import SETTINGS, is_diffusers_folder, read_index, read_settings


def link_or_copy(src: Path, dst: Path):
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def link_tree(src_root: Path, name: str, dst_root: Path):
    """Component folder `name` of src_root into dst_root, every file hard-linked (or copied)."""
    for src in (src_root / name).rglob("*"):
        dst = dst_root / src.relative_to(src_root)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(src, dst)


def no_t5_kwargs(drop) -> str:
    """What diffusers needs to load a folder whose model_index has no T5 (it asks for the null parts by name)."""
    return ", text_encoder_3=None, tokenizer_3=None" if "t5" in set(drop) else ""


def export(model: Path, to: Path) -> Path:
    model, to = Path(model), Path(to)
    if not is_diffusers_folder(model):
        raise FlowflashError(f"{model} is a pixel-space flowflash model with no diffusers pipeline class to export "
                             "to; export takes a model whose teacher was an SD3 pipeline (a diffusers folder)")
    if to.exists():  # never replace a folder the user has: it may hold anything
        raise FlowflashError(f"{to} exists; export writes a new folder: remove it or choose another --to")
    index = read_index(model)
    settings = read_settings(model) if (model / SETTINGS).exists() else {}
    sampling = settings.get("sampling", {})
    steps, guidance = sampling.get("steps", 28), sampling.get("guidance", 7.0)
    components = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]]
    with atomic_dir(to) as tmp:
        shutil.copy2(model / "model_index.json", tmp / "model_index.json")
        for name in components:
            if not (model / name).is_dir():
                raise FlowflashError(f"{model} lacks the {name}/ component its model_index.json lists")
            link_tree(model, name, tmp)
        (tmp / "README.md").write_text(f"""# {to.name}

Exported by `flowflash export {model}` as a diffusers `StableDiffusion3Pipeline` folder.

```python
import torch
from diffusers import StableDiffusion3Pipeline
pipe = StableDiffusion3Pipeline.from_pretrained("{to}", local_files_only=True{no_t5_kwargs(settings.get("trained_without", []))})
image = pipe("a red apple", num_inference_steps={steps}, guidance_scale={guidance},
             generator=torch.Generator().manual_seed(0)).images[0]
```

With these settings and the same seed, diffusers draws the image `flowflash generate --model {model} --seed 0`
draws (fp32, CPU). Scheduler config as in the source (shift {json.loads((model / 'scheduler' / 'scheduler_config.json').read_text()).get('shift')}).
""")
    return to
