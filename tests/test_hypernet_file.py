"""The hypernet file: bit-exact round trip, and each refusal names the file and the fault."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from difflora.errors import HypernetFileError
from difflora.hypernet_file import (FORMAT_VERSION, PLAIN_FORMAT_VERSION, load_hypernet, read_header,
                                    save_hypernet)
from tests.support.tiny_models import tiny_hypernet


@pytest.fixture()
def saved(tmp_path):
    hn = tiny_hypernet()
    # Non-trivial normalization so the round trip covers the statistics too.
    hn.weight_normalizer.mean.normal_()
    hn.weight_normalizer.std.uniform_(0.5, 2.0)
    path = save_hypernet(hn, tmp_path / "hn.safetensors", extra_metadata={"trained_steps": "12"})
    return hn, path


def _state_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_is_bit_exact(saved):
    hn, path = saved
    loaded = load_hypernet(path)
    assert _state_equal(hn, loaded)
    assert loaded.spec == hn.spec and loaded.spec.hash == hn.spec.hash
    assert loaded.configs() == hn.configs()
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_metadata_holds_every_config(saved):
    _, path = saved
    meta, shapes = read_header(path)
    assert meta["difflora_format"] == PLAIN_FORMAT_VERSION  # no carried encoders: as earlier versions wrote
    assert meta["lora_spec"]["rank"] == 2 and len(meta["lora_spec"]["layers"]) == 16
    assert meta["encoders"]["face_dim"] == 12 and meta["encoders"]["image_dim"] == 10
    assert {"lae_config", "dit_config", "mif_config"} <= meta.keys()
    assert meta["trained_steps"] == "12"
    assert {k.split(".")[0] for k in shapes} == {"norm", "lae", "dit", "mif"}


def test_dtype_keeps_statistics_float32(saved):
    _, path = saved
    loaded = load_hypernet(path, dtype=torch.bfloat16)
    assert next(loaded.dit.parameters()).dtype == torch.bfloat16
    assert loaded.weight_normalizer.mean.dtype == torch.float32


def test_save_is_atomic_and_leaves_no_temp_files(saved, tmp_path):
    hn, path = saved
    before = path.read_bytes()
    with pytest.raises(ValueError):
        save_hypernet(hn, path, extra_metadata={"lora_spec": "x"})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hn.safetensors"]


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_refuses_pickles_by_name(tmp_path, suffix):
    path = tmp_path / f"hn{suffix}"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(HypernetFileError, match=rf"hn\{suffix}.*pickle"):
        load_hypernet(path)


def test_refuses_pickle_renamed_to_safetensors(tmp_path):
    path = tmp_path / "sneaky.safetensors"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(HypernetFileError, match="sneaky.safetensors.*pickle"):
        load_hypernet(path)


def test_refuses_truncated_file(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(HypernetFileError, match="cut.safetensors.*(corrupt|truncated)"):
        load_hypernet(cut)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(HypernetFileError, match="empty.safetensors"):
        load_hypernet(empty)


def test_refuses_corrupt_header(saved, tmp_path):
    _, path = saved
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n // 2] = ord("#")  # break the JSON in the middle
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(HypernetFileError, match="bad.safetensors"):
        load_hypernet(bad)


def _rewrite(path, out, meta_update=None, tensor_update=None, drop=None):
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(meta_update or {})
    tensors.update(tensor_update or {})
    for k in drop or ():
        tensors.pop(k)
    save_file(tensors, str(out), metadata=meta)
    return out


def test_refuses_newer_format(saved, tmp_path):
    _, path = saved
    newer = _rewrite(path, tmp_path / "newer.safetensors", {"difflora_format": str(FORMAT_VERSION + 1)})
    with pytest.raises(HypernetFileError, match="newer.safetensors.*newer DiffLoRA.*Update"):
        load_hypernet(newer)


def test_refuses_missing_and_misshaped_tensors(saved, tmp_path):
    _, path = saved
    with safe_open(str(path), framework="pt") as f:
        key = next(k for k in f.keys() if k.startswith("dit.") and len(f.get_slice(k).get_shape()) == 2)
    missing = _rewrite(path, tmp_path / "missing.safetensors", drop=[key])
    with pytest.raises(HypernetFileError, match=rf"missing.safetensors.*1 missing tensor.*{key}"):
        load_hypernet(missing)
    wrong = _rewrite(path, tmp_path / "wrong.safetensors", tensor_update={key: torch.zeros(3, 5)})
    with pytest.raises(HypernetFileError, match=r"wrong.safetensors.*mis-shaped.*\(3, 5\)"):
        load_hypernet(wrong)


def test_refuses_file_without_difflora_metadata(tmp_path):
    lora = tmp_path / "some_lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(lora))
    with pytest.raises(HypernetFileError, match="some_lora.safetensors.*not a DiffLoRA hypernet.*LoraLoader"):
        load_hypernet(lora)


def test_refuses_broken_config_json(saved, tmp_path):
    _, path = saved
    broken = _rewrite(path, tmp_path / "json.safetensors", {"dit_config": "{oops"})
    with pytest.raises(HypernetFileError, match="json.safetensors.*dit_config"):
        load_hypernet(broken)
    cfg = dict(read_header(path)[0]["dit_config"])
    cfg["no_such_field"] = 1
    unknown = _rewrite(path, tmp_path / "unknown.safetensors", {"dit_config": json.dumps(cfg)})
    with pytest.raises(HypernetFileError, match="unknown.safetensors.*do not build"):
        load_hypernet(unknown)


def test_saving_twice_gives_identical_bytes(saved, tmp_path):
    """Checksums in weights_manifest.json need reproducible files (safetensors alone orders
    its metadata at random)."""
    hn, path = saved
    for i in range(3):
        again = save_hypernet(hn, tmp_path / f"again{i}.safetensors", extra_metadata={"trained_steps": "12"})
        assert again.read_bytes() == path.read_bytes()


def test_weight_normalizer_is_stored_under_the_files_norm_prefix(tmp_path):
    """The attribute says what it is (hn.weight_normalizer); the file keeps its `norm.` tensors, so
    files written before the rename load, and files written now read the same everywhere."""
    from difflora.hypernet import NORMALIZER_FILE_PREFIX

    hn = tiny_hypernet()
    hn.weight_normalizer.std.uniform_(0.5, 2.0)
    keys = list(hn.state_dict())
    assert NORMALIZER_FILE_PREFIX == "norm." and {"norm.mean", "norm.std"} <= set(keys)
    assert not any(k.startswith("weight_normalizer.") for k in keys) and keys[:2] == ["norm.mean", "norm.std"]
    path = save_hypernet(hn, tmp_path / "h.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert {"norm.mean", "norm.std"} <= set(f.keys())
    loaded = load_hypernet(path)
    torch.testing.assert_close(loaded.weight_normalizer.std, hn.weight_normalizer.std)
