"""CLIP vision encoder through transformers, with tiny random models saved to disk."""

import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from difflora.encoders import load_image_encoder
from difflora.encoders.clip_image import ClipImageEncoder, clip_preprocess, infer_config
from difflora.encoders.open_clip_image import OpenClipImageEncoder
from difflora.errors import EncoderError

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
            image_size=32, patch_size=8, projection_dim=24, hidden_act="gelu")


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY)).eval()


def photos(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (90 + 10 * i, 120, 3), dtype=np.uint8) for i in range(n)]


def reference_embeds(model, images):
    pixels = torch.stack([clip_preprocess(im, TINY["image_size"]) for im in images])
    with torch.no_grad():
        out = model(pixel_values=pixels).image_embeds
    return out / out.norm(dim=-1, keepdim=True)


def check(enc, model):
    images = photos()
    emb = enc.embed(images)
    assert emb.shape == (3, TINY["projection_dim"]) and enc.embedding_dim == TINY["projection_dim"]
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(emb, reference_embeds(model, images), atol=1e-5)  # same weights
    assert torch.equal(enc.embed(images), emb)  # same images -> same embeddings
    assert torch.allclose(enc.embed(images[:1])[0], emb[0], atol=1e-6)  # batch size is irrelevant


def test_from_pretrained_folder(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "clip")
    assert (tmp_path / "clip" / "model.safetensors").is_file()
    enc = load_image_encoder(tmp_path / "clip")
    assert enc.kind == "clip-w64-l2-p8-32-d24"
    check(enc, tiny_model)


def test_single_file_in_comfyui_clip_vision_layout(tmp_path, tiny_model):
    sd = tiny_model.state_dict()
    assert "visual_projection.weight" in sd and any(k.startswith("vision_model.") for k in sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "clip_vision.safetensors")
    enc = ClipImageEncoder.load(tmp_path / "clip_vision.safetensors")
    cfg = enc.model.config
    for key, value in TINY.items():
        assert getattr(cfg, key) == value, key
    check(enc, tiny_model)


def test_single_file_with_prefix_and_open_clip_layout(tmp_path, tiny_model):
    sd = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    save_file({"clip_vision." + k: v for k, v in sd.items()}, tmp_path / "prefixed.safetensors")
    check(ClipImageEncoder.load(tmp_path / "prefixed.safetensors"), tiny_model)
    save_file(_to_open_clip(sd), tmp_path / "open_clip.safetensors")
    check(ClipImageEncoder.load(tmp_path / "open_clip.safetensors"), tiny_model)


def _to_open_clip(sd):
    """The inverse of ComfyUI's convert_to_transformers, for a test checkpoint."""
    p, out = "visual.", {}
    out[p + "class_embedding"] = sd["vision_model.embeddings.class_embedding"]
    out[p + "conv1.weight"] = sd["vision_model.embeddings.patch_embedding.weight"]
    out[p + "positional_embedding"] = sd["vision_model.embeddings.position_embedding.weight"]
    out[p + "proj"] = sd["visual_projection.weight"].t().contiguous()
    for src, dst in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for t in ("weight", "bias"):
            out[f"{p}{dst}.{t}"] = sd[f"vision_model.{src}.{t}"]
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
             "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
    for i in range(TINY["num_hidden_layers"]):
        a, b = f"vision_model.encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for t in ("weight", "bias"):
            for src, dst in names.items():
                out[f"{b}{dst}.{t}"] = sd[f"{a}{src}.{t}"]
            out[f"{b}attn.in_proj_{t}"] = torch.cat(
                [sd[f"{a}self_attn.{x}_proj.{t}"] for x in "qkv"]).contiguous()
    return out


def test_known_tower_configs_are_inferred():
    # ViT-H-14 as ComfyUI's clip_vision_config_h.json, from shapes alone (meta tensors).
    shapes = {"vision_model.embeddings.patch_embedding.weight": (1280, 3, 14, 14),
              "vision_model.embeddings.position_embedding.weight": (257, 1280),
              "vision_model.encoder.layers.0.mlp.fc1.weight": (5120, 1280),
              "visual_projection.weight": (1024, 1280)}
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    sd.update({f"vision_model.encoder.layers.{i}.layer_norm1.weight": torch.empty(0)
               for i in range(32)})
    cfg = infer_config(sd)
    assert (cfg.image_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.projection_dim, cfg.hidden_act) == (224, 32, 16, 1024, "gelu")
    from difflora.encoders.clip_image import tower_kind

    assert tower_kind(cfg) == "clip-vit-h-14"


def test_errors_name_the_file(tmp_path, tiny_model):
    with pytest.raises(EncoderError, match="CLIP vision model not found"):
        ClipImageEncoder.load(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(EncoderError, match="Cannot read junk.safetensors"):
        ClipImageEncoder.load(tmp_path / "junk.safetensors")
    sd = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    save_file({k: v for k, v in sd.items() if k != "visual_projection.weight"},
              tmp_path / "noproj.safetensors")
    with pytest.raises(EncoderError, match="noproj.safetensors has no visual_projection"):
        ClipImageEncoder.load(tmp_path / "noproj.safetensors")
    save_file({k: v for k, v in sd.items() if "layers.1.mlp" not in k},
              tmp_path / "cut.safetensors")
    with pytest.raises(EncoderError, match="cut.safetensors is missing 4 CLIP vision tensor"):
        ClipImageEncoder.load(tmp_path / "cut.safetensors")
    save_file({"unet.weight": torch.zeros(2)}, tmp_path / "unet.safetensors")
    with pytest.raises(EncoderError, match="not a CLIP vision model"):
        ClipImageEncoder.load(tmp_path / "unet.safetensors")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(EncoderError, match="has no config.json"):
        ClipImageEncoder.load(tmp_path / "empty_dir")


def test_preprocess_matches_clip_conventions():
    x = clip_preprocess(np.full((300, 200, 3), 255, np.uint8))
    assert x.shape == (3, 224, 224)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
    assert torch.allclose(x[:, 0, 0], (1 - mean) / std, atol=1e-5)


def test_open_clip_is_optional(tmp_path, monkeypatch):
    ckpt = tmp_path / "open_clip_model.safetensors"
    ckpt.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed
    with pytest.raises(EncoderError, match="pip install open_clip_torch"):
        OpenClipImageEncoder("ViT-H-14", ckpt)
    with pytest.raises(EncoderError, match="checkpoint not found"):
        OpenClipImageEncoder("ViT-H-14", "laion2b_s32b_b79k")  # a tag would download: refused


def test_open_clip_backend_glue(tmp_path, monkeypatch):
    """With a stand-in open_clip module: preprocessing, batching and normalization."""
    seen = {}

    class Model(torch.nn.Module):
        def encode_image(self, x):
            return x.flatten(1)[:, :5] + 1.0

    def create(name, pretrained, device):
        seen.update(name=name, pretrained=pretrained)
        return Model(), None, lambda pil: torch.from_numpy(np.array(pil.resize((8, 8)))).float()

    monkeypatch.setitem(sys.modules, "open_clip",
                        types.SimpleNamespace(create_model_and_transforms=create))
    ckpt = tmp_path / "vit.bin"
    ckpt.write_bytes(b"x")
    enc = OpenClipImageEncoder("ViT-H-14", ckpt)
    assert seen == {"name": "ViT-H-14", "pretrained": str(ckpt)} and enc.embedding_dim == 5
    emb = enc.embed(photos(2))
    assert emb.shape == (2, 5) and torch.allclose(emb.norm(dim=-1), torch.ones(2))
    assert enc.kind == "open_clip-vit-h-14"
