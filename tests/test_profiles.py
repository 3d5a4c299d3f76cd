"""Device profiles chosen from made-up machine facts, the CLI's use of them, and `flowflash doctor`."""
import pytest

from flowflash.cli import main
from flowflash.errors import FlowflashError
from flowflash.runtime.profiles import Machine, large_encoder, pick


def machine(**kw):
    base = dict(cores=8, ram_total_gb=32, ram_available_gb=24)
    return Machine(**{**base, **kw})


@pytest.mark.parametrize("facts, name, device, dtype, threads, batch, drop", [
    (dict(cuda=True), "gpu", "cuda", "bf16", None, 16, False),
    (dict(mps=True), "gpu", "mps", "fp16", None, 16, False),
    (dict(cores=1, ram_available_gb=16), "tiny", "cpu", "fp32", 1, 1, True),
    (dict(cores=8, ram_available_gb=1.5), "tiny", "cpu", "fp32", 1, 1, True),
    (dict(cores=2, ram_available_gb=22), "laptop", "cpu", "fp32", 2, 4, False),
    (dict(cores=16, ram_available_gb=6), "laptop", "cpu", "fp32", 4, 4, False),
    (dict(cores=16, ram_available_gb=60), "desktop", "cpu", "fp32", 16, 8, False),
])
def test_auto_picks_from_machine_facts(facts, name, device, dtype, threads, batch, drop):
    p = pick("auto", machine(**facts))
    assert (p.name, p.device, p.dtype, p.threads, p.batch_size, p.drop_large_encoder) == \
        (name, device, dtype, threads, batch, drop)
    assert p.why.startswith("auto: ")


def test_backend_and_low_memory_follow_the_model_and_the_packages():
    assert pick("laptop", machine(openvino=True)).backend == "openvino"
    assert pick("laptop", machine(openvino=True), emoji=False).backend == "torch"  # SD3: torch only
    assert pick("desktop", machine()).backend == "torch"  # openvino not installed
    assert pick("tiny", machine()).low_memory and not pick("tiny", machine(), emoji=False).low_memory
    assert not pick("laptop", machine()).low_memory
    bf16 = frozenset({"avx2", "avx512_bf16"})
    assert pick("desktop", machine(cpu_flags=bf16)).dtype == "bf16"  # native bf16 matmuls: faster than fp32
    assert pick("desktop", machine(cpu_flags=frozenset({"avx2"}))).dtype == "fp32"
    assert pick("desktop", machine(cpu_flags=bf16, openvino=True)).dtype == "fp32"  # openvino runs fp32
    assert pick("tiny", machine(cpu_flags=bf16)).dtype == "fp32"


def test_named_profiles_and_refusals():
    assert pick("tiny", machine(cuda=True)).device == "cpu"  # asked for: no second-guessing
    assert pick("desktop", machine(cores=3)).threads == 3
    with pytest.raises(FlowflashError, match="profile 'gpu' asked for, but this torch sees no CUDA"):
        pick("gpu", machine())
    with pytest.raises(FlowflashError, match="unknown profile 'phone'"):
        pick("phone", machine())


def test_large_encoder_by_model_kind(tmp_path, tiny_model_dir):
    assert large_encoder(tiny_model_dir) == "minilm"
    (tmp_path / "model_index.json").write_text("{}")
    assert large_encoder(tmp_path) == "t5"


def test_generate_with_a_profile_and_flags_that_win(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import flowflash.runtime.profiles as profiles
    from flowflash.runtime.pipeline import Pipeline

    monkeypatch.setattr(profiles, "machine_facts", lambda: machine(cores=1, ram_available_gb=1))
    seen = {}
    real = Pipeline.load.__func__

    def spy(cls, *a, **kw):
        seen.update(kw)
        return real(cls, *a, **kw)
    monkeypatch.setattr(Pipeline, "load", classmethod(spy))
    assert main(["generate", "dog", "--model", str(tiny_model_dir), "--profile", "auto", "--steps", "2",
                 "-o", str(tmp_path / "a.png")]) == 0
    assert seen["drop"] == {"minilm"} and seen["device"] == "cpu" and seen["dtype"] == "fp32"
    assert main(["generate", "dog", "--model", str(tiny_model_dir), "--profile", "tiny", "--dtype", "bf16",
                 "--steps", "2", "-o", str(tmp_path / "b.png")]) == 0
    assert seen["dtype"] == "bf16"  # an explicit flag beats the profile
    with pytest.raises(SystemExit) as exc:
        main(["generate", "dog", "--profile", "phone"])
    assert exc.value.code == 2 and "invalid choice: 'phone'" in capsys.readouterr().err


def test_doctor_prints_machine_profile_and_plan(tiny_model_dir, capsys, monkeypatch):
    import flowflash.runtime.profiles as profiles

    monkeypatch.setattr(profiles, "machine_facts", lambda: machine(cores=2, ram_available_gb=20))
    assert main(["doctor", "--model", str(tiny_model_dir), "--no-measure"]) == 0
    out = capsys.readouterr().out
    assert "profile: laptop (auto: 2 cores and 20.0 GB RAM free)" in out
    assert "threads 2, batch size 4, drop none" in out and "planned memory" in out
    assert main(["doctor", "--model", str(tiny_model_dir), "--profile", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "drop minilm" in out and "measured: one batch of 1 image(s) in a fresh process peaks at" in out
