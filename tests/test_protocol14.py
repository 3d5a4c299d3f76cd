"""Issue 14's protocol runner: the split stage's pick and the paired claim rule (pure functions of scored sets)."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

spec = importlib.util.spec_from_file_location("protocol14", Path(__file__).parents[1] / "scripts" / "protocol14.py")
p14 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(p14)


def scored(cos: torch.Tensor) -> dict:
    return {"cos": cos, "align": float(100 * cos.clamp(min=0).mean()), "fd": 500.0, "r_precision": 0.5}


def test_paired_claims_only_beyond_twice_the_seed_sd_and_outside_the_interval():
    base = torch.linspace(0.1, 0.3, 50)
    sets = {}
    for s in range(3):
        sets[("x", s, "u8")] = scored(base)
        sets[("y", s, "u8")] = scored(base + 0.05 + 0.001 * s)  # +5 points, seeds agree
    c = p14.paired(sets, ("x", "u8"), ("y", "u8"), torch.Generator().manual_seed(0), 200)
    assert c["pair"] == "y - x" and c["seeds"] == 3 and c["claimed"]
    assert 4.9 < c["align_diff"] < 5.2 and c["ci95"][0] > 0
    # one seed: no seed spread, so no claim however large the difference; two: below the protocol's three
    one = {k: v for k, v in sets.items() if k[1] == 0}
    assert not p14.paired(one, ("x", "u8"), ("y", "u8"), torch.Generator().manual_seed(0), 200)["claimed"]
    two = {k: v for k, v in sets.items() if k[1] < 2}
    c2 = p14.paired(two, ("x", "u8"), ("y", "u8"), torch.Generator().manual_seed(0), 200)
    assert c2["seeds"] == 2 and c2["align_diff"] > 2 * c2["seed_sd"] and c2["ci95"][0] > 0 and not c2["claimed"]
    # no common seeds: nothing to compare
    assert p14.paired({("x", 0, "u8"): sets[("x", 0, "u8")], ("y", 1, "u8"): sets[("y", 1, "u8")]},
                      ("x", "u8"), ("y", "u8"), torch.Generator(), 10) is None


def test_split_table_picks_the_ratio_on_training_prompts_and_judges_it_against_the_control():
    cos = torch.linspace(0.1, 0.3, 40)
    sets, train = {}, {}
    held = {"merge_r000": 0.00, "merge_r050": 0.02, "merge_r100": 0.10, "unsplit": 0.01}
    trained = {"merge_r000": 30.0, "merge_r050": 31.0, "merge_r100": 29.0, "unsplit": 35.0}
    for arm in held:
        for s in (0, 1):
            sets[(arm, s, "u4")] = scored(cos + held[arm])
            train[(arm, s, "u4")] = trained[arm]
    res = p14.split_table(sets, train, torch.Generator().manual_seed(0), 100)
    # the control's training alignment does not compete, and the held-out set does not pick
    assert res["picked"] == "merge_r050"
    assert res["vs_control"]["pair"] == "merge_r050 - unsplit" and res["vs_control"]["align_diff"] > 0
    rows = {r["arm"]: r for r in res["rows"]}
    assert rows["merge_r100"]["train_align"] == 29.0 and rows["unsplit"]["seeds"] == 2


def test_the_step_count_reaches_every_config_and_every_arm_subprocess(tmp_path, monkeypatch):
    import argparse
    import sys

    a = argparse.Namespace(student_steps=2, batch=4, lr=1e-4, device="cpu", parallel=6, budget=60, data="d",
                           updates=8, threads=1, points="final", split_updates=4, split_at=0.5, train_prompts=2,
                           noise_k=2, noise_ref=2, split_from=None, noise_mid=False, seeds=[0], ckpt_updates=48,
                           resume=True)
    assert p14.config(a, method="tg").student_steps == 2 and p14.config(a, method="dmd2").student_steps == 2
    launched = []

    class Done:  # a subprocess that has already finished
        returncode = 0

        def __init__(self, cmd, **kw):
            launched.append(cmd)

        def poll(self):
            return 0

    monkeypatch.setattr(p14.subprocess, "Popen", Done)
    monkeypatch.setattr(p14.time, "sleep", lambda s: None)
    done = p14.run_jobs(a, [("A", 0), ("B", 0)], tmp_path, start=p14.time.time())
    assert [d["rc"] for d in done] == [0, 0] and len(launched) == 2
    for cmd in launched:
        assert cmd[0] == sys.executable and cmd[cmd.index("--student-steps") + 1] == "2"
        assert cmd[cmd.index("--ckpt-updates") + 1] == "48" and "--resume" in cmd  # a resumed run's arms resume


def test_evaluation_points_and_the_updates_they_need():
    assert p14.eval_points("all", 256) == (64, 128, 256)
    assert p14.eval_points("half", 256) == (128, 256) and p14.eval_points("final", 255) == (255,)
    with pytest.raises(SystemExit, match="--updates 250: a multiple of 4 with --points all"):
        p14.eval_points("all", 250)
    with pytest.raises(SystemExit, match="a multiple of 2 with --points half"):
        p14.eval_points("half", 255)


def test_the_common_start_trains_at_its_own_batch_and_reports_its_last_logged_rows(tmp_path, monkeypatch):
    import argparse
    import json

    import flowflash.methods.dmd2 as dmd2
    import flowflash.methods.tg as tg
    import flowflash.models.flow_model as flow_model

    a = argparse.Namespace(student_steps=4, batch=64, start_batch=256, lr=1e-4, device="cpu", tg_iters=5,
                           tg_pool=8, warm_iters=3)
    trained = []

    def fake_train(method, cfg, sampler, **kw):
        trained.append((method, cfg))
        out = p14.Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        if method == "tg":  # the warm-up logs nothing here: its report says so
            (out / "log.jsonl").write_text(json.dumps({"step": 4}) + "\n" + json.dumps({"step": 5, "img_s": 9.0}))
        return out / "student"

    monkeypatch.setattr(p14, "train", fake_train)
    monkeypatch.setattr(tg, "TrajectoryGuidance", lambda cfg, teacher: "tg")
    monkeypatch.setattr(dmd2, "DMD2", lambda cfg, teacher, student: "warm")
    monkeypatch.setattr(flow_model, "load_model", lambda path: None)
    bank = {"ids": torch.zeros(4, 2, dtype=torch.long)}
    res = p14.common_start(a, tmp_path, bank, (3, 8, 8))
    assert [(m, c.batch_size, c.steps) for m, c in trained] == [("tg", 256, 5), ("warm", 256, 3)]
    assert res["batch"] == 256 and res["tg_log"] == {"step": 5, "img_s": 9.0} and res["warm_log"] is None


def test_pack_returns_one_file_per_arm_of_the_calls_own_seeds(tmp_path):
    import numpy as np

    results, out = tmp_path / "results", tmp_path / "out"
    results.mkdir(), out.mkdir()
    for arm in ("A", "B"):
        for seed in (0, 1, 3):
            np.savez_compressed(results / f"images-{arm}-{seed}.npz", u2=np.full((1, 3, 2, 2), seed, np.uint8))
    report = {}
    p14.pack(results, out, report, seeds=[1, 3])
    assert sorted(f.name for f in out.iterdir()) == ["images-A.npz", "images-B.npz"]
    got = np.load(out / "images-A.npz")
    assert sorted(got.keys()) == ["s1_u2", "s3_u2"] and int(got["s3_u2"].max()) == 3
    assert report["run_records"] == [] and report["noise_mid"] == {}


def test_checkpoint_step_reads_the_checkpoint_or_its_old_copy(tmp_path):
    import json

    assert p14.checkpoint_step(tmp_path) is None  # before the first checkpoint
    (tmp_path / "checkpoint.old").mkdir()
    (tmp_path / "checkpoint.old" / "state.json").write_text(json.dumps({"state": {"step": 288}}))
    assert p14.checkpoint_step(tmp_path) == 288  # a crash between the renames
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.json").write_text(json.dumps({"state": {"step": 576}}))
    assert p14.checkpoint_step(tmp_path) == 576


def test_versus_reference_gives_the_fd_ratio_and_the_alignment_difference_against_one_draw():
    cos = torch.linspace(0.1, 0.3, 60)
    sets = {("A", s, "u8"): {**scored(cos + 0.02), "fd": 550.0 + 10 * s} for s in range(3)}
    sets[("A", 0, "u4")] = scored(cos - 0.5)  # another point: not read
    teacher = {**scored(cos), "fd": 500.0}
    v = p14.versus_reference(sets, "A", "u8", teacher, torch.Generator().manual_seed(0), 200)
    assert v["seeds"] == 3 and abs(v["fd_ratio"] - 1.12) < 1e-6 and abs(v["fd_ratio_sd"] - 0.02) < 1e-6
    assert 1.9 < v["align_diff"] < 2.1 and v["ci95"][0] > 0
    # a reference the arm trails: the interval lies below 0
    ahead = {**scored(cos + 0.1), "fd": 500.0}
    assert p14.versus_reference(sets, "A", "u8", ahead, torch.Generator().manual_seed(0), 200)["ci95"][1] < 0


def test_eval_images_passes_the_teachers_guidance(monkeypatch):
    import flowflash.methods.base as base

    seen = []
    monkeypatch.setattr(base, "velocity", lambda model, x, t, b, guidance=1.0: seen.append(guidance) or torch.zeros_like(x))

    class Sched:
        def timesteps(self):
            return torch.tensor([1.0, 0.5, 0.0])

    class Cfg:
        channels, image_size, sampling = 3, 4, Sched()

    model = type("M", (), {"cfg": Cfg()})()
    bank = {"ids": torch.zeros(3, 2, dtype=torch.long), "mini_h": torch.zeros(3, 2, 4), "mini_p": torch.zeros(3, 4)}
    imgs = p14.eval_images(model, bank, torch.device("cpu"), batch=2, guidance=4.0)
    assert imgs.shape == (3, 3, 4, 4) and seen == [4.0] * 4  # two batches x two steps
    seen.clear()
    p14.eval_images(model, bank, torch.device("cpu"), batch=8)
    assert seen == [1.0, 1.0]  # a student: no CFG


def test_iteration_seconds_is_the_median_interval_so_draws_and_restarts_do_not_count(tmp_path):
    log = tmp_path / "log.jsonl"
    assert p14.iteration_seconds(log) is None
    rows = [(0, 0.0), (50, 10.0), (100, 20.0), (150, 90.0), (200, 100.0), (250, 500.0), (300, 510.0)]
    log.write_text("\n".join(json.dumps({"step": s, "time": t}) for s, t in rows))
    assert p14.iteration_seconds(log) == pytest.approx(0.2)  # 0.2 s an iteration; a draw and a restart ignored


def test_save_npz_leaves_the_previous_file_when_the_write_fails(tmp_path, monkeypatch):
    import numpy as np

    f = tmp_path / "images-A-0.npz"
    p14.save_npz(f, u4=np.zeros(3))

    def broken(file, **arrays):
        file.write(b"PK half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez_compressed", broken)
    with pytest.raises(KeyboardInterrupt):
        p14.save_npz(f, u4=np.ones(3), u8=np.ones(3))
    monkeypatch.undo()
    assert list(np.load(f)) == ["u4"] and list(tmp_path.iterdir()) == [f]


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_an_arm_child_is_sent_sigterm_when_run_dies(tmp_path):
    import signal
    import subprocess
    import time

    flag, ready = tmp_path / "terminated", tmp_path / "ready"
    child = (f"import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (open({str(flag)!r}, 'w').write('x'), "
             f"sys.exit(0))); open({str(ready)!r}, 'w').write('x'); time.sleep(60)")
    parent = (f"import importlib.util, subprocess, sys, time; spec = importlib.util.spec_from_file_location('p', "
              f"{str(spec.origin)!r}); p = importlib.util.module_from_spec(spec); spec.loader.exec_module(p); "
              f"c = subprocess.Popen([sys.executable, '-c', {child!r}], preexec_fn=p.die_with_parent); "
              "print(c.pid, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline())
    for _ in range(300):  # bounded: the child has installed its handler (up to 30 s on a busy machine)
        if ready.exists():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for _ in range(100):  # bounded: up to 10 s
        if flag.exists():
            break
        time.sleep(0.1)
    assert flag.exists()
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_cost_table_is_the_median_over_seeds_of_six_iterations():
    recs = [{"arm": "A", "iteration_s": 1.0}, {"arm": "A", "iteration_s": 1.2}, {"arm": "A", "iteration_s": 5.0},
            {"arm": "B", "iteration_s": 0.5}, {"arm": "C"}]  # C: a record from before iteration_s
    assert p14.cost_table(recs) == [{"arm": "A", "runs": 3, "update_s": pytest.approx(7.2)},
                                    {"arm": "B", "runs": 1, "update_s": pytest.approx(3.0)}]


def test_runs_the_disk_cannot_hold_are_refused_before_they_start(tmp_path, monkeypatch):
    import collections

    (tmp_path / "warm").mkdir()
    (tmp_path / "warm" / "critic.safetensors").write_bytes(b"x" * 1000)
    usage = collections.namedtuple("usage", "total used free")
    free = {"bytes": 16_000}
    monkeypatch.setattr(p14.shutil, "disk_usage", lambda p: usage(10**6, 0, free["bytes"]))
    p14.check_disk(tmp_path, 9, 3)  # 9 runs x 1.4 kB + 3 saving at once x 1 kB = 15.6 kB: they fit
    free["bytes"] = 15_000
    with pytest.raises(SystemExit, match="9 runs need about 0.0 GB"):
        p14.check_disk(tmp_path, 9, 3)
    p14.check_disk(tmp_path, 0, 3)  # nothing left to run: nothing to check


def measures(start: str, seeds: range, shift: float = 0.0) -> dict:
    """What `measure` writes for one session's runs of arms A and B (B ahead by `shift` on every prompt)."""
    cos = torch.linspace(0.1, 0.3, 40)
    sets = {}
    for s in seeds:
        for arm, d in (("A", 0.0), ("B", shift)):
            v = scored(cos + d + 0.001 * s)
            sets[p14.KEY.join((arm, str(s), "u8"))] = {**v, "cos": v["cos"].tolist()}
    ref = scored(cos)
    return {"version": 1, "runs": f"session-{start}", "start_sha256": start, "eval_prompts": 40, "sets": sets,
            "train_align": {}, "plain": {p14.KEY.join(("A", str(s), "u8")): {"r_precision": 0.2, "fd": 900.0} for s in seeds},
            "refs": {"teacher": {**ref, "cos": ref["cos"].tolist()}},
            "report": {"run_records": [{"arm": "A", "seed": s, "iteration_s": 1.0} for s in seeds], "noise": None,
                       "noise_mid": {}}}


def test_measures_of_two_sessions_pool_only_on_one_common_start(tmp_path):
    first, second = measures("abc", range(2), 0.05), measures("abc", range(2, 3), 0.05)
    m = p14.merge_measures([first, second])
    assert sorted(m["sets"]) == sorted([*first["sets"], *second["sets"]]) and len(m["report"]["run_records"]) == 3
    second["report"]["run_records"] += first["report"]["run_records"]  # a later call on the same work lists both
    assert len(p14.merge_measures([first, second])["report"]["run_records"]) == 3
    p14.score(m, tmp_path / "p14")
    res = json.loads((tmp_path / "p14.json").read_text())
    claim = next(c for c in res["claims"] if c["pair"] == "B - A")
    assert claim["seeds"] == 3 and claim["claimed"] and claim["align_diff"] > 4  # three seeds across two sessions
    assert res["plain_v1"][0]["seeds"] == 3 and res["versus"] and res["start_sha256"] == "abc"
    assert "| u8 (primary) | B - A | 3 |" in (tmp_path / "p14.md").read_text()
    # two seeds only (one session): described, not claimed
    p14.score(p14.merge_measures([first]), tmp_path / "two")
    assert not json.loads((tmp_path / "two.json").read_text())["claims"][0]["claimed"]
    with pytest.raises(SystemExit, match="different common starts"):
        p14.merge_measures([first, measures("xyz", range(2, 3))])
    again = measures("abc", range(1, 3), 0.05)  # seed 1 drawn again, the same numbers: one set
    assert len(p14.merge_measures([first, again])["sets"]) == 6
    key = p14.KEY.join(("A", "1", "u8"))
    again["sets"][key]["fd"] *= 1 + 1e-9  # measured again in another process: FD's last digits may differ
    assert p14.merge_measures([first, again])["sets"][key]["fd"] == first["sets"][key]["fd"] * (1 + 1e-9)
    again["sets"][key]["fd"] *= 1.001  # a different FD: not the same images
    with pytest.raises(SystemExit, match=r"sets A\|1\|u8: in more than one"):
        p14.merge_measures([first, again])
    other = measures("abc", range(1, 3), 0.07)  # seed 1's B drawn again differently: refused
    with pytest.raises(SystemExit, match=r"sets B\|1\|u8: in more than one of the measures, with different"):
        p14.merge_measures([first, other])


def test_the_start_fingerprint_covers_the_student_and_the_warmed_critic(tmp_path):
    (tmp_path / "tg" / "student").mkdir(parents=True)
    (tmp_path / "warm" / "checkpoint").mkdir(parents=True)
    assert p14.start_sha256(tmp_path) is None  # no start yet
    (tmp_path / "tg" / "student" / "model.safetensors").write_bytes(b"student")
    (tmp_path / "warm" / "checkpoint" / "critic.safetensors").write_bytes(b"critic")
    h = p14.start_sha256(tmp_path)
    (tmp_path / "warm" / "checkpoint" / "critic.safetensors").write_bytes(b"critic2")
    assert h and p14.start_sha256(tmp_path) != h
