"""The identity-LoRA recipe curve of a toy world: identity and prompt accuracy against seconds an identity.

Each recipe (steps x batch, learning rate, rank) trains one LoRA per validation person (identities
60,000 on: neither trained on nor held out; the study's validation people) with the project's
`identity-loras` on the world's base, then the measurement of results.py reads them (the same
scenes, seeds, sampler and classifier). Settings are chosen here, then scored on the held-out
people by the build; docs/TOYWORLD.md ("Toy world v2") holds the curve measured this way.

    python benchmarks/bench_lora_recipes.py --world WORLD --out /tmp/recipes \\
        --recipes 80:4:2e-3:4,160:8:3e-3:16,320:8:2e-3:16 [--people 8] [--base OTHER_BASE_FOLDER]

`--truncate 4,8` also scores each recipe's LoRAs cut to their top 4 / 8 singular components
(`lora_format.load_lora_file(reduce_rank=True)`): how much of a high-rank LoRA a lower-rank target
for the hypernet keeps.

A recipe already trained in --out is not retrained (identity-loras resumes), so its seconds then
read near 0: time a recipe in a fresh --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def parse_recipe(text: str) -> dict:
    """"steps:batch:lr[:rank]" -> IdentityLoraConfig fields (rank 4 when not given)."""
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise SystemExit(f"recipe {text!r}: write steps:batch:lr[:rank], e.g. 160:8:3e-3:16")
    return {"steps": int(parts[0]), "batch_size": int(parts[1]), "lr": float(parts[2]),
            "rank": int(parts[3]) if len(parts) == 4 else 4}


def truncated(path: Path, spec) -> dict:
    """The LoRA file's top `spec.rank` singular components of every layer, as a kohya state dict."""
    from difflora.lora_format import load_lora_file, to_kohya

    return to_kohya(spec, load_lora_file(spec, path, reduce_rank=True))


def main(argv=None) -> int:
    from safetensors.torch import load_file

    from difflora.lora_spec import LoraSpec
    from difflora.train.config import IdentityLoraConfig
    from difflora.train.identity_loras import train_identity_loras
    from difflora_toyworld import toy_sdxl
    from difflora_toyworld.identity_encoder import load_encoder
    from difflora_toyworld.render import sample_identities, write_identity_folders
    from difflora_toyworld.study import LoraScorer, MeasuredPerson
    from difflora_toyworld.world import TRIGGER, VALIDATION_FIRST

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", required=True, help="a built (or base-seeded) world: base, classifier, encoders")
    ap.add_argument("--base", default="", help="another diffusers base folder to train and draw with")
    ap.add_argument("--out", required=True, help="folder for the validation photos and the recipes' LoRAs")
    ap.add_argument("--recipes", required=True, help="comma-separated steps:batch:lr[:rank]")
    ap.add_argument("--people", type=int, default=8)
    ap.add_argument("--photos", type=int, default=12)
    ap.add_argument("--per-pass", type=int, default=8, help="identities trained together in one UNet pass")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--truncate", default="", help="comma-separated ranks to also score each recipe's LoRAs at")
    ap.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"),
                    help="the trainer's compute precision (bf16: the UNet in bf16 under autocast; CPUs with AMX)")
    a = ap.parse_args(argv)
    recipes = [(r, parse_recipe(r)) for r in a.recipes.split(",") if r]

    out = Path(a.out)
    scorer = LoraScorer(a.world)  # results.py's measurement: scenes, seeds, sampler, classifier
    world = scorer.world
    base = a.base or str(world.base)
    if a.base:
        scorer.pipe = toy_sdxl.load_pipeline(a.base)
    data = out / f"photos{a.photos}"
    if not data.is_dir():
        write_identity_folders(data, a.people, a.photos, a.seed, subject=TRIGGER, first_identity=VALIDATION_FIRST)
    people = [MeasuredPerson(f"id_{VALIDATION_FIRST + i:05d}", person, None,
                             sorted((data / f"id_{VALIDATION_FIRST + i:05d}").glob("*.png")))
              for i, person in enumerate(sample_identities(a.people, a.seed, first=VALIDATION_FIRST))]
    scorer = scorer.on(people)
    face, image = load_encoder(world.face), load_encoder(world.image)
    cut_specs = [LoraSpec.from_unet(scorer.pipe.unet, rank=int(k)) for k in a.truncate.split(",") if k]

    def score(loras):
        measured = scorer.score(loras)
        return np.array(measured["per_identity"]), measured["prompt_accuracy"]

    base_ida, base_pa = score([None] * a.people)
    print(f"base model: identity {base_ida.mean():.3f} ± {base_ida.std() / np.sqrt(a.people):.3f}, "
          f"prompt {base_pa:.3f}", flush=True)
    print("| recipe (steps:batch:lr:rank) | identity accuracy | gain over base (paired) | prompt accuracy | s / identity |")
    print("| --- | --- | --- | --- | --- |")
    for text, fields in recipes:
        run = out / ("recipe-" + "-".join(f"{k}{v}" for k, v in fields.items())
                     + ("" if a.mixed_precision == "no" else f"-{a.mixed_precision}"))
        cfg = IdentityLoraConfig(
            data=str(data), out=str(run), base=base, face_encoder="toy-face", insightface_root=str(world.face),
            image_encoder=str(world.image), resolution=toy_sdxl.IMAGE_SIZE, min_images=3, min_face_similarity=0.8,
            mixed_precision=a.mixed_precision, seed=a.seed, identities_per_pass=a.per_pass, **fields)
        t0 = time.perf_counter()
        train_identity_loras(cfg, face_encoder=face, image_encoder=image)
        seconds = (time.perf_counter() - t0) / a.people
        files = [run / f"{p.name}.safetensors" for p in people]
        rows = [(text, [load_file(f) for f in files], f"{seconds:.1f}")]
        rows += [(f"{text}, cut to rank {spec.rank}", [truncated(f, spec) for f in files], "")
                 for spec in cut_specs if spec.rank < fields["rank"]]
        for label, loras, cost in rows:
            ida, pa = score(loras)
            gain = ida - base_ida
            print(f"| {label} | {ida.mean():.3f} ± {ida.std() / np.sqrt(len(ida)):.3f} | {gain.mean():+.3f} ± "
                  f"{gain.std() / np.sqrt(len(gain)):.3f} | {pa:.3f} | {cost} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
