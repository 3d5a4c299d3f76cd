"""Entry points: build a run's networks, method and data from its config, then hand them to the loop.

`train_teacher` (method rf) and `distill` (flash, dmd2, tg, naive) differ only in what they build;
`measure_variance` is the distribution-matching diagnostic on the same set-up.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..data.dataset import load_concept_list
from ..errors import FlowflashError
from ..images import image_grid
from ..models.flow_model import FlowModel, ModelConfig, load_model, save_model, with_words
from ..models.text import WordTokenizer
from ..methods import DISTILL_METHODS, Method
from ..methods.base import set_fields
from ..methods.student import EMOJI_DATA_FIELDS, LATENT_FIELDS
from ..models.sd3 import is_diffusers_folder
from ..runtime.pipeline import resolve_model
from .common import EMA, Dist, close_dist, init_dist, load_checkpoint
from .configs import DistillConfig, TeacherConfig
from .data import CaptionBank, PoolSampler, RowSampler
from .loop import LOOP_FIELDS, LoopConfig, Sampler, train_loop

DISTILL_SAMPLE_PROMPTS = ["grinning face, twemoji style", "red apple, fluent flat style"]


def sample_grid(model_dir: Path, prompts: list[str], path: Path, steps: int | None = None,
                guidance: float | None = None, seed: int = 0, size=None, device: str = "cpu", dtype: str = "fp32"):
    """One image per prompt from an exported model, as a grid PNG (training progress at a glance)."""
    from ..runtime.pipeline import Pipeline

    pipe = Pipeline.load(model_dir, device=device, dtype=dtype)
    images = pipe.generate(prompts, steps=steps, guidance=guidance, seed=seed, size=size)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, cols=min(8, len(images))).save(path)


def write_config(cfg, d: Dist):
    if d.main:
        (Path(cfg.out) / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))


# ------------------------------------------------------------------ teacher (rf)
def train_teacher(cfg: TeacherConfig, resume: bool = False, max_steps: int | None = None,
                  until: int | None = None) -> Path:
    from ..methods.rf import RectifiedFlow

    d = init_dist(cfg.device)
    if cfg.init_from and cfg.model:
        raise FlowflashError("init_from keeps the architecture of the model it starts from; remove model: "
                             "from the config")
    if not 0.0 <= cfg.p_phrasing <= 1.0:
        raise FlowflashError(f"p_phrasing must lie in [0, 1], got {cfg.p_phrasing}")
    if cfg.extend_vocab and not cfg.init_from:
        raise FlowflashError("extend_vocab grows the vocabulary of the model init_from names; a fresh model builds "
                             "its vocabulary from the corpus anyway")
    # A bad list name fails here, before the run folder, model and caption cache are made.
    keep = load_concept_list(cfg.concepts) if cfg.concepts else None
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if cfg.init_from and not cfg.extend_vocab:  # on --resume the checkpoint then overwrites these weights
        model = load_model(Path(cfg.init_from))
    else:
        from ..data.dataset import load_corpus
        from .data import caption_texts, heldout_plain_texts
        texts, _ = caption_texts(load_corpus(Path(cfg.data), "train"), cfg.p_phrasing > 0,  # phrasings' words too
                                 heldout_plain_texts(Path(cfg.data)) if cfg.p_phrasing > 0 else set())
        vocab = WordTokenizer.build(texts).vocab
        if cfg.init_from:  # extend_vocab: the shipped model, its new words appended (outputs unchanged)
            model = with_words(load_model(Path(cfg.init_from)), vocab)
        else:
            model = FlowModel(ModelConfig.from_dict({**cfg.model, "vocab": vocab}))
    mcfg = model.cfg
    bank = CaptionBank.build(Path(cfg.data), mcfg.vocab, mcfg.light_max_tokens, mcfg.minilm_max_tokens, out, d,
                             mcfg.image_size, phrasings=cfg.p_phrasing > 0)
    singles = bank.single_rows(keep)
    if keep is not None and len(singles) == 0:
        raise FlowflashError(f"concept list {cfg.concepts!r} matches no single emoji in {cfg.data}")
    write_config(cfg, d)
    method = RectifiedFlow(cfg, model)
    draw = RowSampler(bank, singles, bank.scene_rows(), cfg.p_single, cfg.p_phrasing)
    sample = lambda folder, png: sample_grid(folder, cfg.sample_prompts, png, steps=28, guidance=4.0)
    folder = train_loop(method, draw, cfg, d, resume=resume, max_steps=max_steps, until=until, sample=sample)
    close_dist(d)
    return folder


# ------------------------------------------------------------------ distillation
@dataclass
class DistillSetup:
    method: Method
    bank: CaptionBank | None  # the emoji corpus's encoded captions (None for an SD3 teacher or `naive`)
    draw: Sampler | None = None  # batches for the loop (None: `naive`, which trains nothing)
    sample_prompts: list[str] | None = None
    sample_kw: dict | None = None  # Pipeline.load/generate settings of the sample grids


def distill_setup(cfg: DistillConfig, d: Dist) -> DistillSetup:
    """Roles, method and the training data: what training and diagnostics both need. Every check of the
    config and its inputs runs before the run folder is made."""
    if cfg.method not in DISTILL_METHODS:
        raise FlowflashError(f"unknown method {cfg.method!r}; known: {', '.join(DISTILL_METHODS)}")
    method_cls = DISTILL_METHODS[cfg.method]
    method_cls.check_config(cfg, LOOP_FIELDS)
    teacher_dir = resolve_model(cfg.teacher)  # a wrong teacher fails before the run folder exists
    if cfg.init_critic and not (Path(cfg.init_critic) / "checkpoint" / "critic.safetensors").exists():
        raise FlowflashError(f"init_critic: {Path(cfg.init_critic) / 'checkpoint'} holds no critic checkpoint (a "
                             "flash or dmd2 run's, written by one process)")
    if is_diffusers_folder(teacher_dir):
        emoji_only = set_fields(cfg, EMOJI_DATA_FIELDS)
        if emoji_only:
            raise FlowflashError(f"{', '.join(emoji_only)}: only for an emoji teacher (rows of its corpus); an SD3 "
                                 "teacher trains on the prompts of --prompts as given")
        if cfg.also_steps:
            raise FlowflashError("also_steps: only for an emoji teacher; an SD3 student's folder runs one scheduler's "
                                 "steps in diffusers")
        return latent_setup(cfg, d, method_cls, teacher_dir)
    keep = check_rows(cfg)
    latent_only = set_fields(cfg, LATENT_FIELDS | {"fsdp", "grad_checkpointing"})
    if latent_only:
        raise FlowflashError(f"{', '.join(latent_only)}: only for an SD3 teacher (a diffusers folder); the emoji teacher "
                             f"{teacher_dir} trains on the captions of its corpus (data:)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    teacher = load_model(teacher_dir)
    student = None
    if cfg.init_student:
        student = load_model(Path(cfg.init_student))
        if not student.cfg.same_network(teacher.cfg):
            raise FlowflashError(f"init_student {cfg.init_student} does not match the teacher's architecture/vocabulary")
    method = method_cls(cfg, teacher, student)
    if cfg.init_critic:
        carry_critic(method, Path(cfg.init_critic))
    if not method.optimizers:
        return DistillSetup(method, None)
    c = teacher.cfg
    bank = CaptionBank.build(Path(cfg.data), c.vocab, c.light_max_tokens, c.minilm_max_tokens, out, d, c.image_size,
                             phrasings=cfg.p_phrasing > 0)
    if cfg.tg_pool:  # the same pool on every rank and after resume
        draw = PoolSampler(bank, cfg.tg_pool, cfg.seed * 1000 + 5)
    elif cfg.p_single is None and keep is None:
        all_rows = torch.arange(len(bank))
        draw = RowSampler(bank, all_rows, all_rows[:0], p_phrasing=cfg.p_phrasing,
                          teacher_caption=cfg.teacher_prompt == "caption")
    else:
        singles = bank.single_rows(keep)
        if len(singles) == 0:
            raise FlowflashError(f"concept list {cfg.concepts!r} matches no single emoji in {cfg.data}")
        draw = RowSampler(bank, singles, bank.scene_rows(), cfg.p_single, cfg.p_phrasing,
                          teacher_caption=cfg.teacher_prompt == "caption")
    return DistillSetup(method, bank, draw, DISTILL_SAMPLE_PROMPTS)


def check_rows(cfg: DistillConfig) -> set[str] | None:
    """The caption-drawing fields of an emoji teacher's run, checked before its folder is made; returns the kept
    concepts (None: all)."""
    if cfg.p_single is not None and not 0.0 <= cfg.p_single <= 1.0:
        raise FlowflashError(f"p_single must lie in [0, 1], got {cfg.p_single}")
    if not 0.0 <= cfg.p_phrasing <= 1.0:
        raise FlowflashError(f"p_phrasing must lie in [0, 1], got {cfg.p_phrasing}")
    if cfg.teacher_prompt not in ("caption", "same"):
        raise FlowflashError(f"teacher_prompt must be caption or same, got {cfg.teacher_prompt!r}")
    if cfg.tg_pool and set_fields(cfg, EMOJI_DATA_FIELDS):
        raise FlowflashError("tg_pool draws its fixed pool from every caption as written; p_single, concepts and "
                             "p_phrasing need tg_pool: 0")
    if cfg.p_phrasing > 0:
        from ..data.dataset import read_manifest
        if not any(r.get("phrasings") for r in read_manifest(Path(cfg.data))):
            raise FlowflashError(f"{cfg.data} lists no phrasings (built before they existed): rebuild it with "
                                 f"flowflash data build --out {cfg.data}")
    return load_concept_list(cfg.concepts) if cfg.concepts else None


def latent_setup(cfg: DistillConfig, d: Dist, method_cls, teacher_dir: Path) -> DistillSetup:
    """An SD3 teacher: roles are its transformer (frozen) and copies of it (trainable), data are cached prompt
    embeddings, training runs in the VAE latent space at cfg.size."""
    from ..methods.dmd2 import DMD2
    from ..models.latent import LatentFlow
    from ..models.protocol import check_drop
    from ..models.sd3 import ENCODERS
    from .latent_data import PromptSampler, default_cache_dir, prompt_bank, read_prompts, real_latents
    from .scale import prepare_roles

    if cfg.data != LoopConfig.data:
        raise FlowflashError("data: is the emoji corpus; an SD3 teacher trains on prompts (prompts:) and, for the "
                             "adversarial heads, real images (real_images:)")
    drop = check_drop(cfg.drop, tuple(ENCODERS))
    trains = method_cls.name != "naive"
    if trains and not cfg.prompts:
        raise FlowflashError("an SD3 teacher trains on prompts: give a prompt file (--prompts FILE, one prompt a "
                             "line or JSONL with a 'prompt' field)")
    prompts = read_prompts(cfg.prompts) if trains else None
    if cfg.fsdp and d.world == 1 and "WORLD_SIZE" not in os.environ:
        raise FlowflashError("fsdp shards the roles across processes: start the run with torchrun "
                             "(torchrun --nproc-per-node N -m flowflash.cli distill ...)")
    if cfg.tg_pool and d.world > 1:  # each rank would integrate the pool entries of its own rows: unequal forwards
        raise FlowflashError("tg_pool with an SD3 teacher runs in one process; under torchrun use tg_pool: 0")
    if cfg.batch_size % d.world:
        raise FlowflashError(f"batch_size {cfg.batch_size} does not split evenly across {d.world} processes")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlowflashError("device 'cuda' asked for, but this torch sees no CUDA GPU")
    # the frozen teacher needs no fp32 master copy: under bf16 it is held in bf16 (half its memory)
    teacher = LatentFlow.load(teacher_dir, cfg.size, torch.bfloat16 if cfg.precision == "bf16" else torch.float32,
                              drop)
    student = LatentFlow.load(Path(cfg.init_student), teacher.cfg.size, torch.float32, drop) if cfg.init_student \
        else None
    arch = lambda m: {k: v for k, v in dict(m.transformer.config).items() if not k.startswith("_")}  # not its path
    if student is not None and arch(student) != arch(teacher):
        raise FlowflashError(f"init_student {cfg.init_student} does not match the teacher's transformer config")
    if trains and cfg.real_images:
        from .latent_data import image_files
        image_files(Path(cfg.real_images))  # an empty or missing folder fails before the run folder exists
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if not trains:
        return DistillSetup(method_cls(cfg, teacher), None)
    cache = Path(cfg.embed_cache) if cfg.embed_cache else default_cache_dir()
    bank = prompt_bank(teacher_dir, prompts, drop, cfg.max_sequence_length, cache, d, device=device)
    real = real_latents(teacher_dir, Path(cfg.real_images), teacher.cfg.size, cache, d) if cfg.real_images else None
    roles = prepare_roles(cfg, teacher, student, critic=issubclass(method_cls, DMD2))
    method = method_cls(cfg, teacher, roles.student, **({"critic": roles.critic} if roles.critic is not None else {}))
    if cfg.init_critic:
        carry_critic(method, Path(cfg.init_critic))
    method.parallel = "shard" if cfg.fsdp else "replicate"  # under torchrun: FSDP2, or data parallel on its engine
    if issubclass(method_cls, DMD2) and not method.adversarial and cfg.adversarial is None and d.main:
        print("adversarial term off: an SD3 teacher's run has no real samples without real_images (--real-images "
              "DIR); distribution matching alone trains the student")
    draw = PromptSampler(bank, teacher.cfg.latent_shape, d, real, cfg.tg_pool, cfg.seed * 1000 + 5)
    # grids at the training size, on the training device (a CPU fp32 grid of a large model would stall the run)
    sample_kw = dict(size=teacher.cfg.size, device=cfg.device, dtype="bf16" if cfg.precision == "bf16" else "fp32")
    return DistillSetup(method, None, draw, prompts[:4], sample_kw)


def carry_critic(method, run: Path):
    """Start the critic and its heads from a previous stage's last checkpoint (run/checkpoint), so a stage or a
    split branch does not restart the critic from the teacher (a fresh critic lags a warm-started student)."""
    from ..methods.dmd2 import gan_blocks

    ckpt = run / "checkpoint"
    if not (ckpt / "critic.safetensors").exists():
        raise FlowflashError(f"init_critic: {ckpt} holds no critic checkpoint (a flash or dmd2 run's, written by "
                             "one process)")
    src_cfg = run / "config.json"
    src_blocks = None
    if src_cfg.exists():  # the blocks the saved heads read (their config's gan_blocks, or the default for the teacher)
        src_blocks = gan_blocks(json.loads(src_cfg.read_text()).get("gan_blocks"), method.teacher)
    for name in ("critic", "heads"):
        weights = load_file(ckpt / f"{name}.safetensors")
        module = method.networks[name]
        own = module.state_dict()
        other_blocks = src_blocks is not None and src_blocks != method.gan_blocks  # unknown without its config
        if name == "heads" and (other_blocks or
                                {k: v.shape for k, v in weights.items()} != {k: v.shape for k, v in own.items()}):
            print(f"init_critic: the heads in {ckpt} read critic blocks {src_blocks}, this run's read "
                  f"{method.gan_blocks}: the heads start fresh, the critic is carried")
            continue
        try:
            module.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()})
        except (RuntimeError, KeyError) as e:
            raise FlowflashError(f"init_critic: the critic in {ckpt} does not fit this teacher: "
                                 f"{str(e).splitlines()[0]}") from None


def distill(cfg: DistillConfig, resume: bool = False, max_steps: int | None = None, until: int | None = None) -> Path:
    d = init_dist(cfg.device)
    su = distill_setup(cfg, d)
    write_config(cfg, d)
    out = Path(cfg.out)
    if su.draw is None:  # naive: export and stop
        if d.main:
            su.method.save_export(None, out / "student")
        close_dist(d)
        return out / "student"
    sample = lambda folder, png: sample_grid(folder, su.sample_prompts, png, **(su.sample_kw or {}))
    # a split branch's EMA stays anchored to the common start (no warm-up)
    folder = train_loop(su.method, su.draw, cfg, d, resume=resume, max_steps=max_steps, until=until,
                        ema_warmup=cfg.split is None, sample=sample)
    close_dist(d)
    return folder


def measure_variance(cfg: DistillConfig, draws: int = 16, batch_size: int = 8, seed: int = 0,
                     from_checkpoint: bool = False) -> dict:
    """Variance of the DM gradient on one fixed batch, timestep sharing vs re-noising, for the roles of
    `cfg` (its student init and a critic from the teacher, or the run's last checkpoint)."""
    from ..methods.diagnostics import compare_sharing
    from ..methods.dmd2 import DMD2

    if cfg.method not in ("flash", "dmd2"):
        raise FlowflashError(f"method {cfg.method!r} has no distribution-matching gradient; use flash or dmd2")
    if is_diffusers_folder(resolve_model(cfg.teacher)):
        raise FlowflashError("--measure-variance runs on an emoji teacher (its corpus batches); an SD3 teacher's "
                             "gradient noise is not measured by it yet")
    # Both arms are measured on one method object whose sharing switch is flipped: build it as flash.
    su = distill_setup(dataclasses.replace(cfg, method="flash", timestep_sharing=None), init_dist())
    assert isinstance(su.method, DMD2)
    if from_checkpoint:
        ema = EMA(su.method.student, cfg.ema)
        load_checkpoint(Path(cfg.out) / "checkpoint", su.method.networks, {}, {"student": ema}, {})  # weights only
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(su.bank), (batch_size,), generator=gen)
    b = su.bank.batch(idx, torch.randn((batch_size, *su.bank.corpus.images.shape[1:]), generator=gen))
    res = compare_sharing(su.method, b, draws, seed)
    res["ratio_renoise_over_sharing"] = (res["renoise"]["relative_variance"]
                                         / max(res["sharing"]["relative_variance"], 1e-30))
    res.update(batch_size=batch_size, seed=seed, config=dataclasses.asdict(cfg))
    return res


def measure_noise(cfg: DistillConfig, k: int = 16, ref_draws: int = 256, batch_size: int = 16, seed: int = 0,
                  arms: list[str] | None = None) -> dict:
    """Issue 14's gradient-noise table on the roles `cfg` builds (its init_student and init_critic): the arms
    of methods/diagnostics.py ARMS, each over k independent minibatches, against a reference of arm A."""
    from ..methods.diagnostics import ARMS, gradient_noise

    if cfg.method not in ("flash", "dmd2"):
        raise FlowflashError(f"method {cfg.method!r} has no distribution-matching gradient; use flash or dmd2")
    if is_diffusers_folder(resolve_model(cfg.teacher)):
        raise FlowflashError("--measure-noise runs on an emoji teacher (its corpus batches)")
    arms = arms or list(ARMS)
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise FlowflashError(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
    su = distill_setup(dataclasses.replace(cfg, method="flash", timestep_sharing=None), init_dist())
    su.method.to(cfg.device)
    if hasattr(su.draw, "place") and torch.device(cfg.device).type != "cpu":
        su.draw.place(torch.device(cfg.device), seed)
    res = gradient_noise(su.method, su.draw, arms, k, ref_draws, batch_size, seed)
    res.update(batch_size=batch_size, seed=seed, config=dataclasses.asdict(cfg))
    return res
