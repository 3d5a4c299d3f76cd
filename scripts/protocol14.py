"""Issue 14's pre-registered protocol (docs/benchmarks.md), end to end, on the shipped emoji teacher.

    python scripts/protocol14.py prepare --data data/emoji64 --to p14-data        # here: captions -> MiniLM states
    python scripts/protocol14.py run --data p14-data --out $OUT --device cuda      # a GPU (or the CPU, smaller)
    python scripts/protocol14.py score --runs $OUT --data data/emoji64 --out docs/bench/protocol14   # here

`prepare` encodes a fixed sample of training captions and the eval_v1 prompts with MiniLM (which cannot travel
to a GPU machine: 90 MB against a 64 MiB limit), int8 per token (a few MB; every arm sees the same states).
`run` trains the common start (a `tg` student, then a critic warmed on it), then every arm x seed from that
start (subprocesses, `--parallel` at a time), with adversarial heads off but in `B_adv`; each writes the EMA
student's images for the eval prompts (image i from seed i) at 1/4, 1/2 and all of its updates, and the
gradient-noise table is measured on the common start. `score` computes FD-EffNetL0,
R-precision and the per-prompt alignment of every image set, the seed spread, the bootstrap over prompts of
the seed-averaged per-prompt differences, and applies the pre-registered rule (a difference is claimed when it
exceeds twice the seed SD of the difference and its 95 % bootstrap interval excludes 0). The secondary arms are
`--arms B_matching,B_uniform,B_teacher,B_adv` (B with fix 2 off, fix 4 off, the teacher's critic times, the
adversarial term on).

The gradient-noise table is measured again at the middle of the first seed's run of each primary arm (A, B, C),
on that run's own student and critic (`--noise-mid`). The split-timestep stage (`--split-from ARM`) starts from
each seed's final student and critic of ARM: a low branch (student times t <= --split-at), a high branch and an
unsplit control, each for --split-updates; then every merge ratio r in --merge-ratios (r x low + (1 - r) x
high; r = 1 is the low branch alone) draws the held-out prompts and the first --train-prompts training captions.
`score` picks the ratio on the training captions (seed-averaged alignment) and judges it against the unsplit
control on the held-out prompts. `B_adv` is B with the adversarial term: its heads' real branch reads the
sampled rows' own images, which `prepare` stores as their PNG files (~2 MB for 1,000). Every run also draws
plain_v1 (issue 15's prompts as people type them) at its end; `score` tables its R-precision per arm.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from flowflash.fsutil import atomic_file, write_text_atomic  # noqa: E402  (after the path: this checkout's own)
TEACHER = ROOT / "src" / "flowflash" / "weights" / "emoji-teacher"
_B = {"method": "flash", "timestep_sharing": True, "match_point": "start"}
ARMS = {  # the protocol's arms as DistillConfig settings (names without '-': file names are images-ARM-SEED)
    "A": {"method": "dmd2"}, "B": _B, "C": {**_B, "match_point": "interval"},
    # secondary arms: B with one fix undone or changed, or with the adversarial term
    "B_matching": {**_B, "dm_norm": "matching"}, "B_uniform": {**_B, "critic_t": "uniform"},
    "B_teacher": {**_B, "critic_t": "teacher"},
    "B_adv": {**_B, "adversarial": True}}  # needs `prepare`'s images (the heads' real branch)
STAGES = ("split_low", "split_high", "unsplit")  # the split-timestep stage's runs, from an arm's final state
MERGE_RATIOS = (0.0, 0.25, 0.3, 0.5, 0.7, 0.75, 1.0)
MIN_SEEDS = 3  # the protocol's least number of seeds behind a claim (a pair with fewer common seeds is described)


# ------------------------------------------------------------------ prepare (here: needs MiniLM)
def quantize_states(h: torch.Tensor) -> dict[str, torch.Tensor]:
    scale = h.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
    return {"mini_h_q": (h / scale).round().to(torch.int8), "mini_h_scale": scale.half()}


def encode(captions: list[str], vocab: list[str], cfg) -> dict[str, torch.Tensor]:
    from flowflash.models.text import WordTokenizer
    from flowflash.train.data import minilm_cache

    ids, _ = WordTokenizer(vocab).batch(captions, cfg.light_max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        h, p = minilm_cache(captions, Path(tmp), cfg.minilm_max_tokens)
    return {"ids": ids, "mini_p": p.half(), **quantize_states(h)}


def prepare(data: Path, n: int, to: Path, seed: int = 0):
    from safetensors.torch import save_file

    from flowflash.data.dataset import read_manifest
    from flowflash.eval.prompt_set import load_prompt_set
    from flowflash.models.flow_model import read_config

    cfg = read_config(TEACHER)
    rows = [r for r in read_manifest(data) if r["split"] == "train"]
    pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    train = [rows[i]["caption"] for i in pick.tolist()]
    ps = load_prompt_set("eval_v1")
    to.mkdir(parents=True, exist_ok=True)
    save_file(encode(train, cfg.vocab, cfg), to / "train.safetensors")
    save_file(encode(ps.captions, cfg.vocab, cfg), to / "eval.safetensors")
    plain = load_prompt_set("plain_v1")  # prompts as people type them (issue 15), drawn at each run's end
    save_file(encode(plain.captions, cfg.vocab, cfg), to / "plain.safetensors")
    # the sampled rows' own PNG files, byte for byte (~4 KB each): the adversarial arm's real images
    blobs = [(data / rows[i]["file"]).read_bytes() for i in pick.tolist()]
    offsets = torch.tensor([0, *itertools.accumulate(len(b) for b in blobs)])
    save_file({"png": torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8), "offsets": offsets},
              to / "images.safetensors")
    (to / "meta.json").write_text(json.dumps({"train_captions": train, "eval_set": ps.name, "eval_sha": ps.sha,
                                              "plain_set": plain.name, "plain_sha": plain.sha, "seed": seed,
                                              "teacher": str(TEACHER), "vocab_sha": vocab_sha(cfg.vocab)}, indent=1))
    print(f"{len(train)} training captions, {len(ps.captions)} eval and {len(plain.captions)} plain prompts -> {to}")


def vocab_sha(vocab: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(vocab).encode()).hexdigest()[:16]


def check_prepared(data: Path):
    """The word ids in a prepared folder are the teacher's vocabulary's: refuse a folder made for another one."""
    from flowflash.models.flow_model import read_config

    meta = json.loads((data / "meta.json").read_text())
    if meta.get("vocab_sha") != vocab_sha(read_config(TEACHER).vocab):
        raise SystemExit(f"{data} was prepared for another teacher vocabulary than the shipped teacher's ({TEACHER}); "
                         "run `prepare` again")


# ------------------------------------------------------------------ run (a GPU or the CPU)
def save_npz(path: Path, **arrays):
    """np.savez_compressed through a temp file and a rename: a run killed mid-write leaves the previous file (or
    none), never a truncated one that a resume, `pack` or `score` would fail on."""
    import numpy as np

    with atomic_file(path) as f:
        np.savez_compressed(f, **arrays)


def load_bank(path: Path, device, images: bool = False) -> dict[str, torch.Tensor]:
    """A prepared caption bank on `device`; with images, the rows' real images too (train.safetensors only)."""
    from PIL import Image
    from safetensors.torch import load_file

    from flowflash.images import pil_to_u8, to_unit

    d = load_file(path)
    bank = {"ids": d["ids"].to(device), "mini_p": d["mini_p"].float().to(device),
            "mini_h": (d["mini_h_q"].float() * d["mini_h_scale"].float()).to(device)}
    if images:
        f = path.parent / "images.safetensors"
        if not f.exists():
            raise SystemExit(f"{f} is missing: an adversarial arm needs real images; rerun `prepare` (it writes them)")
        im = load_file(f)
        png, off = im["png"].numpy().tobytes(), im["offsets"].tolist()
        u8 = pil_to_u8(Image.open(io.BytesIO(png[a:b])) for a, b in zip(off, off[1:]))
        if len(u8) != len(bank["ids"]):
            raise SystemExit(f"{f}: {len(u8)} images for {len(bank['ids'])} captions; rerun `prepare`")
        bank["real"] = to_unit(u8).to(device)
    return bank


class CaptionSampler:
    """Batches of the prepared captions and fresh noise (or a fixed pool of them, for tg's memoised teacher)."""

    def __init__(self, bank: dict, shape: tuple[int, ...], pool: int = 0, pool_seed: int = 5):
        self.bank, self.shape = bank, shape
        self.pool_idx = self.pool_noise = None
        if pool:
            g = torch.Generator().manual_seed(pool_seed)
            self.pool_idx = torch.randint(len(bank["ids"]), (pool,), generator=g)
            self.pool_noise = torch.randn((pool, *shape), generator=g)

    def __call__(self, n: int, gen: torch.Generator):
        from flowflash.train.data import Batch

        key = None
        if self.pool_idx is not None:
            key = torch.randint(len(self.pool_idx), (n,), generator=gen)
            idx, noise = self.pool_idx[key], self.pool_noise[key]
        else:
            idx, noise = torch.randint(len(self.bank["ids"]), (n,), generator=gen), torch.randn((n, *self.shape), generator=gen)
        dev = self.bank["ids"].device
        idx = idx.to(dev)
        real = self.bank["real"][idx] if "real" in self.bank else None
        return Batch(self.bank["ids"][idx], self.bank["mini_h"][idx], self.bank["mini_p"][idx], noise.to(dev),
                     real, None if key is None else key.to(dev))


def config(a, **kw):
    from flowflash.train.configs import DistillConfig

    base = dict(teacher=str(TEACHER), student_steps=a.student_steps, batch_size=a.batch, lr=a.lr, ema=0.99,
                device=a.device,
                precision="bf16" if a.device == "cuda" else "fp32", sample_every=0, log_every=50)
    if kw.get("method") != "tg":  # the two-player methods: the critic's rate, no adversarial heads
        base.update(lr_critic=2 * a.lr, adversarial=False)
    base.update(kw)
    return DistillConfig(**base)


def train(method, cfg, sampler, sample=None, ema_warmup: bool = True, resume: bool = False):
    from flowflash.train.common import Dist
    from flowflash.train.loop import LOOP_FIELDS, train_loop

    type(method).check_config(cfg, LOOP_FIELDS)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    return train_loop(method, sampler, cfg, Dist(), ema_warmup=ema_warmup, sample=sample, resume=resume)


def checkpoint_step(run: Path) -> int | None:
    """The step of a run's last checkpoint (train_loop's), None before its first."""
    from flowflash.train.common import checkpoint_folder

    folder = checkpoint_folder(run / "checkpoint")
    return None if folder is None else int(json.loads((folder / "state.json").read_text())["state"]["step"])


@torch.no_grad()
def eval_images(model, bank: dict, device, batch: int = 128, guidance: float = 1.0) -> torch.Tensor:
    """The eval prompts through a model folder's model: image i from seed i, its own schedule (a student: no CFG;
    the teacher: its own guidance, passed in)."""
    from flowflash.images import to_uint8
    from flowflash.methods.base import velocity
    from flowflash.sampling import sample
    from flowflash.train.data import Batch

    n, c, s = len(bank["ids"]), model.cfg.channels, model.cfg.image_size
    ts = model.cfg.sampling.timesteps()
    out = []
    for i in range(0, n, batch):
        j = torch.arange(i, min(n, i + batch))
        noise = torch.stack([torch.randn(c, s, s, generator=torch.Generator().manual_seed(int(k))) for k in j]).to(device)
        b = Batch(bank["ids"][j.to(device)], bank["mini_h"][j.to(device)], bank["mini_p"][j.to(device)], noise)
        out.append(to_uint8(sample(lambda x, t: velocity(model, x, t, b, guidance), noise, ts).float()).cpu())
    return torch.cat(out)


def baselines(a):
    """The rows every arm is judged against, drawn as the arms draw (same prepared states, image i from seed i):
    the teacher at its own 50 steps and CFG, and the common start (the `tg` student every arm starts from), on
    the eval and plain_v1 prompts. Written as ref-teacher.npz and ref-tg.npz (keys eval, plain) for `score`."""
    from flowflash.models.flow_model import load_model

    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    check_prepared(Path(a.data))
    if set(a.refs) - {"tg", "teacher"}:
        raise SystemExit(f"--refs {','.join(a.refs)}: of tg, teacher")
    banks = {k: load_bank(Path(a.data) / f"{k}.safetensors", device) for k in ("eval", "plain")}
    start = Path(a.work) / "tg" / "student"
    if not (start / "config.json").exists():
        raise SystemExit(f"{start}: no common start there (run `run` first, with this --work)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, folder in (("tg", start), ("teacher", TEACHER)):
        if name not in a.refs:
            continue
        model = load_model(folder).to(device)
        g = model.cfg.sampling.guidance if name == "teacher" else 1.0
        t = time.time()
        imgs = {k: eval_images(model, b, device, guidance=g).numpy() for k, b in banks.items()}
        save_npz(out / f"ref-{name}.npz", **imgs)
        print(f"{name}: {sum(len(v) for v in imgs.values())} images in {time.time() - t:.0f} s -> {out}", flush=True)


def common_start(a, work: Path, bank: dict, shape) -> dict:
    from flowflash.methods.dmd2 import DMD2
    from flowflash.methods.tg import TrajectoryGuidance
    from flowflash.models.flow_model import load_model

    t0 = time.time()
    teacher = load_model(TEACHER)
    tg_cfg = config(a, method="tg", out=str(work / "tg"), steps=a.tg_iters, tg_pool=a.tg_pool, tg_teacher_steps=6,
                    ckpt_every=a.tg_iters, batch_size=a.start_batch)
    student_dir = train(TrajectoryGuidance(tg_cfg, teacher), tg_cfg, CaptionSampler(bank, shape, a.tg_pool))
    t1 = time.time()
    warm_cfg = config(a, method="dmd2", out=str(work / "warm"), steps=a.warm_iters, critic_warmup=a.warm_iters,
                      init_student=str(student_dir), ckpt_every=a.warm_iters, batch_size=a.start_batch)
    train(DMD2(warm_cfg, load_model(TEACHER), load_model(student_dir)), warm_cfg, CaptionSampler(bank, shape))
    return {"tg_s": t1 - t0, "warm_s": time.time() - t1, "student": str(student_dir), "critic": str(work / "warm"),
            "batch": a.start_batch, "tg_log": last_log(work / "tg"), "warm_log": last_log(work / "warm")}


def last_log(run: Path) -> dict | None:
    """A training run's last logged row (its losses and images/s): how fast the start went, in the report."""
    f = run / "log.jsonl"
    rows = f.read_text().splitlines() if f.exists() else []
    return json.loads(rows[-1]) if rows else None


def first(bank: dict, n: int) -> dict:
    return {k: v[:n] for k, v in bank.items()}


def eval_points(points: str, updates: int) -> tuple[int, ...]:
    """The student updates at which a run draws the eval prompts (--points all, half or final)."""
    per = {"all": 4, "half": 2, "final": 1}[points]
    if updates % per:
        raise SystemExit(f"--updates {updates}: a multiple of {per} with --points {points}, so that its evaluation "
                         "points are whole updates")
    return {"all": (updates // 4, updates // 2, updates), "half": (updates // 2, updates), "final": (updates,)}[points]


def arm_run(a):
    """One arm x seed (a subprocess of `run`): train from the common start, images at three points; or one run of
    the split stage (split_low, split_high, unsplit) from the final state of arm --from-arm's run of this seed."""
    import numpy as np

    from flowflash.methods import DISTILL_METHODS
    from flowflash.models.flow_model import load_model
    from flowflash.train.run import carry_critic

    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    stage = a.arm in STAGES
    adversarial = ARMS.get(a.from_arm if stage else a.arm, {}).get("adversarial", False)
    bank = load_bank(Path(a.data) / "train.safetensors", device, images=adversarial)
    evalb = load_bank(Path(a.data) / "eval.safetensors", device)
    plain_f = Path(a.data) / "plain.safetensors"  # absent in a folder prepared before plain_v1 was added
    plainb = load_bank(plain_f, device) if plain_f.exists() else None
    work, results = Path(a.work), Path(a.results)
    if stage:
        if a.from_arm not in ARMS:
            raise SystemExit(f"--arm {a.arm} needs --from-arm, one of {', '.join(ARMS)}")
        kw, updates = dict(ARMS[a.from_arm]), a.split_updates
        start = work / f"arm{a.from_arm}-seed{a.seed}"
        student_dir, critic_dir = start / "student", start
        if a.arm != "unsplit":
            kw.update(split=a.arm.split("_")[1], split_at=a.split_at)
        wanted = () if a.arm != "unsplit" else (updates,)  # the branches are drawn as merges, by `run`
    else:
        kw, updates = dict(ARMS[a.arm]), a.updates
        student_dir, critic_dir = work / "tg" / "student", work / "warm"
        wanted = eval_points(a.points, updates)
    method_name = kw.pop("method")
    out = work / f"arm{a.arm}-seed{a.seed}"
    every = min(wanted) if wanted else 0
    if a.noise_mid and not stage:
        every = math.gcd(every, updates // 2)
    # checkpoints every --ckpt-updates (48: between the evaluation points, so a run stopped while it draws one
    # redraws it), and when `run` stops it at the budget (SIGTERM: the step in hand ends, then a checkpoint)
    cfg = config(a, method=method_name, out=str(out), seed=a.seed, steps=6 * updates, critic_ratio=5,
                 init_student=str(student_dir), init_critic=str(critic_dir), sample_every=6 * every,
                 ckpt_every=6 * min(a.ckpt_updates, updates), **kw)
    teacher = load_model(TEACHER)
    method = DISTILL_METHODS[method_name](cfg, teacher, load_model(student_dir))
    carry_critic(method, critic_dir)
    resume = a.resume and checkpoint_step(out) is not None
    images_f = results / f"images-{a.arm}-{a.seed}.npz"
    images, t0 = (dict(np.load(images_f)) if resume and images_f.exists() else {}), time.time()
    sampler = CaptionSampler(bank, (3, 64, 64))

    def sample(folder, png):
        done = int(Path(png).stem[4:]) // 6
        if a.noise_mid and not stage and done == updates // 2:
            noise_mid(method, sampler, a, results / f"noise-mid-{a.arm}-{a.seed}.json")
        if done in wanted:
            model = load_model(folder).to(device)
            images[f"u{done}"] = eval_images(model, evalb, device).numpy()
            # written at once: a run stopped at the budget keeps the points it reached
            save_npz(images_f, **images)
            if plainb is not None and done == updates:
                save_npz(results / f"plain-{a.arm}-{a.seed}.npz",
                         **{f"u{done}": eval_images(model, plainb, device).numpy()})
            if stage:  # the control is judged beside the merges: their training prompts too
                save_npz(results / f"train-{a.arm}-{a.seed}.npz",
                         **{f"u{done}": eval_images(model, first(bank, a.train_prompts), device).numpy()})

    # a split branch's EMA stays anchored to its start (as `flowflash distill` does), and so does the unsplit
    # control's: the merges and the control differ only in the split
    folder = train(method, cfg, sampler, sample=sample, ema_warmup=not stage, resume=resume)
    step = checkpoint_step(out)
    if step != cfg.steps:  # stopped at the budget: `run --resume` goes on from the checkpoint
        print(f"stopped at step {step} of {cfg.steps}", flush=True)
        raise SystemExit(3)
    if updates in wanted and f"u{updates}" not in images:  # resumed from the final checkpoint before its draw
        sample(folder, f"step{cfg.steps:06d}.png")
    write_text_atomic(results / f"run-{a.arm}-{a.seed}.json", json.dumps(
        {"arm": a.arm, "seed": a.seed, "updates": updates, "seconds": time.time() - t0, "resumed": resume,
         "iteration_s": iteration_seconds(out / "log.jsonl"),
         "config": {k: v for k, v in vars(cfg).items()}}, default=str))


def iteration_seconds(log: Path) -> float | None:
    """Seconds per training iteration from a run's log: the median over its logged intervals, so that the
    intervals holding a draw, a noise table or a resume's restart do not count (the record's `seconds` spans only
    the last call, draws included). Each arm's cost per update is 6 x this."""
    rows = [json.loads(r) for r in log.read_text().splitlines()] if log.exists() else []
    rates = sorted((b["time"] - a["time"]) / (b["step"] - a["step"]) for a, b in zip(rows, rows[1:])
                   if b["step"] > a["step"])
    return rates[len(rates) // 2] if rates else None


NOISE_ROLES = ["A_renoise", "B_sharing_start", "C_sharing_interval", "B_old_normaliser"]


def noise_mid(method, sampler, a, path: Path):
    """The gradient-noise table on a run's own student and critic at its middle (the networks are shared, not
    copied: the measurement takes gradients by autograd.grad and leaves .grad and the optimizers untouched)."""
    from flowflash.methods.diagnostics import gradient_noise
    from flowflash.methods.flash import Flash

    view = Flash.__new__(Flash)
    view.__dict__.update(method.__dict__)
    t = time.time()
    res = gradient_noise(view, sampler, NOISE_ROLES, a.noise_k, a.noise_ref, a.batch)
    res["seconds"] = time.time() - t
    write_text_atomic(path, json.dumps(res, indent=1))


@torch.no_grad()
def merges(a, work: Path, results: Path, device):
    """Every merge ratio of each seed's two split branches: held-out and training-prompt images."""
    from flowflash.methods.merge import merged
    from flowflash.models.flow_model import load_model

    bank, evalb = load_bank(Path(a.data) / "train.safetensors", device), load_bank(Path(a.data) / "eval.safetensors", device)
    done = []
    for s in a.seeds:
        low, high = (work / f"armsplit_{b}-seed{s}" / "student" for b in ("low", "high"))
        if not (low.exists() and high.exists() and (results / f"run-split_low-{s}.json").exists()
                and (results / f"run-split_high-{s}.json").exists()):
            continue
        lo, hi = load_model(low), load_model(high)
        for r in a.merge_ratios:
            m = merged(lo, hi, r).to(device)
            arm, key = f"merge_r{round(100 * r):03d}", f"u{a.split_updates}"
            save_npz(results / f"images-{arm}-{s}.npz", **{key: eval_images(m, evalb, device).numpy()})
            save_npz(results / f"train-{arm}-{s}.npz",
                     **{key: eval_images(m, first(bank, a.train_prompts), device).numpy()})
        done.append(s)
    return done


def pack(results: Path, out: Path, report: dict, seeds: list[int] | None = None):
    """Few files back from a device machine (it returns at most 8): one image file per arm (keys
    s<seed>_u<updates>), only of `seeds` (a resumed call that adds seeds returns its own: an earlier call's came
    back with it), and every run's record inside the report."""
    import numpy as np

    report["run_records"] = [json.loads(f.read_text()) for f in sorted(results.glob("run-*.json"))]
    report["noise_mid"] = {f.stem[len("noise-mid-"):]: json.loads(f.read_text())
                           for f in sorted(results.glob("noise-mid-*.json"))}
    for kind in ("images", "train", "plain"):  # held-out prompts; training prompts (the split's pick); plain_v1
        for arm in sorted({f.stem.split("-")[1] for f in results.glob(f"{kind}-*.npz")}):
            both = {}
            for f in sorted(results.glob(f"{kind}-{arm}-*.npz")):
                seed = f.stem.split("-")[2]
                if seeds is None or int(seed) in seeds:
                    both.update({f"s{seed}_{k}": v for k, v in np.load(f).items()})
            if both:
                save_npz(out / f"{kind}-{arm}.npz", **both)


def die_with_parent():
    """In an `arm` child before it starts (Linux): SIGTERM it when `run` dies, so that it checkpoints and ends
    instead of going on beside a later `run --resume` that would start a second writer on its files."""
    if sys.platform == "linux":
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_jobs(a, jobs: list, work: Path, start: float) -> list[dict]:
    """`arm` subprocesses, --parallel at a time, all killed when the run's --budget is spent."""
    running, done = [], []
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    while jobs or running:
        while jobs and len(running) < a.parallel:
            arm, s = jobs.pop(0)
            cmd = [sys.executable, __file__, "arm", "--arm", arm, "--seed", str(s), "--data", a.data, "--work",
                   str(work), "--results", str(work / "results"), "--device", a.device, "--updates", str(a.updates),
                   "--batch", str(a.batch), "--lr", str(a.lr), "--threads", str(a.threads), "--points", a.points,
                   "--student-steps", str(a.student_steps),
                   "--split-updates", str(a.split_updates), "--split-at", str(a.split_at), "--train-prompts",
                   str(a.train_prompts), "--noise-k", str(a.noise_k), "--noise-ref", str(a.noise_ref),
                   "--ckpt-updates", str(a.ckpt_updates)]
            if a.resume:
                cmd.append("--resume")
            if a.split_from:
                cmd += ["--from-arm", a.split_from]
            if a.noise_mid and s == a.seeds[0] and arm in ("A", "B", "C"):
                cmd.append("--noise-mid")
            log = open(logs / f"{arm}-{s}.log", "a")  # a resumed run adds to its first call's log
            running.append((arm, s, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                     preexec_fn=die_with_parent), log))
        time.sleep(1)
        for r in list(running):
            if r[2].poll() is not None:
                running.remove(r)
                r[3].close()
                done.append({"arm": r[0], "seed": r[1], "rc": r[2].returncode})
        if time.time() - start > a.budget:
            # SIGTERM: each run ends its step and checkpoints (train_loop's graceful stop), so `--resume` loses
            # nothing; a run still going after the grace period is killed
            for _, _, p, _ in running:
                p.terminate()
            deadline = time.time() + a.stop_grace
            for arm, s, p, log in running:
                try:
                    rc = p.wait(timeout=max(0.0, deadline - time.time()))
                    how = "stopped at the budget (checkpointed)" if rc == 3 else f"ended at the budget (rc {rc})"
                except subprocess.TimeoutExpired:
                    p.kill()
                    how = "killed at the budget"
                log.close()
                done.append({"arm": arm, "seed": s, "rc": how})
            running, jobs = [], []
    return done


def run(a):
    from flowflash.methods.diagnostics import gradient_noise
    from flowflash.methods.flash import Flash
    from flowflash.models.flow_model import load_model
    from flowflash.train.run import carry_critic

    start = time.time()
    unknown = [arm for arm in a.arms if arm not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {', '.join(unknown)}; known: {', '.join(ARMS)}")
    if any(ARMS[arm].get("adversarial") for arm in a.arms) and not (Path(a.data) / "images.safetensors").exists():
        raise SystemExit(f"--arms {','.join(a.arms)}: an adversarial arm needs {a.data}/images.safetensors "
                         "(rerun `prepare`)")
    if a.split_from and a.split_from not in a.arms:
        raise SystemExit(f"--split-from {a.split_from}: not among --arms ({', '.join(a.arms)}); the split stage starts "
                         "from that arm's final students")
    eval_points(a.points, a.updates)
    check_prepared(Path(a.data))
    device = torch.device(a.device)
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    (work / "results").mkdir(parents=True, exist_ok=True)
    bank = load_bank(Path(a.data) / "train.safetensors", device)
    shape = (3, 64, 64)
    saved = work / "report.json"  # the common start's report, for --resume
    if a.resume and saved.exists():
        done = run_rest(a, json.loads(saved.read_text()), work, out, device, start)
        print(json.dumps({"runs": done, "seconds": time.time() - start}, indent=1))
        return
    if a.resume:
        print(f"--resume: no common start in {work}; starting from scratch", flush=True)
    report = {"args": vars(a), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    report["start"] = common_start(a, work, bank, shape)
    # gradient noise on the common start, the same roles for every arm
    ncfg = config(a, method="flash", out=str(work / "noise"), init_student=str(work / "tg" / "student"),
                  init_critic=str(work / "warm"))
    m = Flash(ncfg, load_model(TEACHER), load_model(work / "tg" / "student"))
    carry_critic(m, work / "warm")
    m.to(device)
    t = time.time()
    report["noise"] = gradient_noise(m, CaptionSampler(bank, shape), NOISE_ROLES, a.noise_k, a.noise_ref, a.batch)
    report["noise"]["seconds"] = time.time() - t
    del m
    write_text_atomic(out / "protocol14.json", json.dumps(report, indent=1, default=str))
    write_text_atomic(saved, json.dumps(report, indent=1, default=str))
    done = run_rest(a, report, work, out, device, start)
    print(json.dumps({"runs": done, "seconds": time.time() - start}, indent=1))


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def check_disk(work: Path, runs: int, parallel: int):
    """Refuse to start runs the disk cannot hold (a run that dies of a full disk mid-protocol wastes its compute).
    Each run keeps a checkpoint and an export, ~1.4x the warm-up's checkpoint folder (measured: 550-590 MB against
    430 MB on the emoji teacher), and a checkpoint being written holds a second copy for a moment."""
    warm = folder_bytes(work / "warm") if (work / "warm").exists() else 0
    need = int(warm * (1.4 * runs + min(runs, parallel)))
    free = shutil.disk_usage(work).free
    if need > free:
        raise SystemExit(f"{runs} runs need about {need / 1e9:.1f} GB in {work}, and {free / 1e9:.1f} GB are free: "
                         "free some space (or run fewer seeds or arms at a time)")


def run_rest(a, report: dict, work: Path, out: Path, device, start: float) -> list[dict]:
    """Every arm x seed without a finished record, a few at a time; then the split stage from --split-from's
    finals, then its merges; then the images and records packed into --out."""
    results = work / "results"
    todo = lambda pairs: [(x, s) for x, s in pairs if not (results / f"run-{x}-{s}.json").exists()]
    arms, stages = todo([(arm, s) for s in a.seeds for arm in a.arms]), []
    if a.split_from:
        stages = todo([(st, s) for s in a.seeds for st in STAGES])
    check_disk(work, len(arms) + len(stages), a.parallel)
    done = run_jobs(a, arms, work, start)
    if a.split_from:
        done += run_jobs(a, stages, work, start)
        t = time.time()
        report["merges"] = {"seeds": merges(a, work, results, device), "ratios": a.merge_ratios,
                            "seconds": time.time() - t}
    report["calls"] = report.get("calls", []) + [{"resumed": a.resume, "runs": done, "seconds": time.time() - start}]
    report["runs"], report["seconds"] = done, time.time() - start
    pack(results, out, report, a.seeds)
    write_text_atomic(out / "protocol14.json", json.dumps(report, indent=1, default=str))
    write_text_atomic(work / "report.json", json.dumps(report, indent=1, default=str))
    return done


# ------------------------------------------------------------------ score (here: the judge and the real images)
def paired(sets: dict, x, y, gen: torch.Generator, resamples: int) -> dict | None:
    """y - x in held-out alignment over their common seeds: the per-seed differences, a 95 % bootstrap over prompts
    of the seed-averaged per-prompt differences, and the pre-registered claim (beyond twice the seed SD of the
    difference, with the interval excluding 0). x, y: (arm, point)."""
    seeds = sorted({k[1] for k in sets if (k[0], k[2]) == x} & {k[1] for k in sets if (k[0], k[2]) == y})
    if not seeds:
        return None
    get = lambda arm, s: sets[(arm[0], s, arm[1])]
    per_seed = torch.tensor([get(y, s)["align"] - get(x, s)["align"] for s in seeds])
    d = torch.stack([100 * (get(y, s)["cos"].clamp(min=0) - get(x, s)["cos"].clamp(min=0)) for s in seeds]).mean(0)
    boot = torch.stack([d[torch.randint(len(d), (len(d),), generator=gen)].mean() for _ in range(resamples)])
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975])).tolist()
    sd = per_seed.std().item() if len(seeds) > 1 else float("inf")
    mean = per_seed.mean().item()
    return {"point": y[1], "pair": f"{y[0]} - {x[0]}", "seeds": len(seeds), "align_diff": mean, "seed_sd": sd,
            "ci95": [lo, hi], "claimed": len(seeds) >= MIN_SEEDS and abs(mean) > 2 * sd and (lo > 0 or hi < 0)}


def split_table(sets: dict, train_align: dict, gen, resamples: int) -> dict:
    """The split stage: the merge ratio picked on the training captions (seed-averaged alignment), then judged
    against the unsplit control (same start, same updates) on the held-out prompts."""
    mean = lambda xs: sum(xs) / len(xs)
    sd = lambda xs: float(torch.tensor(xs).std()) if len(xs) > 1 else None
    rows = []
    for arm in sorted({k[0] for k in train_align}):
        keys = [k for k in train_align if k[0] == arm]
        tr = [train_align[k] for k in keys]
        ho = [sets[k]["align"] for k in keys if k in sets]
        rows.append({"arm": arm, "point": keys[0][2], "seeds": len(keys), "train_align": mean(tr),
                     "train_align_sd": sd(tr), "heldout_align": mean(ho), "heldout_align_sd": sd(ho),
                     "fd": mean([sets[k]["fd"] for k in keys]), "r_precision": mean([sets[k]["r_precision"] for k in keys])})
    merges_ = [r for r in rows if r["arm"].startswith("merge_")]
    control = next((r for r in rows if r["arm"] == "unsplit"), None)
    res = {"rows": rows, "picked": None, "vs_control": None}
    if merges_:
        best = max(merges_, key=lambda r: r["train_align"])
        res["picked"] = best["arm"]
        if control:
            res["vs_control"] = paired(sets, ("unsplit", control["point"]), (best["arm"], best["point"]), gen, resamples)
    return res


def versus_reference(sets: dict, arm: str, point: str, ref: dict, gen, resamples: int) -> dict:
    """An arm's seeds at one point against a single reference image set (the teacher, the common start): the FD
    ratio, and the alignment difference with a 95 % bootstrap over prompts of the seed-averaged per-prompt
    differences (the reference is one deterministic draw: no seed SD of its own)."""
    rows = [v for k, v in sets.items() if k[0] == arm and k[2] == point]
    d = torch.stack([100 * (r["cos"].clamp(min=0) - ref["cos"].clamp(min=0)) for r in rows]).mean(0)
    boot = torch.stack([d[torch.randint(len(d), (len(d),), generator=gen)].mean() for _ in range(resamples)])
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975])).tolist()
    fd = torch.tensor([r["fd"] for r in rows])
    return {"arm": arm, "point": point, "seeds": len(rows), "fd_ratio": (fd / ref["fd"]).mean().item(),
            "fd_ratio_sd": (fd / ref["fd"]).std().item() if len(rows) > 1 else None,
            "align_diff": d.mean().item(), "ci95": [lo, hi]}


def cost_table(records: list[dict]) -> list[dict]:
    """Seconds per student update by arm, from the runs' records (`iteration_s`: the median logged interval, which
    leaves out draws and restarts), the median over seeds: what the protocol's "cheapest arm" rule reads."""
    per = {}
    for r in records:
        if r.get("iteration_s"):
            per.setdefault(r["arm"], []).append(6 * r["iteration_s"])
    med = lambda xs: sorted(xs)[len(xs) // 2]
    return [{"arm": arm, "runs": len(v), "update_s": med(v)} for arm, v in sorted(per.items())]


def plain_table(plain: dict) -> list[dict]:
    """plain_v1 (prompts as people type them) at each run's end: R-prec@10 and FD per arm, mean and seed SD."""
    per = {}
    for (arm, _, point), r in sorted(plain.items()):
        per.setdefault((arm, point), []).append(r)
    sd = lambda xs: float(torch.tensor(xs).std()) if len(xs) > 1 else None
    return [{"arm": arm, "point": point, "seeds": len(v), "r_precision": sum(r["r_precision"] for r in v) / len(v),
             "r_precision_sd": sd([r["r_precision"] for r in v]), "fd": sum(r["fd"] for r in v) / len(v)}
            for (arm, point), v in sorted(per.items())]


def start_sha256(work: Path) -> str | None:
    """The common start's fingerprint: its student's and warmed critic's weight files. Runs pool across sessions
    (a fresh machine trains the start again) only when their starts are this same one."""
    import hashlib

    files = sorted((work / "tg" / "student").glob("*.safetensors")) + [work / "warm" / "checkpoint" / "critic.safetensors"]
    if not all(f.exists() for f in files):
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


KEY = "|"  # measures' set keys: arm|seed|point (JSON has no tuple keys)


@torch.no_grad()
def measure(runs: Path, data: Path, prep: Path | None = None, work: Path | None = None) -> dict:
    """Everything `score` reads of a run's images, a few kB a run (the images are MBs and do not survive a fresh
    machine; this does, committed): per image set its FD-EffNetL0, R-precision, alignment and per-prompt cosines
    (the bootstrap's unit); the split stage's training-prompt alignment; plain_v1; the references; the run records
    and noise tables of protocol14.json; and the common start's fingerprint (from --work) so that sets of
    different starts never pool."""
    import numpy as np

    from flowflash.eval.judge import encode_texts
    from flowflash.eval.metrics import frechet_distance
    from flowflash.eval.prompt_set import load_prompt_set
    from flowflash.eval.tasks import load_reference, real_images

    ref = load_reference(data, "eval_v1")
    embed_texts = lambda caps: ref.judge.scorer.embed_texts(encode_texts(ref.judge.minilm, caps))
    txt = embed_texts(ref.ps.captions)

    def one(imgs) -> dict:
        feats = ref.judge.features(torch.from_numpy(imgs))
        cos = (ref.judge.scorer.embed_images(feats) * txt).sum(-1)  # per prompt
        return {"fd": frechet_distance(feats, ref.real_feats), "align": float(100 * cos.clamp(min=0).mean()),
                "r_precision": ref.judge.alignment(feats, ref.ps.captions, ref.ps.captions)["r_precision"],
                "cos": [round(float(c), 5) for c in cos]}

    res = {"version": 1, "runs": str(runs), "start_sha256": start_sha256(work) if work else None,
           "eval_prompts": len(ref.ps.captions), "sets": {}, "train_align": {}, "plain": {}, "refs": {}}
    for f in sorted(runs.glob("images-*.npz")):
        arm = f.stem.split("-")[1]
        for key, imgs in np.load(f).items():
            seed, point = key.split("_")
            res["sets"][KEY.join((arm, seed[1:], point))] = one(imgs)
    train_files = sorted(runs.glob("train-*.npz"))
    if train_files:
        if prep is None:
            raise SystemExit(f"{runs} holds the split stage's training-prompt images: --prep names the `prepare` "
                             "folder (its meta.json lists the captions)")
        captions = json.loads((prep / "meta.json").read_text())["train_captions"]
        ttxt = None
        for f in train_files:
            arm = f.stem.split("-")[1]
            for key, imgs in np.load(f).items():
                seed, point = key.split("_")
                if ttxt is None:
                    ttxt = embed_texts(captions[:len(imgs)])
                feats = ref.judge.features(torch.from_numpy(imgs))
                cos = (ref.judge.scorer.embed_images(feats) * ttxt[:len(imgs)]).sum(-1)
                res["train_align"][KEY.join((arm, seed[1:], point))] = float(100 * cos.clamp(min=0).mean())
    plain_files = sorted(runs.glob("plain-*.npz"))
    plain_ps = load_prompt_set("plain_v1")
    plain_caps = plain_ps.captions
    if plain_files:  # the same judge; plain_v1's real images only for the FD
        plain_real = ref.judge.features(real_images(data, plain_ps))
    for f in plain_files:
        arm = f.stem.split("-")[1]
        for key, imgs in np.load(f).items():
            seed, point = key.split("_")
            feats = ref.judge.features(torch.from_numpy(imgs))
            res["plain"][KEY.join((arm, seed[1:], point))] = {
                "r_precision": ref.judge.alignment(feats, plain_caps, plain_caps)["r_precision"],
                "fd": frechet_distance(feats, plain_real)}
    # the references (`baselines`): the teacher at its 50 CFG steps and the common start, drawn as the arms are
    for f in sorted(runs.glob("ref-*.npz")):
        d = np.load(f)
        r = res["refs"][f.stem[len("ref-"):]] = one(d["eval"])
        if "plain" in d:  # R-precision needs the judge and the prompts, not plain_v1's real images
            pf = ref.judge.features(torch.from_numpy(d["plain"]))
            r["plain_r_precision"] = ref.judge.alignment(pf, plain_caps, plain_caps)["r_precision"]
    rep_f = runs / "protocol14.json"
    rep = json.loads(rep_f.read_text()) if rep_f.exists() else {}
    res["report"] = {k: rep.get(k) for k in ("run_records", "noise", "noise_mid", "start", "args")}
    return res


def same_measure(x, y, rel: float = 1e-6) -> bool:
    """Two measures of one image set: equal, numbers up to float rounding. The same images measured in two
    processes can differ in FD's last digits (EffNet's features summed in another order under other thread
    counts); a second draw of a run differs far beyond `rel`."""
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(same_measure(x[k], y[k], rel) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(same_measure(a, b, rel) for a, b in zip(x, y))
    if isinstance(x, (int, float)) and isinstance(y, (int, float)):
        return math.isclose(x, y, rel_tol=rel, abs_tol=1e-9)
    return x == y


def merge_measures(parts: list[dict]) -> dict:
    """Several sessions' measures as one: the same common start (fingerprint) and eval prompts; a set in two of
    them only with the same values (a deterministic re-run), never two draws of one arm and seed."""
    starts = {p.get("start_sha256") for p in parts}
    if len(starts) > 1:
        raise SystemExit(f"the measures come from {len(starts)} different common starts ({', '.join(map(str, starts))}):"
                         " runs of different starts do not pool")
    if len({p["eval_prompts"] for p in parts}) > 1:
        raise SystemExit("the measures were drawn on different eval prompt sets")
    out = {"start_sha256": starts.pop(), "eval_prompts": parts[0]["eval_prompts"], "runs": [p["runs"] for p in parts],
           "sets": {}, "train_align": {}, "plain": {}, "refs": {},
           "report": {"run_records": [], "noise": None, "noise_mid": {}}}
    for p in parts:
        for kind in ("sets", "train_align", "plain"):
            # a run drawn again on the same start (the split stage's session re-runs its arm) is the same draw
            # when the CPU runs are deterministic; a different value is a second draw of one key: refused
            twice = [k for k in set(out[kind]) & set(p[kind]) if not same_measure(out[kind][k], p[kind][k])]
            if twice:
                raise SystemExit(f"{kind} {', '.join(sorted(twice))}: in more than one of the measures, with "
                                 "different values")
            out[kind].update(p[kind])
        for name, r in p["refs"].items():
            out["refs"].setdefault(name, r)  # the same start draws the same references
        rep = p.get("report") or {}
        seen = {(r.get("arm"), r.get("seed")) for r in out["report"]["run_records"]}
        out["report"]["run_records"] += [r for r in rep.get("run_records") or [] if (r.get("arm"), r.get("seed")) not in seen]
        out["report"]["noise"] = out["report"]["noise"] or rep.get("noise")
        out["report"]["noise_mid"].update(rep.get("noise_mid") or {})
    return out


def score(m: dict, out: Path, resamples: int = 1000):
    """The tables and the pre-registered rule from measures (`measure`, or several sessions' merged)."""
    def unkey(d: dict, f=lambda v: v) -> dict:  # "arm|seed|point" -> (arm, seed, point)
        return {(k.split(KEY)[0], int(k.split(KEY)[1]), k.split(KEY)[2]): f(v) for k, v in d.items()}

    with_cos = lambda v: {**v, "cos": torch.tensor(v["cos"])}
    sets, train_align = unkey(m["sets"], with_cos), unkey(m["train_align"])
    stage_arm = lambda arm: arm.startswith("merge_") or arm in STAGES
    points = sorted({k[2] for k in sets if not stage_arm(k[0])}, key=lambda p: int(p[1:]))
    arms = sorted({k[0] for k in sets if not stage_arm(k[0])})
    table, claims = [], []
    gen = torch.Generator().manual_seed(0)
    for point in points:
        for arm in arms:
            rows = [v for k, v in sets.items() if k[0] == arm and k[2] == point]
            fd, al = torch.tensor([r["fd"] for r in rows]), torch.tensor([r["align"] for r in rows])
            rp = torch.tensor([r["r_precision"] for r in rows])
            sd = lambda x: x.std().item() if len(rows) > 1 else None
            table.append({"point": point, "arm": arm, "seeds": len(rows), "fd": fd.mean().item(), "fd_sd": sd(fd),
                          "align": al.mean().item(), "align_sd": sd(al), "r_precision": rp.mean().item(),
                          "r_precision_sd": sd(rp)})
        for x, y in [(p, q) for i, p in enumerate(arms) for q in arms[i + 1:]]:
            c = paired(sets, (x, point), (y, point), gen, resamples)
            if c:
                claims.append({**c, "primary": point == points[-1]})  # the rule's point; earlier ones describe
    split = split_table(sets, train_align, gen, resamples) if train_align else None
    plain = plain_table(unkey(m["plain"])) if m["plain"] else None
    refs, versus = {k: with_cos(v) for k, v in m["refs"].items()}, []
    if refs and points:
        last = points[-1]
        versus = [{"reference": name, **versus_reference(sets, arm, last, r, gen, resamples)}
                  for name, r in refs.items() for arm in arms]
    rep = m.get("report") or {}
    costs = cost_table(rep.get("run_records") or [])
    res = {"table": table, "claims": claims, "split": split, "plain_v1": plain, "runs": m["runs"], "costs": costs,
           "start_sha256": m.get("start_sha256"),
           "references": {k: {x: y for x, y in v.items() if x != "cos"} for k, v in refs.items()}, "versus": versus}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    claim_md = lambda c: (f"| {c['point']}{' (primary)' if c.get('primary') else ''} | {c['pair']} | {c['seeds']} | {c['align_diff']:+.2f} | {c['seed_sd']:.2f} | "
                          f"[{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}] | {'yes' if c['claimed'] else 'no'} |")
    claim_head = ["| point | difference | seeds | alignment diff | seed SD | bootstrap 95 % | claimed |",
                  "|---|---|---|---|---|---|---|"]
    md = ["| point | arm | seeds | FD-EffNetL0 (SD) | alignment (SD) | R-prec@10 (SD) |", "|---|---|---|---|---|---|"]
    md += [f"| {r['point']} | {r['arm']} | {r['seeds']} | {r['fd']:.1f} ({r['fd_sd'] or 0:.1f}) | "
           f"{r['align']:.2f} ({r['align_sd'] or 0:.2f}) | {r['r_precision']:.3f} ({r['r_precision_sd'] or 0:.3f}) |"
           for r in table]
    md += ["", *claim_head, *map(claim_md, claims)]
    if split:
        md += ["", f"Split stage: merge ratio picked on the training captions: **{split['picked']}**.", "",
               "| run | seeds | training alignment (SD) | held-out alignment (SD) | FD-EffNetL0 | R-prec@10 |",
               "|---|---|---|---|---|---|"]
        md += [f"| {r['arm']} | {r['seeds']} | {r['train_align']:.2f} ({r['train_align_sd'] or 0:.2f}) | "
               f"{r['heldout_align']:.2f} ({r['heldout_align_sd'] or 0:.2f}) | {r['fd']:.1f} | {r['r_precision']:.3f} |"
               for r in split["rows"]]
        if split["vs_control"]:
            md += ["", *claim_head, claim_md(split["vs_control"])]
    if plain:
        md += ["", "plain_v1 (70 prompts as people type them), at each run's end:", "",
               "| point | arm | seeds | R-prec@10 (SD) | FD-EffNetL0 |", "|---|---|---|---|---|"]
        md += [f"| {r['point']} | {r['arm']} | {r['seeds']} | {r['r_precision']:.3f} ({r['r_precision_sd'] or 0:.3f}) | "
               f"{r['fd']:.1f} |" for r in plain]
    if refs:
        md += ["", "References, drawn as the arms are (`baselines`): the teacher at 50 steps with CFG, the common "
               "start (`tg`):", "", "| reference | FD-EffNetL0 | alignment | R-prec@10 | plain_v1 R-prec@10 |",
               "|---|---|---|---|---|"]
        md += [f"| {k} | {v['fd']:.1f} | {v['align']:.2f} | {v['r_precision']:.3f} | "
               f"{v.get('plain_r_precision', float('nan')):.3f} |" for k, v in refs.items()]
        md += ["", "| arm | point | against | seeds | FD ratio (SD) | alignment diff | bootstrap 95 % |",
               "|---|---|---|---|---|---|---|"]
        md += [f"| {v['arm']} | {v['point']} | {v['reference']} | {v['seeds']} | {v['fd_ratio']:.3f} "
               f"({v['fd_ratio_sd'] or 0:.3f}) | {v['align_diff']:+.2f} | [{v['ci95'][0]:+.2f}, {v['ci95'][1]:+.2f}] |"
               for v in versus]
    if costs:
        md += ["", "Cost per student update (5 critic and 1 student iterations; the median logged interval of each run, "
               "then the median over its seeds):", "", "| arm | runs | s / update |", "|---|---|---|"]
        md += [f"| {c['arm']} | {c['runs']} | {c['update_s']:.2f} |" for c in costs]
    if rep.get("noise") or rep.get("noise_mid"):  # the gradient-noise tables: the common start, each primary arm's middle
        tables = {"common start": rep.get("noise"), **{f"middle of {k}": v for k, v in rep.get("noise_mid", {}).items()}}
        md += ["", "| roles | matching | SNR | cos(draw, ref) (SD) | cos(mean, ref) |", "|---|---|---|---|---|"]
        md += [f"| {where} | {name} | {r['snr']:.3f} | {r['cos_draw_to_ref']:.3f} ({r['cos_draw_to_ref_sd']:.3f}) | "
               f"{r['cos_mean_to_ref']:.3f} |" for where, t in tables.items() if t for name, r in t["arms"].items()]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--data", type=Path, default=Path("data/emoji64"))
    p.add_argument("--captions", type=int, default=1000)
    p.add_argument("--to", type=Path, required=True)
    for name in ("run", "arm"):
        r = sub.add_parser(name)
        r.add_argument("--data", required=True)
        r.add_argument("--work", default="/tmp/p14-work")
        r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        r.add_argument("--updates", type=int, default=256, help="student updates per arm run (x6 iterations; the protocol asks at least 250)")
        r.add_argument("--batch", type=int, default=64)
        r.add_argument("--student-steps", type=int, default=4, choices=[4, 2],
                       help="the students' step count, common start included (the protocol's 4-step and 2-step rows; "
                            "one count per run, each in its own --work and --out)")
        r.add_argument("--lr", type=float, default=1e-4)
        r.add_argument("--threads", type=int, default=1, help="torch threads per process")
        r.add_argument("--points", choices=["all", "half", "final"], default="all",
                       help="eval images at 1/4, 1/2 and all updates, at 1/2 and all, or only at the end (what comes "
                            "back from a device machine is at most 64 MB, 16 MiB a file: ~2.5 MB per run and point)")
        r.add_argument("--noise-k", type=int, default=16)
        r.add_argument("--noise-ref", type=int, default=256)
        r.add_argument("--split-updates", type=int, default=100, help="student updates of each split-stage run")
        r.add_argument("--split-at", type=float, default=0.5, help="low branch: student times t <= this")
        r.add_argument("--train-prompts", type=int, default=256,
                       help="training captions the split stage's runs also draw (the merge ratio's pick)")
        r.add_argument("--ckpt-updates", type=int, default=48, help="an arm run checkpoints every this many updates")
        r.add_argument("--resume", action="store_true",
                       help="go on from --work: the common start as saved, each unfinished run from its checkpoint")
        if name == "run":
            r.add_argument("--out", required=True)
            r.add_argument("--arms", type=lambda s: s.split(","), default=["A", "B", "C"],
                           help=f"comma-separated, of {', '.join(ARMS)} (the last three: secondary arms)")
            r.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2, 3])
            # the common start: 128,000 captions each for tg and the critic's warm-up, at a batch that keeps a GPU
            # busy (at batch 64 it took 371 s of an 8-minute H200 session, bound by kernel launches: stop 27)
            r.add_argument("--tg-iters", type=int, default=500)
            r.add_argument("--tg-pool", type=int, default=2048)
            r.add_argument("--warm-iters", type=int, default=500)
            r.add_argument("--start-batch", type=int, default=256, help="batch of the common start's tg and warm-up")
            r.add_argument("--noise-mid", action=argparse.BooleanOptionalAction, default=True,
                           help="the noise table again at the middle of the first seed's A, B and C runs")
            r.add_argument("--split-from", choices=list(ARMS), help="run the split-timestep stage from this arm")
            r.add_argument("--merge-ratios", type=lambda s: [float(x) for x in s.split(",")], default=list(MERGE_RATIOS))
            r.add_argument("--parallel", type=int, default=6, help="arm runs at a time")
            r.add_argument("--budget", type=float, default=440,
                           help="seconds; runs still going then are stopped (they checkpoint) and the rest is packed")
            r.add_argument("--stop-grace", type=float, default=25,
                           help="seconds a run stopped at the budget has to checkpoint before it is killed")
        else:
            r.add_argument("--arm", choices=[*ARMS, *STAGES], required=True)
            r.add_argument("--from-arm", choices=list(ARMS), help="the split stage's start (with --arm split_*/unsplit)")
            r.add_argument("--noise-mid", action="store_true")
            r.add_argument("--seed", type=int, required=True)
            r.add_argument("--results", required=True)
    b = sub.add_parser("baselines", help="the teacher's and the common start's images, beside a run's --out")
    b.add_argument("--data", required=True)
    b.add_argument("--work", required=True, help="the run's --work (its common start)")
    b.add_argument("--out", required=True, help="the run's --out (score reads ref-*.npz there)")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--refs", type=lambda s: s.split(","), default=["tg", "teacher"],
                   help="which references: tg (the common start, ~1 min on a CPU core) and teacher (50 CFG steps, "
                        "the same on every start: ~25 min of a CPU core)")
    for name in ("measure", "score"):
        s = sub.add_parser(name, help={"measure": "what score reads of a run's images, a few kB to commit",
                                       "score": "the tables and the rule, from a run's images or from measures"}[name])
        s.add_argument("--runs", type=Path, required=name == "measure", help="a run's --out (its images)")
        s.add_argument("--data", type=Path, default=Path("data/emoji64"))
        s.add_argument("--prep", type=Path, help="the `prepare` folder (needed when the runs include the split stage)")
        s.add_argument("--work", type=Path, help="the run's --work: the common start's fingerprint goes with the measures")
        if name == "measure":
            s.add_argument("--to", type=Path, required=True, help="the measures' JSON file")
        else:
            s.add_argument("--measures", type=Path, nargs="+", help="measures files (several sessions' runs of one "
                           "common start), instead of --runs")
            s.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.data, a.captions, a.to)
    elif a.cmd == "run":
        run(a)
    elif a.cmd == "arm":
        arm_run(a)
    elif a.cmd == "baselines":
        baselines(a)
    elif a.cmd == "measure":
        write_text_atomic(a.to, json.dumps(measure(a.runs, a.data, a.prep, a.work)))
        print(f"measures of {a.runs} -> {a.to}")
    else:
        if bool(a.runs) == bool(a.measures):
            raise SystemExit("score: either --runs (a run's images) or --measures (measures files)")
        parts = [json.loads(f.read_text()) for f in a.measures] if a.measures else [measure(a.runs, a.data, a.prep, a.work)]
        score(merge_measures(parts), a.out)


if __name__ == "__main__":
    main()
