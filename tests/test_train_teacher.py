"""Teacher training on a tiny model: what changes, determinism, resume, checkpoint contents, DDP."""
import json

import pytest
import torch
from safetensors.torch import load_file

from flowflash.errors import FlowflashError
from flowflash.train.common import load_config
from flowflash.train.configs import TeacherConfig
from flowflash.train.run import train_teacher

TINY = dict(patch_size=4, num_layers=1, num_heads=2, head_dim=8, light_max_tokens=16, minilm_max_tokens=16,
            image_size=16, sampling={"shift": 1.0, "steps": 2}, name="tiny")


def cfg(corpus, out, **kw):
    base = dict(data=str(corpus), out=str(out), model=TINY, steps=4, batch_size=4, warmup=1, ckpt_every=2,
                sample_every=1000, log_every=1, sample_prompts=["red apple, twemoji style"])
    base.update(kw)
    return TeacherConfig(**base)


def final_weights(out):
    return load_file(out / "checkpoint" / "model.safetensors")


def test_every_trainable_parameter_moves(tiny_corpus, tmp_path):
    from flowflash.models.flow_model import FlowModel, ModelConfig
    from flowflash.models.text import WordTokenizer
    from flowflash.data.dataset import load_corpus

    train_teacher(cfg(tiny_corpus, tmp_path / "a", steps=1, ckpt_every=1))
    torch.manual_seed(0)
    caps = load_corpus(tiny_corpus).captions
    init = FlowModel(ModelConfig.from_dict({**TINY, "vocab": WordTokenizer.build(caps).vocab})).state_dict()
    after = final_weights(tmp_path / "a")
    moved = {k for k in init if not torch.equal(init[k], after[k])}
    assert any(k.startswith("transformer.") for k in moved) and any(k.startswith("light.") for k in moved)
    # after one AdamW step every parameter that got a gradient moves; the padding row never does
    assert "light.embed.weight" in moved
    assert torch.equal(init["light.embed.weight"][0], after["light.embed.weight"][0])


def test_deterministic_and_resume_matches_uninterrupted(tiny_corpus, tmp_path):
    train_teacher(cfg(tiny_corpus, tmp_path / "full"))
    train_teacher(cfg(tiny_corpus, tmp_path / "again"))
    train_teacher(cfg(tiny_corpus, tmp_path / "split"), max_steps=2)
    assert json.loads((tmp_path / "split/checkpoint/state.json").read_text())["state"]["step"] == 2
    train_teacher(cfg(tiny_corpus, tmp_path / "split"), resume=True)
    a, b, c = (final_weights(tmp_path / n) for n in ("full", "again", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], c[k]) for k in a)
    log = [json.loads(l) for l in (tmp_path / "split/log.jsonl").read_text().splitlines()]
    full = [json.loads(l) for l in (tmp_path / "full/log.jsonl").read_text().splitlines()]
    assert [r["flow"] for r in log] == [r["flow"] for r in full]  # resume reproduces the next losses
    ck = tmp_path / "full/checkpoint"
    assert {p.name for p in ck.iterdir()} == {"model.safetensors", "model_ema.safetensors",
                                             "model_optim.safetensors", "rng.safetensors", "state.json"}
    assert (tmp_path / "full/ema_model/model.safetensors").exists()


def test_resume_without_checkpoint(tiny_corpus, tmp_path):
    with pytest.raises(FlowflashError, match="no checkpoint"):
        train_teacher(cfg(tiny_corpus, tmp_path / "none"), resume=True)


def test_unknown_config_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 3\nlearning_rate: 1\n")
    with pytest.raises(FlowflashError, match="unknown keys.*learning_rate"):
        load_config(TeacherConfig, p)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tiny_corpus, tmp_path, monkeypatch):
    import flowflash.methods.rf as teacher
    real, calls = teacher.flow_matching_loss, []

    def poisoned(*a):
        calls.append(1)
        loss = real(*a)
        return loss * float("nan") if len(calls) == 3 else loss
    monkeypatch.setattr(teacher, "flow_matching_loss", poisoned)
    with pytest.raises(FlowflashError, match=r"non-finite flow loss at step 2.*Last good checkpoint: .*checkpoint"):
        train_teacher(cfg(tiny_corpus, tmp_path / "nan", steps=4, ckpt_every=2))
    state = json.loads((tmp_path / "nan/checkpoint/state.json").read_text())
    assert state["state"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in final_weights(tmp_path / "nan").values())


@pytest.mark.slow
def test_torchrun_two_processes(tiny_corpus, tmp_path, torchrun):
    import yaml
    c = cfg(tiny_corpus, tmp_path / "ddp")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(c.__dict__))
    torchrun(["train", "teacher", "--config", str(path)])
    state = json.loads((tmp_path / "ddp/checkpoint/state.json").read_text())
    assert state["state"]["step"] == 4
    rng = load_file(tmp_path / "ddp/checkpoint/rng.safetensors")  # each rank resumes its own data stream
    assert not torch.equal(rng["gen.data.rank0"], rng["gen.data.rank1"])


def test_init_from_a_model_folder_starts_from_its_weights(tiny_corpus, tmp_path):
    from flowflash.models.flow_model import load_model
    train_teacher(cfg(tiny_corpus, tmp_path / "first", steps=2))
    shipped = tmp_path / "first" / "ema_model"
    c = cfg(tiny_corpus, tmp_path / "second", steps=1, lr=0.0, model={}, init_from=str(shipped))
    train_teacher(c)  # lr 0: weights must stay exactly the shipped ones
    a, b = load_model(shipped).state_dict(), load_model(tmp_path / "second" / "ema_model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_extend_vocab_adds_the_corpus_new_words_without_changing_the_start(tiny_corpus, tmp_path):
    from flowflash.models.flow_model import FlowModel, ModelConfig, load_model, save_model
    from flowflash.models.text import WordTokenizer
    from flowflash.data.dataset import load_corpus

    torch.manual_seed(0)
    words = WordTokenizer.build(load_corpus(tiny_corpus).captions).vocab
    small = FlowModel(ModelConfig.from_dict({**TINY, "vocab": words[: len(words) // 2]}))  # knows half the words
    save_model(small, tmp_path / "small")
    small = load_model(tmp_path / "small")  # as stored (fp16)
    c = cfg(tiny_corpus, tmp_path / "grown", steps=1, lr=0.0, model={}, init_from=str(tmp_path / "small"),
            extend_vocab=True, p_phrasing=0.5)
    train_teacher(c)  # lr 0: the grown model must answer exactly as the small one did
    grown = load_model(tmp_path / "grown" / "ema_model")
    assert grown.cfg.vocab[: len(words) // 2] == small.cfg.vocab and set(words) <= set(grown.cfg.vocab)
    assert "emoji" in grown.cfg.vocab  # a word only the phrasings use
    prompt = "the " + " ".join(words[len(words) // 2:][:4])  # new words: unknown to the small model
    ids_small, _ = WordTokenizer(small.cfg.vocab).batch([prompt], 16)
    ids_grown, _ = WordTokenizer(grown.cfg.vocab).batch([prompt], 16)
    assert not torch.equal(ids_small, ids_grown)
    mini = torch.randn(1, 16, 384), torch.randn(1, 384)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([0.5])
    from flowflash.models.text import combine
    on = torch.ones(1, dtype=torch.bool)
    with torch.no_grad():
        a = small(x, t, *combine(small.light, ids_small, *mini, on, on))
        b = grown(x, t, *combine(grown.light, ids_grown, *mini, on, on))
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(FlowflashError, match="extend_vocab grows the vocabulary of the model init_from"):
        train_teacher(cfg(tiny_corpus, tmp_path / "bad", extend_vocab=True))
    assert not (tmp_path / "bad").exists()


def test_init_from_run_resumes_with_the_shipped_architecture(tiny_corpus, tmp_path):
    # cfg.model is empty in an init_from config: --resume must rebuild the shipped model, not a default one
    train_teacher(cfg(tiny_corpus, tmp_path / "first", steps=2))
    shipped = str(tmp_path / "first" / "ema_model")
    train_teacher(cfg(tiny_corpus, tmp_path / "full", model={}, init_from=shipped))
    train_teacher(cfg(tiny_corpus, tmp_path / "split", model={}, init_from=shipped), max_steps=2)
    train_teacher(cfg(tiny_corpus, tmp_path / "split", model={}, init_from=shipped), resume=True)
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_concept_list_restricts_the_single_rows(tiny_corpus, tmp_path, monkeypatch):
    import flowflash.train.data as teacher
    from flowflash.data.dataset import load_corpus

    rows = load_corpus(tiny_corpus).rows
    drawn = []
    real = teacher.draw_rows
    monkeypatch.setattr(teacher, "draw_rows", lambda *a: drawn.append(real(*a)) or drawn[-1])
    keep = tmp_path / "keep.txt"
    keep.write_text("# only the frog\nfrog\n\n")
    for p_single in (0.9, None):
        drawn.clear()
        train_teacher(cfg(tiny_corpus, tmp_path / f"f{p_single}", steps=6, batch_size=8, concepts=str(keep),
                          p_single=p_single))
        picked = [rows[i] for i in torch.cat(drawn).tolist()]
        singles = [r for r in picked if r["kind"] == "single"]
        assert singles and {r["concepts"][0] for r in singles} == {"frog"}
        assert any(r["kind"] != "single" for r in picked)  # scenes are not filtered

    with pytest.raises(FlowflashError, match="neither a shipped list"):
        train_teacher(cfg(tiny_corpus, tmp_path / "x", concepts="no-such-list"))
    assert not (tmp_path / "x").exists()  # nothing half-made
    keep.write_text("unicorn\n")
    with pytest.raises(FlowflashError, match="matches no single emoji"):
        train_teacher(cfg(tiny_corpus, tmp_path / "y", concepts=str(keep)))


def test_shipped_core_list_covers_the_scene_objects():
    from flowflash.data.constants import SCENE_OBJECTS
    from flowflash.data.dataset import load_concept_list

    core = load_concept_list("core")
    assert 150 <= len(core) <= 250 and "red-apple" in core and "moose" not in core
    # scenes stay whole under the core list, so every object they use must be in it
    assert set(SCENE_OBJECTS) - core <= {"rocket", "star", "fire", "sun", "heart-suit", "snowflake", "crescent-moon"}


def test_ship_writes_a_loadable_model_with_a_card(tiny_corpus, tmp_path, capsys):
    from flowflash.cli import main
    from flowflash.models.flow_model import load_model
    train_teacher(cfg(tiny_corpus, tmp_path / "run", steps=2))
    code = main(["train", "ship", "--run", str(tmp_path / "run"), "--to", str(tmp_path / "shipped"),
                 "--command", "flowflash train teacher --config x.yaml"])
    assert code == 0
    card = (tmp_path / "shipped" / "README.md").read_text()
    assert "2 steps at batch 4" in card and "CPU-hours" in card and "flowflash train teacher --config x.yaml" in card
    assert (tmp_path / "shipped" / "ATTRIBUTION.md").exists() and load_model(tmp_path / "shipped").cfg.name == "tiny"
    assert "- **Storage**: int8 weight-only" in card and "MB in 1 safetensors file(s)" in card
    assert "concept list" not in card and "started from" not in card


def test_card_names_the_starting_weights_and_the_concept_list():
    from flowflash.release.card import schedule_note
    note = schedule_note({"init_from": "weights/t", "concepts": "core", "p_single": 0.85})
    assert "started from the weights in weights/t" in note and "concept list 'core'" in note and "85%" in note


@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_and_exports(tiny_corpus, tmp_path):
    """A real SIGTERM from outside a training process (its own process: no other test's threads or handlers
    around it) ends the run after the current step with a checkpoint and an export, exit code 0."""
    import signal
    import subprocess
    import sys
    import time

    import yaml
    c = cfg(tiny_corpus, tmp_path / "t", steps=100000, ckpt_every=100000)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(c.__dict__))
    proc = subprocess.Popen([sys.executable, "-m", "flowflash.cli", "train", "teacher", "--config",
                             str(tmp_path / "c.yaml")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, end = tmp_path / "t/log.jsonl", time.monotonic() + 120
    while time.monotonic() < end and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    state = json.loads((tmp_path / "t/checkpoint/state.json").read_text())
    steps = len(log.read_text().splitlines())
    assert 2 <= state["state"]["step"] == steps < 100000  # stopped where its log stopped: the step finished
    assert (tmp_path / "t/ema_model/model.safetensors").exists()


def test_a_stop_that_lands_late_in_a_step_still_ends_on_a_checkpoint(tiny_corpus, tmp_path, monkeypatch):
    """The stop request read once a step: one arriving after the step decided not to save (here while it
    logs) ends the run only after the next step, which checkpoints."""
    import flowflash.train.loop as loop

    stops, writes = [], []

    class Stop(loop.GracefulStop):
        def __enter__(self):
            stops.append(self)
            return super().__enter__()
    real_write = loop.JsonlLog.write

    def write(self, record):
        real_write(self, record)
        writes.append(record["step"])
        if len(writes) == 2:
            stops[0].requested = True  # as the signal handler would, after this step's save decision
    monkeypatch.setattr(loop, "GracefulStop", Stop)
    monkeypatch.setattr(loop.JsonlLog, "write", write)
    train_teacher(cfg(tiny_corpus, tmp_path / "t", steps=10, ckpt_every=100))
    state = json.loads((tmp_path / "t/checkpoint/state.json").read_text())
    assert state["state"]["step"] == 3 and writes == [1, 2, 3]


def test_graceful_stop_handles_then_restores_the_signal_handlers():
    import signal

    from flowflash.train.common import GracefulStop
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with GracefulStop(True) as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handler
        stop._handler(signal.SIGTERM, None)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):  # a second one means now
            stop._handler(signal.SIGINT, None)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    with GracefulStop(False):  # under torchrun: the handlers stay as they are
        assert signal.getsignal(signal.SIGTERM) == before[0]


def test_lr_schedule_warmup_then_cosine_to_min():
    from flowflash.train.loop import lr_factor
    learning_rate = lambda c, step: c.lr * lr_factor(c, step)
    c = TeacherConfig(lr=1e-3, warmup=10, steps=110, decay_start=10, min_lr=1e-4)
    assert learning_rate(c, 0) == pytest.approx(1e-4)  # warmup: (0 + 1) / 10 of lr
    assert learning_rate(c, 10) == pytest.approx(1e-3)
    assert learning_rate(c, 60) == pytest.approx(0.5 * (1e-3 + 1e-4))
    assert learning_rate(c, 110) == pytest.approx(1e-4)
    assert learning_rate(TeacherConfig(lr=1e-3, warmup=10, steps=110), 100) == pytest.approx(1e-3)


def test_p_single_draws_singles_at_the_asked_rate():
    from flowflash.train.data import draw_rows
    singles, scenes = torch.arange(0, 10), torch.arange(10, 100)
    idx = draw_rows(4000, singles, scenes, 0.5, torch.Generator().manual_seed(0))
    frac = (idx < 10).float().mean().item()
    assert 0.46 < frac < 0.54
    uniform = draw_rows(4000, singles, scenes, None, torch.Generator().manual_seed(0))
    assert 0.07 < (uniform < 10).float().mean().item() < 0.13


def test_bf16_autocast_keeps_fp32_master_weights_and_a_missing_gpu_is_named(tiny_corpus, tmp_path):
    train_teacher(cfg(tiny_corpus, tmp_path / "bf16", steps=2, precision="bf16"))
    w = final_weights(tmp_path / "bf16")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in w.values() if v.is_floating_point())
    log = [json.loads(l) for l in (tmp_path / "bf16" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(r["flow"] > 0 for r in log)
    with pytest.raises(FlowflashError, match="precision must be one of fp32, bf16"):
        train_teacher(cfg(tiny_corpus, tmp_path / "p", steps=1, precision="fp8"))
    if not torch.cuda.is_available():
        with pytest.raises(FlowflashError, match="sees no CUDA GPU"):
            train_teacher(cfg(tiny_corpus, tmp_path / "g", steps=1, device="cuda"))


def test_resume_takes_a_changed_lr_and_init_from_refuses_a_model_block(tiny_corpus, tmp_path):
    train_teacher(cfg(tiny_corpus, tmp_path / "r", lr=1e-3, warmup=1), max_steps=2)
    train_teacher(cfg(tiny_corpus, tmp_path / "r", lr=5e-4, warmup=1), resume=True)
    log = [json.loads(l) for l in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert [r["lr_model"] for r in log] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4])  # the phase's own rate
    train_teacher(cfg(tiny_corpus, tmp_path / "first", steps=1))
    with pytest.raises(FlowflashError, match="init_from keeps the architecture"):
        train_teacher(cfg(tiny_corpus, tmp_path / "x", init_from=str(tmp_path / "first" / "ema_model")))


def test_on_an_accelerator_the_nan_check_waits_for_the_log_and_still_guards_the_checkpoint(tiny_corpus, tmp_path,
                                                                                         monkeypatch):
    import flowflash.methods.rf as teacher
    import flowflash.train.loop as loop
    monkeypatch.setattr(loop, "CHECK_EACH_STEP_ON", ())  # the accelerator's way, on the CPU
    real, calls = teacher.flow_matching_loss, []

    def poisoned(*a):
        calls.append(1)
        loss = real(*a)
        return loss * float("nan") if len(calls) == 3 else loss  # step 2
    monkeypatch.setattr(teacher, "flow_matching_loss", poisoned)
    with pytest.raises(FlowflashError, match=r"non-finite (flow|a) loss at step 2-3.*Last good checkpoint"):
        train_teacher(cfg(tiny_corpus, tmp_path / "nan", steps=6, ckpt_every=2, log_every=2))
    state = json.loads((tmp_path / "nan/checkpoint/state.json").read_text())
    assert state["state"]["step"] == 2  # the bad step's weights never reached a checkpoint
    assert all(torch.isfinite(v).all() for v in final_weights(tmp_path / "nan").values())


def test_phrasings_caption_singles_as_people_type_them(tiny_corpus, tmp_path):
    """With p_phrasing, a single is captioned with one of its other phrasings that often: the vocabulary holds
    their words, the bank encodes them once, and the drawn texts mix the caption and the phrasings."""
    from flowflash.data.dataset import load_corpus
    from flowflash.train.common import Dist
    from flowflash.train.data import CaptionBank, RowSampler, caption_texts, heldout_plain_texts

    corpus = load_corpus(tiny_corpus)
    held = heldout_plain_texts(tiny_corpus)
    texts, variants = caption_texts(corpus, True, held)
    assert held and not held & set(texts)  # a held-out concept's plain phrasings never train (plain_v1 stays held out)
    assert held & set(caption_texts(corpus, True)[0])  # ... which they would without the exclusion
    singles = [r for r, row in enumerate(corpus.rows) if row["kind"] == "single"]
    assert all(len(variants[r]) > 1 and texts[variants[r][0]] == corpus.captions[r] for r in singles)
    assert len(texts) == len(set(texts))  # plain phrasings shared by both styles are encoded once
    out = train_teacher(cfg(tiny_corpus, tmp_path / "p", steps=2, p_phrasing=0.5))
    vocab = json.loads((out / "config.json").read_text())["vocab"]
    assert "emoji" in vocab  # "dog face emoji": a word only the phrasings have
    bank = CaptionBank.build(tiny_corpus, vocab, 16, 16, tmp_path / "p", Dist(), phrasings=True)
    draw = RowSampler(bank, torch.tensor(singles), torch.tensor([], dtype=torch.long), None, p_phrasing=0.5)
    gen = torch.Generator().manual_seed(0)
    idx = torch.tensor(singles * 20)
    drawn = bank.texts_of(idx, 0.5, gen)
    own = sum(int(t) == variants[int(r)][0] for r, t in zip(idx, drawn))
    assert 0.35 < own / len(idx) < 0.65
    assert all(int(t) in variants[int(r)] for r, t in zip(idx, drawn))
    assert torch.equal(bank.texts_of(idx, 0.0, gen), idx)  # off: each row's own caption, as before
    b = draw(8, gen)
    assert b.ids.shape[0] == 8 and b.real.shape[0] == 8


def test_ema_update_is_the_lerp_of_every_float_tensor_and_copies_the_rest():
    from flowflash.train.common import EMA

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))  # a long counter among the floats
    ema = EMA(net, 0.9)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    net(torch.randn(8, 4))  # moves the running stats and the batch counter
    ema.update(net, 100)
    d = ema.rate(100)
    for k, v in net.state_dict().items():
        want = before[k].lerp(v.float(), 1 - d) if v.dtype.is_floating_point else v
        assert torch.equal(ema.shadow[k], want), k
    assert ema.shadow["1.num_batches_tracked"].item() == 1
