"""Prompt sets: the packaged ones (named: `eval_v1`, `grid64`, ...) or any file by path.

An evaluation prompt set is JSONL (a caption plus what the checks need, one row a line; `eval_v1` the
held-out captions of data/emoji64, `plain_v1` plain phrasings of its held-out single concepts); a grid prompt
list is plain text, one prompt a line. The default sets ship inside the package (`prompts/` next to this
module), so a non-editable install finds them too.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import FlowflashError
from ..fsutil import write_text_atomic

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
DEFAULT_PROMPTS = PROMPTS_DIR / "eval_v1.jsonl"
# What a held-out row keeps: the caption and whatever the compositional checks read.
PROMPT_FIELDS = ("caption", "kind", "style", "concepts", "positions", "background", "count", "file")


@dataclass(frozen=True)
class PromptSet:
    name: str
    sha: str
    rows: list[dict]

    @property
    def captions(self) -> list[str]:
        return [r["caption"] for r in self.rows]


def packaged_names(suffix: str) -> list[str]:
    return sorted(p.stem for p in PROMPTS_DIR.glob(f"*{suffix}"))


def resolve_prompt_file(name_or_path: str | Path, suffix: str, what: str) -> Path:
    """A file path if it exists, else a packaged set of that name (`eval_v1` -> prompts/eval_v1.jsonl)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = PROMPTS_DIR / f"{name_or_path}{suffix}"
    if path.name == str(name_or_path) and packaged.is_file():  # a bare name, not a missing path
        return packaged
    raise FlowflashError(f"{what} not found: {name_or_path} (neither a file nor a packaged {what}: "
                         f"{', '.join(packaged_names(suffix)) or 'none'})")


def load_prompt_set(name_or_path: str | Path = DEFAULT_PROMPTS) -> PromptSet:
    path = resolve_prompt_file(name_or_path, ".jsonl", "prompt set")
    text = path.read_text()
    try:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise FlowflashError(f"prompt set {path} is not JSONL (one JSON object a line): {e}") from None
    if not rows:
        raise FlowflashError(f"prompt set is empty: {path}")
    if any("caption" not in r for r in rows):
        raise FlowflashError(f"prompt set {path}: every row needs a 'caption'")
    return PromptSet(path.stem, hashlib.sha256(text.encode()).hexdigest()[:10], rows)


def load_prompt_lines(name_or_path: str | Path) -> tuple[str, list[str]]:
    """A plain prompt list (one a line, blank lines skipped) and how to refer to it: the name of a
    packaged list, else the path as given."""
    path = resolve_prompt_file(name_or_path, ".txt", "prompts file")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise FlowflashError(f"prompts file is empty: {path}")
    label = str(path) if path == Path(name_or_path) else str(name_or_path)
    return label, prompts


def write_prompt_set(data: Path, out: Path) -> int:
    """The held-out split of a built corpus as a prompt set. Returns the number of prompts."""
    from ..data.dataset import read_manifest

    rows = [{k: r[k] for k in PROMPT_FIELDS if k in r} for r in read_manifest(data) if r["split"] == "heldout"]
    if not rows:
        raise FlowflashError(f"the corpus at {data} has no held-out rows to write as a prompt set")
    write_text_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def plain_prompt_rows(manifest: list[dict]) -> list[dict]:
    """Plain prompts (no style: "a dog face", "Dog face emoji") for the held-out single rows of a corpus
    manifest, one per held-out concept, in concept order; the phrasing templates are taken in turn (row i
    gets phrasing i of its concept's plain_phrasings, modulo their number), so each is about equally used.

    Each row keeps the checks' fields of its held-out row, with `style` null: a prompt that names no style
    may be answered in either style. `file` stays the held-out image (the concept x style pair that is never
    trained on), so FD/KID on a plain set measure the distance to those held-out renderings (in the default
    corpus all of them fluent flat): the same reference for every model, never a training image. A model that
    answers in the other style pays some FD for it; the alignment scores (CLIP-score analogue, R-precision)
    read the plain caption and do not ask for a style."""
    from ..data.phrasing import caption_name, plain_phrasings

    held = {}
    for r in manifest:
        if r["split"] == "heldout" and r["kind"] == "single":
            held.setdefault(r["concepts"][0], r)  # one row a concept (the first held-out style)
    rows = []
    for i, (name, r) in enumerate(sorted(held.items())):
        options = plain_phrasings(caption_name(name))
        row = {k: r[k] for k in PROMPT_FIELDS if k in r}
        rows.append({**row, "caption": options[i % len(options)], "style": None})
    return rows


def write_plain_prompt_set(data: Path, out: Path) -> int:
    """The held-out single concepts of a built corpus as a prompt set of plain phrasings (how
    prompts/plain_v1.jsonl was made, from data/emoji64). Returns the number of prompts."""
    from ..data.dataset import read_manifest

    rows = plain_prompt_rows(read_manifest(data))
    if not rows:
        raise FlowflashError(f"the corpus at {data} has no held-out single rows to write as plain prompts")
    write_text_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def sweep_prompt_set(data: Path, n: int = 256, seed: int = 0) -> PromptSet:
    """A fixed, seeded sample of the *training* split: tuning a choice (e.g. a merge ratio) on the
    held-out evaluation prompts would tune on the evaluation set."""
    from ..data.dataset import read_manifest

    rows = [r for r in read_manifest(data) if r["split"] == "train"]
    if not rows:
        raise FlowflashError(f"the corpus at {data} has no training rows to sample sweep prompts from")
    rows = random.Random(seed).sample(rows, min(n, len(rows)))
    return PromptSet(f"train-sample-{len(rows)}-seed{seed}", "-", rows)
