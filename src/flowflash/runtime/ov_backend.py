"""The OpenVINO backend for CPUs: the emoji model's transformer as an OpenVINO IR, the text encoders in torch.

`attach(net, folder, weights_hash)` converts `net.transformer` once with `openvino.convert_model` (batch
dimension dynamic, image size and sequence length from the model's config), optionally compresses its
weights (`weights="int8"`: per-channel int8 on the grid flowflash stores int8 models on; `"int4"`: NNCF),
keeps the IR (.xml/.bin) in a cache folder and compiles it for the CPU; from then on `FlowModel.forward`
calls the compiled model in place of the torch transformer.

Cache: `<model folder>/.openvino/<key>/` when the folder is writable and not inside the installed package,
else `$FLOWFLASH_OPENVINO_CACHE` or `~/.cache/flowflash/openvino/` (`$XDG_CACHE_HOME` honoured). The key
names the model's weights hash, a digest of what shaped the export (the transformer's class and the hash of
its source file, its config and input shapes, the compression settings, this module's EXPORT_VERSION), the
openvino version and the weights tag (with NNCF's version for int4), so a changed model, transformer code,
openvino or NNCF never reuses a stale IR. Each entry is written whole with `fsutil.atomic_dir`; an entry
that does not read back is exported again; one that cannot be written leaves the IR in memory (a warning).

openvino and NNCF send usage telemetry to Google Analytics (on `import openvino` and on each conversion)
and write ~/intel/ unless the user opted out; this module imports them with their telemetry package hidden,
so they fall back to their own no-op stubs, and switches already-loaded telemetry hooks to those stubs: no
socket is opened.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path

import torch

from ..errors import FlowflashError
from ..fsutil import atomic_dir

WEIGHT_MODES = ("fp32", "int8", "int4")
INSTALL_HINT = "pip install 'flowflash[openvino]'"
EXPORT_VERSION = 1  # bump when the exported graph changes (inputs, wrapper), so older IRs are not reused
IR_NAME = "transformer"
META = "meta.json"
CACHE_ENV = "FLOWFLASH_OPENVINO_CACHE"
PACKAGE = Path(__file__).resolve().parent.parent  # the installed flowflash package
# How each weights tag compresses the converted model, chosen by measurement on the shipped student
# (docs/bench/backends). int8: flowflash's own pass, per-output-channel symmetric with scale max|row| / 127 (the
# grid `models/storage.py` stores int8 models on, so a shipped int8 model's weights come through exactly; NNCF's
# INT8_SYM divides by 128 and keeps fp16 scales, INT8_ASYM re-rounds too). int4: NNCF, data-free, asymmetric,
# groups of 64 input channels (or the largest power of two that divides every layer's width: `group_size`).
COMPRESSION = {
    "int8": {"method": "per-channel-int8"},
    "int4": {"method": "nncf", "mode": "INT4_ASYM", "group_size": 64, "ratio": 1.0},
}
# Compile settings per weights tag: DYNAMIC_QUANTIZATION_GROUP_SIZE 0 keeps the CPU plugin from quantizing
# activations to int8 for the compressed matrices (faster, but it moves pixels).
RUNTIME = {"fp32": {}, "int8": {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}, "int4": {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}}
# The CPU plugin's settings. f32 inference precision: on CPUs with AMX or AVX512-BF16 the plugin would pick
# bf16 by itself, which changes images; the IR stays the same wherever it runs.
CPU_CONFIG = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}


# ---------------------------------------------------------------- imports without telemetry

@contextlib.contextmanager
def telemetry_off():
    """While importing openvino or nncf: make `import openvino_telemetry` fail, so their modules bind the
    no-op stubs they ship for that case; the real package (if loaded) is put back afterwards."""
    saved = {k: v for k, v in sys.modules.items() if k == "openvino_telemetry" or k.startswith("openvino_telemetry.")}
    for k in saved:
        del sys.modules[k]
    sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        yield
    finally:
        for k in [k for k in sys.modules if k == "openvino_telemetry" or k.startswith("openvino_telemetry.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def _stub_loaded_telemetry():
    """Modules that were imported before flowflash's import (with live telemetry) get the stubs too."""
    stub = sys.modules.get("openvino.tools.ovc.telemetry_stub")
    if stub is not None:
        for name in ("telemetry_utils", "convert_impl", "utils"):
            mod = sys.modules.get(f"openvino.tools.ovc.{name}")
            if mod is not None and getattr(getattr(mod, "tm", None), "__name__", "").startswith("openvino_telemetry"):
                mod.tm = stub
    wrapper = sys.modules.get("nncf.telemetry.wrapper")
    if wrapper is not None and not isinstance(wrapper.telemetry, wrapper.NNCFTelemetryStub):
        quiet = wrapper.NNCFTelemetryStub()
        for name in ("nncf.telemetry.wrapper", "nncf.telemetry.decorator"):
            if name in sys.modules:
                sys.modules[name].telemetry = quiet


_quiet: dict[str, bool] = {}  # packages imported here, with their telemetry stubbed


def import_openvino():
    """The openvino module, imported with its telemetry off; one line naming the extra when it is missing."""
    if _quiet.get("openvino"):
        return sys.modules["openvino"]
    try:
        with telemetry_off():
            import openvino
            import openvino.tools.ovc.telemetry_stub  # noqa: F401  (the stub _stub_loaded_telemetry hands out)
    except ImportError as e:
        raise FlowflashError(f"the openvino backend needs OpenVINO ({e}): {INSTALL_HINT}") from None
    _stub_loaded_telemetry()
    _quiet["openvino"] = True
    return openvino


def import_nncf():
    """NNCF (for ov_weights="int4"), imported as openvino is."""
    if _quiet.get("nncf"):
        return sys.modules["nncf"]
    import_openvino()
    try:
        with telemetry_off(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import nncf
    except ImportError as e:
        raise FlowflashError(f"ov_weights='int4' needs NNCF ({e}): {INSTALL_HINT}") from None
    _stub_loaded_telemetry()
    _quiet["nncf"] = True
    return nncf


def openvino_version(ov=None) -> str:
    """e.g. 2026.4.1 (the build suffix dropped)."""
    ov = ov or import_openvino()
    return ov.get_version().split("-")[0]


# ---------------------------------------------------------------- export

class _Traced(torch.nn.Module):
    """The transformer with positional inputs and a tensor output: what convert_model traces."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0]


def input_shapes(cfg) -> list[list[int]]:
    """Each input's shape with batch -1: image, text states, pooled vector, timestep."""
    if hasattr(cfg, "input_shapes"):  # an SD3 export spec (SD3Export) gives its own
        return cfg.input_shapes()
    k = cfg.transformer_kwargs()
    s = k["sample_size"]
    seq = cfg.light_max_tokens + cfg.minilm_max_tokens
    return [[-1, k["in_channels"], s, s], [-1, seq, k["joint_attention_dim"]], [-1, k["pooled_projection_dim"]], [-1]]


def convert(transformer: torch.nn.Module, cfg):
    """The transformer as an openvino.Model (fp32), traced on example inputs of batch 2."""
    ov = import_openvino()
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    odd = sorted({str(p.dtype) for p in transformer.parameters() if p.dtype != torch.float32})
    if odd:
        raise FlowflashError(f"the openvino backend exports fp32 transformers, this one holds {', '.join(odd)}")
    shapes = input_shapes(cfg)
    gen = torch.Generator().manual_seed(0)
    example = tuple(torch.randn([2, *sh[1:]], generator=gen) for sh in shapes[:3]) + (torch.tensor([500.0, 900.0]),)
    was_training = transformer.training
    transformer.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python branches
            # check_trace off: torch's trace check reruns the model three times, most of the export's time
            decoder = TorchScriptPythonDecoder(_Traced(transformer), example_input=example,
                                               trace_kwargs={"check_trace": False})
            model = ov.convert_model(decoder, example_input=example, input=[ov.PartialShape(sh) for sh in shapes])
    except FlowflashError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FlowflashError(f"could not convert the transformer to OpenVINO: {first}") from None
    finally:
        transformer.train(was_training)
    for port, name in zip(model.inputs, ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")):
        port.get_tensor().set_names({name})
    model.outputs[0].get_tensor().set_names({"sample"})
    return model


def _matmul_weights(model):
    """(MatMul op, its f32 Constant weight (out, in)) for every linear layer of the converted model."""
    ov = import_openvino()
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul" or not op.get_attributes().get("transpose_b"):
            continue
        src = op.input_value(1).get_node()
        if (src.get_type_name() == "Constant" and src.get_output_element_type(0) == ov.Type.f32
                and len(src.get_output_partial_shape(0)) == 2):
            yield op, src


def quantize_int8(model) -> int:
    """Every linear layer's weight becomes int8 per output channel, scale max|row| / 127, decompressed in f32
    (Constant i8 -> Convert -> Multiply), which the CPU plugin runs as a compressed FullyConnected.
    Returns how many matrices it replaced."""
    import numpy as np

    ov = import_openvino()
    ops = import_module("openvino.opset13")
    n = 0
    for op, src in list(_matmul_weights(model)):
        w = src.get_data()
        scale = np.abs(w).max(axis=1, keepdims=True) / 127
        scale = np.where(scale == 0, 1, scale).astype(np.float32)
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        weight = ops.multiply(ops.convert(ops.constant(q), ov.Type.f32), ops.constant(scale))
        op.input(1).replace_source_output(weight.output(0))
        n += 1
    model.validate_nodes_and_infer_types()
    return n


def group_size(model, preferred: int) -> int:
    """The largest power of two <= preferred (and >= 8) that divides every linear layer's input width, so no
    layer falls outside NNCF's groups; -1 (one scale per output channel) when there is none."""
    widths = {int(src.get_output_partial_shape(0)[1].get_length()) for _, src in _matmul_weights(model)}
    g = preferred
    while g >= 8 and any(w % g for w in widths):
        g //= 2
    return g if g >= 8 else -1


def compress(model, weights: str):
    """The converted model with its weights compressed as COMPRESSION[weights] says (fp32: as it is)."""
    if weights == "fp32":
        return model
    spec = dict(COMPRESSION[weights])
    method = spec.pop("method")
    if method == "per-channel-int8":
        quantize_int8(model)
        return model
    nncf = import_nncf()
    mode = getattr(nncf.CompressWeightsMode, spec.pop("mode"))
    if "group_size" in spec:
        spec["group_size"] = group_size(model, spec["group_size"])
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its bit-width table; its progress bar goes to the redirected stdout
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return nncf.compress_weights(model, mode=mode, **spec)
    finally:
        logger.setLevel(level)


def weights_tag(weights: str) -> str:
    """The compression part of the cache key: fp32, int8, or e.g. int4-nncf3.4.0 (NNCF's output depends on its
    version)."""
    if COMPRESSION.get(weights, {}).get("method") != "nncf":
        return weights
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"{weights}-nncf{version('nncf')}"
    except PackageNotFoundError:
        raise FlowflashError(f"ov_weights={weights!r} needs NNCF: {INSTALL_HINT}") from None


def export_digest(net, weights: str) -> str:
    """What shapes the IR apart from the weights, as 8 hex: this module's EXPORT_VERSION, the transformer's
    class and the source file it is defined in, its config and input shapes, and the compression settings."""
    import inspect
    from importlib.metadata import PackageNotFoundError, version

    cls = type(net.transformer)
    try:
        source = hashlib.sha256(Path(inspect.getsourcefile(cls)).read_bytes()).hexdigest()
    except (TypeError, OSError):
        source = None
    try:  # a version, not an import: importing diffusers costs seconds
        package = version(cls.__module__.split(".")[0])
    except (PackageNotFoundError, ValueError):
        package = None
    spec = {"export": EXPORT_VERSION, "class": f"{cls.__module__}.{cls.__qualname__}", "source": source,
            "package": package, "transformer": net.cfg.transformer_kwargs(), "inputs": input_shapes(net.cfg),
            "compression": COMPRESSION.get(weights)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]


def cache_key(net, weights_hash: str, weights: str, ov_version: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", net.cfg.name)[:40] or "model"
    return f"{name}-{weights_hash}-{export_digest(net, weights)}-ov{ov_version}-{weights_tag(weights)}"


def user_cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "flowflash" / "openvino"


def cache_roots(folder: Path | None) -> list[Path]:
    """Where an entry may live, first choice first: beside the model (a writable folder outside the
    installed package), then the user cache."""
    roots = []
    if folder is not None:
        folder = Path(folder).resolve()
        if folder.is_dir() and not folder.is_relative_to(PACKAGE) and os.access(folder, os.W_OK):
            roots.append(folder / ".openvino")
    return roots + [user_cache_root()]


def _read_entry(entry: Path, key: str):
    """The cached openvino.Model, or None when the entry is absent, another key's, or unreadable."""
    try:
        meta = json.loads((entry / META).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != key:
        return None
    try:
        return import_openvino().Core().read_model(str(entry / f"{IR_NAME}.xml"), str(entry / f"{IR_NAME}.bin"))
    except Exception as e:  # a truncated .bin or a broken .xml: export again
        warnings.warn(f"ignoring the unreadable OpenVINO cache {entry}: {str(e).splitlines()[0] if str(e) else e}",
                      stacklevel=3)
        return None


def _write_entry(entry: Path, model, meta: dict) -> bool:
    ov = import_openvino()
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(entry) as tmp:
            ov.save_model(model, str(tmp / f"{IR_NAME}.xml"), compress_to_fp16=False)
            (tmp / META).write_text(json.dumps(meta, indent=1))
        return True
    except (OSError, RuntimeError):
        return False


# ---------------------------------------------------------------- the runtime object

@dataclass
class LoadInfo:
    """How `attach` got its compiled model (the benchmark reads it)."""
    key: str
    entry: Path | None  # the cache folder holding the IR; None when nothing could be written
    exported: bool  # converted now (False: read from the cache)
    weights: str
    threads: int
    ir_bytes: int = 0
    export_s: float = 0.0  # convert + compress + save
    compile_s: float = 0.0
    notes: list[str] = field(default_factory=list)


class OVTransformer:
    """Called by FlowModel.forward in place of the torch transformer, with the same keywords; returns
    `(sample,)` as a torch tensor of the input's shape, dtype and device. Any batch size; calls are serialized."""

    def __init__(self, compiled, info: LoadInfo, shapes: list[list[int]]):
        self.compiled, self.info = compiled, info
        self.image_shape, self.text_shape = tuple(shapes[0][1:]), tuple(shapes[1][1:])
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()

    def __call__(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 pooled_projections: torch.Tensor, timestep: torch.Tensor, return_dict: bool = False):
        if return_dict:
            raise FlowflashError("the OpenVINO transformer returns a tuple only (return_dict=False)")
        b = hidden_states.shape[0]
        timestep = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        if timestep.numel() == 1 and b != 1:
            timestep = timestep.expand(b)
        image, text = tuple(hidden_states.shape[1:]), tuple(encoder_hidden_states.shape[1:])
        if image != self.image_shape or text != self.text_shape:
            raise FlowflashError(f"the OpenVINO transformer takes images {self.image_shape} and text states "
                                 f"{self.text_shape}, got {image} and {text}")
        arrays = [t.detach().to("cpu", torch.float32).contiguous().numpy()
                  for t in (hidden_states, encoder_hidden_states, pooled_projections, timestep)]
        with self._lock:
            self._request.infer(arrays, share_inputs=True)
            out = torch.from_numpy(self._request.get_output_tensor(0).data.copy())
        return (out.to(hidden_states.device, hidden_states.dtype),)


def compile_model(model, threads: int, weights: str = "fp32"):
    ov = import_openvino()
    config = {**CPU_CONFIG, **RUNTIME[weights], "INFERENCE_NUM_THREADS": int(threads)}
    return ov.Core().compile_model(model, "CPU", config)


def load(net, folder: Path | None, weights_hash: str | None, weights: str = "fp32", threads: int | None = None,
         cache_dir: Path | None = None) -> OVTransformer:
    """The compiled OpenVINO transformer of `net` (a FlowModel): from the cache when an entry with this key
    exists, else exported now and cached. No folder or hash (an in-memory model): exported, not cached.
    cache_dir: one root to use in place of the usual ones."""
    if weights not in WEIGHT_MODES:
        raise FlowflashError(f"ov_weights must be one of {', '.join(WEIGHT_MODES)}, got {weights!r}")
    threads = int(threads or torch.get_num_threads())
    if threads < 1:
        raise FlowflashError(f"threads must be >= 1, got {threads}")
    ov = import_openvino()
    cfg = net.cfg
    ov_version = openvino_version(ov)
    cacheable = weights_hash is not None and (folder is not None or cache_dir is not None)
    key = cache_key(net, weights_hash, weights, ov_version) if cacheable else "uncached"
    roots = [Path(cache_dir)] if cache_dir is not None else cache_roots(folder) if cacheable else []
    info = LoadInfo(key, None, False, weights, threads)
    model = None
    for root in roots:
        model = _read_entry(root / key, key)
        if model is not None:
            info.entry = root / key
            break
    if model is None:
        t0 = time.perf_counter()
        model = compress(convert(net.transformer, cfg), weights)
        info.exported = True
        meta = {"format": "flowflash-openvino-v1", "key": key, "model": cfg.name, "weights_hash": weights_hash,
                "weights": weights, "compression": COMPRESSION.get(weights), "openvino": ov.get_version(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for root in roots:
            if _write_entry(root / key, model, meta):
                info.entry = root / key
                break
        else:
            if roots:
                info.notes.append(f"could not write the OpenVINO cache in {', '.join(map(str, roots))}; "
                                  "the IR is kept in memory only")
        info.export_s = time.perf_counter() - t0
    if info.entry is not None:
        info.ir_bytes = sum(p.stat().st_size for p in info.entry.glob(f"{IR_NAME}.*"))
    t0 = time.perf_counter()
    compiled = compile_model(model, threads, weights)
    info.compile_s = time.perf_counter() - t0
    for note in info.notes:
        warnings.warn(note, stacklevel=2)
    return OVTransformer(compiled, info, input_shapes(cfg))


def attach(net, folder: Path | None, weights_hash: str | None, weights: str = "fp32", threads: int | None = None,
           cache_dir: Path | None = None) -> OVTransformer:
    """Load (or export) the OpenVINO transformer and make `net.forward` call it; returns it."""
    runner = load(net, folder, weights_hash, weights, threads, cache_dir)
    net.transformer_runner = runner
    return runner


# ---------------------------------------------------------------- SD3 transformers (diffusers)
class _SD3Spec:
    """The parts of an emoji ModelConfig the exporter reads, for a diffusers SD3 transformer at one latent
    size: a name, what shapes the IR (its config and the sizes), and the input shapes."""

    def __init__(self, model, latent_hw: tuple[int, int]):
        self.name = model.name
        self._model, self._hw = model, latent_hw

    def transformer_kwargs(self) -> dict:
        # the architecture fields only: diffusers also records where the config was read from
        c = {k: v for k, v in dict(self._model.transformer.config).items() if not k.startswith("_")}
        c = json.loads(json.dumps(c, default=str))
        return {**c, "latent_hw": list(self._hw), "context_tokens": self.context_tokens()}

    def context_tokens(self) -> int:
        return 77 + self._model.max_sequence_length  # CLIP's 77, then T5's (zeros when T5 is dropped)

    def input_shapes(self) -> list[list[int]]:
        c = self._model.transformer.config
        return [[-1, c.in_channels, *self._hw], [-1, self.context_tokens(), c.joint_attention_dim],
                [-1, c.pooled_projection_dim], [-1]]


class SD3Export:
    """An SD3 model's transformer at one latent size, in the shape `load` takes (`.transformer`, `.cfg`)."""

    def __init__(self, model, latent_hw: tuple[int, int]):
        self.transformer = model.transformer
        self.cfg = _SD3Spec(model, latent_hw)
        self.transformer_runner = None


class SD3Runner:
    """Called by SD3Model.velocity in place of the diffusers transformer: one IR per latent size, exported
    (or read from the cache) the first time that size is asked for."""

    def __init__(self, model, folder: Path | None, weights_hash: str | None, weights: str = "fp32",
                 threads: int | None = None):
        self.model, self.folder, self.weights_hash = model, folder, weights_hash
        self.weights, self.threads = weights, threads
        self.by_size: dict[tuple[int, int], OVTransformer] = {}

    def __call__(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 pooled_projections: torch.Tensor, return_dict: bool = False):
        hw = tuple(hidden_states.shape[-2:])
        if hw not in self.by_size:
            self.by_size[hw] = load(SD3Export(self.model, hw), self.folder, self.weights_hash, self.weights,
                                    self.threads)
        return self.by_size[hw](hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, timestep=timestep, return_dict=return_dict)


def attach_sd3(model, folder: Path | None, weights_hash: str | None, weights: str = "fp32",
               threads: int | None = None) -> SD3Runner:
    runner = SD3Runner(model, folder, weights_hash, weights, threads)
    model.transformer_runner = runner
    return runner

