"""Atomic `.safetensors` writes: streamed yet byte-identical, the user's file mode, nothing left
behind on a full disk or after a killed write."""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import tracemalloc

import pytest
import torch
from safetensors.torch import load_file, save

from difflora import safetensors_io
from difflora.safetensors_io import save_file_atomic


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"b.w": torch.randn(3, 4, generator=g), "a.w": torch.randn(5, generator=g).half(),
            "z": torch.randn(2, 2, generator=g).bfloat16(), "i": torch.arange(7), "m": torch.tensor([True, False]),
            "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5), "d": torch.randn(3, generator=g).double()}


def sorted_header_copy(raw: bytes) -> bytes:
    """safetensors' own file with its header re-emitted with sorted keys (what the manifest checksums)."""
    (n,) = struct.unpack("<Q", raw[:8])
    text = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


@pytest.mark.parametrize("metadata", [None, {}, {"z": "1", "a": "two"}])
def test_streamed_file_equals_safetensors_own_bytes(tmp_path, metadata):
    tensors = mixed_tensors()
    path = save_file_atomic(tensors, tmp_path / "x.safetensors", metadata)
    assert path.read_bytes() == sorted_header_copy(save(tensors, metadata=metadata))
    back = load_file(str(path))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_writing_holds_no_copy_of_the_file_in_memory(tmp_path):
    """The tensors go straight from their own memory to the file: no read-back, no concatenation
    (which held ~2x the file: tens of GB for a paper-size checkpoint)."""
    tensors = {f"w{i}": torch.ones(1024, 1024) for i in range(4)}  # 16 MiB
    tracemalloc.start()
    try:
        save_file_atomic(tensors, tmp_path / "big.safetensors")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (tmp_path / "big.safetensors").stat().st_size > 16 * 2**20
    assert peak < 2**20, f"{peak / 2**20:.1f} MiB of Python memory while writing a 16 MiB file"


def test_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        a = save_file_atomic({"x": torch.zeros(2)}, tmp_path / "a.safetensors")
        os.umask(0o027)
        b = save_file_atomic({"x": torch.zeros(2)}, tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(a.stat().st_mode) == 0o644 and stat.S_IMODE(b.stat().st_mode) == 0o640


def test_full_disk_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = save_file_atomic({"x": torch.ones(4)}, tmp_path / "keep.safetensors")
    good = path.read_bytes()

    def full_disk(tensors, tmp, metadata=None):
        with open(tmp, "wb") as f:
            f.write(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors_io, "save_file_reproducible", full_disk)
    with pytest.raises(OSError) as err:
        save_file_atomic({"x": torch.zeros(4)}, path)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)  # names the file
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["keep.safetensors"]


def test_stale_temps_of_killed_writes_are_removed(tmp_path):
    from difflora.safetensors_io import remove_stale_temps

    keep = save_file_atomic({"x": torch.ones(1)}, tmp_path / "step_00000004.safetensors")
    (tmp_path / ".step_00000008.safetensors.k3j2h1.tmp").write_bytes(b"partial")
    (tmp_path / "notes.tmp").write_text("not ours")
    assert [p.name for p in remove_stale_temps(tmp_path)] == [".step_00000008.safetensors.k3j2h1.tmp"]
    assert sorted(os.listdir(tmp_path)) == ["notes.tmp", keep.name]
    assert remove_stale_temps(tmp_path / "missing") == []
