"""eval / bench / prompt-set bad input: one clear error, nothing half-written."""
import json

import pytest

from flowflash.cli import main
from flowflash.eval.run import load_prompt_set, read_image_folder
from flowflash.errors import FlowflashError


def test_prompt_set_errors(tmp_path):
    with pytest.raises(FlowflashError, match="prompt set not found"):
        load_prompt_set(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(FlowflashError, match="prompt set is empty"):
        load_prompt_set(tmp_path / "empty.jsonl")


def test_image_folder_size_mismatch(tmp_path):
    from PIL import Image
    Image.new("RGB", (16, 16)).save(tmp_path / "00000.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "00001.png")
    with pytest.raises(FlowflashError, match="mismatched sizes"):
        read_image_folder(tmp_path, 2)
    with pytest.raises(FlowflashError, match="lacks 1 of the 3"):
        read_image_folder(tmp_path, 3)


def test_bench_unknown_setting_and_model(tmp_path, capsys, tiny_model_dir):
    code = main(["bench", "--setting", "a=model:teacher,colour:red", "--out", str(tmp_path / "b")])
    assert code == 2 and "unknown option 'colour'" in capsys.readouterr().err
    code = main(["bench", "--setting", "a=model:/no/such", "--out", str(tmp_path / "b")])
    assert code == 2 and "unknown model" in capsys.readouterr().err
    code = main(["bench", "--setting", f"a=model:{tiny_model_dir}", "--baseline", "zz", "--out", str(tmp_path / "b")])
    assert code == 2 and "baseline 'zz'" in capsys.readouterr().err
    assert not list(tmp_path.glob("b*"))


def test_bench_runs_tiny_settings_side_by_side(tmp_path, capsys, tiny_model_dir):
    m = str(tiny_model_dir)
    code = main(["bench", "--setting", f"four=model:{m},steps:4,guidance:3", "--setting", f"one=model:{m},steps:1,guidance:1",
                 "--setting", f"bf=model:{m},steps:1,guidance:1,precision:bf16", "--memory",
                 "--reps", "2", "--prompt", "a red apple", "--out", str(tmp_path / "bench")])
    assert code == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["setting"]: r for r in res["rows"]}
    assert rows["four"]["speedup"] == 1.0 and rows["one"]["steps"] == 1 and rows["four"]["steps"] == 4
    assert rows["one"]["speedup"] > 1.5  # 1 step without CFG is several times cheaper than 4 with
    assert (tmp_path / "bench.md").exists() and (tmp_path / "latency.png").exists()
    assert rows["bf"]["precision"] == "bf16" and all(r["peak_rss_mb"] > 50 for r in rows.values())
