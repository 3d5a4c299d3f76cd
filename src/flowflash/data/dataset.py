"""The built corpus in memory: images as a uint8 tensor, captions, manifest rows."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FlowflashError
from ..images import read_images


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


def load_corpus(root: Path, split: str | None = "train", kinds: tuple[str, ...] | None = None) -> Corpus:
    root = Path(root)
    rows = [r for r in read_manifest(root) if (split is None or r["split"] == split)
            and (kinds is None or any(r["kind"].startswith(k) for k in kinds))]
    if not rows:
        raise FlowflashError(f"corpus {root} has no rows for split={split!r}")
    return Corpus(read_images(root / r["file"] for r in rows), [r["caption"] for r in rows], rows)


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
