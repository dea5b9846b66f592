"""augment --backend diffusers: SDXL + IP-Adapter FaceID in process, on the tiny diffusers SDXL with
FaceID weights of its shapes (random values, written here as .safetensors in the layout diffusers'
load_ip_adapter reads) and a stub face analysis whose 8-d embedding is the image's column-band means."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from difflora.encoders.base import DetectedFace, FaceEncoder
from difflora.errors import GeneratorError
from difflora.photos.augment import augment_identities
from difflora.train.base_model import load_sdxl
from difflora.train.config import AugmentConfig
from difflora.photos.faceid_generator import FaceIDGenerator, check_faceid_fits, read_faceid_weights
from tests.support.train_data import tiny_base

FACE_DIM = 8


class BandFaces(FaceEncoder):
    """One face in every image; its embedding: the mean brightness of 8 column bands, plus 1 (all
    positive, so any two images' similarity is above 0)."""

    kind, embedding_dim = "bands", FACE_DIM

    def _detect(self, image):
        return [DetectedFace(box=(0, 0, image.shape[1], image.shape[0]), score=1.0)]

    def embed(self, image, face):
        bands = np.array_split(image.astype(np.float32).mean(axis=(0, 2)), FACE_DIM)
        return torch.tensor([b.mean() / 255 + 1 for b in bands])


def faceid_weights(unet, embedding_dim=FACE_DIM, cross_dim=None, lora_rank=0, seed=0) -> dict[str, torch.Tensor]:
    """FaceID tensors for `unet` in the .safetensors layout: image_proj (2x mult, 4 tokens) and
    to_k_ip / to_v_ip for every cross-attention (processor k = 1, 3, ...); with lora_rank, FaceID's
    LoRA on every attention's q/k/v/out (processor k = 0, 1, ...)."""
    g = torch.Generator().manual_seed(seed)
    cross = cross_dim or unet.config.cross_attention_dim
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
    t = {"image_proj.proj.0.weight": rand(2 * embedding_dim, embedding_dim),
         "image_proj.proj.0.bias": rand(2 * embedding_dim),
         "image_proj.proj.2.weight": rand(4 * cross, 2 * embedding_dim),
         "image_proj.proj.2.bias": rand(4 * cross), "image_proj.norm.weight": torch.ones(cross),
         "image_proj.norm.bias": torch.zeros(cross)}
    for k, name in enumerate(unet.attn_processors):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        if not name.endswith("attn1.processor"):
            for part in ("to_k_ip", "to_v_ip"):
                t[f"ip_adapter.{k}.{part}.weight"] = rand(*attn.to_k.weight.shape) * 3
        if lora_rank:
            layers = (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v), ("to_out", attn.to_out[0]))
            for part, layer in layers:
                t[f"ip_adapter.{k}.{part}_lora.down.weight"] = rand(lora_rank, layer.in_features)
                t[f"ip_adapter.{k}.{part}_lora.up.weight"] = rand(layer.out_features, lora_rank)
    return t


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory)


@pytest.fixture(scope="module")
def weights_file(base, tmp_path_factory):
    path = tmp_path_factory.mktemp("faceid") / "ip-adapter-faceid_sdxl.safetensors"
    save_file(faceid_weights(load_sdxl(str(base)).unet), str(path))
    return path


def meta_unet(base):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(json.loads((base / "unet" / "config.json").read_text()))


DRAW = dict(steps=2, guidance=2.0, resolution=64, negative_prompt="blurry", device="cpu", dtype="fp32")


def test_the_face_embedding_steers_the_photo_and_scale_0_is_the_base_pipeline(base, weights_file):
    pipe = load_sdxl(str(base))
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(prompt="a photo of sks person", negative_prompt="blurry", height=64, width=64, num_inference_steps=2,
                 guidance_scale=2.0, generator=torch.Generator("cpu").manual_seed(7), output_type="np").images[0]
    plain = (np.clip(plain, 0, 1) * 255).round().astype(np.uint8)
    gen = FaceIDGenerator(pipe, read_faceid_weights(weights_file), BandFaces(), scale=0.0, **DRAW)
    g = torch.Generator().manual_seed(1)
    a, b = (torch.nn.functional.normalize(torch.rand(1, 1, FACE_DIM, generator=g) + 0.1, dim=-1) for _ in range(2))
    assert np.array_equal(gen.draw(a, "a photo of sks person", 7), plain)   # scale 0: exactly the base model
    gen.pipe.set_ip_adapter_scale(1.0)
    photo_a = gen.draw(a, "a photo of sks person", 7)
    assert photo_a.shape == (64, 64, 3) and photo_a.dtype == np.uint8
    assert np.array_equal(gen.draw(a, "a photo of sks person", 7), photo_a)  # same face, same seed: same photo
    photo_b = gen.draw(b, "a photo of sks person", 7)
    assert np.abs(photo_a.astype(int) - photo_b).mean() > 0.5                # another face: another photo
    assert np.abs(photo_a.astype(int) - plain).mean() > 0.5


def test_faceid_lora_tensors_load_through_peft_and_change_the_base(base, tmp_path):
    pipe = load_sdxl(str(base))
    path = tmp_path / "with_lora.safetensors"
    save_file(faceid_weights(pipe.unet, lora_rank=2), str(path))
    before = {n: p.clone() for n, p in pipe.unet.named_parameters()}
    gen = FaceIDGenerator(pipe, read_faceid_weights(path), BandFaces(), scale=0.0, **DRAW)
    assert any("lora" in n for n, _ in gen.pipe.unet.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in gen.pipe.unet.named_parameters() if n in before)
    assert gen.pipe.get_active_adapters() == ["faceid_0"]


def test_a_pickle_and_a_non_faceid_file_are_refused_with_a_sentence(tmp_path):
    pickle = tmp_path / "ip-adapter-faceid_sdxl.bin"
    torch.save({"image_proj": {}, "ip_adapter": {}}, pickle)
    with pytest.raises(GeneratorError, match=r"is not a \.safetensors file: .*pickles.*Convert it once"):
        read_faceid_weights(pickle)
    plain = tmp_path / "ip-adapter_sdxl.safetensors"
    save_file({"image_proj.proj.weight": torch.zeros(4, 2), "ip_adapter.1.to_k_ip.weight": torch.zeros(2, 2)},
              str(plain))
    with pytest.raises(GeneratorError, match="is not IP-Adapter FaceID weights: it lacks image_proj.proj.0.weight"):
        read_faceid_weights(plain)
    with pytest.raises(GeneratorError, match="not found: pass --faceid-weights"):
        read_faceid_weights(tmp_path / "none.safetensors")


def test_weights_for_another_unet_or_face_model_are_refused_naming_the_mismatch(base, tmp_path):
    unet = meta_unet(base)
    ok = faceid_weights(unet)

    def check(tensors, embedding_dim=FACE_DIM):
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        check_faceid_fits(read_faceid_weights(path), unet, embedding_dim, "w.safetensors")

    check(ok)
    with pytest.raises(GeneratorError, match="face tokens are 2048-d but this UNet's cross-attention is 64-d"):
        check(faceid_weights(unet, cross_dim=2048))
    wrong = dict(ok, **{"ip_adapter.3.to_v_ip.weight": torch.zeros(640, 64)})
    with pytest.raises(GeneratorError, match=r"ip_adapter.3.to_v_ip.weight is \(640, 64\) but this UNet's "
                                             r"down_blocks.1.attentions.0.transformer_blocks.1.attn2 needs \(64, 64\)"):
        check(wrong)
    fewer = {k: v for k, v in ok.items() if not k.startswith("ip_adapter.139.")}
    with pytest.raises(GeneratorError, match="keys for 69 cross-attention layers, this UNet has 70"):
        check(fewer)
    with pytest.raises(GeneratorError, match="takes 8-d face embeddings but the face analysis gives 512-d"):
        check(ok, embedding_dim=512)


def test_augment_backend_diffusers_writes_photos_and_report(base, weights_file, tmp_path):
    data = tmp_path / "data"
    for name, left in (("ann", 230), ("bob", 20)):
        (data / name).mkdir(parents=True)
        photo = np.full((64, 64, 3), 250 - left, np.uint8)
        photo[:, :32] = left
        Image.fromarray(photo).save(data / name / "001.png")
    cfg = AugmentConfig(data=str(data), out=str(tmp_path / "out"), backend="diffusers", base=str(base),
                        faceid_weights=str(weights_file), target_images=3, concurrency=1, steps=2, resolution=64,
                        guidance=1.0, device="cpu", dtype="fp32", min_face_similarity=0.0, progress=False)
    reports = augment_identities(cfg, face_encoder=BandFaces())
    assert [(r.name, r.status, r.generated, r.kept) for r in reports] == [("ann", "augmented", 2, 2),
                                                                          ("bob", "augmented", 2, 2)]
    out = tmp_path / "out"
    photos = {}
    for r in reports:
        files = sorted((out / r.name).glob("gen_*.png"))
        assert [f.name for f in files] == sorted(p["file"] for p in r.photos)
        assert all(Image.open(f).size == (64, 64) for f in files)
        assert all(f.with_suffix(".txt").read_text().startswith("a photo of sks person") for f in files)
        assert (out / f"{r.name}.contact.png").is_file()
        photos[r.name] = np.asarray(Image.open(files[0]))
        assert json.loads((out / f"{r.name}.augment.json").read_text())["kept"] == 2
    assert not np.array_equal(photos["ann"], photos["bob"])
    report = json.loads((out / "augment_report.json").read_text())
    assert report["config"]["backend"] == "diffusers" and len(report["identities"]) == 2
    assert sorted(str(p.relative_to(data)) for p in data.rglob("*")) == ["ann", "ann/001.png", "bob", "bob/001.png"]
