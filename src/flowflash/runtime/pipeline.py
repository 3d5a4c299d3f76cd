"""The Python API: `Pipeline.load(name_or_path).generate(prompt, ...) -> list[PIL.Image]`.

The Pipeline is model-agnostic: it asks the model for the noise of each seed, picks the timesteps,
applies CFG and runs the sampler over any `TextToImageModel` (models/protocol.py). What a call used and how long it took come
back explicitly as a `Generation` (`Pipeline.run`), and the last one stays readable as `pipe.last`.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..errors import FlowflashError
from ..images import pil_to_u8, u8_to_pil
from ..models.protocol import SamplingDefaults, TextToImageModel, check_drop, check_schedule
from ..models.storage import weights_hash
from ..sampling import add_noise, guided_velocity, sample, x0_from_v

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
ALIASES = {"teacher": "emoji-teacher", "student": "emoji-student"}
DEFAULT_MODEL = "student"  # the 4-step CFG-free distilled student; the teacher stays `--model teacher`
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda", "mps")
BACKENDS = ("torch", "openvino")


def resolve_model(name_or_path: str | Path | None) -> Path:
    """A shipped model's name (or alias), or a folder path (a flowflash model or a diffusers SD3 pipeline)."""
    name = str(name_or_path or DEFAULT_MODEL)
    path = Path(name)
    # a model folder at that path wins over a shipped model of the same name (as from_pretrained's local dirs do)
    if path.is_dir() and any((path / f).is_file() for f in ("config.json", "model_index.json")):
        return path
    shipped = WEIGHTS / ALIASES.get(name, name)
    if "/" not in name and shipped.is_dir():
        return shipped
    if path.is_dir():
        return path
    known = sorted(set(ALIASES) | {p.name for p in WEIGHTS.glob("*") if p.is_dir() and p.name != "judge"})
    raise FlowflashError(f"unknown model {name!r}: not a folder, and not a shipped model ({', '.join(known)})")


def resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise FlowflashError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else
                            "mps" if torch.backends.mps.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise FlowflashError("device 'cuda' asked for, but this torch sees no CUDA GPU")
    if device == "mps" and not torch.backends.mps.is_available():
        raise FlowflashError("device 'mps' asked for, but this torch has no Apple GPU backend here")
    return torch.device(device)


def load_image(image) -> Image.Image:
    """An init image: a PIL image or a path to one."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise FlowflashError(f"cannot read the init image {image}: {e}") from None


def validate_prompt(prompt: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise FlowflashError("prompt is empty")
    return prompt.strip()


@dataclass
class Timings:
    text_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.text_s + self.denoise_s + self.decode_s


@dataclass
class GenerationParams:
    steps: int
    guidance: float
    seeds: list[int]
    size: tuple[int, int]  # (width, height)
    timesteps: list[float]  # the times actually integrated (img2img: from its starting point)
    dropped: tuple[str, ...] = ()
    negative_prompt: str | None = None
    strength: float | None = None  # img2img only
    prompts: list[str] = field(default_factory=list)  # as drawn: with the model's style completed (SamplingDefaults)


@dataclass
class Generation:
    """One call's images, the parameters they were made with, its timings and its warnings."""
    images: list[Image.Image]
    params: GenerationParams
    timings: Timings
    warnings: list[str] = field(default_factory=list)


def check_explicit_timesteps(times) -> tuple[float, ...]:
    """Times given in place of a model's schedule: a schedule (check_schedule) that starts at 1, where the noise
    is pure (img2img's strength then picks its own start, as with the model's schedule)."""
    ts = check_schedule(times)
    if ts[0] != 1.0:
        raise FlowflashError(f"explicit timesteps start at 1 (pure noise; for img2img, --strength picks the start), "
                             f"got {ts[0]:g}")
    return ts


class Pipeline:
    """Text-to-image over one loaded model. `pipe.last` is the Generation of the most recent call."""

    def __init__(self, model: TextToImageModel, path: Path | None = None, drop=(), name: str | None = None):
        self.model = model
        self.path = path  # the model folder; None for a model that lives in memory only
        self.name = name or model.name
        self.drop = check_drop(drop, model.encoder_names)
        self.last: Generation | None = None
        self._hash: str | None = None if path is not None else "in-memory"

    @classmethod
    def load(cls, name_or_path: str | Path | None = None, *, drop=(), dtype: str = "fp32", device: str = "cpu",
             config: str | Path | None = None, max_sequence_length: int = 256, compile: bool = False,
             precision: str | None = None, backend: str = "torch", ov_weights: str = "fp32",
             low_memory: bool = False) -> "Pipeline":
        """A shipped model's name, a flowflash model folder, a diffusers StableDiffusion3Pipeline folder, or a
        single .safetensors transformer checkpoint with `config` naming a local diffusers folder.
        drop: text encoders to leave out (emoji: light, minilm; SD3: clip_l, clip_g, t5), never loaded.
        dtype: fp32, bf16 or fp16 for the denoiser (`precision` is its old name). compile: torch.compile the
        transformer, and on CUDA an SD3 VAE decoder (pays off over repeated calls in one process).
        backend: "torch", or "openvino" (CPU, fp32: the transformer runs as a cached OpenVINO IR,
        runtime/ov_backend.py; for SD3 one per image size) with ov_weights fp32, int8 or int4 (NNCF weight
        compression). low_memory: a flowflash model's quantized linear weights stay
        int8 in memory, dequantized per call (the same images, a smaller resident set)."""
        from ..models.emoji import EmojiModel
        from ..models.sd3 import SD3Model, is_diffusers_folder

        dtype = precision or dtype
        if dtype not in DTYPES:
            raise FlowflashError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if backend not in BACKENDS:
            raise FlowflashError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "openvino":
            from .ov_backend import WEIGHT_MODES, import_openvino

            if ov_weights not in WEIGHT_MODES:
                raise FlowflashError(f"ov_weights must be one of {', '.join(WEIGHT_MODES)}, got {ov_weights!r}")
            if device not in ("auto", "cpu"):
                raise FlowflashError(f"the openvino backend runs on the CPU only, not device {device!r}")
            if dtype != "fp32" or compile:
                raise FlowflashError("the openvino backend takes dtype fp32 and no compile (ov_weights= compresses)")
            import_openvino()  # a missing package fails before any loading
            device = "cpu"
        elif ov_weights != "fp32":
            raise FlowflashError("ov_weights applies to backend='openvino' only")
        dev = resolve_device(device)
        if config is not None or str(name_or_path or "").endswith(".safetensors"):
            if name_or_path is None:
                raise FlowflashError("--config names the folder for a single-file checkpoint: give the file with --model")
            if config is None:
                raise FlowflashError(f"{name_or_path} is a single checkpoint file: name a local diffusers folder "
                                     "for its configs with --config FOLDER (Python: config=)")
            folder = resolve_model(config)
            model = SD3Model.load(folder, DTYPES[dtype], drop, max_sequence_length, transformer_file=Path(name_or_path))
            path = Path(name_or_path)
        else:
            path = resolve_model(name_or_path)
            if is_diffusers_folder(path):
                if low_memory:
                    raise FlowflashError("low_memory takes flowflash models for now, not SD3 pipelines")
                model = SD3Model.load(path, DTYPES[dtype], drop, max_sequence_length)
            else:
                check_drop(drop, EmojiModel.encoder_names)  # a wrong name fails before any loading
                model = EmojiModel.load(path, DTYPES[dtype], drop, low_memory=low_memory)
        model.to(dev)
        if compile:
            model.compile()
        pipe = cls(model, path, drop)
        if backend == "openvino":
            from .ov_backend import attach, attach_sd3

            if isinstance(model, SD3Model):  # one IR per image size, made when that size is first asked for
                attach_sd3(model, path, pipe.hash, ov_weights)
            else:
                attach(model.net, path, pipe.hash, ov_weights)
        return pipe

    @classmethod
    def from_flow_model(cls, net, name: str, *, minilm=None, drop=()) -> "Pipeline":
        """An in-memory emoji FlowModel (e.g. a merge under evaluation), reusing a loaded MiniLM if given."""
        from ..models.emoji import EmojiModel
        from ..models.text import MiniLMEncoder

        drop = check_drop(drop, EmojiModel.encoder_names)
        if minilm is None and "minilm" not in drop:
            minilm = MiniLMEncoder(max_tokens=net.cfg.minilm_max_tokens)
        return cls(EmojiModel(net, minilm), None, drop, name)

    @property
    def hash(self) -> str:
        """Short sha256 of the weight files (in PNG metadata and evaluation caches)."""
        if self._hash is None:
            own = getattr(self.model, "weights_id", None)  # models whose files are not a flowflash folder
            self._hash = own(self.path) if own else weights_hash(self.path)
        return self._hash

    @property
    def sampling(self) -> SamplingDefaults:
        return self.model.sampling

    def timesteps(self, steps: int | None = None, size: int | tuple[int, int] | None = None) -> torch.Tensor:
        return self.model.timesteps(steps, self.model.check_size(size))

    def generate(self, prompt: str | list[str], steps: int | None = None, guidance: float | None = None,
                 seed: int = 0, num_images: int = 1, size: int | tuple[int, int] | None = None,
                 negative_prompt: str | None = None, init_image=None, strength: float = 0.8,
                 progress=None, timesteps: list[float] | None = None, complete_style: bool = True) -> list[Image.Image]:
        """num_images per prompt; image k of each prompt uses seed + k, independent of batching.
        guidance <= 1 turns classifier-free guidance off (as diffusers). init_image (a PIL image or a path)
        with strength in (0, 1]: img2img, starting that far into the schedule from the noised image.
        timesteps (e.g. [1, 0.5, 0]) in place of steps: the times to integrate, not the model's own.
        complete_style=False draws a prompt that names no style as typed (see Pipeline.complete)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise FlowflashError(f"num_images must be a positive integer, got {num_images!r}")
        seeds = [seed + k for _ in prompts for k in range(num_images)]
        return self.run([p for p in prompts for _ in range(num_images)], seeds, steps, guidance, size,
                        negative_prompt=negative_prompt, init_image=init_image, strength=strength,
                        progress=progress, timesteps=timesteps, complete_style=complete_style).images

    def complete(self, prompt: str) -> str:
        """The prompt with the model's default style (SamplingDefaults.complete), unless the suffix would make the
        text encoders cut a prompt that fits as typed: the user's own words win over the style."""
        prompt = validate_prompt(prompt)
        styled = self.sampling.complete(prompt)
        fits = getattr(self.model, "fits", None)  # models with a default style say what fits (the emoji models)
        if styled != prompt and fits is not None and not fits(styled, self.drop) and fits(prompt, self.drop):
            return prompt
        return styled

    @torch.inference_mode()
    def run(self, prompts: list[str], seeds: list[int], steps: int | None = None, guidance: float | None = None,
            size: int | tuple[int, int] | None = None, *, negative_prompt: str | None = None, init_image=None,
            strength: float = 0.8, progress=None, preview=None, timesteps: list[float] | None = None,
            complete_style: bool = True) -> Generation:
        """One image per (prompt, seed) pair; the noise of an image depends on its seed only.
        progress(i) after each denoising step; preview(i, n, images) also (n: the steps this call integrates),
        with each image's current prediction of the clean image decoded (costs a decode a step). Either may raise to
        stop the call. A prompt that names no style gets the model's default style, if it has one and it fits (see
        complete), unless complete_style=False."""
        prompts = [validate_prompt(p) for p in prompts]
        if complete_style:
            prompts = [self.complete(p) for p in prompts]
        if len(prompts) != len(seeds):
            raise FlowflashError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise FlowflashError(f"steps must be a positive integer, got {steps!r}")
        if timesteps is not None:
            if steps is not None:
                raise FlowflashError("give steps or timesteps, not both (timesteps fix the step count)")
            timesteps = check_explicit_timesteps(timesteps)
        guidance = self.sampling.guidance if guidance is None else float(guidance)
        if not guidance >= 0:
            raise FlowflashError(f"guidance must be >= 0, got {guidance}")
        init = None
        if init_image is not None:
            if not 0 < strength <= 1:
                raise FlowflashError(f"strength must lie in (0, 1], got {strength}")
            init = load_image(init_image)  # resized to the size asked (default: the model's), as diffusers does
        wh = self.model.check_size(size)
        use_cfg = guidance > 1.0
        t0 = time.perf_counter()
        negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
        cond = self.model.condition(prompts, self.drop, use_cfg, negative)
        t1 = time.perf_counter()

        latest: dict[str, torch.Tensor] = {}

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            v = lambda x_, t_: self.model.velocity(x_, t_, cond)
            out = guided_velocity(v, x, t, guidance) if use_cfg else v(x, t)
            if preview is not None:
                latest["x0"] = x0_from_v(x.float(), t.float(), out.float()).to(x.dtype)
            return out

        def step_done(i: int):
            if progress is not None:
                progress(i)
            if preview is not None:
                preview(i, len(ts) - 1, u8_to_pil(self.model.decode(latest["x0"])))

        ts = self.model.timesteps(steps, wh) if timesteps is None else torch.tensor(timesteps, dtype=torch.float64)
        n_steps = len(ts) - 1
        if init is None:
            x = self.model.noise(seeds, wh)
        else:  # img2img: start at the schedule's point that `strength` names, from the noised image
            start = int(max(n_steps - min(n_steps * strength, n_steps), 0))
            ts = ts[start:]
            if len(ts) < 2:
                raise FlowflashError(f"strength {strength} leaves no step of {n_steps}: raise it or the steps")
            pixels = pil_to_u8([init.resize(wh, Image.LANCZOS)]).expand(len(seeds), -1, -1, -1)
            if hasattr(self.model, "img2img_start"):  # a model that draws its own start (diffusers' order)
                x0, noise = self.model.img2img_start(pixels, seeds, wh)
            else:
                x0, noise = self.model.encode(pixels), self.model.noise(seeds, wh)
            x = add_noise(x0, noise, float(ts[0]))
        x = sample(velocity, x, ts, callback=step_done if progress or preview else None)
        t2 = time.perf_counter()
        images = u8_to_pil(self.model.decode(x))
        notes = list(dict.fromkeys(cond.warnings))
        trained = self.sampling.trained_steps
        if timesteps is None and steps is not None and trained and steps not in trained:
            # a distilled student is only good at the counts it learnt; other counts run, but say so
            notes.append(f"{self.name} was trained for {' and '.join(map(str, trained))} steps; {steps} steps "
                         f"sample times it never learnt")
        for note in notes:
            warnings.warn(note, stacklevel=3)
        params = GenerationParams(n_steps, guidance, list(seeds), wh, [float(t) for t in ts],
                                  tuple(sorted(self.drop)), negative_prompt if use_cfg else None,
                                  strength if init is not None else None, list(prompts))
        self.last = Generation(images, params, Timings(t1 - t0, t2 - t1, time.perf_counter() - t2), notes)
        return self.last
