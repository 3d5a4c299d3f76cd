"""`flowflash eval`: generate for a fixed prompt set (or read a folder of images) and score it."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..errors import FlowflashError
from .metrics import bootstrap_fd, frechet_distance, kid

DEFAULT_PROMPTS = Path(__file__).resolve().parents[3] / "prompts" / "eval_v1.jsonl"


@dataclass
class PromptSet:
    name: str
    sha: str
    rows: list[dict]

    @property
    def captions(self) -> list[str]:
        return [r["caption"] for r in self.rows]


def load_prompt_set(path: Path | str = DEFAULT_PROMPTS) -> PromptSet:
    path = Path(path)
    if not path.exists():
        raise FlowflashError(f"prompt set not found: {path}")
    text = path.read_text()
    rows = [json.loads(l) for l in text.splitlines() if l.strip()]
    if not rows:
        raise FlowflashError(f"prompt set is empty: {path}")
    return PromptSet(path.stem, hashlib.sha256(text.encode()).hexdigest()[:10], rows)


def write_prompt_set(data: Path, out: Path) -> int:
    """The held-out split of a built corpus as a prompt set (caption + what the checks need)."""
    from ..data.dataset import read_manifest

    keep = ("caption", "kind", "style", "concepts", "positions", "background", "count", "file")
    rows = [{k: r[k] for k in keep if k in r} for r in read_manifest(data) if r["split"] == "heldout"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def real_images(data: Path, ps: PromptSet) -> torch.Tensor:
    missing = [r["file"] for r in ps.rows if not (Path(data) / r["file"]).exists()]
    if missing:
        raise FlowflashError(f"{len(missing)} real images of the prompt set are missing under {data} "
                             f"(e.g. {missing[0]}); build the corpus with: flowflash data build --out {data}")
    return torch.from_numpy(np.stack([np.asarray(Image.open(Path(data) / r["file"]).convert("RGB"))
                                      for r in ps.rows])).permute(0, 3, 1, 2).contiguous()


def read_image_folder(folder: Path, n: int) -> torch.Tensor:
    """Images named 00000.png, 00001.png, ... in prompt-set order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FlowflashError(f"image folder not found: {folder}")
    files = [folder / f"{i:05d}.png" for i in range(n)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise FlowflashError(f"{folder} lacks {len(missing)} of the {n} images (e.g. {missing[0]})")
    arrs = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    sizes = {a.shape for a in arrs}
    if len(sizes) > 1:
        raise FlowflashError(f"images in {folder} have mismatched sizes: {sorted(sizes)}")
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


@dataclass
class Setting:
    """One configuration to evaluate or benchmark."""
    name: str
    model: str = "teacher"
    steps: int | None = None
    guidance: float | None = None
    minilm: bool = True
    precision: str = "fp32"


def generate_set(setting: Setting, ps: PromptSet, seed: int = 0, batch: int = 64, pipe=None,
                 cache: Path | None = None) -> tuple[torch.Tensor, dict]:
    """One image per prompt, prompt i with seed + i. Returns uint8 images and summed phase timings.
    With `cache`, the images are stored under a key of everything that determines them (weights hash,
    schedule, guidance, encoders, precision, seed, prompt set) and reused; the timings are then just {"cached": True}."""
    from ..runtime.pipeline import Pipeline

    pipe = pipe or Pipeline.load(setting.model, use_minilm=setting.minilm, precision=setting.precision)
    tim = {"text_s": 0.0, "denoise_s": 0.0, "decode_s": 0.0}
    path = None
    if cache is not None:
        cfg = pipe.model.cfg
        guidance = cfg.default_guidance if setting.guidance is None else float(setting.guidance)
        key = json.dumps([pipe.hash, [round(float(t), 8) for t in pipe.schedule(setting.steps)], guidance,
                          setting.minilm, setting.precision, seed, ps.sha])
        path = Path(cache) / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.safetensors"
        if path.exists():
            from safetensors.torch import load_file
            return load_file(path)["images"], {"cached": True}
    out = []
    caps = ps.captions
    for i in tqdm(range(0, len(caps), batch), desc=f"generate {setting.name}", leave=False):
        chunk = caps[i: i + batch]
        imgs = pipe.generate_seeded(chunk, [seed + i + j for j in range(len(chunk))], steps=setting.steps,
                                    guidance=setting.guidance)
        for k in tim:
            tim[k] += getattr(pipe.timings, k)
        out += [np.asarray(im) for im in imgs]
    images = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
    if path is not None:
        from safetensors.torch import save_file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"images": images}, str(tmp), metadata={"setting": setting.name})
        tmp.replace(path)
    return images, tim


def score(images: torch.Tensor, ps: PromptSet, judge, real_feats: torch.Tensor, ref_feats: dict | None = None) -> dict:
    feats = judge.features(images)
    lo, hi = bootstrap_fd(feats, real_feats)
    k_mean, k_std = kid(feats, real_feats)
    res = {"n_images": len(images), "fd_effnetl0": frechet_distance(feats, real_feats), "fd_ci90": [lo, hi],
           "kid_effnetl0": k_mean, "kid_std": k_std}
    for name, f in (ref_feats or {}).items():
        res[f"fd_to_{name}"] = frechet_distance(feats, f)
    res.update(judge.alignment(feats, ps.captions, ps.captions))
    res.update(judge.compositional(images, ps.rows))
    return res, feats


def write_results(results: dict, out: Path):
    """JSON plus a short markdown table next to it; both written via temp files."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out.with_suffix(".json"))
    md = out.with_suffix(".md.tmp")
    md.write_text(markdown_table(results["rows"], results.get("baseline")))
    md.replace(out.with_suffix(".md"))


COLUMNS = [("fd_effnetl0", "FD-EffNetL0 ↓", "{:.1f}"), ("kid_effnetl0", "KID ↓", "{:.4f}"),
           ("clip_score", "CLIP-score analogue ↑", "{:.1f}"), ("r_precision", "R-prec@10 ↑", "{:.3f}"),
           ("compositional_acc", "compositional ↑", "{:.3f}"), ("sec_per_image", "s/image ↓", "{:.3f}"),
           ("speedup", "speed-up", "{:.1f}x"), ("peak_rss_mb", "peak RSS MB", "{:.0f}")]


def markdown_table(rows: list[dict], baseline: str | None = None) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    head = "| setting | " + " | ".join(c[1] for c in cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    lines = []
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append("—" if v is None else fmt.format(v))
        lines.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def score_singles(images_u8: torch.Tensor, prompts: list[str], data: Path, judge) -> dict:
    """How recognisable single-emoji images are: for each prompt that is a single-emoji caption of the
    corpus, the rank of its caption among all single-emoji captions, for the generated image and, as the
    ceiling of the instrument, for the corpus's own image of that caption."""
    from ..data.dataset import load_corpus

    singles = load_corpus(Path(data), None, kinds=("single",))
    first: dict[str, int] = {}  # caption -> its first row (one image per caption is enough)
    for i, c in enumerate(singles.captions):
        first.setdefault(c, i)
    pool = list(first)
    concepts = [singles.rows[first[c]]["concepts"][0] for c in pool]
    keep = [i for i, p in enumerate(prompts) if p in first]
    if not keep:
        raise FlowflashError(f"none of the prompts is a single-emoji caption of {data}")
    caps = [prompts[i] for i in keep]
    real = singles.images[[first[c] for c in caps]]
    sets = {"generated": judge.features(images_u8[keep]), "real": judge.features(real)}
    return {"prompts": caps, **judge.recognition(sets, caps, pool, concepts)}
