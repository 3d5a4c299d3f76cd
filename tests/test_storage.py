"""The weight-file layer: formats on disk, int8 storage, sharding, legacy folders, and each error."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flowflash.errors import FlowflashError
from flowflash.models import storage
from flowflash.models.storage import (INT8_SUFFIX, dequantize_int8, load_weights, quantize_int8, save_weights,
                                      storage_of, upgrade_legacy_shards, weight_files, weights_hash)


def tiny_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    """A few KB; float values are fp16-representable so an fp16 roundtrip is exact."""
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(8, 16, generator=g).half().float(),
        "a.bias": torch.randn(8, generator=g).half().float(),
        "b.weight": torch.randn(8, 8, generator=g).half().float(),
        "b.ids": torch.arange(5),  # non-floating: kept as int64
    }


def assert_same(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == (torch.float32 if want[k].is_floating_point() else want[k].dtype), k
        assert torch.equal(got[k], want[k]), k


def file_meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def no_siblings(folder: Path):
    """atomic_dir leaves neither its temp folder nor the old copy behind."""
    assert not folder.with_name(folder.name + ".tmp").exists()
    assert not folder.with_name(folder.name + ".old").exists()


# ---------------------------------------------------------------- single file


def test_fp16_roundtrip_exact_and_metadata(tmp_path):
    sd = tiny_sd()
    files = save_weights(sd, tmp_path / "m", metadata={"note": "hi"})
    assert files == [tmp_path / "m" / "model.safetensors"] == weight_files(tmp_path / "m")
    assert_same(load_weights(tmp_path / "m"), sd)
    half = load_weights(tmp_path / "m", torch.float16)
    assert half["a.weight"].dtype == torch.float16 and half["b.ids"].dtype == torch.int64
    meta = file_meta(files[0])
    assert meta == {"format": "pt", "flowflash_storage": "float16", "note": "hi"}
    with safe_open(str(files[0]), framework="pt") as f:
        assert f.get_slice("a.weight").get_dtype() == "F16"
    assert storage_of(tmp_path / "m") == {"files": 1, "bytes": files[0].stat().st_size, "int8_tensors": 0,
                                          "packed_tensors": 0, "packed_bits": None, "dtypes": ["float16", "int64"]}
    no_siblings(tmp_path / "m")


def test_noncontiguous_and_tied_tensors_all_come_back(tmp_path):
    # fp32 -> fp32 is no cast, so without copies huggingface_hub would drop one of two names sharing storage
    base = torch.arange(24, dtype=torch.float32).view(4, 6)
    sd = {"t": base.t(), "tied1": base, "tied2": base, "slice": base[1:3]}
    save_weights(sd, tmp_path / "m", dtype=torch.float32)
    got = load_weights(tmp_path / "m")
    assert sorted(got) == sorted(sd)
    for k in sd:
        assert torch.equal(got[k], sd[k]), k


# ---------------------------------------------------------------- int8


def test_quantize_int8_bounds_and_zero_row():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 32, generator=g) * torch.tensor([[1.0], [0.01], [100.0], [0.0], [3.0]])
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (5, 1)
    assert int(q.abs().max()) <= 127
    nonzero = [0, 1, 2, 4]
    assert torch.equal(scale[nonzero], w.abs().amax(dim=1, keepdim=True)[nonzero] / 127)
    assert (q[nonzero].abs().amax(dim=1) == 127).all()  # each row's largest value uses the full range
    assert scale[3].item() == 1.0 and (q[3] == 0).all()
    err = (w - dequantize_int8(q, scale, torch.float32)).abs()
    assert (err <= scale / 2 * (1 + 1e-5)).all()
    assert dequantize_int8(q, scale, torch.float16).dtype == torch.float16


def test_int8_save_load(tmp_path):
    sd = tiny_sd()
    files = save_weights(sd, tmp_path / "m", int8_keys=["a.weight"])
    with safe_open(str(files[0]), framework="pt") as f:
        assert f.get_slice("a.weight").get_dtype() == "I8"
        assert f.get_slice("a.weight" + INT8_SUFFIX).get_dtype() == "F32"
        assert f.get_slice("a.weight" + INT8_SUFFIX).get_shape() == [8, 1]
        assert f.get_slice("b.weight").get_dtype() == "F16"
    assert file_meta(files[0])["flowflash_storage"] == "int8-weight-only"
    got = load_weights(tmp_path / "m")
    assert sorted(got) == sorted(sd)  # no _scale keys
    q, scale = quantize_int8(sd["a.weight"])
    assert torch.equal(got["a.weight"], dequantize_int8(q, scale, torch.float32))
    assert torch.equal(got["b.weight"], sd["b.weight"])
    info = storage_of(tmp_path / "m")
    assert info["int8_tensors"] == 1 and info["dtypes"] == ["float16", "float32", "int64", "int8"]


@pytest.mark.parametrize("key, value", [("a.bias", None), ("v", torch.randn(2, 3, 4)), ("ids", torch.ones(3, 3, dtype=torch.int32)),
                                        ("nope", None), ("inf", torch.tensor([[1.0, float("inf")]]))])
def test_int8_key_refused_and_no_folder_left(tmp_path, key, value):
    sd = tiny_sd()
    if value is not None:
        sd[key] = value
    with pytest.raises(FlowflashError, match=repr(key)):
        save_weights(sd, tmp_path / "m", int8_keys=[key])
    assert not (tmp_path / "m").exists()
    no_siblings(tmp_path / "m")


def test_int8_tensor_without_scale_refused(tmp_path):
    (tmp_path / "m").mkdir()
    save_file({"w": torch.ones(2, 2, dtype=torch.int8)}, tmp_path / "m" / "model.safetensors")
    with pytest.raises(FlowflashError, match="'w' has no 'w_scale'"):
        load_weights(tmp_path / "m")


def test_own_scale_named_tensor_is_kept(tmp_path):
    sd = {"layer_scale": torch.ones(3), "x": torch.zeros(2)}
    save_weights(sd, tmp_path / "m")
    assert sorted(load_weights(tmp_path / "m")) == ["layer_scale", "x"]


# ---------------------------------------------------------------- sharding


def sharded(tmp_path, monkeypatch) -> tuple[dict, Path, list[Path]]:
    # 100 bytes: a.weight (256, alone) | a.bias 16 + b.weight int8 64 | b.weight_scale 32 + b.ids 40
    monkeypatch.setattr(storage, "SHARD_BYTES", 100)
    sd = tiny_sd()
    folder = tmp_path / "m"
    return sd, folder, save_weights(sd, folder, int8_keys=["b.weight"], metadata={"note": "hi"})


def test_sharded_roundtrip_and_order(tmp_path, monkeypatch):
    sd, folder, files = sharded(tmp_path, monkeypatch)
    n = len(files)
    assert n == 3
    assert [p.name for p in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert weight_files(folder) == files
    assert not (folder / "model.safetensors").exists()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd) | {"b.weight_scale"}
    assert set(index["weight_map"].values()) == {p.name for p in files}
    # huggingface_hub puts the caller's metadata into the index, beside total_size
    assert index["metadata"]["flowflash_storage"] == "int8-weight-only" and index["metadata"]["note"] == "hi"
    assert index["metadata"]["total_size"] == 8 * 16 * 2 + 8 * 2 + 8 * 8 + 8 * 4 + 5 * 8
    assert all(file_meta(p)["format"] == "pt" for p in files)
    got = load_weights(folder)
    assert sorted(got) == sorted(sd)
    for k in ("a.weight", "a.bias", "b.ids"):
        assert torch.equal(got[k], sd[k]), k
    assert (got["b.weight"] - sd["b.weight"]).abs().max() <= sd["b.weight"].abs().max() / 127
    assert storage_of(folder)["files"] == n and storage_of(folder)["int8_tensors"] == 1


def test_missing_shard_is_named(tmp_path, monkeypatch):
    _, folder, files = sharded(tmp_path, monkeypatch)
    files[1].unlink()
    for fn in (load_weights, weight_files, weights_hash):
        with pytest.raises(FlowflashError, match=files[1].name):
            fn(folder)


def test_shard_lacking_an_indexed_tensor(tmp_path, monkeypatch):
    _, folder, files = sharded(tmp_path, monkeypatch)
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"]["ghost.weight"] = files[0].name
    path.write_text(json.dumps(index))
    with pytest.raises(FlowflashError, match=f"{files[0].name} lacks .*ghost.weight"):
        load_weights(folder)


def test_index_not_json(tmp_path, monkeypatch):
    _, folder, _ = sharded(tmp_path, monkeypatch)
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(FlowflashError, match="index.json is not valid JSON"):
        load_weights(folder)


def test_index_naming_a_file_outside_the_folder(tmp_path, monkeypatch):
    _, folder, _ = sharded(tmp_path, monkeypatch)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../evil.safetensors"}}))
    with pytest.raises(FlowflashError, match="evil"):
        load_weights(folder)


# ---------------------------------------------------------------- broken folders


@pytest.mark.parametrize("keep", [0.5, 4 / 10_000])
def test_truncated_file_is_named(tmp_path, keep):
    files = save_weights(tiny_sd(), tmp_path / "m")
    data = files[0].read_bytes()
    files[0].write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(FlowflashError, match="model.safetensors is truncated or corrupt"):
        load_weights(tmp_path / "m")


def test_pickle_only_empty_and_missing_folders(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(FlowflashError, match=r"holds pickle weights \(pytorch_model.bin\); .*never unpickles"):
        load_weights(tmp_path / "p")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text("{}")
    assert weight_files(tmp_path / "e") == []
    with pytest.raises(FlowflashError, match="has no weights"):
        load_weights(tmp_path / "e")
    with pytest.raises(FlowflashError, match="not found"):
        load_weights(tmp_path / "absent")


# ---------------------------------------------------------------- legacy folders


def legacy(folder: Path, n: int = 2) -> dict[str, torch.Tensor]:
    """The pre-index layout: shards named like huggingface_hub's, but no index."""
    sd = tiny_sd()
    keys = list(sd)
    folder.mkdir()
    for i in range(n):
        part = {k: sd[k].half() if sd[k].is_floating_point() else sd[k] for k in keys[i::n]}
        save_file(part, folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors", metadata={"format": "flowflash-model-v1"})
    return sd


def test_legacy_folder_refused_then_upgraded(tmp_path):
    folder = tmp_path / "old"
    sd = legacy(folder)
    for fn in (load_weights, weight_files, weights_hash):
        with pytest.raises(FlowflashError, match="pre-index shard layout.*upgrade_legacy_shards"):
            fn(folder)
    shards = sorted(folder.glob("model-*.safetensors"))
    before = [p.read_bytes() for p in shards]
    index_path = upgrade_legacy_shards(folder)
    assert index_path == folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    assert index["weight_map"] == {"a.weight": shards[0].name, "b.weight": shards[0].name,
                                   "a.bias": shards[1].name, "b.ids": shards[1].name}
    assert index["metadata"]["total_size"] == 8 * 16 * 2 + 8 * 2 + 8 * 8 * 2 + 5 * 8
    assert [p.read_bytes() for p in shards] == before  # shards untouched
    assert weight_files(folder) == shards
    assert_same(load_weights(folder), sd)
    # the hash is the one the shards always had: the shards' bytes in order, the index not included
    assert weights_hash(folder) == hashlib.sha256(b"".join(before)).hexdigest()[:10]
    assert upgrade_legacy_shards(folder) == index_path  # already standard: nothing to do


def test_upgrade_refuses_incomplete_set(tmp_path):
    folder = tmp_path / "old"
    legacy(folder, n=3)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FlowflashError, match="missing: model-00002-of-00003.safetensors"):
        upgrade_legacy_shards(folder)
    assert not (folder / "model.safetensors.index.json").exists()


def test_upgrade_refuses_a_folder_without_shards(tmp_path):
    save_weights(tiny_sd(), tmp_path / "m")
    with pytest.raises(FlowflashError, match="single model.safetensors"):
        upgrade_legacy_shards(tmp_path / "m")


# ---------------------------------------------------------------- hash, extra files, atomicity


def test_weights_hash_stable_and_byte_sensitive(tmp_path):
    files = save_weights(tiny_sd(), tmp_path / "m", extra_files={"config.json": "{}"})
    h = weights_hash(tmp_path / "m")
    assert len(h) == 10 and h == weights_hash(tmp_path / "m")
    assert h == hashlib.sha256(files[0].read_bytes()).hexdigest()[:10]
    (tmp_path / "m" / "config.json").write_text('{"x": 1}')  # not a weight file
    assert weights_hash(tmp_path / "m") == h
    data = bytearray(files[0].read_bytes())
    data[-1] ^= 1  # last byte is tensor data: the file still loads
    files[0].write_bytes(bytes(data))
    load_weights(tmp_path / "m")
    assert weights_hash(tmp_path / "m") != h


def test_extra_files_land_in_the_folder(tmp_path):
    save_weights(tiny_sd(), tmp_path / "m", extra_files={"config.json": '{"a": 1}', "README.md": "# hi\n"})
    assert (tmp_path / "m" / "config.json").read_text() == '{"a": 1}'
    assert (tmp_path / "m" / "README.md").read_text() == "# hi\n"
    for bad in ("model.safetensors", "../x.json", "model-00001-of-00002.safetensors"):
        with pytest.raises(FlowflashError, match="extra file name"):
            save_weights(tiny_sd(), tmp_path / "n", extra_files={bad: "x"})
    assert not (tmp_path / "n").exists()


def test_failed_save_keeps_the_existing_folder(tmp_path, monkeypatch):
    import huggingface_hub

    folder = tmp_path / "m"
    sd = tiny_sd()
    save_weights(sd, folder, extra_files={"config.json": "old"})
    h = weights_hash(folder)
    with pytest.raises(FlowflashError, match="'a.bias'"):
        save_weights(tiny_sd(1), folder, int8_keys=["a.bias"], extra_files={"config.json": "new"})

    def half_write(state_dict, save_directory, **kw):  # a disk that fills up mid-write
        (Path(save_directory) / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "save_torch_state_dict", half_write)
    with pytest.raises(FlowflashError, match="No space left"):
        save_weights(tiny_sd(1), folder, extra_files={"config.json": "new"})
    with pytest.raises(FlowflashError, match="No space left"):
        save_weights(tiny_sd(1), tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    no_siblings(tmp_path / "fresh")
    assert (folder / "config.json").read_text() == "old"
    assert weights_hash(folder) == h
    assert_same(load_weights(folder), sd)
    no_siblings(folder)


def test_atomic_dir_keeps_the_old_copy_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    """After a crash between its two renames (no dest, a complete .old), the next write must not delete .old
    before its new folder has replaced it: a second crash there would leave no complete copy."""
    from flowflash.fsutil import atomic_dir

    dest = tmp_path / "ckpt"
    old = tmp_path / "ckpt.old"
    old.mkdir()
    (old / "state.json").write_text("{}")
    real_rename = Path.rename

    def crash(self, target):
        if self.name == "ckpt.tmp":
            raise KeyboardInterrupt("killed between the renames")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(dest) as tmp:
            (tmp / "state.json").write_text('{"new": 1}')
    assert (old / "state.json").read_text() == "{}"
    monkeypatch.setattr(Path, "rename", real_rename)
    with atomic_dir(dest) as tmp:
        (tmp / "state.json").write_text('{"new": 2}')
    assert (dest / "state.json").read_text() == '{"new": 2}'
    no_siblings(dest)
