"""Issue 15's plain_v1 row at GPU scale: the default student's recipe (`dmd2`, 4 + 2 steps) with a budget the CPU
cannot give, on a device machine, which cannot run MiniLM (its 90 MB do not fit the 64 MiB a call carries).

    python scripts/device15.py prepare --data data/emoji64-wide --to .whl/d15               # here: texts -> states
    python scripts/device15.py run --data .whl/d15 --out $OUT --budget 420                  # the device (or a CPU)
    python scripts/device15.py unpack --runs FILES_AT --to runs/d15                        # here

`prepare` draws training texts as the product is used (singles two rows in three, from every concept, half of them
in another phrasing; the held-out concepts' plain phrasings left out) and completes each with the shipped student's
default style ("a dog face" -> "a dog face, twemoji style"), as `generate` draws it; student and teacher read the
same text. It stores their MiniLM states int8 per token (~10 KB a text: 900 texts, the default, are what the 64 MiB
leave beside the tracked tree and the diffusers wheel).
`run` trains the runs of `RUNS` side by side (subprocesses; each is bound by kernel launches at batch 64, so they
share one GPU), stops them all at `--budget` seconds (SIGTERM: the step in hand ends, the EMA student is exported),
and writes each run's student int8 in shards small enough to come back (~21 MB a run), with its step count and last
logged rows, to --out. Nothing is judged on the device: `unpack` gives model folders that the usual tools measure
here (`scripts/split_by_concepts.py` on fresh seeds, `scripts/pick_students.py`, `scripts/bench-students-v5.sh`).

The device session (docs/benchmarks.md, "Issue 15 on a device: the rule, written before any run"), prepared here:
    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1                       # 6.4 MB
    python scripts/device15.py prepare --to .whl/d15                                       # 9.2 MB
then, through the device tool with carry [".whl"] and timeout_s 560:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/diffusers-*.whl && \
    PYTHONPATH=/tmp/site:src python3 scripts/device15.py run --data .whl/d15 --out $OUT --budget 420
A dry run here (stop 32): `run --device cpu --batch 2 --budget 90 --log-every 2` (~230 iterations a run).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
_spec = importlib.util.spec_from_file_location("protocol14", ROOT / "scripts" / "protocol14.py")
p14 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(p14)  # the caption bank, the sampler, the config and the loop call are issue 14's

STUDENT = ROOT / "src" / "flowflash" / "weights" / "emoji-student"
TWO_STEP = [1.0, 1 / 3, 0.0]  # the shipped student's 2-step times (its last step starts where the 4-step one's does)
RUNS = {  # DistillConfig settings beyond p14.config's (batch, lr, bf16 on cuda, adversarial heads off)
    # the shipped recipe's 4 + 2-step student from the teacher, at the device's budget
    "scale": {},
    # the shipped student trained on: the critic (a teacher copy) first learns the student's samples
    "cont": {"init_student": str(STUDENT), "critic_warmup": 300},
}
RETURN_SHARD = 12 * 1024 * 1024  # a file that comes back from the device may hold 16 MiB


# ------------------------------------------------------------------ prepare (here: needs MiniLM)
def draw_texts(data: Path, n: int, seed: int = 0, p_single: float = 0.67, p_phrasing: float = 0.5) -> list[str]:
    """n distinct training texts drawn as the product is used, each completed with the student's default style.
    The held-out concepts' plain phrasings are left out as the shipped recipe leaves them out; completed, each is
    also a styled phrasing of the concept's trained style, so that the texts are those the shipped recipe draws."""
    from flowflash.data.dataset import read_manifest
    from flowflash.models.flow_model import read_config
    from flowflash.train.data import heldout_plain_texts

    rows = [r for r in read_manifest(data) if r["split"] == "train"]
    singles = [r for r in rows if r["kind"] == "single"]
    scenes = [r for r in rows if r["kind"] != "single"]
    if not singles or not scenes:
        raise SystemExit(f"{data}: needs single and scene rows in its training split")
    if not any(r.get("phrasings") for r in singles):
        raise SystemExit(f"{data} lists no phrasings: rebuild it with `flowflash data build`")
    held = heldout_plain_texts(data)
    sampling = read_config(STUDENT).sampling
    if sampling.default_style is None:
        raise SystemExit(f"{STUDENT} names no default style: the texts would not be drawn as `generate` draws them")
    g = torch.Generator().manual_seed(seed)
    pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=g))]
    texts: dict[str, None] = {}
    for _ in range(50 * n):  # bounded: a small corpus may hold fewer than n distinct texts
        if len(texts) == n:
            break
        if float(torch.rand(1, generator=g)) < p_single:
            row = pick(singles)
            other = [p for p in row.get("phrasings", [])[1:] if p not in held]
            text = pick(other) if other and float(torch.rand(1, generator=g)) < p_phrasing else row["caption"]
        else:
            text = pick(scenes)["caption"]
        texts[sampling.complete(text)] = None
    if len(texts) < n:
        raise SystemExit(f"{data}: only {len(texts)} distinct texts in {50 * n} draws; ask fewer (--texts)")
    return list(texts)


def prepare(data: Path, n: int, to: Path, seed: int = 0):
    from safetensors.torch import save_file

    from flowflash.models.flow_model import read_config

    texts = draw_texts(data, n, seed)
    cfg = read_config(p14.TEACHER)
    to.mkdir(parents=True, exist_ok=True)
    save_file(p14.encode(texts, cfg.vocab, cfg), to / "train.safetensors")
    (to / "meta.json").write_text(json.dumps({"texts": texts, "data": str(data), "seed": seed,
                                              "vocab_sha": p14.vocab_sha(cfg.vocab)}, indent=1))
    kb = (to / "train.safetensors").stat().st_size / 1e3
    print(f"{len(texts)} texts ({kb:.0f} kB) -> {to}")


def check_prepared(data: Path):
    from flowflash.models.flow_model import read_config

    meta = data / "meta.json"
    if not meta.exists() or not (data / "train.safetensors").exists():
        raise SystemExit(f"{data}: not a `prepare` folder (meta.json and train.safetensors)")
    if json.loads(meta.read_text())["vocab_sha"] != p14.vocab_sha(read_config(p14.TEACHER).vocab):
        raise SystemExit(f"{data} was prepared for another teacher vocabulary: run `prepare` again")


# ------------------------------------------------------------------ run (the device)
def child(a):
    """One run: dmd2 until SIGTERM (or --steps), then its EMA student int8 in returnable shards."""
    from flowflash.methods.dmd2 import DMD2
    from flowflash.models.flow_model import load_model
    from flowflash.release.card import convert

    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    bank = p14.load_bank(Path(a.data) / "train.safetensors", device)
    work = Path(a.work) / a.name
    extra = dict(RUNS[a.name])
    cfg = p14.config(a, method="dmd2", out=str(work), seed=a.seed, steps=a.steps, critic_ratio=2,
                     also_steps=[2], also_times=[TWO_STEP], ema=a.ema, ckpt_every=a.steps, log_every=a.log_every,
                     **extra)
    teacher = load_model(p14.TEACHER)
    student = load_model(Path(extra["init_student"])) if "init_student" in extra else None
    t0 = time.time()
    folder = p14.train(DMD2(cfg, teacher, student), cfg, p14.CaptionSampler(bank, (3, 64, 64)),
                       resume=p14.checkpoint_step(work) is not None)
    seconds = time.time() - t0
    dest = Path(a.out) / a.name
    if dest.exists():
        shutil.rmtree(dest)
    convert(folder, dest, "int8", shard_bytes=RETURN_SHARD)
    log = (work / "log.jsonl").read_text().splitlines() if (work / "log.jsonl").exists() else []
    p14.write_text_atomic(Path(a.out) / f"run-{a.name}.json", json.dumps(
        {"name": a.name, "step": p14.checkpoint_step(work), "seconds": seconds,
         "iteration_s": p14.iteration_seconds(work / "log.jsonl"), "last_logs": [json.loads(x) for x in log[-5:]],
         "config": vars(cfg)}, indent=1, default=str))
    print(f"{a.name}: step {p14.checkpoint_step(work)} in {seconds:.0f} s -> {dest}", flush=True)


def run(a):
    check_prepared(Path(a.data))
    names = a.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"--runs: unknown {', '.join(unknown)}; known: {', '.join(RUNS)}")
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    start = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    procs = {}
    for n in names:
        cmd = [sys.executable, __file__, "child", "--name", n, "--data", a.data, "--out", a.out, "--work", a.work,
               "--device", a.device, "--batch", str(a.batch), "--lr", str(a.lr), "--threads", str(a.threads),
               "--steps", str(a.steps), "--seed", str(a.seed), "--ema", str(a.ema), "--log-every", str(a.log_every)]
        log = open(work / "logs" / f"{n}.log", "a")
        procs[n] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=p14.die_with_parent), log)
    while any(p.poll() is None for p, _ in procs.values()) and time.time() - start < a.budget:
        time.sleep(1)
    for p, _ in procs.values():  # the step in hand ends, the student is exported and written int8
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + a.stop_grace
    report = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "args": vars(a), "runs": {}}
    for n, (p, log) in procs.items():
        try:
            rc = p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            rc = "killed after the grace period"
        log.close()
        report["runs"][n] = {"rc": rc, "log_tail": (work / "logs" / f"{n}.log").read_text()[-1500:]}
    report["seconds"] = time.time() - start
    p14.write_text_atomic(out / "device15.json", json.dumps(report, indent=1, default=str))
    print(json.dumps({n: r["rc"] for n, r in report["runs"].items()}), f"{report['seconds']:.0f} s", flush=True)
    failed = [n for n, r in report["runs"].items() if r["rc"] != 0]
    if failed:
        for n in failed:
            print(f"--- {n} (rc {report['runs'][n]['rc']}):\n{report['runs'][n]['log_tail']}", flush=True)
        raise SystemExit(1)


# ------------------------------------------------------------------ unpack (here)
def unpack(runs: Path, to: Path):
    """The returned students as model folders (with the shipped student's sampling block: its default style and
    2-step times, as it would ship), and their run reports."""
    sampling = json.loads((STUDENT / "config.json").read_text())["sampling"]
    to.mkdir(parents=True, exist_ok=True)
    found = sorted(p.parent for p in runs.glob("*/config.json"))
    if not found:
        raise SystemExit(f"{runs}: no returned student (NAME/config.json)")
    for src in found:
        dest = to / src.name
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(src, dest)
        cfg = json.loads((dest / "config.json").read_text())
        cfg["sampling"] = sampling
        (dest / "config.json").write_text(json.dumps(cfg, indent=1))
        rep = runs / f"run-{src.name}.json"
        if rep.exists():
            shutil.copy(rep, to / rep.name)
        print(dest)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="here: draw the training texts and store their MiniLM states")
    p.add_argument("--to", type=Path, required=True, help="the folder to carry (e.g. .whl/d15)")
    p.add_argument("--data", type=Path, default=Path("data/emoji64-wide"))
    p.add_argument("--texts", type=int, default=900, help="distinct texts (~10 KB each)")
    p.add_argument("--seed", type=int, default=0)
    for name in ("run", "child"):
        r = sub.add_parser(name)
        r.add_argument("--data", required=True)
        r.add_argument("--out", required=True)
        r.add_argument("--work", default="/tmp/d15-work")
        r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        r.add_argument("--batch", type=int, default=64)
        r.add_argument("--lr", type=float, default=5e-5, help="the student's (the critic's: twice it)")
        r.add_argument("--threads", type=int, default=1, help="torch threads per run")
        r.add_argument("--steps", type=int, default=100000, help="iterations per run, if the budget leaves them")
        r.add_argument("--seed", type=int, default=0)
        r.add_argument("--ema", type=float, default=0.99)
        r.add_argument("--log-every", type=int, default=50)
        r.set_defaults(student_steps=4)  # p14.config's; the 2-step times come as also_steps
        if name == "run":
            r.add_argument("--runs", default=",".join(RUNS), help=f"of {', '.join(RUNS)}")
            r.add_argument("--budget", type=float, default=420, help="seconds until every run is stopped")
            r.add_argument("--stop-grace", type=float, default=60, help="seconds a stopped run has to write its student")
        else:
            r.add_argument("--name", choices=list(RUNS), required=True)
    u = sub.add_parser("unpack")
    u.add_argument("--runs", type=Path, required=True, help="what came back ($OUT's files)")
    u.add_argument("--to", type=Path, required=True)
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.data, a.texts, a.to, a.seed)
    elif a.cmd == "run":
        run(a)
    elif a.cmd == "child":
        child(a)
    else:
        unpack(a.runs, a.to)


if __name__ == "__main__":
    main()
