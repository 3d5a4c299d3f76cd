"""Linear layers that keep their stored int8 / 6-bit / 4-bit weights in memory and dequantize per call.

For the smallest resident set (the `tiny` profile): a quantized weight costs 1 byte a parameter in memory
instead of 4, at the price of one dequantization a call. The arithmetic is the loader's own
(storage.dequantize), so the output is the same as with weights dequantized at load."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .storage import dequantize


class QLinear(nn.Module):
    """y = x W^T + b with W = q * scale (per row, or per group of `group` columns)."""

    def __init__(self, q: Tensor, scale: Tensor, bias: Tensor | None, dtype: torch.dtype):
        super().__init__()
        rows, cols = q.shape
        groups = scale.shape[1]
        if q.dtype != torch.int8 or scale.shape[0] != rows or cols % groups:
            raise ValueError(f"QLinear needs int8 q and per-row or per-group scales, got {q.dtype} "
                             f"{tuple(q.shape)} with scales {tuple(scale.shape)}")
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.dtype = dtype
        self.in_features, self.out_features = cols, rows

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, dequantize(self.q, self.scale, self.dtype), self.bias)


def swap_in(model: nn.Module, quantized: dict[str, tuple[Tensor, Tensor]], state: dict[str, Tensor],
            dtype: torch.dtype, prefix: str = "") -> set[str]:
    """Replace each nn.Linear under `prefix` whose weight is in `quantized` ({"a.b.weight": (q int8, scale)})
    by a QLinear holding it (its bias taken from `state`). Returns the state keys it consumed. Other
    weights are left for the caller to dequantize (torch's own attention layers read `.weight` directly)."""
    used = set()
    for name, mod in list(model.named_modules()):
        key = f"{name}.weight"
        if not isinstance(mod, nn.Linear) or key not in quantized or not name.startswith(prefix):
            continue
        q, scale = quantized[key]
        bias = state.get(f"{name}.bias") if mod.bias is not None else None
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], QLinear(q, scale, bias, dtype))
        used |= {key} | ({f"{name}.bias"} if bias is not None else set())
    return used
