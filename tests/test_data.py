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


# ---- phrasings, the wide category set, plain prompts

def test_phrasings_cover_what_people_type():
    from flowflash.data.phrasing import phrasings, plain_phrasings

    p = phrasings("dog face", "twemoji style")
    assert p[0] == "dog face, twemoji style"  # the corpus caption comes first
    for want in ("dog face", "a dog face", "Dog face emoji", "the dog face emoji, twemoji style",
                 "the dog face emoji", "a dog face, twemoji style", "A dog face"):
        assert want in p
    assert len(p) == len(set(p)) == 16
    plain = plain_phrasings("dog face")
    assert plain == [x for x in p if "style" not in x] and not any("," in x for x in plain)
    assert p == phrasings("dog face", "twemoji style")  # pure: same in, same out
    # the plain phrasings are the same for both styles: a missing style means either style
    assert set(phrasings("dog face", "fluent flat style")) - set(p) == {x.replace("twemoji", "fluent flat")
                                                                       for x in p if "style" in x}


def test_phrasing_articles():
    from flowflash.data.phrasing import article, plain_phrasings

    assert [article(n) for n in ("dog face", "alien", "unicorn", "hourglass done", "cherries", "two hearts",
                                 "face with tears of joy", "one oclock", "two hump camel", "octopus")] == \
        ["a", "an", "a", "an", None, None, "a", None, "a", "an"]
    assert plain_phrasings("cherries") == ["cherries", "cherries emoji", "the cherries emoji", "Cherries",
                                           "Cherries emoji"]


def test_single_rows_carry_phrasings_scenes_one_caption(tiny_corpus):
    from flowflash.data.phrasing import phrasings

    rows = [json.loads(l) for l in (tiny_corpus / "manifest.jsonl").read_text().splitlines()]
    for r in rows:
        if r["kind"] == "single":
            name, style = r["caption"].split(", ")
            assert r["phrasings"] == phrasings(name, style) and r["phrasings"][0] == r["caption"]
        else:
            assert "phrasings" not in r


def test_exclusions_and_category_sets():
    from flowflash.data.build import excluded
    from flowflash.data.constants import CATEGORY_SETS, DEFAULT_CATEGORIES

    assert CATEGORY_SETS["default"] == DEFAULT_CATEGORIES
    assert set(CATEGORY_SETS["wide"]) == set(DEFAULT_CATEGORIES) | {"Travel & Places", "Activities", "Objects"}
    for name in ("man-biking", "woman-biking", "family-man-girl", "men-holding-hands", "kiss-woman-man",
                 "thumbs-up-medium-skin-tone", "flag-france", "chequered-flag", "keycap-1"):
        assert excluded(name), name
    for name in ("snowman", "mans-shoe", "womans-hat", "rocket", "red-apple", "manual-wheelchair"):
        assert not excluded(name), name


def test_wide_build_adds_the_new_categories_only(tmp_path):
    cache = write_fake_npm_cache(tmp_path / "cache")
    extra = {"Travel & Places": ["rocket"], "Objects": ["crown"], "People & Body": ["man-biking"],
             "Flags": ["flag-france"]}
    for pkg in cache.iterdir():
        icons = json.loads((pkg / "package" / "icons.json").read_text())
        meta = json.loads((pkg / "package" / "metadata.json").read_text())
        body = next(iter(icons["icons"].values()))["body"]
        for cat, names in extra.items():
            meta["categories"][cat] = names
            icons["icons"].update({n: {"body": body} for n in names})
        (pkg / "package" / "icons.json").write_text(json.dumps(icons))
        (pkg / "package" / "metadata.json").write_text(json.dumps(meta))
    default = build_corpus(tmp_path / "d", size=16, cache=cache, n_scenes=20)
    wide = build_corpus(tmp_path / "w", size=16, cache=cache, n_scenes=20, categories="wide")
    assert default["n_concepts"] == len(FAKE_ICONS) and wide["n_concepts"] == len(FAKE_ICONS) + 2
    concepts = {json.loads(l)["concepts"][0] for l in (tmp_path / "w" / "manifest.jsonl").read_text().splitlines()
                if '"single"' in l}
    assert concepts == set(FAKE_ICONS) | {"rocket", "crown"}
    assert "rocket" in wide["scene_objects"] and "rocket" not in default["scene_objects"]
    with pytest.raises(FlowflashError, match="unknown category set 'everything'"):
        build_corpus(tmp_path / "x", size=16, cache=cache, categories="everything")


def test_plain_prompt_set_from_the_heldout_singles(tmp_path):
    from flowflash.cli import main
    from flowflash.data.phrasing import plain_phrasings
    from flowflash.eval.prompt_set import load_prompt_set

    cache = write_fake_npm_cache(tmp_path / "cache")
    build_corpus(tmp_path / "c", size=16, cache=cache, n_scenes=40, heldout_frac=0.5)
    manifest = [json.loads(l) for l in (tmp_path / "c" / "manifest.jsonl").read_text().splitlines()]
    held = sorted({r["concepts"][0] for r in manifest if r["split"] == "heldout" and r["kind"] == "single"})
    assert held
    assert main(["data", "prompts", "--plain", "--data", str(tmp_path / "c"), "--out", str(tmp_path / "p.jsonl")]) == 0
    ps = load_prompt_set(tmp_path / "p.jsonl")
    assert [r["concepts"][0] for r in ps.rows] == held
    for i, r in enumerate(ps.rows):
        assert r["kind"] == "single" and r["style"] is None and "style" not in r["caption"]
        options = plain_phrasings(r["concepts"][0].replace("-", " "))
        assert r["caption"] == options[i % len(options)]  # the templates taken in turn
        assert (tmp_path / "c" / r["file"]).is_file()
        assert next(m for m in manifest if m["file"] == r["file"])["split"] == "heldout"  # FD: held-out images


def test_shipped_plain_v1():
    from flowflash.eval.prompt_set import load_prompt_set

    ps = load_prompt_set("plain_v1")
    assert ps.name == "plain_v1" and 40 <= len(ps.rows) <= 120
    assert all(r["kind"] == "single" and r["style"] is None and "style" not in r["caption"] for r in ps.rows)
    assert len({r["concepts"][0] for r in ps.rows}) == len(ps.rows)  # one prompt a concept
    # its concepts and reference images are eval_v1's held-out singles
    ev = {r["file"] for r in load_prompt_set("eval_v1").rows if r["kind"] == "single"}
    assert {r["file"] for r in ps.rows} == ev


def test_core_wide_list_extends_core():
    from flowflash.data.constants import SCENE_OBJECTS
    from flowflash.data.dataset import load_concept_list

    core, wide = load_concept_list("core"), load_concept_list("core-wide")
    assert core < wide and set(SCENE_OBJECTS) <= wide  # every scene object of the wide corpus
    assert {"rocket", "automobile", "crown", "balloon", "sun", "guitar"} <= wide and "moose" not in wide
