"""A diffusers StableDiffusion3Pipeline folder behind the generation protocol (SD3 Medium, SD3.5 Medium/Large).

Every step mirrors `StableDiffusion3Pipeline.__call__` so that the same seed gives the same image: the prompt
encoding (CLIP-L and CLIP-G penultimate states side by side, zero-padded to T5's width, then T5's sequence;
pooled = both CLIPs' projections), latents drawn in one `randn` from a CPU generator of the seed, the
scheduler's own sigmas (its shift, or its dynamic shift for this image size), and the VAE's scaling and
shift. Components load from local paths only. A dropped encoder is never read from disk; its embedding is
zeros, as diffusers does for a pipeline without T5.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from ..errors import FlowflashError
from .protocol import Conditioning, SamplingDefaults, check_drop

PIPELINE_CLASS = "StableDiffusion3Pipeline"
ENCODERS = {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2"),
            "t5": ("text_encoder_3", "tokenizer_3")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SETTINGS = "flowflash.json"  # optional: a distilled student's sampling defaults beside the diffusers files


def read_settings(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / SETTINGS).read_text())
    except json.JSONDecodeError as e:
        raise FlowflashError(f"{Path(folder) / SETTINGS} is not valid JSON: {e}") from None


def quiet_loaders():
    """diffusers and transformers print progress bars and advice while loading; a CLI prints its own lines."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def is_diffusers_folder(path: Path) -> bool:
    return (Path(path) / "model_index.json").exists()


def read_index(folder: Path) -> dict:
    if not (folder / "model_index.json").is_file():
        raise FlowflashError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except json.JSONDecodeError as e:
        raise FlowflashError(f"{folder / 'model_index.json'} is not valid JSON: {e}") from None
    cls = index.get("_class_name")
    if cls != PIPELINE_CLASS:
        raise FlowflashError(f"{folder} holds a {cls} pipeline; flowflash runs {PIPELINE_CLASS} folders "
                             "(SD3 Medium, SD3.5 Medium/Large) and its own model folders")
    return index


def refuse_pickles(folder: Path, component: str):
    """Weights of a component must be safetensors: a folder with only .bin/.pt/.ckpt is refused by name."""
    sub = folder / component
    if sub.is_dir() and not list(sub.glob("*.safetensors")):
        pickles = sorted(p.name for p in sub.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"})
        if pickles:
            raise FlowflashError(f"{sub} holds pickle weights ({', '.join(pickles)}); flowflash loads only "
                                 "safetensors and never unpickles")


def load_component(cls, folder: Path, name: str, dtype: torch.dtype | None = None):
    refuse_pickles(folder, name)
    if not (folder / name).is_dir():
        raise FlowflashError(f"{folder} lacks the {name}/ component")
    from ..release.quantize_sd3 import is_quantized, load_quantized

    if is_quantized(folder / name):  # written by `flowflash quantize`: flowflash's storage, not diffusers'
        return load_quantized(cls, folder / name, dtype or torch.float32)
    # networks: safetensors only, in the asked dtype; tokenizers take neither argument
    kw = {"torch_dtype": dtype, "use_safetensors": True} if issubclass(cls, torch.nn.Module) else {}
    if kw and cls.__module__.startswith("diffusers"):
        kw["low_cpu_mem_usage"] = False  # the default asks for accelerate (and says so); plain loading is fine
    from safetensors import SafetensorError

    import warnings

    try:
        with warnings.catch_warnings():  # newer releases rename torch_dtype to dtype and say so each load
            warnings.simplefilter("ignore", FutureWarning)
            component = cls.from_pretrained(folder, subfolder=name, local_files_only=True, **kw)
        # diffusers keeps a file's own dtype when it assigns stored tensors as they are: cast to the one asked
        return component.to(dtype) if kw else component
    except SafetensorError as e:  # transformers lets a truncated file's error through as it is
        raise FlowflashError(f"{folder / name} holds a truncated or corrupt safetensors file: {e}") from None
    except (OSError, ValueError, RuntimeError, EnvironmentError) as e:  # RuntimeError: shapes against the config
        raise FlowflashError(f"cannot load {folder / name}: {str(e).splitlines()[0]}") from None


def check_sequence_length(n: int):
    if n < 1 or n > 512:
        raise FlowflashError(f"max_sequence_length must lie in 1..512, got {n}")


def clip_widths(folder: Path) -> dict[str, tuple[int, int]]:
    """name -> (hidden size, projection size) of both CLIPs, from their configs (known even when dropped)."""
    widths = {}
    for name in ("clip_l", "clip_g"):
        cfg_path = Path(folder) / ENCODERS[name][0] / "config.json"
        if not cfg_path.exists():
            raise FlowflashError(f"{folder} lacks the {ENCODERS[name][0]}/ component")
        c = json.loads(cfg_path.read_text())
        widths[name] = (c["hidden_size"], c["projection_dim"])
    return widths


class SD3TextEncoders:
    """The three text encoders of an SD3 folder (dropped ones absent) and SD3's prompt embedding. Apart from
    the transformer, so that distillation encodes its prompts once without loading any other network."""

    def __init__(self, encoders: dict, clip_widths: dict[str, tuple[int, int]], max_sequence_length: int,
                 joint_dim: int, dtype: torch.dtype):
        self.encoders = encoders  # name -> (text model, tokenizer); dropped encoders are absent
        self.clip_widths, self.max_sequence_length = clip_widths, max_sequence_length
        self.joint_dim, self.dtype, self.device = joint_dim, dtype, torch.device("cpu")

    @classmethod
    def load(cls, folder: Path, drop: frozenset[str], max_sequence_length: int, dtype: torch.dtype,
             joint_dim: int | None = None, widths: dict | None = None) -> "SD3TextEncoders":
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        quiet_loaders()
        folder = Path(folder)
        check_sequence_length(max_sequence_length)
        if joint_dim is None:  # T5's zeros take the transformer's context width
            joint_dim = json.loads((folder / "transformer" / "config.json").read_text())["joint_attention_dim"]
        classes = {"clip_l": (CLIPTextModelWithProjection, CLIPTokenizer),
                   "clip_g": (CLIPTextModelWithProjection, CLIPTokenizer), "t5": (T5EncoderModel, T5TokenizerFast)}
        encoders = {}
        for name, (model_dir, tok_dir) in ENCODERS.items():
            if name in drop:
                continue  # never read from disk
            model_cls, tok_cls = classes[name]
            encoders[name] = (load_component(model_cls, folder, model_dir, dtype).eval().requires_grad_(False),
                              load_component(tok_cls, folder, tok_dir))
        return cls(encoders, widths or clip_widths(folder), max_sequence_length, joint_dim, dtype)

    def to(self, device) -> "SD3TextEncoders":
        self.device = torch.device(device)
        for m, _ in self.encoders.values():
            m.to(self.device)
        return self

    @staticmethod
    def _ids(tok, prompts: list[str], limit: int) -> tuple[Tensor, list[bool]]:
        """Token ids padded/truncated to `limit` as the tokenizer's own truncation makes them (the sequence cut,
        its closing special token kept), and which prompts were cut: one tokenization, not two."""
        rows, cut = [], []
        for ids in tok(prompts).input_ids:
            cut.append(len(ids) > limit)
            ids = ids[: limit - 1] + ids[-1:] if len(ids) > limit else ids
            rows.append(ids + [tok.pad_token_id] * (limit - len(ids)))
        return torch.tensor(rows, dtype=torch.long), cut

    def _clip(self, name: str, prompts: list[str]) -> tuple[Tensor, Tensor, list[bool]]:
        model, tok = self.encoders[name]
        ids, cut = self._ids(tok, prompts, tok.model_max_length)
        out = model(ids.to(self.device), output_hidden_states=True)
        return out.hidden_states[-2], out[0], cut

    def _t5(self, prompts: list[str]) -> tuple[Tensor, list[bool]]:
        model, tok = self.encoders["t5"]
        ids, cut = self._ids(tok, prompts, self.max_sequence_length)
        return model(ids.to(self.device))[0], cut

    def encode_text(self, prompts: list[str], drop: frozenset[str]) -> tuple[Tensor, Tensor, list[list[str]]]:
        """(context, pooled, each prompt's warnings) as StableDiffusion3Pipeline.encode_prompt makes them."""
        b = len(prompts)
        notes: list[list[str]] = [[] for _ in prompts]
        clip_states, pooled = [], []
        for name in ("clip_l", "clip_g"):
            if name in drop or name not in self.encoders:  # zeros, the shape the dropped CLIP would have
                clip_states.append(None)
                pooled.append(torch.zeros(b, self._clip_width(name, pooled=True), device=self.device, dtype=self.dtype))
                continue
            h, p, cut = self._clip(name, prompts)
            clip_states.append(h)
            pooled.append(p)
            for i in (i for i, c in enumerate(cut) if c):
                notes[i].append(f"prompt longer than {self.encoders[name][1].model_max_length} {name} tokens: truncated")
        ref = next((h for h in clip_states if h is not None), None)
        seq = ref.shape[1] if ref is not None else 77
        widths = [self._clip_width(n) for n in ("clip_l", "clip_g")]
        clip_states = [h if h is not None else torch.zeros(b, seq, w, device=self.device, dtype=self.dtype)
                       for h, w in zip(clip_states, widths)]
        clip = torch.cat(clip_states, dim=-1)
        if "t5" in drop or "t5" not in self.encoders:
            t5 = torch.zeros(b, self.max_sequence_length, self.joint_dim,
                             device=self.device, dtype=self.dtype)
        else:
            t5, cut = self._t5(prompts)
            for i in (i for i, c in enumerate(cut) if c):
                notes[i].append(f"prompt longer than {self.max_sequence_length} T5 tokens: truncated")
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1), notes

    def _clip_width(self, name: str, pooled: bool = False) -> int:
        """Width of a CLIP's token states (or of its projection), known from its config even when dropped."""
        hidden, projection = self.clip_widths[name]
        return projection if pooled else hidden


def vae_layout(device: torch.device) -> torch.memory_format:
    """The VAE's memory layout on this kind of device. Channels-last is oneDNN's fast layout on CPUs (the fixture's
    decode 1.4x faster; the same image as diffusers within its rounding, tests/test_sd3.py); on CUDA cuDNN decoded
    a contiguous latent faster (H200, eager, 1024 px: 88 ms against 128 ms; docs/benchmarks.md)."""
    return torch.contiguous_format if torch.device(device).type == "cuda" else torch.channels_last


class SD3Model:
    encoder_names = tuple(ENCODERS)

    def __init__(self, transformer, vae, scheduler, text: "SD3TextEncoders", name: str, sampling: SamplingDefaults):
        self.transformer, self.vae, self.scheduler, self.text = transformer, vae, scheduler, text
        self._sigmas: dict[tuple[int, int, int], Tensor] = {}
        self._text: dict[tuple[str, frozenset], tuple[Tensor, Tensor, list[str]]] = {}
        self.name, self.sampling = name, sampling
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.multiple = self.vae_scale * transformer.config.patch_size

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, folder: Path, dtype: torch.dtype = torch.float32, drop=(), max_sequence_length: int = 256,
             transformer_file: Path | None = None) -> "SD3Model":
        """A diffusers folder; `transformer_file`: a single-file checkpoint whose configs come from `folder`."""
        from diffusers import AutoencoderKL, SD3Transformer2DModel

        quiet_loaders()
        folder = Path(folder)
        drop = check_drop(drop, cls.encoder_names)
        index = read_index(folder)
        all_settings = read_settings(folder) if (folder / SETTINGS).exists() else {}
        # a student distilled without an encoder runs without it (its embedding was zeros in training)
        drop = drop | frozenset(all_settings.get("trained_without", []))
        if "t5" not in drop and (not (index.get("text_encoder_3") or [None])[0]
                                 or not (folder / "text_encoder_3").is_dir()):
            raise FlowflashError(f"{folder} has no T5 text encoder (text_encoder_3); load it with --drop t5 "
                                 "(Python: drop=['t5'])")
        check_sequence_length(max_sequence_length)
        # everything cheap to check is checked before the (possibly multi-GB) weights are read
        widths = clip_widths(folder)
        settings = all_settings.get("sampling", {})
        scheduler = load_scheduler(folder)
        # a flowflash student records its own steps and guidance; else diffusers' defaults (28, 7)
        sampling = SamplingDefaults(steps=settings.get("steps", 28), guidance=settings.get("guidance", 7.0),
                                    shift=float(scheduler.config.get("shift", 1.0)))
        if transformer_file is not None:
            transformer = load_single_file(Path(transformer_file), folder, dtype)
        else:
            transformer = load_component(SD3Transformer2DModel, folder, "transformer", dtype)
        vae = load_component(AutoencoderKL, folder, "vae", dtype)
        text = SD3TextEncoders.load(folder, drop, max_sequence_length, dtype, transformer.config.joint_attention_dim,
                                    widths)
        vae = vae.to(memory_format=vae_layout(vae.device))  # see decode
        model = cls(transformer.eval(), vae.eval(), scheduler, text, folder.name, sampling)
        for m in (transformer, vae):
            m.requires_grad_(False)
        return model

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    def compile(self) -> None:
        """torch.compile the transformer, and on CUDA the VAE decoder too: there it decoded a 1024 px image in 36 ms
        against 88-128 ms eager (H200); on a CPU it cost time (the fixture at 256 px: 15-16 ms against 11-12 ms;
        docs/benchmarks.md)."""
        self.transformer.compile()
        if self.device.type == "cuda":
            self.vae.decoder.compile()

    def weights_id(self, path: Path) -> str:
        """A short id of the transformer weights for PNG metadata, cheap on multi-GB files: sha256 over the
        transformer config, each weight file's name and size, and its first MiB."""
        import hashlib
        path = Path(path)
        files = [path] if path.is_file() else sorted((path / "transformer").glob("*.safetensors"))
        h = hashlib.sha256(json.dumps(dict(self.transformer.config), sort_keys=True, default=str).encode())
        for f in files:
            h.update(f"{f.name}:{f.stat().st_size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
        return h.hexdigest()[:10]

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def to(self, device: torch.device | str) -> "SD3Model":
        for m in (self.transformer, self.vae):
            m.to(device)
        self.vae.to(memory_format=vae_layout(self.vae.device))
        self.text.to(device)
        self._text.clear()  # cached embeddings live on the old device
        return self

    # ------------------------------------------------------------------ sizes and schedule
    def default_size(self) -> tuple[int, int]:
        s = self.transformer.config.sample_size * self.vae_scale
        return s, s

    def check_size(self, size: int | tuple[int, int] | None) -> tuple[int, int]:
        return check_size(size, self.default_size(), self.multiple, self.vae_scale,
                          self.transformer.config.pos_embed_max_size)

    def timesteps(self, steps: int | None, size: tuple[int, int] | None = None) -> Tensor:
        """The scheduler's own sigmas (N + 1, ending at 0) for N steps at this size, as diffusers computes them."""
        steps = steps or self.sampling.steps
        w, h = size or self.default_size()
        key = (steps, w, h)
        if key not in self._sigmas:  # computed once per (steps, size): a reused Pipeline skips the scheduler
            p = self.transformer.config.patch_size
            seq = (h // self.vae_scale // p) * (w // self.vae_scale // p)
            self._sigmas[key] = scheduler_sigmas(self.scheduler, steps, seq)
        return self._sigmas[key]

    # ------------------------------------------------------------------ text
    @property
    def encoders(self) -> dict:
        return self.text.encoders

    @property
    def max_sequence_length(self) -> int:
        return self.text.max_sequence_length

    def encode_text(self, prompts: list[str], drop: frozenset[str]) -> tuple[Tensor, Tensor, list[list[str]]]:
        return self.text.encode_text(prompts, drop)

    CACHE = 8  # prompts whose embeddings a reused model keeps (SD3.5: ~5 MB each in fp32)

    @torch.no_grad()
    def encode_cached(self, prompts: list[str], drop: frozenset[str]) -> tuple[Tensor, Tensor, list[str]]:
        """encode_text, remembering the last few prompts: a reused model does not encode the same prompt (or
        the empty negative prompt of every CFG call) again, which diffusers does on every call."""
        distinct = list(dict.fromkeys(prompts))
        got = {p: self._text[(p, drop)] for p in distinct if (p, drop) in self._text}
        todo = [p for p in distinct if p not in got]
        if todo:  # one batch for the new prompts
            ctx, pooled, notes = self.encode_text(todo, drop)
            got.update({p: (ctx[i], pooled[i], notes[i]) for i, p in enumerate(todo)})
        for p in distinct:  # most recently used last; the oldest go
            self._text.pop((p, drop), None)
            self._text[(p, drop)] = got[p]
        while len(self._text) > self.CACHE:
            self._text.pop(next(iter(self._text)))
        rows = [got[p] for p in prompts]
        notes = list(dict.fromkeys(n for r in rows for n in r[2]))
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), notes

    @torch.no_grad()
    def condition(self, prompts: list[str], drop: frozenset[str], cfg: bool,
                  negative: list[str] | None = None) -> Conditioning:
        ctx, pooled, notes = self.encode_cached(prompts, drop)
        if cfg:  # the unconditional rows encode the negative prompt ("" by default), as diffusers does
            nctx, npooled, _ = self.encode_cached(negative or [""] * len(prompts), drop)
            ctx, pooled = torch.cat([ctx, nctx]), torch.cat([pooled, npooled])
        return Conditioning(ctx.to(self.device, self.dtype), pooled.to(self.device, self.dtype), notes)

    # ------------------------------------------------------------------ denoising and images
    transformer_runner = None  # called in place of self.transformer when set (runtime/ov_backend.py)

    def velocity(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        run = self.transformer_runner or self.transformer
        return run(hidden_states=x, timestep=t * 1000, encoder_hidden_states=cond.context,
                   pooled_projections=cond.pooled, return_dict=False)[0]

    def noise(self, seeds: list[int], size: tuple[int, int]) -> Tensor:
        """One latent per seed, drawn as diffusers' prepare_latents draws a batch of one from a CPU generator."""
        w, h = size
        shape = (1, self.transformer.config.in_channels, h // self.vae_scale, w // self.vae_scale)
        return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s), dtype=self.dtype)
                          for s in seeds]).to(self.device)

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        c = self.vae.config
        # the latent in the VAE's own layout (vae_layout: the device's fast one)
        fmt = torch.channels_last if self.vae.decoder.conv_in.weight.is_contiguous(
            memory_format=torch.channels_last) else torch.contiguous_format
        z = (x / c.scaling_factor + c.shift_factor).contiguous(memory_format=fmt)
        image = self.vae.decode(z, return_dict=False)[0]
        # diffusers' postprocess: [-1, 1] -> [0, 1] in the VAE's dtype, then float, x 255, rounded
        return ((image / 2 + 0.5).clamp(0, 1).float() * 255).round().to(torch.uint8).cpu()

    def _pixels(self, images_u8: Tensor) -> Tensor:
        """uint8 -> [-1, 1] as diffusers' image processor computes it."""
        return ((images_u8.float() / 255.0) * 2.0 - 1.0).to(self.device, self.dtype)

    @torch.no_grad()
    def encode(self, images_u8: Tensor) -> Tensor:
        """Images -> latents: the VAE posterior's mean (deterministic), scaled and shifted as SD3 trains."""
        c = self.vae.config
        return (self.vae.encode(self._pixels(images_u8)).latent_dist.mode() - c.shift_factor) * c.scaling_factor

    @torch.no_grad()
    def img2img_start(self, images_u8: Tensor, seeds: list[int], size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """(latents of the image, noise) as StableDiffusion3Img2ImgPipeline draws them for a seed: the VAE
        posterior sampled first, then the noise, both from one CPU generator of the seed."""
        c, out, noise = self.vae.config, [], []
        for img, s in zip(images_u8, seeds):
            g = torch.Generator().manual_seed(s)
            z = self.vae.encode(self._pixels(img[None])).latent_dist.sample(generator=g)
            out.append((z - c.shift_factor) * c.scaling_factor)
            noise.append(torch.randn(out[-1].shape, generator=g, dtype=self.dtype).to(self.device))
        return torch.cat(out), torch.cat(noise)


def check_size(size, default: tuple[int, int], multiple: int, vae_scale: int,
               pos_embed_max_size: int | None) -> tuple[int, int]:
    """(width, height) for a size request; one error naming the rule it breaks."""
    w, h = default if size is None else (size, size) if isinstance(size, int) else tuple(size)
    if w % multiple or h % multiple or w < multiple or h < multiple:
        raise FlowflashError(f"size {w}x{h} is not a positive multiple of {multiple} "
                             f"(VAE factor {vae_scale} x patch {multiple // vae_scale})")
    top = (pos_embed_max_size or 0) * multiple
    if top and max(w, h) > top:  # the position table ends there
        raise FlowflashError(f"size {w}x{h} is larger than this model's position embedding allows ({top} px a side)")
    return w, h


def size_rule(folder: Path, transformer_config, size) -> tuple[int, int, int]:
    """(width, height, VAE factor) of a size request for a diffusers folder, from its configs alone."""
    vae_cfg = Path(folder) / "vae" / "config.json"
    if not vae_cfg.is_file():
        raise FlowflashError(f"{folder} lacks the vae/ component")
    vae_scale = 2 ** (len(json.loads(vae_cfg.read_text())["block_out_channels"]) - 1)
    c = transformer_config
    default = (c.sample_size * vae_scale,) * 2
    w, h = check_size(size, default, vae_scale * c.patch_size, vae_scale, c.pos_embed_max_size)
    return w, h, vae_scale


def load_scheduler(folder: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not (Path(folder) / "scheduler" / "scheduler_config.json").is_file():
        raise FlowflashError(f"{folder} lacks the scheduler/ component")
    return FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)


def scheduler_shift(folder: Path) -> float:
    return float(load_scheduler(folder).config.get("shift", 1.0))


def scheduler_sigmas(scheduler, steps: int, image_seq_len: int) -> Tensor:
    """The scheduler's sigmas (N + 1, ending at 0) for N steps, as diffusers computes them (its shift, or its
    dynamic shift for this many image tokens)."""
    import copy

    from ..sampling import dynamic_shift_mu

    sched = copy.deepcopy(scheduler)  # set_timesteps mutates; keep the loaded one pristine
    kw = {}
    if sched.config.get("use_dynamic_shifting"):
        c = sched.config
        kw["mu"] = dynamic_shift_mu(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                    c.get("base_shift", 0.5), c.get("max_shift", 1.16))
    sched.set_timesteps(steps, **kw)
    return sched.sigmas.to(torch.float64)


def load_single_file(path: Path, config: Path, dtype: torch.dtype):
    """An SD3 transformer from one .safetensors file (original or diffusers keys), configs from a local folder."""
    from diffusers import SD3Transformer2DModel

    if path.suffix != ".safetensors":
        raise FlowflashError(f"{path}: single-file checkpoints must be .safetensors (flowflash never unpickles)")
    if not path.exists():
        raise FlowflashError(f"checkpoint not found: {path}")
    read_index(config)
    try:
        model = SD3Transformer2DModel.from_single_file(str(path), config=str(config), subfolder="transformer",
                                                       local_files_only=True, torch_dtype=dtype)
        return model.to(dtype)
    except Exception as e:  # diffusers raises assorted types for a file that does not fit the config
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FlowflashError(f"cannot load {path} with the configs of {config}: {msg}") from None
