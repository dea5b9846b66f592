"""`python -m difflora spec|inspect`: what a user sees on the command line."""

from __future__ import annotations

import subprocess
import sys

import torch
from safetensors.torch import save_file

from difflora.__main__ import main
from difflora.hypernet_file import save_hypernet
from tests.support.tiny_models import tiny_hypernet


def test_spec_sdxl_rank4_reports_layers_and_parameters():
    out = subprocess.run([sys.executable, "-m", "difflora", "spec", "sdxl", "--rank", "4"],
                         capture_output=True, text=True, check=True).stdout
    assert "layers:     560" in out
    assert "parameters: 5,806,080" in out and "11.6 MB in fp16" in out


def test_spec_of_a_checkpoint_file_reads_shapes_only(tmp_path, capsys):
    sd = {"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": torch.zeros(8, 8),
          "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 6)}
    path = tmp_path / "unet.safetensors"
    save_file(sd, str(path))
    assert main(["spec", str(path), "--rank", "2"]) == 0
    out = capsys.readouterr().out
    assert "layers:     2" in out and f"parameters: {2 * (8 + 8) + 2 * (6 + 8)}" in out


def test_inspect_hypernet_lora_and_broken_files(tmp_path, capsys):
    path = save_hypernet(tiny_hypernet(), tmp_path / "hn.safetensors")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "DiffLoRA hypernet hn.safetensors (format 1)" in out and "16 layers" in out
    assert "dit_config" in out and "test-face" in out

    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(4, 8), "lora_unet_a.lora_up.weight": torch.zeros(8, 4)},
              str(lora))
    assert main(["inspect", str(lora)]) == 0
    assert "1 layers (kohya keys), rank [4]" in capsys.readouterr().out

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:100])
    assert main(["inspect", str(broken)]) == 1
    assert "broken.safetensors" in capsys.readouterr().out
    pickled = tmp_path / "model.ckpt"
    torch.save({"x": 1}, pickled)
    assert main(["inspect", str(pickled)]) == 1
    assert "pickle" in capsys.readouterr().out
