"""Issue 14's pre-registered protocol (docs/benchmarks.md), end to end, on the shipped emoji teacher.

    python scripts/protocol14.py prepare --data data/emoji64 --to p14-data        # here: captions -> MiniLM states
    python scripts/protocol14.py run --data p14-data --out $OUT --device cuda      # a GPU (or the CPU, smaller)
    python scripts/protocol14.py score --runs $OUT --data data/emoji64 --out docs/bench/protocol14   # here

`prepare` encodes a fixed sample of training captions and the eval_v1 prompts with MiniLM (which cannot travel
to a GPU machine: 90 MB against a 64 MiB limit), int8 per token (a few MB; every arm sees the same states).
`run` trains the common start (a `tg` student, then a critic warmed on it), then every arm x seed from that
start (subprocesses, `--parallel` at a time), with adversarial heads off; each writes the EMA student's images
for the eval prompts (image i from seed i) at 1/4, 1/2 and all of its updates, and the gradient-noise table is
measured on the common start. No distillation step needs a corpus image. `score` computes FD-EffNetL0,
R-precision and the per-prompt alignment of every image set, the seed spread, the bootstrap over prompts of
the seed-averaged per-prompt differences, and applies the pre-registered rule (a difference is claimed when it
exceeds twice the seed SD of the difference and its 95 % bootstrap interval excludes 0). The secondary arms are
`--arms B_matching,B_uniform,B_teacher` (B with fix 2 off, fix 4 off, the teacher's critic times). Not yet in it:
the adversarial secondary arm (it needs corpus images on the device), the noise table at mid-run, the
split-timestep stage, plain_v1.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
TEACHER = ROOT / "src" / "flowflash" / "weights" / "emoji-teacher"
_B = {"method": "flash", "timestep_sharing": True, "match_point": "start"}
ARMS = {  # the protocol's arms as DistillConfig settings (names without '-': file names are images-ARM-SEED)
    "A": {"method": "dmd2"}, "B": _B, "C": {**_B, "match_point": "interval"},
    # secondary arms: B with one fix undone or changed (the adversarial arm needs corpus images: not here yet)
    "B_matching": {**_B, "dm_norm": "matching"}, "B_uniform": {**_B, "critic_t": "uniform"},
    "B_teacher": {**_B, "critic_t": "teacher"}}


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
    (to / "meta.json").write_text(json.dumps({"train_captions": train, "eval_set": ps.name, "eval_sha": ps.sha,
                                              "seed": seed, "teacher": str(TEACHER)}, indent=1))
    print(f"{len(train)} training captions and {len(ps.captions)} eval prompts -> {to}")


# ------------------------------------------------------------------ run (a GPU or the CPU)
def load_bank(path: Path, device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    d = load_file(path)
    return {"ids": d["ids"].to(device), "mini_p": d["mini_p"].float().to(device),
            "mini_h": (d["mini_h_q"].float() * d["mini_h_scale"].float()).to(device)}


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
        return Batch(self.bank["ids"][idx], self.bank["mini_h"][idx], self.bank["mini_p"][idx], noise.to(dev),
                     None, None if key is None else key.to(dev))


def config(a, **kw):
    from flowflash.train.configs import DistillConfig

    base = dict(teacher=str(TEACHER), student_steps=4, batch_size=a.batch, lr=a.lr, ema=0.99, device=a.device,
                precision="bf16" if a.device == "cuda" else "fp32", sample_every=0, log_every=50)
    if kw.get("method") != "tg":  # the two-player methods: the critic's rate, no adversarial heads
        base.update(lr_critic=2 * a.lr, adversarial=False)
    base.update(kw)
    return DistillConfig(**base)


def train(method, cfg, sampler, sample=None):
    from flowflash.train.common import Dist
    from flowflash.train.loop import LOOP_FIELDS, train_loop

    type(method).check_config(cfg, LOOP_FIELDS)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    return train_loop(method, sampler, cfg, Dist(), ema_warmup=True, sample=sample)


@torch.no_grad()
def eval_images(model, bank: dict, device, batch: int = 128) -> torch.Tensor:
    """The eval prompts through a student folder's model: image i from seed i, its own schedule, no CFG."""
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
        out.append(to_uint8(sample(lambda x, t: velocity(model, x, t, b), noise, ts).float()).cpu())
    return torch.cat(out)


def common_start(a, work: Path, bank: dict, shape) -> dict:
    from flowflash.methods.dmd2 import DMD2
    from flowflash.methods.tg import TrajectoryGuidance
    from flowflash.models.flow_model import load_model

    t0 = time.time()
    teacher = load_model(TEACHER)
    tg_cfg = config(a, method="tg", out=str(work / "tg"), steps=a.tg_iters, tg_pool=a.tg_pool, tg_teacher_steps=6,
                    ckpt_every=a.tg_iters)
    student_dir = train(TrajectoryGuidance(tg_cfg, teacher), tg_cfg, CaptionSampler(bank, shape, a.tg_pool))
    t1 = time.time()
    warm_cfg = config(a, method="dmd2", out=str(work / "warm"), steps=a.warm_iters, critic_warmup=a.warm_iters,
                      init_student=str(student_dir), ckpt_every=a.warm_iters)
    train(DMD2(warm_cfg, load_model(TEACHER), load_model(student_dir)), warm_cfg, CaptionSampler(bank, shape))
    return {"tg_s": t1 - t0, "warm_s": time.time() - t1, "student": str(student_dir), "critic": str(work / "warm")}


def arm_run(a):
    """One arm x seed (a subprocess of `run`): train from the common start, images at three points."""
    import numpy as np

    from flowflash.methods import DISTILL_METHODS
    from flowflash.models.flow_model import load_model
    from flowflash.train.run import carry_critic

    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    bank, evalb = load_bank(Path(a.data) / "train.safetensors", device), load_bank(Path(a.data) / "eval.safetensors", device)
    kw = dict(ARMS[a.arm])
    method_name = kw.pop("method")
    work = Path(a.work)
    out = work / f"arm{a.arm}-seed{a.seed}"
    every = a.updates if a.points == "final" else max(1, a.updates // 4)
    cfg = config(a, method=method_name, out=str(out), seed=a.seed, steps=6 * a.updates, critic_ratio=5,
                 init_student=str(work / "tg" / "student"), init_critic=str(work / "warm"), sample_every=6 * every,
                 ckpt_every=6 * a.updates, **kw)
    teacher = load_model(TEACHER)
    method = DISTILL_METHODS[method_name](cfg, teacher, load_model(work / "tg" / "student"))
    carry_critic(method, work / "warm")
    images, t0 = {}, time.time()

    wanted = (a.updates,) if a.points == "final" else (a.updates // 4, a.updates // 2, a.updates)

    def sample(folder, png):
        updates = int(Path(png).stem[4:]) // 6
        if updates in wanted:
            images[f"u{updates}"] = eval_images(load_model(folder).to(device), evalb, device).numpy()
            # written at once: a run stopped at the budget keeps the points it reached
            np.savez_compressed(Path(a.results) / f"images-{a.arm}-{a.seed}.npz", **images)

    train(method, cfg, CaptionSampler(bank, (3, 64, 64)), sample=sample)
    (Path(a.results) / f"run-{a.arm}-{a.seed}.json").write_text(json.dumps(
        {"arm": a.arm, "seed": a.seed, "updates": a.updates, "seconds": time.time() - t0,
         "config": {k: v for k, v in vars(cfg).items()}}, default=str))


def pack(results: Path, out: Path, report: dict):
    """Few files back from a device machine (it returns at most 8): one image file per arm (keys
    s<seed>_u<updates>) and every run's record inside the report."""
    import numpy as np

    report["run_records"] = [json.loads(f.read_text()) for f in sorted(results.glob("run-*.json"))]
    for arm in sorted({f.stem.split("-")[1] for f in results.glob("images-*.npz")}):
        merged = {}
        for f in sorted(results.glob(f"images-{arm}-*.npz")):
            seed = f.stem.split("-")[2]
            merged.update({f"s{seed}_{k}": v for k, v in np.load(f).items()})
        np.savez_compressed(out / f"images-{arm}.npz", **merged)


def run(a):
    from flowflash.methods.diagnostics import gradient_noise
    from flowflash.methods.flash import Flash
    from flowflash.models.flow_model import load_model
    from flowflash.train.run import carry_critic

    start = time.time()
    unknown = [arm for arm in a.arms if arm not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {', '.join(unknown)}; known: {', '.join(ARMS)}")
    if a.points == "all" and a.updates % 4:
        raise SystemExit(f"--updates {a.updates}: a multiple of 4, so that 1/4 and 1/2 of it are evaluation points")
    device = torch.device(a.device)
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    (work / "results").mkdir(parents=True, exist_ok=True)
    bank = load_bank(Path(a.data) / "train.safetensors", device)
    shape = (3, 64, 64)
    report = {"args": vars(a), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    report["start"] = common_start(a, work, bank, shape)
    # gradient noise on the common start, the same roles for every arm
    ncfg = config(a, method="flash", out=str(work / "noise"), init_student=str(work / "tg" / "student"),
                  init_critic=str(work / "warm"))
    m = Flash(ncfg, load_model(TEACHER), load_model(work / "tg" / "student"))
    carry_critic(m, work / "warm")
    m.to(device)
    t = time.time()
    report["noise"] = gradient_noise(m, CaptionSampler(bank, shape), ["A_renoise", "B_sharing_start",
                                     "C_sharing_interval", "B_old_normaliser"], a.noise_k, a.noise_ref, a.batch)
    report["noise"]["seconds"] = time.time() - t
    del m
    (out / "protocol14.json").write_text(json.dumps(report, indent=1, default=str))
    # every arm x seed, a few at a time
    jobs = [(arm, s) for s in a.seeds for arm in a.arms]
    running, done = [], []
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    while jobs or running:
        while jobs and len(running) < a.parallel:
            arm, s = jobs.pop(0)
            cmd = [sys.executable, __file__, "arm", "--arm", arm, "--seed", str(s), "--data", a.data, "--work",
                   str(work), "--results", str(work / "results"), "--device", a.device, "--updates", str(a.updates),
                   "--batch", str(a.batch), "--lr", str(a.lr), "--threads", str(a.threads), "--points", a.points]
            log = open(logs / f"{arm}-{s}.log", "w")
            running.append((arm, s, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        time.sleep(1)
        for r in list(running):
            if r[2].poll() is not None:
                running.remove(r)
                r[3].close()
                done.append({"arm": r[0], "seed": r[1], "rc": r[2].returncode})
        if time.time() - start > a.budget:
            for arm, s, p, log in running:
                p.kill()
                done.append({"arm": arm, "seed": s, "rc": "killed at the budget"})
            running, jobs = [], []
    report["runs"], report["seconds"] = done, time.time() - start
    pack(work / "results", out, report)
    (out / "protocol14.json").write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({"runs": done, "seconds": report["seconds"]}, indent=1))


# ------------------------------------------------------------------ score (here: the judge and the real images)
@torch.no_grad()
def score(runs: Path, data: Path, out: Path, resamples: int = 1000):
    import numpy as np

    from flowflash.eval.judge import encode_texts
    from flowflash.eval.metrics import frechet_distance
    from flowflash.eval.tasks import load_reference

    ref = load_reference(data, "eval_v1")
    txt = ref.judge.scorer.embed_texts(encode_texts(ref.judge.minilm, ref.ps.captions))
    sets = {}
    for f in sorted(runs.glob("images-*.npz")):
        arm = f.stem.split("-")[1]
        for key, imgs in np.load(f).items():
            seed, point = key.split("_")
            seed = seed[1:]
            feats = ref.judge.features(torch.from_numpy(imgs))
            img = ref.judge.scorer.embed_images(feats)
            cos = (img * txt).sum(-1)  # per prompt
            sets[(arm, int(seed), point)] = {"fd": frechet_distance(feats, ref.real_feats), "cos": cos,
                                             "align": float(100 * cos.clamp(min=0).mean()),
                                             "r_precision": ref.judge.alignment(feats, ref.ps.captions,
                                                                                ref.ps.captions)["r_precision"]}
    points = sorted({k[2] for k in sets}, key=lambda p: int(p[1:]))
    arms = sorted({k[0] for k in sets})
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
            seeds = sorted({k[1] for k in sets if k[0] == x and k[2] == point} & {k[1] for k in sets if k[0] == y and k[2] == point})
            if not seeds:
                continue
            per_seed = torch.tensor([sets[(y, s, point)]["align"] - sets[(x, s, point)]["align"] for s in seeds])
            d = torch.stack([100 * (sets[(y, s, point)]["cos"].clamp(min=0) - sets[(x, s, point)]["cos"].clamp(min=0))
                             for s in seeds]).mean(0)  # per prompt, over seeds
            boot = torch.stack([d[torch.randint(len(d), (len(d),), generator=gen)].mean() for _ in range(resamples)])
            lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975])).tolist()
            sd = per_seed.std().item() if len(seeds) > 1 else float("inf")
            mean = per_seed.mean().item()
            claims.append({"point": point, "pair": f"{y} - {x}", "seeds": len(seeds), "align_diff": mean,
                           "seed_sd": sd, "ci95": [lo, hi],
                           "claimed": abs(mean) > 2 * sd and (lo > 0 or hi < 0)})
    res = {"table": table, "claims": claims, "runs": str(runs)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    md = ["| point | arm | seeds | FD-EffNetL0 (SD) | alignment (SD) | R-prec@10 (SD) |", "|---|---|---|---|---|---|"]
    md += [f"| {r['point']} | {r['arm']} | {r['seeds']} | {r['fd']:.1f} ({r['fd_sd'] or 0:.1f}) | "
           f"{r['align']:.2f} ({r['align_sd'] or 0:.2f}) | {r['r_precision']:.3f} ({r['r_precision_sd'] or 0:.3f}) |"
           for r in table]
    md += ["", "| point | difference | seeds | alignment diff | seed SD | bootstrap 95 % | claimed |", "|---|---|---|---|---|---|---|"]
    md += [f"| {c['point']} | {c['pair']} | {c['seeds']} | {c['align_diff']:+.2f} | {c['seed_sd']:.2f} | "
           f"[{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}] | {'yes' if c['claimed'] else 'no'} |" for c in claims]
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
        r.add_argument("--updates", type=int, default=250, help="student updates per arm run (x6 iterations)")
        r.add_argument("--batch", type=int, default=64)
        r.add_argument("--lr", type=float, default=1e-4)
        r.add_argument("--threads", type=int, default=1, help="torch threads per process")
        r.add_argument("--points", choices=["all", "final"], default="all",
                       help="eval images at 1/4, 1/2 and all updates, or only at the end (smaller: what comes back "
                            "from a device machine is at most 64 MB: ~2.5 MB per run and point)")
        if name == "run":
            r.add_argument("--out", required=True)
            r.add_argument("--arms", type=lambda s: s.split(","), default=["A", "B", "C"],
                           help=f"comma-separated, of {', '.join(ARMS)} (the last three: secondary arms)")
            r.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2, 3])
            r.add_argument("--tg-iters", type=int, default=2000)
            r.add_argument("--tg-pool", type=int, default=2048)
            r.add_argument("--warm-iters", type=int, default=2000)
            r.add_argument("--noise-k", type=int, default=16)
            r.add_argument("--noise-ref", type=int, default=256)
            r.add_argument("--parallel", type=int, default=6, help="arm runs at a time")
            r.add_argument("--budget", type=float, default=440, help="seconds; runs still going then are killed")
        else:
            r.add_argument("--arm", choices=list(ARMS), required=True)
            r.add_argument("--seed", type=int, required=True)
            r.add_argument("--results", required=True)
    s = sub.add_parser("score")
    s.add_argument("--runs", type=Path, required=True)
    s.add_argument("--data", type=Path, default=Path("data/emoji64"))
    s.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.data, a.captions, a.to)
    elif a.cmd == "run":
        run(a)
    elif a.cmd == "arm":
        arm_run(a)
    else:
        score(a.runs, a.data, a.out)


if __name__ == "__main__":
    main()
