"""Weight-only quantization of an SD3 pipeline folder: the transformer and T5 (when present).

The quantized components are written in flowflash's storage layout (`models/storage.py`: int8 per row, or
6/4-bit packed per group) with a `flowflash_quantized.json` marker, and read back by `models/sd3.py`, which
dequantizes them into the diffusers/transformers modules. Everything else is hard-linked or copied. The
result is a flowflash folder: vanilla diffusers cannot read the quantized components."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import FlowflashError
from ..fsutil import atomic_dir
from ..models import storage
from .export import link_or_copy

MARKER = "flowflash_quantized.json"
QUANTIZED = {"transformer": "transformer", "t5": "text_encoder_3"}
GROUP = 32
# 2-D weights that are lookup tables, not linear layers: kept in fp16
NOT_LINEAR = ("embed", "shared", "relative_attention_bias")


def read_component(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a diffusers/transformers component folder's safetensors (sharded or not)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FlowflashError(f"{folder} has no safetensors weights to quantize")
    out: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def linear_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k for k, v in state.items() if k.endswith(".weight") and v.dim() == 2 and v.is_floating_point()
                  and not any(part in k for part in NOT_LINEAR) and v.shape[1] % 4 == 0)


def quantize_sd3(src: Path, dest: Path, bits: int) -> Path:
    src, dest = Path(src), Path(dest)
    if bits not in (8, 6, 4):
        raise FlowflashError(f"--bits must be 8, 6 or 4, got {bits}")
    if dest.exists():
        raise FlowflashError(f"{dest} exists; quantize writes a new folder (remove it or pick another --to)")
    if any((src / c / MARKER).exists() for c in QUANTIZED.values()):
        raise FlowflashError(f"{src} is already quantized; quantizing again compounds the rounding: start from "
                             "the original pipeline folder")
    if dest.resolve().is_relative_to(src.resolve()):
        raise FlowflashError(f"--to {dest} lies inside the pipeline folder {src}")
    if not (src / "transformer").is_dir():
        raise FlowflashError(f"{src} lacks the transformer/ component")
    with atomic_dir(dest) as tmp:
        for entry in sorted(src.iterdir()):
            if entry.is_dir() and entry.name in QUANTIZED.values():
                state = read_component(entry)
                keys = linear_keys(state)
                storage.save_weights(state, tmp / entry.name, dtype=torch.float16, int8_keys=keys, bits=bits,
                                     group=GROUP, extra_files={
                                         "config.json": (entry / "config.json").read_text(),
                                         MARKER: json.dumps({"bits": bits, "group": GROUP if bits < 8 else None,
                                                             "quantized_tensors": len(keys)}, indent=1)})
            elif entry.is_dir():
                shutil.copytree(entry, tmp / entry.name, copy_function=link_or_copy)
            else:
                link_or_copy(entry, tmp / entry.name)
    return dest


def is_quantized(component: Path) -> bool:
    return (Path(component) / MARKER).is_file()


def load_quantized(cls, component: Path, dtype: torch.dtype):
    """A diffusers/transformers module built from the component's config, with its quantized weights
    dequantized to `dtype`. Tied weights the file leaves out (T5's embed_tokens) are tied again."""
    state = storage.load_weights(component, dtype)
    if hasattr(cls, "from_config") and cls.__module__.startswith("diffusers"):
        model = cls.from_config(cls.load_config(component))
    else:
        model = cls(cls.config_class.from_pretrained(component))
    model = model.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    tied = {k for k in missing if "embed_tokens" in k}
    if unexpected or set(missing) - tied:
        raise FlowflashError(f"{component}: the quantized weights do not fit its config (missing "
                             f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return model
