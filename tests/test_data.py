import json
import shutil

import pytest

from flowflash.data.build import build_corpus, fetch_npm_package
from flowflash.data.dataset import load_corpus
from flowflash.errors import FlowflashError
from tests.conftest import FAKE_ICONS, write_fake_npm_cache


def test_corpus_layout_and_captions(tiny_corpus):
    rows = [json.loads(l) for l in (tiny_corpus / "manifest.jsonl").read_text().splitlines()]
    singles = [r for r in rows if r["kind"] == "single"]
    assert len(singles) == 2 * len(FAKE_ICONS)  # every concept in both styles
    assert "red apple, twemoji style" in {r["caption"] for r in singles}
    scenes = [r for r in rows if r["kind"].startswith("scene")]
    assert scenes and all(" background, " in r["caption"] for r in scenes)
    lr = [r for r in scenes if r["kind"] == "scene_pair_lr"]
    assert all(r["positions"] == ["left", "right"] and "to the left of" in r["caption"] for r in lr)
    assert (tiny_corpus / "ATTRIBUTION.md").read_text().count("CC-BY-4.0") == 1
    c = load_corpus(tiny_corpus, "train")
    assert c.images.shape[1:] == (3, 16, 16) and c.images.dtype.is_floating_point is False


def test_corpus_is_deterministic(tiny_corpus, tmp_path):
    cache = write_fake_npm_cache(tmp_path / "cache")
    build_corpus(tmp_path / "again", size=16, cache=cache, n_scenes=40)
    manifest = (tiny_corpus / "manifest.jsonl").read_text()
    assert (tmp_path / "again" / "manifest.jsonl").read_text() == manifest
    files = [json.loads(l)["file"] for l in manifest.splitlines()]
    assert any(f.startswith("images/scene-") for f in files) and "images/twemoji-red-apple.png" in files
    for f in files:  # every image, byte for byte
        assert (tmp_path / "again" / f).read_bytes() == (tiny_corpus / f).read_bytes()
    assert not (tmp_path / "again.tmp").exists()  # built beside, then renamed into place


def test_heldout_split_is_disjoint_from_train(tmp_path):
    cache = write_fake_npm_cache(tmp_path / "cache")
    build_corpus(tmp_path / "c", size=16, cache=cache, n_scenes=200, heldout_frac=0.3)
    rows = [json.loads(l) for l in (tmp_path / "c" / "manifest.jsonl").read_text().splitlines()]
    train = {r["caption"] for r in rows if r["split"] == "train"}
    held = {r["caption"] for r in rows if r["split"] == "heldout"}
    assert held and not (train & held)


def test_missing_npm_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FlowflashError, match=r"npm not found.*@iconify-json/twemoji.*apt-get install npm"):
        fetch_npm_package("@iconify-json/twemoji", "1.2.5", tmp_path)


def test_bad_size(tmp_path):
    with pytest.raises(FlowflashError, match="multiple of 8"):
        build_corpus(tmp_path / "x", size=20, cache=tmp_path)
