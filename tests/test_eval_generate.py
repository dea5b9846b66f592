"""`generate` through the core pipeline and a local diffusers SDXL (the tiny one), into the layout."""

import importlib.resources
import json
import shutil

import pytest
import torch

from devtools.tiny_clip_vision import build_tiny_clip_vision
from devtools.tiny_hypernet import build_tiny_hypernet
from difflora.eval import EvalLayout
from difflora.eval.generate import generate, trigger_subject
from difflora.eval.layout import image_name

pytest.importorskip("dlib")
TOM = importlib.resources.files("insightface") / "data" / "images" / "Tom_Hanks_54745.png"


def test_generate_writes_the_layout_and_fuses_then_removes_the_lora(tmp_path, monkeypatch):
    from devtools.tiny_sdxl import build_tiny_diffusers_sdxl

    base = build_tiny_diffusers_sdxl(tmp_path / "sdxl")
    hypernet = build_tiny_hypernet(tmp_path / "hn.safetensors")
    clip_vision = build_tiny_clip_vision(tmp_path / "clip_vision.safetensors")
    layout = EvalLayout(tmp_path / "eval")
    layout.write_prompts(["a photo of {person}", "{person} in the snow"])
    (layout.root / "references" / "tom").mkdir(parents=True)
    shutil.copy(TOM, layout.root / "references" / "tom" / "tom.png")

    import difflora.eval.generate as gen_mod

    layer, fused, pipes = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", [], []
    real_load = gen_mod.load_sdxl_pipeline

    def weight(pipe):
        module = pipe.unet.get_submodule(layer)
        return getattr(module, "base_layer", module).weight.detach().clone()

    def spy_load(*a, **k):  # record that the LoRA really changes the UNet while the images are drawn
        pipe = real_load(*a, **k)
        pipes.append((pipe, weight(pipe)))
        real_fuse = pipe.fuse_lora

        def fuse(**kw):
            real_fuse(**kw)
            fused.append(float((weight(pipe) - pipes[0][1]).abs().max()))
        pipe.fuse_lora = fuse
        return pipe

    monkeypatch.setattr(gen_mod, "load_sdxl_pipeline", spy_load)
    timing = generate(layout, hypernet=str(hypernet), base=str(base), image_encoder=str(clip_vision), face="dlib",
                      images_per_prompt=1, steps=2, width=64, height=64, lora_steps=2)
    assert set(timing) == {"tom"} and timing["tom"] > 0
    assert json.loads((layout.method_dir("DiffLoRA") / "timing.json").read_text()) == timing
    for p in range(2):
        assert (layout.method_dir("DiffLoRA") / "tom" / image_name(p, 0)).is_file()
    assert layout.method_images("DiffLoRA").count == 2
    assert fused and fused[0] > 0  # the predicted LoRA was merged into the weights...
    pipe, before = pipes[0]
    assert torch.equal(weight(pipe), before)  # ...and taken out again, bit for bit
    assert trigger_subject("a photo of sks person") == "sks person" and trigger_subject("sks") == "sks"
