"""Which captions an emoji teacher's distillation draws: single emoji of a concept list, other phrasings for the
student while the teacher is asked the row's corpus caption, and the refusals of settings that cannot apply."""
from __future__ import annotations

import pytest
import torch

from flowflash.data.dataset import read_manifest
from flowflash.errors import FlowflashError
from flowflash.train.common import init_dist
from flowflash.train.configs import DistillConfig
from flowflash.train.run import distill_setup

from tests.test_distill import cfg, teacher_dir  # noqa: F401 (teacher_dir: a fixture)


def two_concepts(corpus) -> list[str]:
    names = sorted({r["concepts"][0] for r in read_manifest(corpus) if r["kind"] == "single" and r["split"] == "train"})
    return names[:2]


def captions_by_ids(bank) -> dict[tuple, str]:
    texts = bank.corpus.captions + []  # the row captions come first in the bank's texts
    return {tuple(bank.ids[i].tolist()): texts[i] for i in range(len(texts))}


def test_rows_are_singles_of_the_list_and_the_teacher_is_asked_their_corpus_caption(teacher_dir, tmp_path,
                                                                                     tiny_corpus):
    keep = two_concepts(tiny_corpus)
    (tmp_path / "keep.txt").write_text("\n".join(keep))
    c = cfg(teacher_dir, tiny_corpus, tmp_path / "run", "dmd2", p_single=1.0, concepts=str(tmp_path / "keep.txt"),
            p_phrasing=1.0)
    su = distill_setup(c, init_dist())
    b = su.draw(64, torch.Generator().manual_seed(0))
    row_caption = captions_by_ids(su.bank)
    allowed = {r.get("caption") for r in su.bank.corpus.rows if r["kind"] == "single" and r["concepts"][0] in keep}
    teacher_captions = [row_caption[tuple(ids.tolist())] for ids in b.for_teacher().ids]
    assert set(teacher_captions) <= allowed and len(set(teacher_captions)) > 1
    # every student caption is one of the row's other phrasings (p_phrasing 1), never its corpus caption
    row_of = {cap: r for r, cap in enumerate(su.bank.corpus.captions)}
    for s_ids, cap in zip(b.ids, teacher_captions):
        others = {tuple(su.bank.ids[v].tolist()) for v in su.bank.variants[row_of[cap]][1:]}
        assert tuple(s_ids.tolist()) in others
    assert not torch.equal(b.ids, b.for_teacher().ids)
    assert not torch.equal(b.mini_p, b.for_teacher().mini_p)


def test_the_teacher_reads_the_corpus_caption_and_the_critic_the_students(teacher_dir, tmp_path, tiny_corpus):
    seen = {}
    for asked in ("caption", "same"):
        c = cfg(teacher_dir, tiny_corpus, tmp_path / asked, "dmd2", p_single=1.0, p_phrasing=1.0,
                teacher_prompt=asked, adversarial=False)
        su = distill_setup(c, init_dist())
        b = su.draw(4, torch.Generator().manual_seed(1))
        m = su.method
        ids = {}
        def keep_first(name):  # the conditional call comes first; a hook returning nothing leaves the output alone
            return lambda mod, args, out: None if name in ids else ids.update({name: args[0].clone()})
        hooks = [net.light.register_forward_hook(keep_first(name))
                 for name, net in (("teacher", m.teacher), ("critic", m.critic), ("student", m.student))]
        m.dm_loss(b)
        for h in hooks:
            h.remove()
        assert torch.equal(ids["critic"][:4], b.ids) and torch.equal(ids["student"][:4], b.ids)
        seen[asked] = ids["teacher"][:4], b
    teacher, b = seen["same"]
    assert b.teacher_text is None and torch.equal(teacher, b.ids)
    teacher, b = seen["caption"]
    assert not torch.equal(teacher, b.ids) and torch.equal(teacher, b.for_teacher().ids)


@pytest.mark.parametrize("kw, message", [
    (dict(p_single=1.5), "p_single must lie in"),
    (dict(p_phrasing=-0.1), "p_phrasing must lie in"),
    (dict(teacher_prompt="styled"), "teacher_prompt must be caption or same"),
    (dict(concepts="no-such-list"), "neither a shipped list"),
    (dict(p_single=0.5, tg_pool=8), "tg_pool draws its fixed pool"),
])
def test_bad_row_settings_fail_before_the_run_folder(kw, message, teacher_dir, tmp_path, tiny_corpus):
    method = "tg" if "tg_pool" in kw else "dmd2"
    with pytest.raises(FlowflashError, match=message):
        distill_setup(cfg(teacher_dir, tiny_corpus, tmp_path / "run", method, **kw), init_dist())
    assert not (tmp_path / "run").exists()


def test_naive_refuses_row_settings(teacher_dir, tmp_path, tiny_corpus):
    with pytest.raises(FlowflashError, match="does not use p_single"):
        distill_setup(DistillConfig(teacher=str(teacher_dir), method="naive", p_single=0.5), init_dist())


def test_phrasings_on_a_corpus_built_without_them_fail_before_the_run_folder(teacher_dir, tmp_path, tiny_corpus):
    import json
    import shutil
    old = tmp_path / "old-corpus"
    shutil.copytree(tiny_corpus, old)
    rows = [json.loads(line) for line in (old / "manifest.jsonl").read_text().splitlines() if line.strip()]
    (old / "manifest.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "phrasings"}) + "\n"
                                                for r in rows))
    with pytest.raises(FlowflashError, match="lists no phrasings .*flowflash data build"):
        distill_setup(cfg(teacher_dir, old, tmp_path / "run", "dmd2", p_phrasing=0.5), init_dist())
    assert not (tmp_path / "run").exists()
