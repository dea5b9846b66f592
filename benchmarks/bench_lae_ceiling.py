"""What limits the LAE's reconstruction in a toy world: the held-out people's trained LoRAs, their
rank cuts, each LAE's reconstruction, and their projection on the top principal components of the
training LoRAs, all scored by the results instrument (identity accuracy, paired against trained).

    python benchmarks/bench_lae_ceiling.py --world WORLD [--lae A.safetensors,B.safetensors]
        [--training-loras FOLDER] [--components 16,64,256] [--cuts 1,2,4] [--out report.json]

`--lae` defaults to the world's lae/lae_final.safetensors; the projection is made in the first LAE's
normalized, gauge-aligned space from `--training-loras` (default: the LoRAs the world's LAE learns
from). A projection keeps only what the training LoRAs span: a linear ceiling for any code made
from them (docs/TOYWORLD.md, "What limits the LAE").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def normalized_loras(paths, spec, normalizer) -> torch.Tensor:
    """(N, P): each LoRA file read at the spec's rank (top components), canonical, then normalized."""
    from difflora.lora_format import load_lora_file
    from difflora.lora_weights import canonicalize_layers, flatten

    rows = [flatten(spec, canonicalize_layers(spec, load_lora_file(spec, p, reduce_rank=True))).float() for p in paths]
    return normalizer.normalize(torch.stack(rows))


def projected(x: torch.Tensor, train: torch.Tensor, k: int) -> torch.Tensor:
    """x projected on the mean plus the top k principal components of `train` (rows)."""
    mean = train.mean(0)
    basis = torch.linalg.svd(train - mean, full_matrices=False)[2][:k]
    return mean + (x - mean) @ basis.T @ basis


def main(argv=None) -> int:
    from safetensors.torch import load_file

    from difflora.lora_format import load_lora_file, to_kohya
    from difflora.lora_spec import LoraSpec
    from difflora.lora_weights import canonicalize_layers, unflatten
    from difflora.train.lae_trainer import load_lae_final
    from difflora_toyworld.plugin import register
    from difflora_toyworld.results import reconstruct
    from difflora_toyworld.study import LoraScorer
    from difflora_toyworld.world import hypernet_loras

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", required=True)
    ap.add_argument("--lae", default="", help="comma-separated lae_final files (default: the world's)")
    ap.add_argument("--training-loras", default="", help="the LoRA folder the projection's components come from")
    ap.add_argument("--components", default="16,64,256", help="comma-separated numbers of principal components")
    ap.add_argument("--cuts", default="", help="comma-separated ranks to also score the trained LoRAs at")
    ap.add_argument("--out", default="", help="also write the rows (with per-person scores) as JSON here")
    a = ap.parse_args(argv)
    register()

    scorer = LoraScorer(a.world)
    laes = [Path(p) for p in a.lae.split(",") if p] or [scorer.world.lae / "lae_final.safetensors"]
    training = Path(a.training_loras) if a.training_loras else hypernet_loras(scorer.world, scorer.cfg)
    rows = {"base model": scorer.score([None] * len(scorer.people)),
            "trained": scorer.score([load_file(p.lora) for p in scorer.people])}
    for r in (int(k) for k in a.cuts.split(",") if k):
        spec = LoraSpec.from_unet(scorer.pipe.unet, rank=r)
        rows[f"trained, cut to rank {r}"] = scorer.score(
            [to_kohya(spec, load_lora_file(spec, p.lora, reduce_rank=True)) for p in scorer.people])
    for path in laes:
        lae, normalizer, spec, _ = load_lae_final(path)
        hn = argparse.Namespace(spec=spec, lae=lae, weight_normalizer=normalizer, latent_shape=lae.latent_shape)
        rows[f"LAE {path} ({lae.compression_ratio:.0f}x)"] = scorer.score([reconstruct(hn, p.lora) for p in scorer.people])

    lae, normalizer, spec, _ = load_lae_final(laes[0])
    train = normalized_loras(sorted(training.glob("id_*[0-9].safetensors")), spec, normalizer)
    held = normalized_loras([p.lora for p in scorer.people], spec, normalizer)
    centred = ((held - train.mean(0)) ** 2).sum()
    for k in (int(c) for c in a.components.split(",") if c):
        k = min(k, len(train))
        rec = projected(held, train, k)
        loras = [to_kohya(spec, canonicalize_layers(spec, unflatten(spec, normalizer.denormalize(r[None])[0])))
                 for r in rec]
        row = scorer.score(loras)
        row["relative_error_around_mean"] = float(((rec - held) ** 2).sum() / centred)
        rows[f"projection on {k} of {len(train)} training LoRAs' components"] = row

    trained = np.array(rows["trained"]["per_identity"])
    print(f"{len(scorer.people)} held-out people; components from {len(train)} LoRAs in {training}")
    print("| LoRA | identity accuracy | share of trained | minus trained (paired) | prompt accuracy |")
    print("| --- | --- | --- | --- | --- |")
    for label, row in rows.items():
        x = np.array(row["per_identity"])
        d = x - trained
        print(f"| {label} | {x.mean():.3f} ± {x.std() / np.sqrt(len(x)):.3f} | {x.mean() / trained.mean():.2f} | "
              f"{d.mean():+.3f} ± {d.std() / np.sqrt(len(d)):.3f} | {row['prompt_accuracy']:.3f} |")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
