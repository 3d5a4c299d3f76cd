"""The evaluation instruments bundled: frozen EfficientNet-Lite0 features, the image-text scorer, the
crop classifier and the pixel checks. Built once from the training split (`flowflash judge build`)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..data.constants import SCENE_OBJECTS
from ..data.dataset import load_corpus
from ..errors import FlowflashError
from ..models.text import MiniLMEncoder
from . import compose
from .effnet import effnet_features, load_effnet
from .metrics import caption_ranks, r_precision
from .scorer import Scorer, train_scorer

JUDGE_DIR = Path(__file__).resolve().parent.parent / "weights" / "judge"


def encode_texts(enc: MiniLMEncoder, texts: list[str], batch: int = 256) -> torch.Tensor:
    return torch.cat([enc(texts[i: i + batch])[1] for i in range(0, len(texts), batch)])


def crop_dataset(images: np.ndarray, rows: list[dict], classes: list[str]) -> tuple[list[np.ndarray], list[int]]:
    """Object crops with known labels: halves of pair scenes, whole single-object scenes, white singles."""
    crops, labels = [], []
    for img, r in zip(images, rows):
        if r["kind"] in ("scene_pair_lr", "scene_pair_tb"):
            for crop, c in zip(compose.halves(img, "lr" if r["kind"] == "scene_pair_lr" else "tb"), r["concepts"]):
                crops.append(crop), labels.append(classes.index(c))
        elif (r["kind"] == "scene_one" or r["kind"] == "single") and r["concepts"][0] in classes:
            crops.append(img), labels.append(classes.index(r["concepts"][0]))
    return crops, labels


def build_judge(data: Path, out: Path = JUDGE_DIR, seed: int = 0, max_crops: int = 2500) -> dict:
    corpus = load_corpus(Path(data), "train")
    effnet, enc = load_effnet(), MiniLMEncoder(max_tokens=32)
    feats = effnet_features(effnet, corpus.images)
    caps = sorted(set(corpus.captions))
    cap_id = torch.tensor([caps.index(c) for c in corpus.captions])
    txt = encode_texts(enc, caps)
    scorer = train_scorer(feats, txt[cap_id], cap_id, seed=seed)
    classes = [o for o in SCENE_OBJECTS if any(o in r["concepts"] for r in corpus.rows)]
    arr = corpus.images.permute(0, 2, 3, 1).numpy()
    crops, labels = crop_dataset(arr, corpus.rows, classes)
    keep = torch.randperm(len(crops), generator=torch.Generator().manual_seed(seed))[:max_crops].tolist()
    crops, labels = [crops[i] for i in keep], [labels[i] for i in keep]
    cfeats = effnet_features(effnet, torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2))
    clf = compose.train_classifier(cfeats, torch.tensor(labels), classes, seed=seed)
    info = {"data": str(data), "n_train_images": len(corpus), "n_captions": len(caps), "n_crops": len(crops),
            "classes": classes, "seed": seed}
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in scorer.state_dict().items()}, out / "scorer.safetensors")
    save_file({k: v.half().contiguous() for k, v in clf.state_dict().items()}, out / "classifier.safetensors")
    (out / "judge.json").write_text(json.dumps(info, indent=1))
    return info


@dataclass
class Judge:
    effnet: torch.nn.Module
    scorer: Scorer
    classifier: compose.CropClassifier
    minilm: MiniLMEncoder

    @classmethod
    def load(cls, folder: Path | None = None) -> "Judge":
        """The shipped judge, or FLOWFLASH_JUDGE_DIR, or `folder`."""
        folder = Path(folder or os.environ.get("FLOWFLASH_JUDGE_DIR") or JUDGE_DIR)
        if not (folder / "judge.json").exists():
            raise FlowflashError(f"no evaluation judge at {folder}; build it with: flowflash judge build --data DIR")
        info = json.loads((folder / "judge.json").read_text())
        scorer = Scorer()
        scorer.load_state_dict({k: v.float() for k, v in load_file(folder / "scorer.safetensors").items()})
        clf = compose.CropClassifier(info["classes"])
        clf.load_state_dict({k: v.float() for k, v in load_file(folder / "classifier.safetensors").items()})
        return cls(load_effnet(), scorer.eval(), clf.eval(), MiniLMEncoder(max_tokens=32))

    def features(self, images_u8: torch.Tensor) -> torch.Tensor:
        return effnet_features(self.effnet, images_u8)

    @torch.no_grad()
    def alignment(self, feats: torch.Tensor, captions: list[str], pool: list[str], k: int = 10) -> dict:
        """CLIP-score analogue (100 x mean cosine, floored at 0) and R-precision among k captions from `pool`."""
        img = self.scorer.embed_images(feats)
        pool = list(dict.fromkeys(pool))
        txt = self.scorer.embed_texts(encode_texts(self.minilm, pool))
        idx = torch.tensor([pool.index(c) for c in captions])
        cos = (img * txt[idx]).sum(-1)
        return {"clip_score": float(100 * cos.clamp(min=0).mean()), "r_precision": r_precision(img, txt, idx, k=k),
                "r_precision_k": k}

    @torch.no_grad()
    def recognition(self, image_sets: dict[str, torch.Tensor], captions: list[str], pool: list[str],
                    groups: list[str] | None = None) -> dict:
        """For each set of image features (one row per caption), the rank of each image's caption among
        every caption of `pool` (e.g. all single-emoji captions): a stricter 'is it recognisable' than
        R-precision's 10 random candidates. With `groups` (one per pool caption, e.g. its concept), also
        the rank of the right group, so that a dog drawn in the other style still counts. The pool is
        encoded once for all sets."""
        txt = self.scorer.embed_texts(encode_texts(self.minilm, pool))
        at = {c: i for i, c in enumerate(pool)}
        idx = torch.tensor([at[c] for c in captions])
        gid = None
        if groups is not None:
            names = {g: i for i, g in enumerate(dict.fromkeys(groups))}
            gid = torch.tensor([names[g] for g in groups])

        def summary(ranks: torch.Tensor) -> dict:
            return {"top1": float((ranks <= 1).float().mean()), "top5": float((ranks <= 5).float().mean()),
                    "median_rank": float(ranks.float().median()), "ranks": ranks.tolist()}

        out = {}
        for name, feats in image_sets.items():
            img = self.scorer.embed_images(feats)
            out[name] = {"n": len(captions), "pool": len(pool), **summary(caption_ranks(img, txt, idx))}
            if gid is not None:
                out[name]["groups"] = {"n_groups": int(gid.max()) + 1, **summary(caption_ranks(img, txt, idx, gid))}
        return out

    @torch.no_grad()
    def compositional(self, images_u8: torch.Tensor, rows: list[dict]) -> dict:
        """Per-check accuracy on scene prompts, and their mean ('compositional accuracy')."""
        arr = images_u8.permute(0, 2, 3, 1).numpy()
        checks: dict[str, list[bool]] = {"background": [], "count": [], "position": [], "object": []}
        crops, crop_rows = [], []
        for img, r in zip(arr, rows):
            if not r["kind"].startswith("scene"):
                continue
            checks["background"].append(compose.background_name(img) == r["background"])
            if r["kind"] == "scene_count":
                checks["count"].append(compose.count_objects(img) == r["count"])
            elif r["kind"] in ("scene_pair_lr", "scene_pair_tb"):
                hs = compose.halves(img, "lr" if r["kind"] == "scene_pair_lr" else "tb")
                crops += hs
                crop_rows.append(("position", r["concepts"]))
            elif r["kind"] == "scene_one":
                crops.append(img)
                crop_rows.append(("object", r["concepts"]))
        if crops:
            pred = self.classifier(self.features(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2))).argmax(-1)
            names = [self.classifier.classes[int(i)] for i in pred]
            j = 0
            for check, concepts in crop_rows:
                n = len(concepts)
                checks[check].append(names[j: j + n] == concepts)
                j += n
        out = {f"{k}_acc": (float(np.mean(v)) if v else None) for k, v in checks.items()}
        out.update({f"{k}_n": len(v) for k, v in checks.items()})
        vals = [v for k, v in out.items() if k.endswith("_acc") and v is not None]
        out["compositional_acc"] = float(np.mean(vals)) if vals else None
        return out
