"""The core's open registries are filled by plugin packages: a toy hypernet file loads headless with
nothing but the core imported (the toy world's `difflora.plugins` entry point), and a broken or
missing plugin ends in a sentence, never a crash of the core."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from difflora import plugins

REPO = Path(__file__).resolve().parent.parent
TOY_HYPERNET = REPO / "assets" / "toyworld" / "difflora" / "difflora_toy.safetensors"


def _fresh_python(code: str) -> str:
    """Run ``code`` in a new interpreter (nothing of the toy world imported yet); its stdout."""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_toy_hypernet_loads_headless_through_the_entry_point():
    out = _fresh_python(
        "import sys\n"
        "from difflora.hypernet_file import load_hypernet\n"
        "assert 'difflora_toyworld' not in sys.modules\n"
        f"hn = load_hypernet({str(TOY_HYPERNET)!r})\n"
        "print(hn.face_encoder.kind, hn.image_encoder.kind, 'difflora_toyworld' in sys.modules)\n")
    assert out.split() == ["toy-face", "toy-image", "True"]


def test_inspect_names_the_carried_encoders_of_a_toy_file_headless():
    done = subprocess.run([sys.executable, "-m", "difflora", "inspect", str(TOY_HYPERNET)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "carried encoders: face toy-face" in done.stdout and "image toy-image" in done.stdout


def test_the_toy_world_fills_the_registries_when_imported():
    import difflora_toyworld  # noqa: F401 - importing registers
    from difflora.dit import DIT_CONFIGS
    from difflora.encoders import FACE_ENCODER_KINDS
    from difflora.encoders.carried import CARRIED_MODELS
    from difflora.lae import LAE_CONFIGS
    from difflora.train.identity_filter import DEFAULT_SIMILARITY

    assert {"toy", "toy-64x", "toy-32x"} <= set(LAE_CONFIGS) and "toy" in DIT_CONFIGS
    assert "toy-face" in FACE_ENCODER_KINDS and DEFAULT_SIMILARITY["toy-face"] == 0.8
    assert "toy-encoder" in CARRIED_MODELS


def test_the_toy_lae_sizes_compress_the_v2_lora_by_their_names():
    # The v2 world's LoRA: the toy-attn UNet at rank 4. 32 entries a patch, 4 x 4 strides -> 84 tokens.
    import torch
    from diffusers import UNet2DConditionModel

    import difflora_toyworld  # noqa: F401 - importing registers
    from difflora.lae import LAE_CONFIGS, LoraAutoencoder
    from difflora.lora_spec import LoraSpec
    from difflora_toyworld.toy_sdxl import unet_config

    entries = LoraSpec.from_unet(UNet2DConditionModel(**unet_config("toy-attn")), rank=4).num_params
    assert entries == 43008
    for size, channels, ratio in (("toy", 4, 128), ("toy-64x", 8, 64), ("toy-32x", 16, 32)):
        lae = LoraAutoencoder(LAE_CONFIGS[size](entries))
        assert lae.latent_shape == (84, channels) and round(lae.compression_ratio) == ratio
        z = lae.encode(torch.randn(2, entries))
        assert z.shape == (2, 84, channels) and lae.decode(z).shape == (2, entries)


class _BrokenEntryPoint:
    name, value = "broken", "no_such_package_for_difflora"

    def load(self):
        raise ImportError("No module named 'no_such_package_for_difflora'")


def test_a_broken_plugin_is_logged_not_fatal(monkeypatch, caplog):
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [_BrokenEntryPoint()])
    with caplog.at_level(logging.WARNING, logger="difflora"):
        plugins.load_plugins()
    assert "plugin broken (no_such_package_for_difflora) failed to import" in caplog.text


def test_an_unregistered_carried_model_is_refused_with_a_sentence(monkeypatch):
    from difflora.encoders.carried import MODEL_KEY, carried_from_tensors
    from difflora.errors import EncoderError

    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [])
    with pytest.raises(EncoderError, match="holds a model of kind 'someone-elses-net', not an encoder DiffLoRA "
                                           "can carry .*install the package that provides it"):
        carried_from_tensors({}, {MODEL_KEY: "someone-elses-net"}, "x.safetensors")
