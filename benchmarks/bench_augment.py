"""What augment buys in the toy world: identity accuracy of a LoRA trained from (a) 12 rendered photos,
(b) the first of those photos alone, (c) that photo + photos augment generated through the harness
ComfyUI (the toy augmenting workflow: the shipped toy hypernet's LoRA from the one photo, then scenes).

    python benchmarks/bench_augment.py [--identities 6] [--similarity 0.4] [--out DIR]

LoRAs: identity-loras with the toy world's settings (120 steps x 8, lr 2e-3, rank 4). Scores: the toy
classifier reading 8 images per LoRA (results.py's 4 scenes x 2 seeds, 20 Euler steps, guidance 4).
Prints figures; nothing is asserted. Needs the harness ComfyUI (COMFYUI_PATH) and nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools import harness_models  # noqa: E402
from devtools.augment_workflow import NODES, install_toy_world, toy_augment_workflow, toy_prompts  # noqa: E402
from devtools.comfy_server import ComfyServer  # noqa: E402
from devtools.get_comfyui import get_comfyui  # noqa: E402
from difflora.hypernet_file import load_hypernet  # noqa: E402
from difflora.photos.augment import augment_identities  # noqa: E402
from difflora.train.config import AugmentConfig, IdentityLoraConfig  # noqa: E402
from difflora.train.identity_loras import train_identity_loras  # noqa: E402
from difflora_toyworld import toy_sdxl  # noqa: E402
from difflora_toyworld.attributes import identity_accuracy, load_classifier, prompt_accuracy  # noqa: E402
from difflora_toyworld.render import caption, sample_identities, write_identity_folders  # noqa: E402
from difflora_toyworld.results import EVAL_SCENES, SEEDS_PER_SCENE, eval_scene, generate  # noqa: E402
from difflora_toyworld.world import HELDOUT_FIRST, TRIGGER, WORLD_SIZES  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--identities", type=int, default=6)
    ap.add_argument("--similarity", type=float, default=0.4, help="augment's and identity-loras' face threshold")
    ap.add_argument("--out", default="", help="keep the data sets and LoRAs here (default: a temp folder)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoders": UNet-only LoRAs, by design
    root = Path(a.out or tempfile.mkdtemp(prefix="bench-augment-"))
    comfy = get_comfyui()
    base = toy_sdxl.pipeline_folder_from_checkpoint(harness_models.toy_asset("checkpoints/toy_sdxl.safetensors"), root / "base",
                                                    comfy / "comfy" / "sd1_tokenizer")
    hn = load_hypernet(harness_models.toy_asset("difflora/difflora_toy.safetensors"))
    face, image = hn.face_encoder, hn.image_encoder
    first = HELDOUT_FIRST + 100  # held-out people no model saw (nor the hypernet's own measurement)
    data = {"a": write_identity_folders(root / "a_12_rendered", a.identities, 12, 0, first_identity=first),
            "b": write_identity_folders(root / "b_1_photo", a.identities, 1, 0, first_identity=first)}
    data["c"] = _augment(comfy, data["b"], root, face, a.similarity, a.identities)
    rows = _score_loras(root, base, data, face, image, sample_identities(a.identities, 0, first=first), a.similarity)
    _print_table(rows)
    print(f"folders: {root}")
    return 0


def _augment(comfy, photos: Path, root: Path, face, similarity: float, identities: int) -> Path:
    """(c): the one-photo data set augmented through the toy world's ComfyUI workflow; prints what was kept."""
    t0 = time.perf_counter()
    with ComfyServer(comfy) as server:
        names = install_toy_world(server)
        workflow = root / "toy_augment_api.json"
        workflow.write_text(json.dumps(toy_augment_workflow(server, names)))
        prompts = root / "prompts.txt"
        prompts.write_text("\n".join(toy_prompts()) + "\n")
        cfg = AugmentConfig(data=str(photos), out=str(root / "c_augmented"), server=server.url,
                            workflow=str(workflow), prompts=str(prompts), target_images=12, concurrency=2,
                            face_encoder="toy-face", min_face_similarity=similarity, progress=False, **NODES)
        reports = augment_identities(cfg, face_encoder=face)
    augment_s = time.perf_counter() - t0
    sims = [p["similarity"] for r in reports for p in r.photos if p["similarity"] is not None]
    print(f"augment: {sum(r.kept for r in reports)} kept of {sum(r.generated for r in reports)} generated "
          f"({identities} identities, threshold {similarity}) in {augment_s:.0f} s; similarity to the reference "
          f"of generated photos: median {np.median(sims):.3f}, quartiles {np.percentile(sims, 25):.3f} / "
          f"{np.percentile(sims, 75):.3f}")
    return root / "c_augmented"


def _score_loras(root: Path, base: Path, data: dict, face, image, people, similarity: float) -> dict:
    """label -> (identity accuracies, prompt accuracies, photos per identity): the base model, then
    an identity LoRA trained from each data set, in the toy world's measurement."""
    from safetensors.torch import load_file

    from difflora.train.data import read_metadata

    world = WORLD_SIZES["default"]
    clf = load_classifier(harness_models.toy_asset(harness_models.TOY_CLASSIFIER))
    pipe = toy_sdxl.load_pipeline(base)
    scenes = [eval_scene(b, e) for b, e in EVAL_SCENES for _ in range(SEEDS_PER_SCENE)]
    prompts_eval = [caption(s, TRIGGER) for s in scenes]
    seeds = list(range(len(scenes)))
    base_scores = [identity_accuracy(clf, generate(pipe, None, prompts_eval, seeds, 20, 4.0), p) for p in people]
    rows = {"base model": (base_scores, [], [])}
    for key, label in (("a", "(a) 12 rendered photos"), ("b", "(b) 1 photo"), ("c", "(c) 1 photo + augmented")):
        lora_cfg = IdentityLoraConfig(data=str(data[key]), out=str(root / f"loras_{key}"), base=str(base),
                                      face_encoder="toy-face", rank=4, steps=world.lora_steps,
                                      batch_size=world.lora_batch, lr=world.lora_lr, resolution=64, min_images=1,
                                      min_face_similarity=similarity if key == "c" else -1.0,
                                      mixed_precision="no", seed=world.seed, progress=False)
        results = train_identity_loras(lora_cfg, face_encoder=face, image_encoder=image)
        ident, prompt, photos = [], [], []
        for person, r in zip(people, results):
            lora = root / f"loras_{key}" / f"{r.name}.safetensors"
            imgs = generate(pipe, load_file(lora), prompts_eval, seeds, 20, 4.0)
            ident.append(identity_accuracy(clf, imgs, person))
            prompt.append(prompt_accuracy(clf, imgs, scenes))
            photos.append(int(read_metadata(lora)["difflora_images"]))
        rows[label] = (ident, prompt, photos)
    return rows


def _print_table(rows: dict) -> None:
    print("\n| LoRA trained from | photos per identity | identity accuracy | prompt accuracy |")
    print("| --- | --- | --- | --- |")
    for label, (ident, prompt, photos) in rows.items():
        se = np.std(ident, ddof=1) / np.sqrt(len(ident))
        print(f"| {label} | {np.mean(photos) if photos else '-'} | {np.mean(ident):.3f} ± {se:.3f} | "
              f"{np.mean(prompt) if prompt else float('nan'):.3f} |")
    print("\nper identity (a / b / c): " + "; ".join(
        f"{x:.2f} / {y:.2f} / {z:.2f}" for x, y, z in zip(*(rows[k][0] for k in list(rows)[1:]))))


if __name__ == "__main__":
    sys.exit(main())
