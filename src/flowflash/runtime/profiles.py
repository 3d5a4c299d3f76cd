"""Device profiles: how to run on this machine (device, dtype, threads, batch size, encoders, backend).

`pick(name, machine)` is a pure function of a profile name and the machine's facts, so every choice can be
tested with made-up machines; `machine_facts()` reads the real one. Explicit CLI flags override a profile.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FlowflashError

PROFILES = ("auto", "tiny", "laptop", "desktop", "gpu")


@dataclass(frozen=True)
class Machine:
    cores: int  # usable by this process
    ram_total_gb: float
    ram_available_gb: float
    cuda: bool = False
    mps: bool = False
    cpu_flags: frozenset[str] = field(default_factory=frozenset)
    cpu_name: str = ""
    openvino: bool = False  # the openvino package is installed


@dataclass(frozen=True)
class Profile:
    name: str
    device: str
    dtype: str
    threads: int | None  # None: torch's default
    batch_size: int
    drop_large_encoder: bool  # leave out the big text encoder (emoji: MiniLM; SD3: T5)
    backend: str = "torch"
    low_memory: bool = False  # quantized weights stay int8 in memory
    why: str = ""


def _meminfo() -> dict[str, float]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, _, v = line.partition(":")
            out[k] = int(v.split()[0]) / 2**20  # kB -> GB
    except (OSError, ValueError, IndexError):
        pass
    return out


def _cpuinfo() -> tuple[frozenset[str], str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset(), platform.processor()
    flags, name = frozenset(), ""
    for line in text.splitlines():
        k, _, v = line.partition(":")
        if k.strip() in ("flags", "Features") and not flags:  # x86 / ARM
            flags = frozenset(v.split())
        elif k.strip() == "model name" and not name:
            name = v.strip()
    return flags, name


def machine_facts() -> Machine:
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    mem = _meminfo()
    total = mem.get("MemTotal", 0.0)
    flags, name = _cpuinfo()
    import importlib.util

    return Machine(cores=cores, ram_total_gb=total, ram_available_gb=mem.get("MemAvailable", total),
                   cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available(), cpu_flags=flags,
                   cpu_name=name, openvino=importlib.util.find_spec("openvino") is not None)


def pick(name: str, m: Machine, emoji: bool = True) -> Profile:
    """The profile `name` on machine `m` (`auto` chooses one of the others and says why). `emoji`: the model
    is a flowflash model (the OpenVINO backend and low-memory loading take those only)."""
    if name not in PROFILES:
        raise FlowflashError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    if name == "auto":
        if m.cuda or m.mps:
            name, why = "gpu", "a GPU is available"
        elif m.ram_available_gb < 2 or m.cores <= 1:
            name, why = "tiny", f"{m.ram_available_gb:.1f} GB RAM free and {m.cores} core(s): keep memory lowest"
        elif m.ram_available_gb < 8 or m.cores <= 4:
            name, why = "laptop", f"{m.cores} cores and {m.ram_available_gb:.1f} GB RAM free"
        else:
            name, why = "desktop", f"{m.cores} cores and {m.ram_available_gb:.1f} GB RAM free"
        return _named(name, m, f"auto: {why}", emoji)
    return _named(name, m, "asked for", emoji)


def _named(name: str, m: Machine, why: str, emoji: bool = True) -> Profile:
    if name == "gpu":
        if not (m.cuda or m.mps):
            raise FlowflashError("profile 'gpu' asked for, but this torch sees no CUDA or Apple GPU")
        device = "cuda" if m.cuda else "mps"
        # bf16 on CUDA; MPS runs fp16 best
        return Profile("gpu", device, "bf16" if m.cuda else "fp16", None, 16, False, why=why)
    cpu_backend = "openvino" if m.openvino and emoji else "torch"
    if name == "tiny":
        # One image at a time on one thread, without the 90 MB MiniLM: the smallest resident set
        # (the light encoder still reads the prompt; the card's encoder-drop table gives the quality cost).
        return Profile("tiny", "cpu", "fp32", 1, 1, True, low_memory=emoji, why=why)
    # OpenVINO (int8 on the stored grid, fp32 activations) halves an emoji model's denoising time where it
    # is installed. On torch, bf16 pays only on CPUs with native bf16 matmuls (AVX512-BF16, AMX: 1.5x on
    # the development machine); on AVX2 alone it is slower than fp32.
    native_bf16 = bool({"avx512_bf16", "amx_bf16"} & m.cpu_flags)
    dtype = "bf16" if cpu_backend == "torch" and native_bf16 else "fp32"
    if name == "laptop":
        return Profile("laptop", "cpu", dtype, min(m.cores, 4), 4, False, backend=cpu_backend, why=why)
    return Profile("desktop", "cpu", dtype, m.cores, 8, False, backend=cpu_backend, why=why)


def large_encoder(model_path: Path) -> str:
    """The big, droppable text encoder of a model folder: T5 for an SD3 pipeline, MiniLM for ours."""
    return "t5" if (Path(model_path) / "model_index.json").is_file() else "minilm"


def describe(m: Machine) -> str:
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "neon", "asimd") if f in m.cpu_flags]
    gpu = "CUDA GPU" if m.cuda else "Apple GPU (MPS)" if m.mps else "none"
    return (f"CPU: {m.cpu_name or platform.machine()} ({m.cores} usable cores; {', '.join(isa) or 'no AVX2'})\n"
            f"RAM: {m.ram_total_gb:.1f} GB total, {m.ram_available_gb:.1f} GB available\n"
            f"GPU: {gpu}")


def expected_peak_mb(model_folder: Path, profile: Profile, torch_mb: float) -> dict[str, float]:
    """A rough plan of one image's peak memory for a flowflash model folder: torch itself (measured in this
    process), the weights as they sit in memory (fp32/bf16 after dequantizing), MiniLM unless dropped, and
    a working set per image in the batch. Measured peaks are in docs/benchmarks.md."""
    from ..models.flow_model import read_config
    from ..models.storage import storage_of
    from ..models.text import minilm_dir

    cfg = read_config(model_folder)
    info = storage_of(model_folder)
    # the parameter count from the config (the network built on the meta device: nothing allocated)
    try:
        import torch

        from ..models.flow_model import FlowModel
        with torch.device("meta"):
            params = sum(p.numel() for p in FlowModel(cfg).parameters())
    except Exception:  # a config this version cannot build: fall back to the fp16 assumption
        params = info["bytes"] / 2
    per_param = 2 if profile.dtype in ("bf16", "fp16") else 4
    weights = params * per_param / 2**20
    if profile.low_memory and (info["int8_tensors"] or info["packed_tensors"]):
        weights = params / 2**20  # quantized linear weights (nearly all) stay int8 in memory: ~1 byte each

    mini_files = [] if profile.drop_large_encoder else list(minilm_dir().glob("*.safetensors"))
    minilm = sum(p.stat().st_size for p in mini_files) / 2**20  # fp32 on disk, fp32 in memory
    tokens = (cfg.image_size // cfg.patch_size) ** 2
    hidden = cfg.num_heads * cfg.head_dim
    work = profile.batch_size * tokens * hidden * 4 * 24 / 2**20  # activations of a block, generously
    return {"torch": torch_mb, "weights": weights, "minilm": minilm, "working": work,
            "total": torch_mb + weights + minilm + work}
