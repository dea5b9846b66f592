"""What limits the LAE's reconstruction in a toy world: the held-out people's trained LoRAs, their
rank cuts, each LAE's reconstruction, and their projection on the top principal components of the
training LoRAs, all scored by the results instrument (identity accuracy, paired against trained).

    python benchmarks/bench_lae_ceiling.py --world WORLD [--lae A.safetensors,B.safetensors]
        [--training-loras FOLDER] [--components 16,64,256] [--cuts 1,2,4] [--spans 100,400,1600]
        [--out report.json]

`--lae` defaults to the world's lae/lae_final.safetensors; the projection is made in the first LAE's
normalized, gauge-aligned space from `--training-loras` (default: the LoRAs the world's LAE learns
from). A projection keeps only what the training LoRAs span: a linear ceiling for any code made
from them (docs/TOYWORLD.md, "What limits the LAE"). `--spans` also prints, unscored, how much of the
held-out LoRAs lies outside the span of the first N training LoRAs: does more data close the gap?
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def projected(x: torch.Tensor, train: torch.Tensor, k: int) -> torch.Tensor:
    """x projected on the mean plus the top k principal components of `train` (rows)."""
    mean = train.mean(0)
    basis = torch.linalg.svd(train - mean, full_matrices=False)[2][:k]
    return mean + (x - mean) @ basis.T @ basis


def span_error(x: torch.Tensor, train: torch.Tensor) -> float:
    """The share of x's squared distance from train's mean that lies outside the span of train's rows
    (around their mean): 0 when every row of x is in it, 1 when it is orthogonal to it."""
    outside = (x - projected(x, train, len(train))).double()
    return float((outside ** 2).sum() / ((x - train.mean(0)).double() ** 2).sum())


def lae_as_hypernet(path: Path) -> argparse.Namespace:
    """What results.reconstruct reads of a hypernet, from an LAE stage's lae_final file."""
    from difflora.train.lae_trainer import load_lae_final

    lae, normalizer, spec, _ = load_lae_final(path)
    return argparse.Namespace(spec=spec, lae=lae, weight_normalizer=normalizer, latent_shape=lae.latent_shape)


def main(argv=None) -> int:
    from safetensors.torch import load_file

    from bench_lora_recipes import truncated  # run from benchmarks/, as every bench
    from common import print_paired_against_trained
    from difflora.lora_spec import LoraSpec
    from difflora.pipeline import lora_state_dict
    from difflora_toyworld.plugin import register
    from difflora_toyworld.results import normalized_lora, reconstruct
    from difflora_toyworld.study import LoraScorer
    from difflora_toyworld.world import hypernet_loras

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", required=True)
    ap.add_argument("--lae", default="", help="comma-separated lae_final files (default: the world's)")
    ap.add_argument("--training-loras", default="", help="the LoRA folder the projection's components come from")
    ap.add_argument("--components", default="16,64,256", help="comma-separated numbers of principal components")
    ap.add_argument("--cuts", default="", help="comma-separated ranks to also score the trained LoRAs at")
    ap.add_argument("--spans", default="", help="comma-separated numbers of training LoRAs: the held-out LoRAs' "
                                                "relative error outside the span of the first N (not scored)")
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
        rows[f"trained, cut to rank {r}"] = scorer.score([truncated(p.lora, spec) for p in scorer.people])
    hypernets = [lae_as_hypernet(path) for path in laes]
    for path, hn in zip(laes, hypernets):
        rows[f"LAE {path} ({hn.lae.compression_ratio:.0f}x)"] = scorer.score([reconstruct(hn, p.lora) for p in scorer.people])

    hn = hypernets[0]
    train = torch.stack([normalized_lora(hn, p) for p in sorted(training.glob("id_*[0-9].safetensors"))])
    held = torch.stack([normalized_lora(hn, p.lora) for p in scorer.people])
    centred = ((held - train.mean(0)) ** 2).sum()
    for k in (int(c) for c in a.components.split(",") if c):
        k = min(k, len(train))
        rec = projected(held, train, k)
        row = scorer.score([lora_state_dict(hn, hn.weight_normalizer.denormalize(r)) for r in rec])
        row["relative_error_around_mean"] = float(((rec - held) ** 2).sum() / centred)
        rows[f"projection on {k} of {len(train)} training LoRAs' components"] = row

    print(f"{len(scorer.people)} held-out people; components from {len(train)} LoRAs in {training}")
    print_paired_against_trained(rows)
    spans = {n: span_error(held, train[:n]) for n in (min(int(k), len(train)) for k in a.spans.split(",") if k)}
    if spans:
        print("\n| training LoRAs | held-out relative error outside their span (around their mean) |\n| --- | --- |")
        for n, err in spans.items():
            print(f"| {n} | {err:.3f} |")
        rows["spans"] = {str(n): err for n, err in spans.items()}
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
