"""Training data for every method: the corpus's captions encoded once, and batches drawn from them.

MiniLM is frozen, so each training caption is encoded once into a cache file in the run folder (rank 0
writes it, the other ranks wait and read it). A `Batch` carries what any method may need: the encoded
captions, the real images (rf's targets, the adversarial heads' real branch) and the starting noise.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from ..data.dataset import Corpus, load_corpus
from ..errors import FlowflashError
from ..images import to_unit
from ..models.text import MiniLMEncoder, WordTokenizer, combine
from .common import Dist, barrier


@dataclass
class Batch:
    ids: Tensor  # light-encoder token ids (B, L)
    mini_h: Tensor  # MiniLM token states (B, Lm, 384)
    mini_p: Tensor  # MiniLM pooled (B, 384)
    noise: Tensor  # (B, C, H, W): the starting noise of a student rollout, or rf's eps
    real: Tensor | None = None  # real images in [-1, 1]
    key: Tensor | None = None  # positions in a fixed pool (tg_pool), else None
    # The teacher's own captions (ids, mini_h, mini_p) where they differ from the student's: a row captioned
    # with another phrasing asks the teacher with the row's corpus caption (DistillConfig.teacher_prompt).
    teacher_text: tuple[Tensor, Tensor, Tensor] | None = None

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        tt = None if self.teacher_text is None else tuple(move(t) for t in self.teacher_text)
        return Batch(move(self.ids), move(self.mini_h), move(self.mini_p), move(self.noise), move(self.real),
                     move(self.key), tt)

    def for_teacher(self) -> "Batch":
        """The batch as the teacher is asked it: its captions in place of the student's, when they differ."""
        if self.teacher_text is None:
            return self
        ids, mini_h, mini_p = self.teacher_text
        return replace(self, ids=ids, mini_h=mini_h, mini_p=mini_p, teacher_text=None)

    def condition(self, model, use_light: Tensor, use_minilm: Tensor) -> tuple[Tensor, Tensor]:
        """(context, pooled) through `model`'s own light encoder and the cached MiniLM states."""
        return combine(model.light, self.ids, self.mini_h, self.mini_p, use_light, use_minilm)

    def rows(self, idx: Tensor) -> "Batch":
        return replace(self, ids=self.ids[idx], mini_h=self.mini_h[idx], mini_p=self.mini_p[idx],
                       noise=self.noise[idx], real=None if self.real is None else self.real[idx],
                       key=None if self.key is None else self.key[idx],
                       teacher_text=None if self.teacher_text is None else tuple(t[idx] for t in self.teacher_text))


def minilm_cache(captions: list[str], out: Path, max_tokens: int) -> tuple[Tensor, Tensor]:
    """MiniLM states of every caption, from `out`'s cache when it matches these captions."""
    path = out / f"minilm_cache_{max_tokens}.safetensors"
    # hashlib, not hash(): str hashes are salted per process and ranks must agree.
    key = int.from_bytes(hashlib.sha256("\n".join(captions).encode()).digest()[:4], "big")
    if path.exists():
        d = load_file(path)
        if d["key"].item() == key and d["h"].shape[0] == len(captions):
            return d["h"].float(), d["p"].float()
    enc = MiniLMEncoder(max_tokens=max_tokens)
    hs, ps = [], []
    for i in tqdm(range(0, len(captions), 256), desc="encode captions", leave=False):
        h, p = enc(captions[i: i + 256])
        hs.append(h.half()), ps.append(p.half())
    h, p = torch.cat(hs), torch.cat(ps)
    save_file({"h": h, "p": p, "key": torch.tensor(key)}, path)
    return h.float(), p.float()


def heldout_plain_texts(data: Path) -> set[str]:
    """The plain phrasings of every concept with a held-out single row. A concept is held out in one style
    only, so its other style trains on; its plain phrasings (no style) are what `plain_v1` asks, and they stay
    out of training so that the set stays held out."""
    from ..data.dataset import read_manifest
    from ..data.phrasing import caption_name, plain_phrasings

    return {p for r in read_manifest(data) if r["split"] != "train" and r["kind"] == "single"
            for p in plain_phrasings(caption_name(r["concepts"][0]))}


def caption_texts(corpus: Corpus, phrasings: bool, exclude: set[str] = frozenset()) -> tuple[list[str], list[list[int]]]:
    """Every caption text to encode, and each row's own variants as positions in that list: its caption first,
    then (with `phrasings`) the other phrasings its manifest row lists (singles; data/phrasing.py), less
    `exclude` (the held-out concepts' plain phrasings)."""
    texts = list(corpus.captions)
    variants = [[i] for i in range(len(texts))]
    if phrasings:
        where = {t: i for i, t in enumerate(texts)}
        for r, row in enumerate(corpus.rows):
            for text in row.get("phrasings", [])[1:]:  # the first is the caption itself
                if text in exclude:
                    continue
                if text not in where:
                    where[text] = len(texts)
                    texts.append(text)
                variants[r].append(where[text])
    return texts, variants


@dataclass
class CaptionBank:
    """The training split with its captions (and, with phrasings, every phrasing of its singles) encoded for
    both text encoders. Row r's texts are `variants[r]`, its own caption first."""
    corpus: Corpus
    ids: Tensor  # per text
    mini_h: Tensor
    mini_p: Tensor
    variants: list[list[int]] | None = None  # None: one text per row, the row's caption

    @classmethod
    def build(cls, data: Path, vocab: list[str], light_max_tokens: int, minilm_max_tokens: int, out: Path,
              d: Dist, image_size: int | None = None, phrasings: bool = False) -> "CaptionBank":
        corpus = load_corpus(Path(data), "train")
        if image_size is not None and corpus.images.shape[-1] != image_size:
            raise FlowflashError(f"corpus images are {corpus.images.shape[-1]}px but the model makes "
                                 f"{image_size}px: model and data do not match")
        if phrasings and not any(r.get("phrasings") for r in corpus.rows):
            raise FlowflashError(f"{data} lists no phrasings (built before they existed): rebuild it with "
                                 f"flowflash data build --out {data}")
        texts, variants = caption_texts(corpus, phrasings, heldout_plain_texts(data) if phrasings else set())
        ids, _ = WordTokenizer(vocab).batch(texts, light_max_tokens)
        if d.main:  # one writer; the others read what it wrote
            mini_h, mini_p = minilm_cache(texts, out, minilm_max_tokens)
        barrier(d)
        if not d.main:
            mini_h, mini_p = minilm_cache(texts, out, minilm_max_tokens)
        return cls(corpus, ids, mini_h, mini_p, variants if phrasings else None)

    def texts_of(self, idx: Tensor, p_other: float, gen: torch.Generator) -> Tensor:
        """The text each drawn row is captioned with: its own caption, or with probability p_other one of its
        other phrasings (uniformly); rows without phrasings keep their caption."""
        if self.variants is None or p_other <= 0:
            return idx
        u, k = torch.rand(len(idx), generator=gen), torch.rand(len(idx), generator=gen)
        out = []
        for r, ui, ki in zip(idx.tolist(), u.tolist(), k.tolist()):
            v = self.variants[r]
            out.append(v[0] if ui >= p_other or len(v) == 1 else v[1 + int(ki * (len(v) - 1))])
        return torch.tensor(out, dtype=torch.long, device=idx.device)

    def __len__(self) -> int:
        return len(self.corpus)

    def to(self, device: torch.device) -> "CaptionBank":
        """The bank with its tensors (images still uint8) on `device`, so a batch is gathered there."""
        c = self.corpus
        return CaptionBank(Corpus(c.images.to(device), c.captions, c.rows), self.ids.to(device),
                           self.mini_h.to(device), self.mini_p.to(device), self.variants)

    def batch(self, idx: Tensor, noise: Tensor, key: Tensor | None = None, text: Tensor | None = None,
              teacher_text: Tensor | None = None) -> Batch:
        """Rows idx (images), captioned with the texts `text` (default: each row's own caption); with
        `teacher_text`, the teacher is asked those texts instead."""
        t = idx if text is None else text
        tt = None if teacher_text is None else (self.ids[teacher_text], self.mini_h[teacher_text],
                                                self.mini_p[teacher_text])
        return Batch(self.ids[t], self.mini_h[t], self.mini_p[t], noise, to_unit(self.corpus.images[idx]), key, tt)

    def single_rows(self, keep: set[str] | None = None) -> Tensor:
        return torch.tensor([i for i, r in enumerate(self.corpus.rows) if r["kind"] == "single"
                             and (keep is None or r["concepts"][0] in keep)], dtype=torch.long)

    def scene_rows(self) -> Tensor:
        return torch.tensor([i for i, r in enumerate(self.corpus.rows) if r["kind"] != "single"], dtype=torch.long)


def draw_rows(b: int, singles: Tensor, scenes: Tensor, p_single: float | None, gen: torch.Generator) -> Tensor:
    """b row indices: a single emoji with probability p_single, else a scene; None draws from both pools
    uniformly (rows in manifest order when nothing is filtered out)."""
    if p_single is None or len(singles) == 0 or len(scenes) == 0:
        pool = torch.cat([singles, scenes])
        return pool[torch.randint(len(pool), (b,), generator=gen)]
    pick_single = torch.rand(b, generator=gen) < p_single
    s = singles[torch.randint(len(singles), (b,), generator=gen)]
    c = scenes[torch.randint(len(scenes), (b,), generator=gen)]
    return torch.where(pick_single, s, c)


class DeviceDraws:
    """What the samplers share: once placed on an accelerator (`place`), the bank lives there and the noise
    is drawn there from a generator of its own (the CPU would otherwise draw and copy every batch, which
    left a GPU idle); the rows are still chosen by the CPU data generator. Unplaced, all of it stays on the
    CPU and the data generator draws the noise, as before."""

    bank: CaptionBank
    noise_gen: torch.Generator | None = None

    def place(self, device: torch.device, seed: int) -> dict[str, torch.Generator]:
        self.bank = self.bank.to(device)
        self.noise_gen = torch.Generator(device).manual_seed(seed)
        return {"noise": self.noise_gen}  # for the checkpoint

    def noise(self, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
        if self.noise_gen is None:
            return torch.randn(shape, generator=gen)
        return torch.randn(shape, generator=self.noise_gen, device=self.noise_gen.device)


class RowSampler(DeviceDraws):
    """Fresh rows and fresh noise every batch; with p_phrasing > 0, a single is captioned with one of its other
    phrasings that often (prompts as people type them). With `teacher_caption` (distillation), the teacher is
    asked each row's corpus caption whatever phrasing the student is given, so that the student learns to
    answer "a dog face" as the teacher answers "dog face, twemoji style"."""

    def __init__(self, bank: CaptionBank, singles: Tensor, scenes: Tensor, p_single: float | None = None,
                 p_phrasing: float = 0.0, teacher_caption: bool = False):
        self.bank, self.singles, self.scenes, self.p_single = bank, singles, scenes, p_single
        self.p_phrasing, self.teacher_caption = p_phrasing, teacher_caption

    def __call__(self, n: int, gen: torch.Generator) -> Batch:
        idx = draw_rows(n, self.singles, self.scenes, self.p_single, gen)
        text = self.bank.texts_of(idx, self.p_phrasing, gen) if self.p_phrasing > 0 else None
        shape = (n, *self.bank.corpus.images.shape[1:])
        dev = self.bank.ids.device
        idx = idx.to(dev)
        return self.bank.batch(idx, self.noise(shape, gen), text=None if text is None else text.to(dev),
                               teacher_text=idx if text is not None and self.teacher_caption else None)


class PoolSampler(DeviceDraws):
    """n entries of a fixed pool of (caption, noise) pairs, drawn once from `seed`: the same pool on every
    rank and after a resume, so work cached per entry (the teacher's trajectories) stays valid."""

    def __init__(self, bank: CaptionBank, size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.bank = bank
        self.idx = torch.randint(len(bank), (size,), generator=g)
        self.pool_noise = torch.randn((size, *bank.corpus.images.shape[1:]), generator=g)

    def place(self, device: torch.device, seed: int) -> dict[str, torch.Generator]:
        self.idx, self.pool_noise = self.idx.to(device), self.pool_noise.to(device)
        return super().place(device, seed)

    def __call__(self, n: int, gen: torch.Generator) -> Batch:
        key = torch.randint(len(self.idx), (n,), generator=gen).to(self.idx.device)
        return self.bank.batch(self.idx[key], self.pool_noise[key], key)
