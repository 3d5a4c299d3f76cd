"""Top-level aten ops per training iteration of the protocol's stages (issue 14), counted with torch's profiler on the
CPU: on a GPU each is (at least) one kernel launch, so the count prices a launch-bound loop. The shipped teacher, the
prepared captions of `protocol14.py prepare`, batch 4 (the count barely depends on the batch).

    python scripts/op_count.py --data p14-data
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch


def top_level_ops(step, n: int) -> float:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(n):
            step(i)
    ev = [e for e in prof.events() if e.name.startswith("aten::")]
    return sum(e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::") for e in ev) / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="a `protocol14.py prepare` folder")
    ap.add_argument("--batch", type=int, default=4)
    a = ap.parse_args()
    spec = importlib.util.spec_from_file_location("p14", Path(__file__).parent / "protocol14.py")
    p14 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(p14)
    from flowflash.methods.dmd2 import DMD2
    from flowflash.methods.flash import Flash
    from flowflash.methods.tg import TrajectoryGuidance
    from flowflash.models.flow_model import load_model
    from flowflash.train.loop import run_step

    torch.manual_seed(0)
    args = argparse.Namespace(student_steps=4, batch=a.batch, lr=1e-4, device="cpu")
    bank = p14.load_bank(a.data / "train.safetensors", torch.device("cpu"))
    shape, gen = (3, 64, 64), torch.Generator().manual_seed(0)

    def count(label, method, sampler, n, warm=2):
        for o in method.optimizers.values():  # the multi-tensor AdamW a GPU takes by default
            for g in o.param_groups:
                g["foreach"] = True
        for i in range(warm):
            run_step(method, sampler(a.batch, gen), i)
        print(f"{label}: {top_level_ops(lambda i: run_step(method, sampler(a.batch, gen), warm + i), n):,.0f} "
              "top-level aten ops an iteration", flush=True)

    tg_cfg = lambda pool: p14.config(args, method="tg", out="/tmp/op-count/tg", steps=10, tg_pool=pool,
                                     tg_teacher_steps=6)
    tg = TrajectoryGuidance(tg_cfg(a.batch), load_model(p14.TEACHER))
    count("tg, pool full", tg, p14.CaptionSampler(bank, shape, a.batch), n=3, warm=12)
    assert tg.pool_full, "the pool did not fill in the warm-up: raise it"
    count("tg, filling a pool of 256", TrajectoryGuidance(tg_cfg(256), load_model(p14.TEACHER)),
          p14.CaptionSampler(bank, shape, 256), n=3, warm=0)
    warm = p14.config(args, method="dmd2", out="/tmp/op-count/warm", steps=10, critic_warmup=10)
    count("critic warm-up", DMD2(warm, load_model(p14.TEACHER), load_model(p14.TEACHER)),
          p14.CaptionSampler(bank, shape), n=3)
    for arm in ("A", "B", "C"):  # 5 critic iterations and one student iteration: an update's average
        kw = dict(p14.ARMS[arm])
        cls = DMD2 if kw.pop("method") == "dmd2" else Flash
        cfg = p14.config(args, method="dmd2" if cls is DMD2 else "flash", out=f"/tmp/op-count/{arm}", steps=100,
                         critic_ratio=5, **kw)
        count(f"arm {arm}", cls(cfg, load_model(p14.TEACHER), load_model(p14.TEACHER)), p14.CaptionSampler(bank, shape),
              n=6)


if __name__ == "__main__":
    main()
