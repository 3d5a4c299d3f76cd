"""The built corpus in memory: images as a uint8 tensor, captions, manifest rows."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import FlowflashError


@dataclass
class Corpus:
    images: torch.Tensor  # (N, 3, H, W) uint8
    captions: list[str]
    rows: list[dict]

    def __len__(self) -> int:
        return len(self.captions)


def read_manifest(root: Path) -> list[dict]:
    path = Path(root) / "manifest.jsonl"
    if not path.exists():
        raise FlowflashError(f"no corpus at {root} (manifest.jsonl missing); build one with: flowflash data build --out {root}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def to_unit(img: torch.Tensor) -> torch.Tensor:
    """uint8 [0,255] -> float [-1,1]."""
    return img.float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def load_corpus(root: Path, split: str | None = "train", kinds: tuple[str, ...] | None = None) -> Corpus:
    root = Path(root)
    rows = [r for r in read_manifest(root) if (split is None or r["split"] == split)
            and (kinds is None or any(r["kind"].startswith(k) for k in kinds))]
    if not rows:
        raise FlowflashError(f"corpus {root} has no rows for split={split!r}")
    arr = np.stack([np.asarray(Image.open(root / r["file"]).convert("RGB")) for r in rows])
    return Corpus(torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), [r["caption"] for r in rows], rows)


CONCEPT_LISTS = Path(__file__).parent / "concepts"


def load_concept_list(name: str) -> set[str]:
    """A named list shipped in data/concepts/ (e.g. "core") or a path to a text file, one concept
    (icon name, e.g. "red-apple") per line; '#' starts a comment."""
    path = CONCEPT_LISTS / f"{name}.txt"
    if not path.exists():
        path = Path(name)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONCEPT_LISTS.glob("*.txt")))
        raise FlowflashError(f"concept list {name!r} is neither a shipped list ({known}) nor a file")
    names = {line.split("#")[0].strip() for line in path.read_text().splitlines()}
    names.discard("")
    if not names:
        raise FlowflashError(f"concept list {path} is empty")
    return names
