"""Tampered hypernet files: sizes in the metadata alone never drive memory, every fault is a sentence.

Each file here is a small real hypernet file with its metadata (or one header shape) edited, as a
hostile or careless user could: the loader and `python -m difflora inspect` must refuse it, naming
the file, before building anything of the size it declares.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from difflora.__main__ import main
from difflora.errors import HypernetFileError
from difflora.hypernet_file import check_hypernet, load_hypernet, save_hypernet
from tests.support.tiny_models import tiny_hypernet

REPO = Path(__file__).resolve().parents[1]
TOY_HYPERNET = REPO / "assets" / "toyworld" / "difflora" / "difflora_toy.safetensors"


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def tampered(src: Path, dst: Path, key: str | None = None, edit=None, tensors=None) -> Path:
    """A copy of `src` whose metadata JSON `key` went through `edit(dict) -> dict` and whose
    tensors were updated with `tensors`."""
    t, meta = _read(src)
    if key is not None:
        meta[key] = json.dumps(edit(json.loads(meta[key])))
    t.update(tensors or {})
    save_file(t, str(dst), meta)
    return dst


def _with(**changes):
    return lambda d: {**d, **changes}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return save_hypernet(tiny_hypernet(), tmp_path_factory.mktemp("hn") / "hn.safetensors")


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# (metadata key, edit, what the sentence says): each used to build before checking, or crash raw.
CASES = {
    "huge-tokens": ("dit_config", _with(tokens=10**9), "tokens is 1,000,000,000"),
    "huge-depth": ("dit_config", _with(depth=10**6), "depth is 1,000,000"),
    "huge-hidden": ("dit_config", _with(hidden=65_536, heads=1), "tensors do not match its configs"),
    "zero-heads": ("dit_config", _with(heads=0), "heads is 0"),  # was ZeroDivisionError
    "zero-patch": ("lae_config", _with(patch=0), "patch is 0"),  # was ZeroDivisionError
    "negative-width": ("lae_config", _with(widths=[32, -64, 64]), "widths is -64"),  # was RuntimeError
    "nan-ratio": ("dit_config", _with(mlp_ratio=float("nan")), "mlp_ratio is nan"),
    "string-size": ("mif_config", _with(cond_dim="64"), "cond_dim is '64', not a number"),
    "many-layers": ("lora_spec", lambda d: {**d, "layers": d["layers"] * 10_000}, "160,000 layers"),
    "huge-layer": ("lora_spec", lambda d: {**d, "layers": [[d["layers"][0][0], 10**9, 8]] + d["layers"][1:]},
                   "declares a size of 1000000000"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_declared_sizes_are_checked_before_building(good, tmp_path, case):
    key, edit, says = CASES[case]
    bad = tampered(good, tmp_path / f"{case}.safetensors", key, edit)
    for check in (check_hypernet, load_hypernet):
        with pytest.raises(HypernetFileError, match=f"{case}.safetensors") as e:
            check(bad)
        assert says in str(e.value) and "again" in str(e.value)  # what happened, what to do


def test_deeply_nested_json_is_a_sentence_not_a_recursion_error(good, tmp_path):
    t, meta = _read(good)
    meta["mif_config"] = _nested(100_000)
    save_file(t, str(tmp_path / "deep.safetensors"), meta)
    with pytest.raises(HypernetFileError, match="deep.safetensors: metadata 'mif_config' is nested too deeply"):
        load_hypernet(tmp_path / "deep.safetensors")


def test_gauge_table_declared_huge_in_the_header_alone(good, tmp_path):
    # (N, 0) holds no bytes, yet the loader used to allocate an (N, 4) table from the header's N.
    bad = tampered(good, tmp_path / "gauge.safetensors",
                   tensors={"norm.gauge_reference": torch.zeros(0), "norm.gauge_blocks": torch.zeros(10**9, 0)})
    with pytest.raises(HypernetFileError, match="gauge.safetensors: tensors do not match its configs.*gauge"):
        load_hypernet(bad)


_MEASURE = """
import resource, sys
from difflora.errors import HypernetFileError
from difflora.hypernet_file import load_hypernet
load_hypernet(sys.argv[1])  # the good file: imports and first-use allocations
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for path in sys.argv[2:]:
    try:
        load_hypernet(path)
        print("LOADED", path)
    except HypernetFileError:
        pass
print("PEAK_GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_peak_memory_stays_small_for_files_declaring_huge_sizes(good, tmp_path):
    """The issue's probes reached 3.5-12 GB of RSS (the gauge table alone: +3 GB before failing, a
    depth of 10^6 built blocks for minutes); in a child process under a 6 GB address-space limit (so a
    regression cannot take the machine down), the refusals must grow peak RSS by < 64 MB."""
    bad = [tampered(good, tmp_path / f"{c}.safetensors", CASES[c][0], CASES[c][1])
           for c in ("huge-tokens", "huge-depth", "huge-hidden", "huge-layer")]
    bad.append(tampered(good, tmp_path / "gauge.safetensors",
                        tensors={"norm.gauge_reference": torch.zeros(0), "norm.gauge_blocks": torch.zeros(10**8, 0)}))
    bad.append(tampered(TOY_HYPERNET, tmp_path / "toy-face-huge.safetensors", "carried_encoders",
                        lambda d: {**d, "face": {**d["face"], "config": json.dumps(
                            {**json.loads(d["face"]["config"]), "net": {**json.loads(d["face"]["config"])["net"],
                                                                         "image_size": 60_000}})}}))
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30));"
    run = subprocess.run([sys.executable, "-c", limit + _MEASURE, str(good), *map(str, bad)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "LOADED" not in run.stdout
    growth_kb = int(run.stdout.split("PEAK_GROWTH_KB")[1])
    assert growth_kb < 64 * 1024, run.stdout


def test_carried_encoder_sizes_are_checked_before_building(tmp_path):
    def edit(d, **net):
        cfg = json.loads(d["face"]["config"])
        return {**d, "face": {**d["face"], "config": json.dumps({**cfg, "net": {**cfg["net"], **net}})}}

    for name, net, says in (("huge", {"image_size": 60_000}, "tensors do not match its config"),
                            ("zero", {"stem": 0}, "stem is 0"),
                            ("neg", {"widths": [32, -1, 96]}, "widths is -1")):
        bad = tampered(TOY_HYPERNET, tmp_path / f"{name}.safetensors", "carried_encoders",
                       lambda d: edit(d, **net))
        with pytest.raises(HypernetFileError, match=f"{name}.safetensors \\(its face encoder\\)") as e:
            check_hypernet(bad)
        assert says in str(e.value)


def test_nan_in_a_carried_face_encoder_is_blamed_on_the_file(tmp_path):
    t, meta = _read(TOY_HYPERNET)
    key = next(k for k in t if k.startswith("encoders.face.") and k.endswith("fc.weight"))
    t[key] = torch.full_like(t[key], float("nan"))
    save_file(t, str(tmp_path / "nanface.safetensors"), meta)
    with pytest.raises(HypernetFileError, match="nanface.safetensors: the face encoder it carries has NaN") as e:
        load_hypernet(tmp_path / "nanface.safetensors")
    assert "image" not in str(e.value).replace("its carried", "")  # the photos are not blamed


def test_inspect_runs_the_loaders_checks(good, tmp_path, capsys):
    assert main(["inspect", str(good)]) == 0
    capsys.readouterr()
    # A header-only edit: read_header alone called it a valid hypernet (rc 0).
    t, meta = _read(good)
    t["dit.x_embedder.weight"] = torch.zeros(3, 3)
    save_file(t, str(tmp_path / "reshaped.safetensors"), meta)
    zero_heads = tampered(good, tmp_path / "zeroheads.safetensors", *CASES["zero-heads"][:2])
    for bad, says in ((tmp_path / "reshaped.safetensors", "mis-shaped"), (zero_heads, "heads is 0")):
        assert main(["inspect", str(bad)]) == 1
        out = capsys.readouterr().out
        assert "not a valid DiffLoRA hypernet" in out and bad.name in out and says in out


def test_nan_embeddings_from_a_carried_face_encoder_are_blamed_on_the_file(tmp_path):
    from difflora.pipeline import features_from_images
    from difflora_toyworld.render import make_dataset

    t, meta = _read(TOY_HYPERNET)
    key = next(k for k in t if k.startswith("encoders.face.") and k.endswith("running_var"))
    t[key] = -torch.ones_like(t[key])  # finite weights, NaN activations (sqrt of a negative variance)
    save_file(t, str(tmp_path / "badvar.safetensors"), meta)
    hn = load_hypernet(tmp_path / "badvar.safetensors")
    with pytest.raises(HypernetFileError, match="face encoder carried by badvar.safetensors gives NaN") as e:
        features_from_images(hn, make_dataset(1, 2, seed=0).images)
    assert "reference images" not in str(e.value)


# --- a file changed under a loaded hypernet (issue 27) -------------------------------------------

def _mapped(path: Path) -> bool:
    """Whether this process still maps `path` (a tensor's storage, or anything else)."""
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_a_loaded_hypernet_owns_its_memory(tmp_path):
    import gc

    path = save_hypernet(tiny_hypernet(), tmp_path / "hn.safetensors")
    hn = load_hypernet(path)
    gc.collect()
    assert not _mapped(path)          # no tensor of it shares pages with the file
    assert all(not t.is_meta for t in hn.state_dict().values())


_OVERWRITE_WHILE_LOADED = """
import sys
from difflora.hypernet_file import load_hypernet
hn = load_hypernet(sys.argv[1])
with open(sys.argv[1], "r+b") as f:   # what `head -c 100 other.safetensors > x.safetensors` does
    f.truncate(100)
print("SUM", sum(float(t.double().sum()) for t in hn.state_dict().values()))
"""


def test_a_hypernet_file_overwritten_in_place_while_loaded_leaves_the_process_alive(tmp_path):
    path = save_hypernet(tiny_hypernet(), tmp_path / "hn.safetensors")
    expected = sum(float(t.double().sum()) for t in load_hypernet(path).state_dict().values())
    run = subprocess.run([sys.executable, "-c", _OVERWRITE_WHILE_LOADED, str(path)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])   # -7 is SIGBUS
    assert float(run.stdout.split("SUM")[1]) == pytest.approx(expected)  # the weights read before the overwrite


def test_a_file_replaced_keeping_its_mtime_and_size_has_another_fingerprint(tmp_path):
    import os
    import shutil
    import time

    from difflora.hypernet_file import file_fingerprint

    path = save_hypernet(tiny_hypernet(seed=0), tmp_path / "hn.safetensors")
    other = save_hypernet(tiny_hypernet(seed=1), tmp_path / "other.safetensors")
    before, st = file_fingerprint(path), os.stat(path)
    time.sleep(0.05)  # past the file system's timestamp tick: the copy comes later, as in real use
    shutil.copyfile(other, path)                                     # `cp -p other hn`: same inode,
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))              # same mtime, same size
    assert (os.stat(path).st_mtime_ns, os.stat(path).st_size) == (st.st_mtime_ns, st.st_size)
    assert file_fingerprint(path) != before
    os.replace(other, path)                                          # `rsync -t`: a new file renamed over
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_fingerprint(path) != before


def test_inspect_names_a_folder_a_pipe_and_a_device_as_such(tmp_path, capsys):
    import os

    os.mkfifo(tmp_path / "pipe.safetensors")
    for path, says in ((tmp_path, "is a folder"), (tmp_path / "pipe.safetensors", "not a regular file"),
                       (Path("/dev/zero"), "not a regular file")):
        assert main(["inspect", str(path)]) == 1
        out = capsys.readouterr().out
        assert says in out and "no such file" not in out, out
    with pytest.raises(HypernetFileError, match="not a regular file"):
        load_hypernet(tmp_path / "pipe.safetensors")
