"""Build the captioned emoji corpus from openly licensed npm icon sets.

Sources are fetched with the ordinary package client (`npm pack`) into a cache, rasterised with
resvg, and written as PNG + a JSONL manifest. Everything is deterministic given the seed.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import FlowflashError
from ..fsutil import atomic_dir
from .constants import CATEGORY_SETS, COLORS, DEFAULT_CATEGORIES, EXCLUDE_WORDS, GENDER_WORDS, SCENE_OBJECTS
from .phrasing import caption_name, phrasings


@dataclass(frozen=True)
class Source:
    style: str  # the style word used in captions
    package: str
    version: str
    license: str
    author: str
    url: str


SOURCES = {
    "twemoji": Source("twemoji style", "@iconify-json/twemoji", "1.2.5", "CC-BY-4.0",
                      "Twitter, Inc and other contributors", "https://github.com/jdecked/twemoji"),
    "fluent": Source("fluent flat style", "@iconify-json/fluent-emoji-flat", "1.2.6", "MIT",
                     "Microsoft Corporation", "https://github.com/microsoft/fluentui-emoji"),
}

def fetch_npm_package(package: str, version: str, cache: Path) -> Path:
    """Download and unpack an npm package into the cache; return its folder."""
    dest = cache / f"{package.replace('/', '__').lstrip('@')}-{version}"
    if (dest / "package" / "icons.json").exists():
        return dest / "package"
    if shutil.which("npm") is None:
        raise FlowflashError(
            f"npm not found: it is needed to fetch {package}@{version}. "
            "Install Node.js and npm (Debian: apt-get install npm), or pass --cache with the unpacked package")
    cache.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["npm", "pack", f"{package}@{version}", "--pack-destination", str(cache)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise FlowflashError(f"could not fetch {package}@{version} with npm: "
                             f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'unknown error'}")
    tgz = cache / proc.stdout.strip().splitlines()[-1]
    with atomic_dir(dest) as tmp, tarfile.open(tgz) as tf:
        tf.extractall(tmp, filter="data")
    return dest / "package"


def load_iconset(folder: Path) -> tuple[dict, dict[str, str]]:
    """Icons JSON and a name -> category map."""
    icons = json.loads((folder / "icons.json").read_text())
    meta = json.loads((folder / "metadata.json").read_text())
    cat = {name: c for c, names in meta.get("categories", {}).items() for name in names}
    return icons, cat


def render_icon(icons: dict, name: str, px: int) -> np.ndarray:
    """Rasterise one icon to an RGBA uint8 array of px x px."""
    import resvg_py

    w, h = icons.get("width", 16), icons.get("height", 16)
    body = icons["icons"][name]["body"]
    svg = f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{px}" height="{px}">{body}</svg>'
    png = bytes(resvg_py.svg_to_bytes(svg_string=svg, width=px, height=px))
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))


def composite(bg: tuple[int, int, int], size: int, items: list[tuple[np.ndarray, int, int]]) -> Image.Image:
    """Alpha-composite RGBA sprites at (x, y) onto a flat background."""
    canvas = Image.new("RGBA", (size, size), bg + (255,))
    for rgba, x, y in items:
        canvas.alpha_composite(Image.fromarray(rgba), (x, y))
    return canvas.convert("RGB")


def concept_name(icon: str) -> str:
    return caption_name(icon)


def excluded(icon: str) -> bool:
    """Whether an icon is left out of every corpus: a skin-tone variant, a flag, a keycap (EXCLUDE_WORDS
    anywhere in the name) or a gender variant (GENDER_WORDS as a whole word of the name)."""
    return any(w in icon for w in EXCLUDE_WORDS) or any(w in GENDER_WORDS for w in icon.split("-"))


def corpus_concepts(sets: dict, categories: tuple[str, ...]) -> list[str]:
    """The icons present in every style within the chosen categories, less the excluded ones, sorted."""
    common = None
    for icons, cat in sets.values():
        names = {n for n in icons["icons"] if cat.get(n) in categories and not excluded(n)}
        common = names if common is None else common & names
    return sorted(common or ())


def _held_out(key: str, frac: float, seed: int) -> bool:
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:4], "big") / 2**32 < frac


def build_corpus(out: Path, size: int = 64, seed: int = 0, cache: Path | None = None,
                 categories: tuple[str, ...] | str = DEFAULT_CATEGORIES, n_scenes: int = 6000,
                 heldout_frac: float = 0.08) -> dict:
    """Write images/, manifest.jsonl, ATTRIBUTION.md and meta.json under `out`. Returns meta.
    `categories`: the icon sets' category names, or the name of a set of them ("default", "wide")."""
    if size < 16 or size % 8:
        raise FlowflashError(f"--size must be a multiple of 8 and >= 16, got {size}")
    if isinstance(categories, str):
        if categories not in CATEGORY_SETS:
            raise FlowflashError(f"unknown category set {categories!r}; known: {', '.join(CATEGORY_SETS)}")
        categories = CATEGORY_SETS[categories]
    cache = Path(cache) if cache else Path.home() / ".cache" / "flowflash" / "npm"
    out = Path(out)
    sets = {k: load_iconset(fetch_npm_package(s.package, s.version, cache)) for k, s in SOURCES.items()}

    concepts = corpus_concepts(sets, tuple(categories))
    if not concepts:
        raise FlowflashError(f"no emoji found in categories {categories}")

    with atomic_dir(out) as tmp:  # a half-built corpus is never left under `out`
        return render_corpus(tmp, sets, concepts, categories, size, seed, n_scenes, heldout_frac)



def render_corpus(tmp: Path, sets: dict, concepts: list[str], categories: tuple[str, ...], size: int, seed: int,
                  n_scenes: int, heldout_frac: float) -> dict:
    """Render the singles and the scenes into `tmp` with their manifest, ATTRIBUTION and meta."""
    (tmp / "images").mkdir(parents=True)
    rows = []
    sprite_px = size * 7 // 8
    pad = (size - sprite_px) // 2
    sprites: dict[tuple[str, str], np.ndarray] = {}
    for key, src in SOURCES.items():
        icons, _ = sets[key]
        for name in tqdm(concepts, desc=f"render {key}", leave=False):
            rgba = render_icon(icons, name, sprite_px)
            sprites[(key, name)] = rgba
            img = composite(COLORS["white"], size, [(rgba, pad, pad)])
            fname = f"images/{key}-{name}.png"
            img.save(tmp / fname)
            # Held-out concept x style pairs: the concept is still seen in the other style.
            split = "heldout" if (key == "fluent" and _held_out(name, heldout_frac * 2, seed)) else "train"
            # `phrasings`: the ways a person types this caption (data/phrasing.py); its first is `caption`.
            rows.append(dict(file=fname, caption=f"{concept_name(name)}, {src.style}", split=split,
                             kind="single", style=key, concepts=[name], background="white",
                             phrasings=phrasings(concept_name(name), src.style)))

    # Compositional scenes from a fixed object vocabulary; some compositions are never trained on.
    rng = random.Random(seed)
    objs = [o for o in SCENE_OBJECTS if o in concepts]
    small = size * 7 // 16
    small_sprites = {(k, o): np.asarray(Image.fromarray(sprites[(k, o)]).resize((small, small), Image.LANCZOS))
                     for k in SOURCES for o in objs}
    colors = [c for c in COLORS if c != "white"]
    seen = set()
    for i in tqdm(range(n_scenes), desc="scenes", leave=False):
        style = rng.choice(list(SOURCES))
        color = rng.choice(colors)
        kind = rng.choice(["one", "pair_lr", "pair_tb", "count"])
        a, b = rng.sample(objs, 2)
        m = (size - 2 * small) // 3  # margin
        c = (size - small) // 2
        if kind == "one":
            items, pos = [(sprites[(style, a)], pad, pad)], [(a, "center")]
            caption = f"a {concept_name(a)} on a {color} background"
        elif kind == "pair_lr":
            items = [(small_sprites[(style, a)], m, c), (small_sprites[(style, b)], 2 * m + small, c)]
            pos = [(a, "left"), (b, "right")]
            caption = f"a {concept_name(a)} to the left of a {concept_name(b)} on a {color} background"
        elif kind == "pair_tb":
            items = [(small_sprites[(style, a)], c, m), (small_sprites[(style, b)], c, 2 * m + small)]
            pos = [(a, "top"), (b, "bottom")]
            caption = f"a {concept_name(a)} above a {concept_name(b)} on a {color} background"
        else:
            n = rng.choice([2, 3])
            s = size * 5 // 16 if n == 3 else small
            spr = np.asarray(Image.fromarray(sprites[(style, a)]).resize((s, s), Image.LANCZOS))
            gap = (size - n * s) // (n + 1)
            items = [(spr, gap + j * (s + gap), (size - s) // 2) for j in range(n)]
            pos = [(a, f"slot{j}") for j in range(n)]
            caption = f"{'two' if n == 2 else 'three'} {concept_name(a)} on a {color} background"
        caption_key = caption
        if caption_key in seen:
            continue
        seen.add(caption_key)
        split = "heldout" if _held_out(caption_key.split(" on a ")[0], heldout_frac, seed + 1) else "train"
        fname = f"images/scene-{i:05d}.png"
        composite(COLORS[color], size, items).save(tmp / fname)
        rows.append(dict(file=fname, caption=f"{caption}, {SOURCES[style].style}", split=split,
                         kind=f"scene_{kind}", style=style, concepts=[p[0] for p in pos],
                         positions=[p[1] for p in pos], background=color,
                         count=len(items)))

    with open(tmp / "manifest.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (tmp / "ATTRIBUTION.md").write_text(attribution_text())
    meta = dict(size=size, seed=seed, categories=list(categories), n_concepts=len(concepts),
                n_images=len(rows), n_train=sum(r["split"] == "train" for r in rows),
                n_heldout=sum(r["split"] == "heldout" for r in rows),
                sources={k: f"{s.package}@{s.version} ({s.license})" for k, s in SOURCES.items()},
                scene_objects=objs, colors=list(COLORS))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def attribution_text() -> str:
    lines = ["# Attribution", "", "The flowflash emoji corpus is rendered from these openly licensed icon sets:", ""]
    for s in SOURCES.values():
        lines.append(f"- {s.package}@{s.version} — {s.author}, {s.url} — licence {s.license}. "
                     f"Images were rasterised, resized and composited onto backgrounds.")
    lines += ["", "Twemoji graphics: Copyright Twitter, Inc and other contributors, licensed under CC-BY 4.0 "
              "(https://creativecommons.org/licenses/by/4.0/).",
              "Fluent Emoji: Copyright (c) Microsoft Corporation, MIT licence.", ""]
    return "\n".join(lines)
