"""Weight files of a model folder: how a state dict is written to and read from safetensors.

Layout follows the Hugging Face convention, written by `huggingface_hub.save_torch_state_dict`:
one `model.safetensors`, or above `SHARD_BYTES` the shards `model-0000i-of-0000N.safetensors` plus
`model.safetensors.index.json` ({"metadata": {"total_size": ...}, "weight_map": {tensor: file}}).
Int8 weight-only tensors are stored as int8 `X` plus float32 per-row scales `X_scale` (compressed-tensors
naming). 6- and 4-bit weight-only tensors are packed into uint8 `X` (4 values in 3 bytes; 2 in 1) with
fp16 per-group scales `X_scale` (rows x groups) and `X_qmeta` = int32 [bits, group size, columns].
Nothing here knows model configs, and nothing here ever unpickles.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

from ..errors import FlowflashError
from ..fsutil import atomic_dir, write_text_atomic

INT8_SUFFIX = "_scale"
SHARD_BYTES = 18 * 1024 * 1024  # + header stays under the repository's 20 MB per-file limit

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
FILENAME_PATTERN = "model{suffix}.safetensors"
_SHARD_RE = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
_PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl"}
# safetensors dtype codes -> (torch name, bytes per element), for reading headers without loading tensors
_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
           "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
           "U8": ("uint8", 1), "BOOL": ("bool", 1)}


# ---------------------------------------------------------------- int8


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: q in [-127, 127], scale float32 (out, 1) = max|row| / 127."""
    if w.dim() != 2 or not w.is_floating_point():
        raise FlowflashError(f"int8 quantization needs a 2-D floating tensor, got {tuple(w.shape)} {w.dtype}")
    wf = w.detach().float()
    scale = wf.abs().amax(dim=1, keepdim=True) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # all-zero row: q is 0 whatever the scale
    q = (wf / scale).round().clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """int8 q times its scales, one per row (scale (rows, 1)) or per group of columns (scale (rows, groups)):
    the one dequantization, used at load and per call by layers that keep q (models/qlinear.py)."""
    rows, cols = q.shape
    g = scale.shape[1]
    return (q.float().view(rows, g, cols // g) * scale.float().unsqueeze(2)).view(rows, cols).to(dtype)


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return dequantize(q, scale, dtype)


# ---------------------------------------------------------------- 6 and 4 bits, packed, per group

QMETA_SUFFIX = "_qmeta"
PACKED_BITS = (6, 4)


def quantize_packed(w: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """Symmetric per-group quantization of a 2-D weight to `bits` (q in [-(2^(b-1) - 1), 2^(b-1) - 1]), packed.
    Returns (packed uint8, scales fp16 (rows, columns / group), meta int32 [bits, group, columns])."""
    if bits not in PACKED_BITS:
        raise FlowflashError(f"packed quantization takes {PACKED_BITS} bits, got {bits}")
    rows, cols = w.shape
    if cols % group or group % 4:
        raise FlowflashError(f"{cols} columns do not split into groups of {group} (a multiple of 4 dividing them)")
    qmax = 2 ** (bits - 1) - 1
    g = w.detach().float().reshape(rows, cols // group, group)
    # Each group's scale clips its range where that lowers the group's squared rounding error: at 4 bits the
    # largest weight rarely deserves a whole step of its own.
    top = g.abs().amax(dim=2, keepdim=True)
    best, best_err = None, None
    for ratio in torch.linspace(1.0, 0.6, 9).tolist():
        sc = (top * ratio / qmax).to(torch.float16).float()  # the scale as it will be stored
        sc = torch.where(sc == 0, torch.ones_like(sc), sc)
        err = ((g / sc).round().clamp(-qmax, qmax) * sc - g).pow(2).sum(dim=2, keepdim=True)
        if best is None:
            best, best_err = sc, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, sc, best), torch.where(better, err, best_err)
    scale = best
    q = (g / scale).round().clamp(-qmax, qmax).to(torch.int16).reshape(rows, cols) + qmax + 1  # 1 .. 2^bits - 1
    u = q.to(torch.uint8)
    if bits == 4:
        packed = u[:, 0::2] | (u[:, 1::2] << 4)
    else:  # four 6-bit values a b c d -> 3 bytes
        a, b, c, d = (u[:, i::4].to(torch.int32) for i in range(4))
        word = a | (b << 6) | (c << 12) | (d << 18)
        packed = torch.stack([word & 255, (word >> 8) & 255, (word >> 16) & 255], dim=2).reshape(rows, -1)
        packed = packed.to(torch.uint8)
    meta = torch.tensor([bits, group, cols], dtype=torch.int32)
    return packed.contiguous(), scale.squeeze(2).to(torch.float16).contiguous(), meta


def unpack(packed: Tensor, meta: Tensor) -> Tensor:
    """The packed values as int8 in [-(2^(b-1) - 1), 2^(b-1) - 1], shape (rows, columns)."""
    bits, group, cols = (int(v) for v in meta.tolist())
    rows = packed.shape[0]
    p = packed.to(torch.int32)
    if bits == 4:
        q = torch.stack([p & 15, p >> 4], dim=2).reshape(rows, -1)
    else:
        b = p.reshape(rows, -1, 3)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        q = torch.stack([(word >> s) & 63 for s in (0, 6, 12, 18)], dim=2).reshape(rows, -1)
    if q.shape[1] != cols:
        raise FlowflashError(f"packed tensor of {rows}x{q.shape[1]} values does not match its meta "
                             f"({bits} bits, groups of {group}, {cols} columns)")
    return (q - 2 ** (bits - 1)).to(torch.int8)


def dequantize_packed(packed: Tensor, scale: Tensor, meta: Tensor, dtype: torch.dtype) -> Tensor:
    bits, group, cols = (int(v) for v in meta.tolist())
    q = unpack(packed, meta)
    rows = q.shape[0]
    if scale.shape != (rows, cols // group):
        raise FlowflashError(f"scales {tuple(scale.shape)} do not match a packed tensor of {rows}x{cols} in groups "
                             f"of {group}")
    return dequantize(q, scale, dtype)


# ---------------------------------------------------------------- saving


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _stored_tensors(state_dict: dict[str, Tensor], dtype: torch.dtype, int8_keys: set[str], bits: int = 8,
                    group: int = 32) -> dict[str, Tensor]:
    """The tensors as written: cast, quantized, and each a contiguous CPU copy with its own storage.

    Own storage matters: save_torch_state_dict silently drops all but one name of tensors sharing storage
    (tied weights, or `.to(dtype)` returning its input), and would size a view by its whole storage."""
    for key in sorted(int8_keys):
        v = state_dict.get(key)
        if v is None:
            raise FlowflashError(f"int8 key {key!r} is not in the state dict")
        if v.dim() != 2 or not v.is_floating_point():
            raise FlowflashError(f"int8 key {key!r} must be a 2-D floating tensor, got {tuple(v.shape)} {v.dtype}")
        if not torch.isfinite(v).all():
            raise FlowflashError(f"int8 key {key!r} holds inf or nan; it cannot be quantized")
        for suffix in (INT8_SUFFIX, QMETA_SUFFIX):
            if key + suffix in state_dict:
                raise FlowflashError(f"int8 key {key!r} clashes with the state dict's own {key + suffix!r}")
    out: dict[str, Tensor] = {}
    for key, v in state_dict.items():
        v = v.detach()
        if key in int8_keys and bits == 8:
            out[key], out[key + INT8_SUFFIX] = quantize_int8(v.cpu())
            continue
        if key in int8_keys:
            g = math.gcd(v.shape[1], group)  # a narrower matrix takes smaller groups (its meta records them)
            out[key], out[key + INT8_SUFFIX], out[key + QMETA_SUFFIX] = quantize_packed(v.cpu(), bits, g)
            continue
        cast = dtype if v.is_floating_point() else v.dtype
        out[key] = v.to("cpu", cast, copy=True, memory_format=torch.contiguous_format)
    return out


def _check_extra_name(name: str):
    if Path(name).name != name or name in ("", ".", ".."):
        raise FlowflashError(f"extra file name {name!r} must be a plain file name")
    if name in (SINGLE, INDEX) or _SHARD_RE.fullmatch(name):
        raise FlowflashError(f"extra file name {name!r} would clash with the weight files")


def save_weights(state_dict: dict[str, Tensor], folder: Path, *, dtype: torch.dtype = torch.float16,
                 int8_keys: Iterable[str] = (), metadata: dict[str, str] | None = None,
                 extra_files: dict[str, str] | None = None, bits: int = 8, group: int = 32,
                 shard_bytes: int | None = None) -> list[Path]:
    """Write the state dict (and `extra_files`, name -> text) as the whole of `folder`, atomically.
    `int8_keys` are stored weight-only at `bits` (8: per row; 6 or 4: packed, per group of `group` columns);
    shards hold at most `shard_bytes` (None: SHARD_BYTES; less for a file that must come back from a device).

    Returns the weight files in `weight_files` order. In a sharded folder huggingface_hub puts `metadata`
    into the index's "metadata" (beside total_size); the shards themselves carry only {"format": "pt"}."""
    import huggingface_hub  # module attribute at call time, so tests can make the write fail

    folder = Path(folder)
    if not dtype.is_floating_point:
        raise FlowflashError(f"weights dtype must be floating, got {dtype}")
    int8 = set(int8_keys)
    for name in extra_files or {}:
        _check_extra_name(name)
    if bits not in (8, *PACKED_BITS):
        raise FlowflashError(f"weight-only storage takes 8, 6 or 4 bits, got {bits}")
    tensors = _stored_tensors(state_dict, dtype, int8, bits, group)
    if not tensors:
        raise FlowflashError(f"refusing to write an empty state dict to {folder}")
    kind = ("int8-weight-only" if bits == 8 else f"int{bits}-weight-only-g{group}") if int8 else _dtype_name(dtype)
    meta = {**(metadata or {}), "format": "pt", "flowflash_storage": kind}
    try:
        with atomic_dir(folder) as tmp:
            huggingface_hub.save_torch_state_dict(tensors, tmp, filename_pattern=FILENAME_PATTERN,
                                                  force_contiguous=True, max_shard_size=shard_bytes or SHARD_BYTES,
                                                  metadata=dict(meta))  # it adds to the dict it is given
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
            umask = os.umask(0)
            os.umask(umask)
            for f in tmp.iterdir():  # the hub writes its shards 0600; a model folder is meant to be read
                f.chmod(0o666 & ~umask)
    except OSError as e:
        raise FlowflashError(f"could not write weights to {folder}: {e}") from None
    return weight_files(folder)


# ---------------------------------------------------------------- reading


def _legacy_shards(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("model-*-of-*.safetensors") if _SHARD_RE.fullmatch(p.name))


def _read_index(folder: Path) -> dict[str, str]:
    """The index's weight_map (tensor -> file), validated enough that no file name escapes the folder."""
    path = folder / INDEX
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlowflashError(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise FlowflashError(f"cannot read {path}: {e}") from None
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
        raise FlowflashError(f"{path} has no valid weight_map (tensor name -> file name)")
    bad = sorted({f for f in wmap.values() if Path(f).name != f or not f.endswith(".safetensors")})
    if bad:
        raise FlowflashError(f"{path} names files that are not safetensors in its folder: {', '.join(bad)}")
    return wmap


def weight_files(folder: Path) -> list[Path]:
    """The folder's weight files in a fixed order (shards by number); [] when it has none.

    Raises for an index that names missing shards and for the pre-index shard layout."""
    folder = Path(folder)
    if (folder / SINGLE).is_file():  # as transformers: a single file wins over an index
        return [folder / SINGLE]
    if (folder / INDEX).is_file():
        files = [folder / f for f in sorted(set(_read_index(folder).values()))]
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise FlowflashError(f"{folder / INDEX} names shards the folder lacks: {', '.join(missing)}")
        return files
    if _legacy_shards(folder):
        raise FlowflashError(f"{folder} uses the pre-index shard layout (model-0000i-of-0000N.safetensors "
                             f"without {INDEX}); convert it once with upgrade_legacy_shards")
    return []


def weights_hash(folder: Path) -> str:
    """First 10 hex of sha256 over the weight files' bytes, in weight_files order (for PNG metadata)."""
    h = hashlib.sha256()
    for path in _files_or_raise(Path(folder)):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:10]


def _files_or_raise(folder: Path) -> list[Path]:
    """weight_files, but an absent folder or one without weights is an error."""
    if not folder.is_dir():
        raise FlowflashError(f"model folder not found: {folder}")
    files = weight_files(folder)
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise FlowflashError(f"{folder} holds pickle weights ({', '.join(pickles)}); "
                             "flowflash loads only safetensors and never unpickles")
    raise FlowflashError(f"{folder} has no weights ({SINGLE} or {INDEX})")


def _read_file(path: Path, fn):
    """Run fn(handle) on a memory-mapped safetensors file; any read failure names the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return fn(f)
    except (SafetensorError, OSError, ValueError) as e:
        raise FlowflashError(f"{path} is truncated or corrupt: {e}") from None


def load_weights(folder: Path, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Every tensor of the folder, floating ones cast to `dtype`, int8 ones dequantized (scales dropped)."""
    folder = Path(folder)
    raw = _read_raw(folder)
    return _decode(raw, dtype, folder)


def _read_raw(folder: Path) -> dict[str, Tensor]:
    files = _files_or_raise(folder)
    wmap = _read_index(folder) if files[0].name != SINGLE else {}
    raw: dict[str, Tensor] = {}
    for path in files:
        def read(f, path=path) -> dict[str, Tensor]:
            keys = set(f.keys())
            absent = sorted(k for k, v in wmap.items() if v == path.name and k not in keys)
            if absent:
                raise FlowflashError(f"{path} lacks tensors its index assigns to it: {', '.join(absent[:5])}"
                                     + (f" (+{len(absent) - 5} more)" if len(absent) > 5 else ""))
            return {k: f.get_tensor(k) for k in keys}
        raw.update(_read_file(path, read))
    return raw


def load_weights_quantized(folder: Path, dtype: torch.dtype = torch.float32
                           ) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
    """Like load_weights, but the stored-quantized tensors come back as they are, (int8 q, scales
    (rows, groups)), for layers that keep them (models/qlinear.py); everything else as load_weights."""
    folder = Path(folder)
    raw = _read_raw(folder)
    quantized: dict[str, tuple[Tensor, Tensor]] = {}
    for key, v in list(raw.items()):
        scale = raw.get(key + INT8_SUFFIX)
        if scale is None or v.dtype not in (torch.int8, torch.uint8):
            continue
        if v.dtype == torch.uint8 and key + QMETA_SUFFIX in raw:
            meta = raw.pop(key + QMETA_SUFFIX)
            quantized[key] = (unpack(v, meta), scale)
        elif v.dtype == torch.int8:
            quantized[key] = (v, scale)
        else:
            continue
        del raw[key], raw[key + INT8_SUFFIX]
    return _decode(raw, dtype, folder), quantized


def _decode(raw: dict[str, Tensor], dtype: torch.dtype, folder: Path) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    scales = set()
    for key, v in raw.items():
        if key.endswith(QMETA_SUFFIX) and key[: -len(QMETA_SUFFIX)] in raw:
            continue
        if v.dtype == torch.uint8 and key + QMETA_SUFFIX in raw:
            scale = raw.get(key + INT8_SUFFIX)
            if scale is None:
                raise FlowflashError(f"{folder}: quantized tensor {key!r} has no {key + INT8_SUFFIX!r}")
            out[key] = dequantize_packed(v, scale, raw[key + QMETA_SUFFIX], dtype)
            scales.add(key + INT8_SUFFIX)
        elif v.dtype == torch.int8:
            scale = raw.get(key + INT8_SUFFIX)
            if scale is None:
                raise FlowflashError(f"{folder}: int8 tensor {key!r} has no {key + INT8_SUFFIX!r}")
            out[key] = dequantize_int8(v, scale, dtype)
            scales.add(key + INT8_SUFFIX)
        else:
            out[key] = v.to(dtype) if v.is_floating_point() else v
    # only scales that were consumed go; a model's own tensor named "..._scale" stays
    return {k: v for k, v in out.items() if k not in scales}


def storage_of(folder: Path) -> dict:
    """How the folder stores its weights, for model cards: read from the headers, no tensor loaded."""
    files = _files_or_raise(Path(folder))
    dtypes: dict[str, str] = {}
    for path in files:
        dtypes.update(_read_file(path, lambda f: {k: f.get_slice(k).get_dtype() for k in f.keys()}))
    int8 = [k for k, d in dtypes.items() if d == "I8" and k + INT8_SUFFIX in dtypes]
    packed = [k for k, d in dtypes.items() if d == "U8" and k + QMETA_SUFFIX in dtypes and k + INT8_SUFFIX in dtypes]
    bits = None
    if packed:
        metas = {tuple(m.tolist()) for m in _read_all(files, [k + QMETA_SUFFIX for k in packed])}
        bits = sorted({m[0] for m in metas})
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files), "int8_tensors": len(int8),
            "packed_tensors": len(packed), "packed_bits": bits,
            "dtypes": sorted({_DTYPES.get(d, (d.lower(), 0))[0] for d in dtypes.values()})}


def _read_all(files: list[Path], keys: list[str]) -> list[Tensor]:
    """The named (small) tensors, from whichever file holds them."""
    want, out = set(keys), []
    for path in files:
        out += _read_file(path, lambda f: [f.get_tensor(k) for k in f.keys() if k in want])
    return out


def quantized_bits(folder: Path) -> int | None:
    """8, 6 or 4 when the folder's weights are stored quantized, else None (read from the headers)."""
    s = storage_of(folder)
    if s["packed_bits"]:
        return min(s["packed_bits"])
    return 8 if s["int8_tensors"] else None


# ---------------------------------------------------------------- legacy folders


def _nbytes(f, key: str) -> int:
    sl = f.get_slice(key)
    size = _DTYPES.get(sl.get_dtype(), (None, 0))[1]
    if not size:  # a dtype outside the table: ask torch
        return f.get_tensor(key).nbytes
    n = 1
    for d in sl.get_shape():
        n *= d
    return n * size


def upgrade_legacy_shards(folder: Path) -> Path:
    """Give a pre-index shard folder the standard index, so it loads like any sharded folder.

    The shards are left byte for byte as they are (so weights_hash does not change). A folder that already
    has the index is returned as is."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        return folder / INDEX
    if (folder / SINGLE).is_file():
        raise FlowflashError(f"{folder} holds a single {SINGLE}; it has no shards to index")
    shards = _legacy_shards(folder)
    if not shards:
        raise FlowflashError(f"{folder} has no model-0000i-of-0000N.safetensors shards to index")
    counts = {_SHARD_RE.fullmatch(p.name).group(2) for p in shards}
    if len(counts) != 1:
        raise FlowflashError(f"{folder} mixes shard sets of different sizes ({', '.join(sorted(counts))})")
    n = int(counts.pop())
    want = [folder / f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    missing = [p.name for p in want if not p.is_file()]
    if missing or len(shards) != n:
        extra = sorted({p.name for p in shards} - {p.name for p in want})
        raise FlowflashError(f"{folder}: the shard set is incomplete or inconsistent; missing: "
                             f"{', '.join(missing) or 'none'}; unexpected: {', '.join(extra) or 'none'}")
    weight_map: dict[str, str] = {}
    total = 0
    for path in want:
        sizes = _read_file(path, lambda f: {k: _nbytes(f, k) for k in f.keys()})
        dup = sorted(set(sizes) & set(weight_map))
        if dup:
            raise FlowflashError(f"{path} repeats tensors of {weight_map[dup[0]]}: {', '.join(dup[:5])}")
        weight_map.update({k: path.name for k in sizes})
        total += sum(sizes.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_text_atomic(folder / INDEX, json.dumps(index, indent=2))
    return folder / INDEX
