"""What limits the LAE's reconstruction in a toy world: the held-out people's trained LoRAs, their
rank cuts, each LAE's reconstruction, and their projection on the top principal components of the
training LoRAs, all scored by the results instrument (identity accuracy, paired against trained).

    python benchmarks/bench_lae_ceiling.py --world WORLD [--lae A.safetensors,B.safetensors]
        [--training-loras FOLDER] [--components 16,64,256] [--cuts 1,2,4] [--spans 100,400,1600]
        [--dw-spans 400,1600] [--out report.json]

`--lae` defaults to the world's lae/lae_final.safetensors; the projection is made in the first LAE's
normalized, gauge-aligned space from `--training-loras` (default: the LoRAs the world's LAE learns
from). A projection keeps only what the training LoRAs span: a linear ceiling for any code made
from them (docs/TOYWORLD.md, "What limits the LAE"). `--spans` also prints, unscored, how much of the
held-out LoRAs lies outside the span of the first N training LoRAs: does more data close the gap?
`--dw-spans N` scores the same kind of ceiling in dW = B·A, which has no gauge: each held-out LoRA's
dW projected on the affine span of the first N training LoRAs' dW (through Gram matrices of the
factors, never the out x in products of all N), then cut to the LAE's rank.
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
    _, s, vh = torch.linalg.svd(train - mean, full_matrices=False)
    # n centred rows span at most n - 1 directions: a null singular vector is an arbitrary direction
    basis = vh[:k][s[:k] > s.max() * max(train.shape) * torch.finfo(s.dtype).eps]
    return mean + (x - mean) @ basis.T @ basis


def span_error(x: torch.Tensor, train: torch.Tensor) -> float:
    """The share of x's squared distance from train's mean that lies outside the span of train's rows
    (around their mean): 0 when every row of x is in it, 1 when it is orthogonal to it."""
    outside = (x - projected(x, train, len(train))).double()
    return float((outside ** 2).sum() / ((x - train.mean(0)).double() ** 2).sum())


def dw_gram(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """<dW_i, dW_j> (Frobenius) of one layer for every pair of two stacks of LoRAs, from their factors:
    (down (n_a, r, in), up (n_a, out, r)) and the same for b -> (n_a, n_b). <B_i A_i, B_j A_j> is the
    sum of (B_i^T B_j) * (A_i A_j^T): 2 (n r)^2-sized products instead of n out x in matrices."""
    (down_a, up_a), (down_b, up_b) = a, b
    ups = up_a.transpose(1, 2).flatten(0, 1) @ up_b.transpose(1, 2).flatten(0, 1).T   # (n_a r, n_b r)
    downs = down_a.flatten(0, 1) @ down_b.flatten(0, 1).T                             # (n_a r, n_b r)
    return (ups * downs).unflatten(1, (len(down_b), -1)).unflatten(0, (len(down_a), -1)).sum((1, 3))


def affine_span_weights(train_gram: torch.Tensor, cross_gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights w (H, N), each row summing to 1, such that sum_j w_j x_j is the projection of held-out
    row x_h on the affine span of training rows x_j (their mean plus the span around it), from inner
    products alone: train_gram (N, N) = <x_i, x_j>, cross_gram (H, N) = <x_h, x_j>. Also returns
    |projection - mean|^2 (H,), for the relative error around the mean."""
    row_mean, mean = train_gram.mean(1), train_gram.mean()
    centred = train_gram - row_mean[:, None] - row_mean[None, :] + mean
    cross = cross_gram - cross_gram.mean(1, keepdim=True) - row_mean[None, :] + mean
    c = torch.linalg.lstsq(centred, cross.T, rcond=1e-10, driver="gelsd").solution.T     # (H, N)
    kept = ((c @ centred) * c).sum(1)
    return c + (1 - c.sum(1, keepdim=True)) / len(train_gram), kept


def layer_stacks(spec, paths: list[Path]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's factors of the LoRA files at spec's rank (their top components), stacked (float64)."""
    from difflora.lora_format import load_lora_file

    loras = [load_lora_file(spec, path, reduce_rank=True) for path in paths]
    return {layer.name: (torch.stack([x[layer.name][0] for x in loras]).double(),
                         torch.stack([x[layer.name][1] for x in loras]).double()) for layer in spec.layers}


def dw_span_projections(spec, train: dict, held: dict, sizes: list[int]) -> dict[int, tuple[list[dict], float]]:
    """For each n in `sizes`: the held-out LoRAs' dW projected on the affine span of the first n training
    LoRAs' dW, cut to spec's rank (kohya state dicts), and the mean relative error around the training
    mean. Every layer weighs the same in the projection: its Gram is divided by its training LoRAs'
    mean |dW|^2 (so the largest layers do not decide it alone)."""
    from bench_attribute_oracles import as_lora

    n_train = len(next(iter(train.values()))[0])
    train_gram = torch.zeros(n_train, n_train, dtype=torch.float64)
    cross_gram = torch.zeros(len(next(iter(held.values()))[0]), n_train, dtype=torch.float64)
    held_norm = torch.zeros(len(cross_gram), dtype=torch.float64)
    for name in train:
        layer_gram = dw_gram(train[name], train[name])
        weight = 1 / layer_gram.diagonal().mean().clamp_min(1e-30)
        train_gram += weight * layer_gram
        cross_gram += weight * dw_gram(held[name], train[name])
        held_norm += weight * dw_gram(held[name], held[name]).diagonal()
    out = {}
    for n in sizes:
        weights, kept = affine_span_weights(train_gram[:n, :n], cross_gram[:, :n])
        # |x_h - mean|^2 of the held-out rows, from the same inner products
        around = held_norm - 2 * cross_gram[:, :n].mean(1) + train_gram[:n, :n].mean()
        loras = []
        for w in weights:
            dws = {}
            for name, (down, up) in train.items():
                dws[name] = (up[:n] * w[:, None, None]).transpose(1, 2).flatten(0, 1).T @ down[:n].flatten(0, 1)
            loras.append(as_lora(spec, dws))
        out[n] = loras, float(((around - kept) / around).mean())
    return out


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
    ap.add_argument("--dw-spans", default="", help="comma-separated numbers of training LoRAs: score the held-out "
                                                   "LoRAs' dW projected on the span of the first N training LoRAs' dW")
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

    dw_sizes = [min(int(k), len(train)) for k in a.dw_spans.split(",") if k]
    if dw_sizes:
        paths = sorted(training.glob("id_*[0-9].safetensors"))
        projections = dw_span_projections(hn.spec, layer_stacks(hn.spec, paths),
                                          layer_stacks(hn.spec, [p.lora for p in scorer.people]), dw_sizes)
        for n, (loras, error) in projections.items():
            row = scorer.score(loras)
            row["relative_error_around_mean"] = error
            rows[f"dW projection on the span of {n} training LoRAs' dW, cut to rank {hn.spec.rank}"] = row

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
