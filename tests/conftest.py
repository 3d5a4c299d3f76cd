"""Tiny models and data built inside the tests: a 1-layer BERT + word-level tokenizer in MiniLM's
place, a 1-layer MMDiT, and a corpus rendered from a fake 5-icon npm package."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "red", "apple", "dog", "face", "banana", "grinning", "on",
         "blue", "background", "to", "the", "left", "of", "twemoji", "style", "fluent", "flat", ","]


def write_tiny_bert(folder: Path, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from flowflash.models.text import Bert, BertConfig, _hf_name

    folder.mkdir(parents=True, exist_ok=True)
    cfg = BertConfig(vocab_size=len(WORDS), hidden_size=384, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(seed)
    bert = Bert(cfg)
    save_file({_hf_name(k): v.contiguous() for k, v in bert.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(cfg.__dict__))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="session", autouse=True)
def tiny_minilm(tmp_path_factory):
    folder = write_tiny_bert(tmp_path_factory.mktemp("minilm"))
    os.environ["FLOWFLASH_MINILM_DIR"] = str(folder)
    return folder


def tiny_model_config(**kw):
    from flowflash.models.flow_model import ModelConfig

    base = dict(image_size=16, patch_size=4, num_layers=1, num_heads=2, head_dim=8, light_layers=1,
                light_max_tokens=8, minilm_max_tokens=8, vocab=["a", "apple", "banana", "dog", "face", "red"],
                name="tiny")
    sampling = {"steps": 4, "shift": 1.0, **kw.pop("sampling", {})}
    base.update(kw)
    return ModelConfig.from_dict({**base, "sampling": sampling})


@pytest.fixture
def tiny_model_dir(tmp_path):
    from flowflash.models.flow_model import FlowModel, save_model

    torch.manual_seed(0)
    folder = tmp_path / "tiny-model"
    save_model(FlowModel(tiny_model_config()), folder)
    return folder


FAKE_ICONS = ["red-apple", "dog-face", "banana", "grinning-face", "frog"]
COLORS = {"red-apple": "#d22", "dog-face": "#c95", "banana": "#fd3", "grinning-face": "#fc3", "frog": "#3a3"}


def write_fake_npm_cache(cache: Path) -> Path:
    """The unpacked layout fetch_npm_package leaves behind, for both sources, with 5 simple SVG icons."""
    from flowflash.data.build import SOURCES

    for key, src in SOURCES.items():
        pkg = cache / f"{src.package.replace('/', '__').lstrip('@')}-{src.version}" / "package"
        pkg.mkdir(parents=True, exist_ok=True)
        shape = "circle cx='8' cy='8' r='6'" if key == "twemoji" else "rect x='2' y='2' width='12' height='12'"
        icons = {n: {"body": f"<{shape} fill='{COLORS[n]}'/>"} for n in FAKE_ICONS}
        (pkg / "icons.json").write_text(json.dumps({"prefix": key, "icons": icons, "width": 16, "height": 16}))
        cats = {"Food & Drink": ["red-apple", "banana"], "Animals & Nature": ["dog-face", "frog"],
                "Smileys & Emotion": ["grinning-face"]}
        (pkg / "metadata.json").write_text(json.dumps({"categories": cats}))
    return cache


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    from flowflash.data.build import build_corpus

    root = tmp_path_factory.mktemp("corpus")
    cache = write_fake_npm_cache(root / "cache")
    build_corpus(root / "emoji16", size=16, cache=cache, n_scenes=40)
    return root / "emoji16"


@pytest.fixture
def torchrun(tmp_path):
    """Run `flowflash <args>` under torchrun with 2 CPU processes. A free port (--standalone), so parallel or
    leftover runs cannot collide; each rank's output goes to its own log, shown on failure (torchrun's own
    report names the failed rank, not its error)."""
    import subprocess
    import sys

    def run(args: list[str], script: str | None = None) -> None:
        """`script`: a Python file to run in place of the flowflash CLI."""
        logs = tmp_path / "torchrun-logs"
        shutil.rmtree(logs, ignore_errors=True)  # a second run in one test reads only its own logs
        entry = [script] if script else ["-m", "flowflash.cli"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--log-dir", str(logs), "--redirects", "3", *entry, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            ranks = "".join(f"\n--- {p.relative_to(logs)}\n{p.read_text(errors='replace')[-3000:]}"
                            for p in sorted(logs.rglob("*.log")))
            pytest.fail(f"torchrun exited {proc.returncode}; agent: {proc.stderr[-1500:]}{ranks}")
    return run
