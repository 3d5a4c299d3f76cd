"""Issue 15's device script: the texts it prepares are drawn as the product is used, and a returned student
unpacks into a model folder that samples as the shipped student does."""
import importlib.util
import json
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("device15", Path(__file__).parents[1] / "scripts" / "device15.py")
d15 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(d15)


def test_texts_are_distinct_completed_training_texts_drawn_by_seed(tiny_corpus):
    from flowflash.data.dataset import read_manifest
    from flowflash.models.flow_model import read_config
    from flowflash.train.data import heldout_plain_texts

    texts = d15.draw_texts(tiny_corpus, 30, seed=0, p_phrasing=1.0)
    assert len(texts) == len(set(texts)) == 30
    complete = read_config(d15.STUDENT).sampling.complete
    held = heldout_plain_texts(tiny_corpus)
    rows = [r for r in read_manifest(tiny_corpus) if r["split"] == "train"]
    allowed = {complete(x) for r in rows for x in [r["caption"], *r.get("phrasings", [])[1:]] if x not in held}
    assert set(texts) <= allowed  # the training split's texts only, each as `generate` draws it
    assert set(texts) - {r["caption"] for r in rows}, "p_phrasing=1 draws other phrasings than the captions"
    assert all(complete(t) == t for t in texts)
    assert d15.draw_texts(tiny_corpus, 30, seed=0, p_phrasing=1.0) == texts
    assert d15.draw_texts(tiny_corpus, 30, seed=1, p_phrasing=1.0) != texts


def test_asking_more_texts_than_the_corpus_holds_fails_with_the_count(tiny_corpus):
    with pytest.raises(SystemExit, match="distinct texts"):
        d15.draw_texts(tiny_corpus, 100000)


def test_unpack_gives_the_shipped_students_sampling_and_refuses_an_empty_folder(tmp_path, tiny_model_dir):
    import shutil

    from flowflash.models.flow_model import read_config

    runs = tmp_path / "back"
    shutil.copytree(tiny_model_dir, runs / "scale")
    (runs / "run-scale.json").write_text("{}")
    d15.unpack(runs, tmp_path / "d15")
    got = read_config(tmp_path / "d15" / "scale").sampling
    shipped = read_config(d15.STUDENT).sampling
    assert got.default_style == shipped.default_style == "twemoji style"
    assert got.schedule == shipped.schedule and (tmp_path / "d15" / "run-scale.json").exists()
    with pytest.raises(SystemExit, match="no returned student"):
        d15.unpack(tmp_path / "empty", tmp_path / "x")
