"""What a hypernet could reach in a toy world if it read every attribute of a person perfectly: LoRAs
built from the training LoRAs by the held-out people's attributes alone (no photo), scored by
results.py's measurement, paired against each person's own trained LoRA.

    python benchmarks/bench_attribute_oracles.py --world WORLD [--training-loras FOLDER] [--limit N]
        [--neighbours 1,8] [--strengths 1,1.5] [--out report.json]

Rows:
  nearest by attributes   the trained LoRA of the training identity sharing most of the 9 attributes
                          (a perfect lookup: the face-embedding lookup can only do worse)
  mean of k ...           the mean dW of the k sharing most, scaled back to their mean norm per layer
                          (a plain mean of k people is a weaker LoRA than any one of theirs)
  attribute ridge         ridge regression from the one-hot attributes to every layer's dW: the best
                          additive code of the attributes, cut to the hypernet's rank, at each strength
Every row is a conditional mean or a lookup; the hypernet's DiT is trained by MSE, so it leans to the
first. docs/TOYWORLD.md, "What a perfect reader of attributes gets".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def attribute_codes(people) -> torch.Tensor:
    """(N, 1 + V) float64: a constant, then one column per value of every identity attribute."""
    from difflora_toyworld.vocabulary import IDENTITY_ATTRIBUTES

    rows = [[1.0] + [float(getattr(p, k) == v) for k, values in IDENTITY_ATTRIBUTES.items() for v in values]
            for p in people]
    return torch.tensor(rows, dtype=torch.float64)


def layer_dws(spec, path) -> dict[str, torch.Tensor]:
    """Every layer's dW = up @ down (float64) of one LoRA file."""
    from difflora.lora_format import load_lora_file
    from difflora.lora_weights import delta_weight

    return {name: delta_weight(down.double(), up.double()) for name, (down, up) in load_lora_file(spec, path).items()}


def most_shared(people, candidates, k: int) -> list[list[int]]:
    """For each person, the indices of the k candidates sharing most attributes (ties: first)."""
    from difflora_toyworld.split import shared_attributes

    shared = np.array([[shared_attributes(p, c) for c in candidates] for p in people])
    return np.argsort(-shared, axis=1, kind="stable")[:, :k].tolist()


class DwOracles:
    """One pass over the training LoRAs (`dws`: each one's layer_dws, in the order of `codes`' rows):
    the attribute ridge's normal equations per layer, and each held-out person's sums over its
    neighbours of dW and of dW's norm per layer (`neighbours`: k -> each person's k training indices)."""

    def __init__(self, dws, codes: torch.Tensor, neighbours: dict[int, list[list[int]]]):
        self.codes = codes
        self.xty: dict[str, torch.Tensor] = {}
        self.sums: dict[tuple[int, int], dict[str, torch.Tensor]] = {}   # (k, person) -> layer -> sum of dW
        self.norms: dict[tuple[int, int], dict[str, float]] = {}         # (k, person) -> layer -> sum of |dW|
        owners: dict[int, list[tuple[int, int]]] = {}                    # training index -> its (k, person)s
        for k, rows in neighbours.items():
            for h, row in enumerate(rows):
                self.sums[k, h], self.norms[k, h] = {}, {}
                for j in row:
                    owners.setdefault(j, []).append((k, h))
        for j, layers in enumerate(dws):
            for name, dw in layers.items():
                self.xty[name] = self.xty.get(name, 0) + codes[j][:, None, None] * dw[None]
                for key in owners.get(j, ()):
                    self.sums[key][name] = self.sums[key].get(name, 0) + dw
                    self.norms[key][name] = self.norms[key].get(name, 0) + float(dw.norm())

    def ridge(self, code: torch.Tensor, lam: float = 1.0) -> dict[str, torch.Tensor]:
        """The attribute ridge's dW for one person's code (1 + V,)."""
        x = self.codes
        coef = torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=x.dtype), code)  # (1 + V,)
        return {name: torch.einsum("f,fij->ij", coef, xty) for name, xty in self.xty.items()}

    def neighbour_mean(self, k: int, h: int) -> dict[str, torch.Tensor]:
        """Person h's mean dW of its k neighbours, each layer scaled to their mean norm."""
        sums, norms = self.sums[k, h], self.norms[k, h]
        return {name: m * (norms[name] / k / max(float(m.norm()), 1e-30)) for name, m in sums.items()}


def as_lora(spec, dws: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Kohya LoRA at spec's rank: each layer's best rank-r approximation of scale * dW."""
    from difflora.lora_format import to_kohya
    from difflora.lora_weights import truncate_rank

    layers = {}
    for name, dw in dws.items():
        down, up = truncate_rank(torch.eye(dw.shape[1], dtype=dw.dtype), scale * dw, spec.rank)
        layers[name] = (down.float(), up.float())
    return to_kohya(spec, layers)


def main(argv=None) -> int:
    from safetensors.torch import load_file

    from common import print_paired_against_trained  # run from benchmarks/, as every bench
    from difflora.lora_spec import LoraSpec
    from difflora_toyworld.plugin import register
    from difflora_toyworld.render import sample_identities
    from difflora_toyworld.study import LoraScorer
    from difflora_toyworld.world import TRAIN_FIRST, hypernet_loras

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", required=True)
    ap.add_argument("--training-loras", default="", help="the LoRA folder to build from (default: what the world's "
                                                         "hypernet learns from)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N training LoRAs, in name order (0: all)")
    ap.add_argument("--neighbours", default="1,8", help="comma-separated k: 1 is the nearest by attributes")
    ap.add_argument("--strengths", default="1,1.5", help="comma-separated strengths of the attribute ridge")
    ap.add_argument("--rank", type=int, default=0, help="rank of the built LoRAs (default: the world's hypernet rank)")
    ap.add_argument("--out", default="", help="also write the rows (with per-person scores) as JSON here")
    a = ap.parse_args(argv)
    register()

    scorer = LoraScorer(a.world)
    folder = Path(a.training_loras) if a.training_loras else hypernet_loras(scorer.world, scorer.cfg)
    paths = sorted(folder.glob("id_*[0-9].safetensors"))[: a.limit or None]
    if not paths:
        raise SystemExit(f"no training LoRAs (id_*.safetensors) in {folder}: build the world first or pass "
                         "--training-loras")
    index = [int(p.stem[3:]) - TRAIN_FIRST for p in paths]
    everyone = sample_identities(max(index) + 1, scorer.cfg.seed, first=TRAIN_FIRST)
    train_people, held_people = [everyone[i] for i in index], [p.person for p in scorer.people]
    rank = a.rank or scorer.cfg.hypernet_rank or scorer.cfg.lora_rank
    spec_in = LoraSpec.from_unet(scorer.pipe.unet, rank=scorer.cfg.lora_rank)
    spec = LoraSpec.from_unet(scorer.pipe.unet, rank=rank)
    ks = [int(k) for k in a.neighbours.split(",") if k]
    near = {k: most_shared(held_people, train_people, k) for k in ks}
    oracles = DwOracles((layer_dws(spec_in, p) for p in paths), attribute_codes(train_people),
                        {k: v for k, v in near.items() if k > 1})
    codes = attribute_codes(held_people)

    rows = {"base model": scorer.score([None] * len(scorer.people)),
            "trained": scorer.score([load_file(p.lora) for p in scorer.people])}
    if 1 in near:
        from difflora_toyworld.split import shared_attributes

        shared = np.mean([shared_attributes(p, train_people[n[0]]) for p, n in zip(held_people, near[1])])
        rows[f"nearest by attributes (shares {shared:.1f} of 9)"] = scorer.score([load_file(paths[n[0]]) for n in near[1]])
    for k in (k for k in ks if k > 1):
        rows[f"mean dW of the {k} sharing most attributes, norm-matched, rank {rank}"] = scorer.score(
            [as_lora(spec, oracles.neighbour_mean(k, h)) for h in range(len(held_people))])
    ridge = [oracles.ridge(code) for code in codes]
    for s in (float(x) for x in a.strengths.split(",") if x):
        rows[f"attribute ridge (dW), rank {rank}, strength {s:g}"] = scorer.score([as_lora(spec, dw, s) for dw in ridge])

    print(f"{len(scorer.people)} held-out people; built from {len(paths)} training LoRAs in {folder}")
    print_paired_against_trained(rows)
    if a.out:
        Path(a.out).write_text(json.dumps({"training_loras": len(paths), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
