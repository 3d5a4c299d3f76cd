"""The run configs: the loop's fields (LoopConfig) plus each kind of run's own. YAML files map 1:1 onto these."""
from __future__ import annotations

from dataclasses import dataclass, field

from .loop import LoopConfig


@dataclass
class TeacherConfig(LoopConfig):
    """Method `rf`: a teacher trained from the corpus."""
    out: str = "runs/teacher"
    model: dict = field(default_factory=dict)  # ModelConfig fields (architecture; `sampling` holds the shift)
    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-4
    warmup: int = 200
    min_lr: float = 3e-5
    ema: float = 0.999
    log_every: int = 10
    sample_every: int = 250
    ckpt_every: int = 100
    # Probability that a batch row is a single emoji rather than a scene; None samples rows uniformly.
    # Singles are a quarter of the corpus but carry most of the identity a person checks.
    p_single: float | None = None
    # Curated concept list for the single-emoji rows (a list in data/concepts/ such as "core", or a
    # file); None trains on every concept. Scenes are kept whole: their objects are all in "core".
    concepts: str | None = None
    weight_decay: float = 0.0
    # Probability that a single emoji is captioned with one of its other phrasings ("a dog face", "Dog face
    # emoji", ... from the manifest, data/phrasing.py) instead of its corpus caption; 0 keeps the captions.
    p_phrasing: float = 0.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    p_uncond: float = 0.1  # both encoders nulled: the CFG unconditional branch
    p_drop_light: float = 0.15  # independent encoder dropout (SD3), so either can be nulled at inference
    p_drop_minilm: float = 0.15
    # Continue from a shipped model folder (its weights, a fresh optimizer): how a new session extends
    # training when only the committed weights survived. Its config and vocabulary are kept.
    init_from: str | None = None
    # With init_from: the words of this corpus's captions (and phrasings) that the model does not know join its
    # vocabulary, each starting as the unknown word's embedding (so the start is the shipped model, unchanged).
    extend_vocab: bool = False
    sample_prompts: list = field(default_factory=lambda: [
        "grinning face, twemoji style", "red apple, fluent flat style", "dog face, twemoji style",
        "pizza, fluent flat style", "a frog to the left of a banana on a blue background, twemoji style",
        "two penguin on a yellow background, fluent flat style", "cat face, fluent flat style",
        "watermelon, twemoji style"])


@dataclass
class DistillConfig(LoopConfig):
    """A few-step student from a teacher; `method` picks flash, dmd2, tg or naive."""
    out: str = "runs/distill"
    # dmd2 by default: in issue 14's seeded protocol re-noised matching beat timestep sharing (docs/benchmarks.md)
    method: str = "dmd2"
    teacher: str = "teacher"  # shipped name or model folder
    init_student: str | None = None  # a model folder to start the student from (e.g. the TG stage)
    student_steps: int = 4
    student_shift: float | None = None  # default: the teacher's shift
    schedule: list[float] | None = None  # explicit student times, 1 -> 0
    # other step counts the same weights learn (e.g. [2] beside student_steps 4): each sample draws one of the
    # schedules; the export's default stays student_steps, `--steps K` runs the others (emoji teachers; dmd2, flash)
    also_steps: list[int] | None = None
    # also_steps' times, one list per count in the same order (e.g. [[1, 0.333, 0]] for a 2-step side whose last step
    # starts where the 4-step one's does); None: each count's shifted times. The export records them either way.
    also_times: list[list[float]] | None = None
    lr: float = 2e-5
    lr_critic: float = 4e-5
    guidance: float = 4.0  # the real score (teacher) uses CFG at this scale
    critic_ratio: int = 5  # critic updates per student update (DMD2: 5)
    timestep_sharing: bool | None = None  # flash: on unless set false (the ablation); dmd2: always off
    t_match_min: float | None = None  # lowest matching/critic time; None: the teacher's t_min (emoji 0.05), else 0.02
    adversarial: bool | None = None  # None: on where real samples exist (the emoji corpus; SD3: real_images)
    gan_weight: float = 0.05
    gan_blocks: list | None = None  # critic blocks whose features the heads read (None: depth/4 and 5 depth/8)
    head_reinit_p: float = 0.01
    split: str | None = None  # split-timestep fine-tuning branch: low (t <= split_at) or high (t > split_at)
    split_at: float = 0.5  # the boundary; a 2-step schedule (1, 0.6) needs one between its two times
    tg_teacher_steps: int = 4  # teacher Euler steps per student interval for trajectory guidance
    # tg only: a fixed pool of N (caption, noise) pairs whose teacher trajectories are computed once and
    # reused every epoch (the teacher's CFG ODE is ~20x the cost of a student step); 0 = fresh each step
    tg_pool: int = 0
    # ---- which captions an emoji teacher's run draws (as TeacherConfig's: the corpus rows are three scenes in four)
    p_single: float | None = None  # probability a row is a single emoji; None: rows uniformly
    concepts: str | None = None  # concept list for the single rows (e.g. "core"); None: every concept
    p_phrasing: float = 0.0  # a single is captioned with one of its other phrasings ("a dog face") this often
    teacher_prompt: str = "caption"  # under p_phrasing, the teacher is asked the row's corpus caption (caption:
    #   the student learns to answer "a dog face" as the teacher answers "dog face, twemoji style") or the same
    #   phrasing as the student (same)
    # ---- fixes of the recipe's confounds (issue 14); the old behaviour of each stays as an ablation arm
    init_critic: str | None = None  # a run folder whose checkpoint's critic and heads start this run's (None: teacher)
    critic_warmup: int = 0  # critic-only iterations before the first student update
    dm_norm: str = "renoised"  # DM normaliser mean|x0 - x0_real|: renoised (at a fresh re-noising of the student's
    #   x0, as DMD2) | matching (at the matching point; under sharing it collapses to t |v_s - v_real|) | none
    match_point: str = "start"  # flash's matching point: start (x_{t_i}) | interval (t' in [t_{i+1}, t_i] along v)
    critic_t: str = "full"  # critic's training times: full (uniform on [t_min, 1]: wherever it is asked) |
    #   uniform (old: [t_min, 1 - t_min], the first step's t = 1 never trained) | teacher (logit-normal + shift)
    adversarial_floor: bool = True  # a last-step adversarial point (t = 0) is re-noised to t_match_min
    step_per_sample: bool = True  # one student step index per sample (false: one per batch)
    # ---- an SD3 teacher (a diffusers StableDiffusion3Pipeline folder): training runs in its VAE latent space
    prompts: str | None = None  # the training prompts: text, one a line, or JSONL with a "prompt" field
    size: list | int | None = None  # training image size, px (int or [width, height]); None: the teacher's default
    drop: list = field(default_factory=list)  # text encoders to train (and later run) without, e.g. [t5]
    max_sequence_length: int = 256  # T5 tokens (diffusers' default)
    real_images: str | None = None  # a folder of real images for the adversarial heads (VAE-encoded once)
    embed_cache: str | None = None  # text embeddings and real latents cached here (None: ~/.cache/flowflash/embeddings)
    fsdp: bool = False  # under torchrun: FSDP2 (fully_shard per transformer block) for student, critic and teacher
    grad_checkpointing: bool = False  # recompute each transformer block in backward (less memory, ~1.3x time)
