"""Benchmark 4: LAE compression at the SDXL rank-4 spec, and held-out reconstruction error.

The ratio is exact (flat LoRA length over latent size). The error needs trained LoRAs; no real
identity LoRAs exist here, so the LoRAs are SYNTHETIC: every layer of identity i is
(D0 + sum_j a_ij D_j, U0 + sum_j a_ij U_j) with shared random factors and k per-identity
coefficients a_i (a k-dimensional family of rank-4 LoRAs, like identities sharing structure),
then put in canonical SVD form. The LAE (`sdxl-r4`) trains briefly on --train of them with the
weight-preserved loss on layer-normalized vectors and is scored on --held-out others:
relative weight error ||x_hat - x||^2 / ||x||^2 and relative dW error (sum_l ||dW_hat - dW||^2 /
sum_l ||dW||^2), both on raw weights, next to two baselines: predicting zero (1.0) and predicting
the mean training LoRA. A short CPU run shows the machinery and the trend, not the converged error.

    python benchmarks/bench_lae.py [--steps 5] [--batch 2] [--train 24] [--held-out 8] [--k 4]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import PeakMemory, describe, device_info, print_table, write_json

from difflora.lae import LAE_CONFIGS, LoraAutoencoder, dw_relative_error, weight_preserved_loss
from difflora.lora_spec import LoraSpec
from difflora.lora_weights import canonicalize_layers, flatten
from difflora.normalization import WeightNormalizer


def synthetic_loras(spec: LoraSpec, n: int, k: int, seed: int) -> torch.Tensor:
    """(n, P) canonical LoRAs from a k-dimensional family (shared factors from seed 0)."""
    shared = torch.Generator().manual_seed(0)
    coef = torch.randn(n, k + 1, generator=torch.Generator().manual_seed(seed))
    coef[:, 0] = 1.0  # every identity has the shared base factors
    r, layers = spec.rank, {}
    for layer in spec.layers:
        d = torch.randn(k + 1, r, layer.in_features, generator=shared) / layer.in_features ** 0.5
        u = torch.randn(k + 1, layer.out_features, r, generator=shared) * 0.01
        layers[layer.name] = (torch.einsum("nk,kri->nri", coef, d), torch.einsum("nk,kor->nor", coef, u))
    return torch.stack([flatten(spec, canonicalize_layers(spec, {name: (dn[i], up[i]) for name, (dn, up) in layers.items()}))
                        for i in range(n)])


def errors(x_hat: torch.Tensor, x: torch.Tensor, spec: LoraSpec) -> dict:
    w = ((x_hat - x).pow(2).sum(-1) / x.pow(2).sum(-1)).mean().item()
    return {"weight_rel_err": w, "dw_rel_err": dw_relative_error(x_hat, x, spec).mean().item()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps (CPU: ~20 s each at batch 2)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lam", type=float, default=1.0, help="weight-preserved loss lambda (0: plain MSE)")
    ap.add_argument("--train", type=int, default=24, help="synthetic training LoRAs")
    ap.add_argument("--held-out", type=int, default=8, help="synthetic held-out LoRAs")
    ap.add_argument("--k", type=int, default=4, help="dimension of the synthetic identity family")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/lae.json)")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    spec = LoraSpec.sdxl(4)
    cfg = LAE_CONFIGS["sdxl-r4"](spec.num_params)
    info = {**device_info(a.device), **{k: v for k, v in vars(a).items() if k != "out"}}
    print(f"device: {describe(info)}", flush=True)
    t0 = time.perf_counter()
    train, held = synthetic_loras(spec, a.train, a.k, seed=1), synthetic_loras(spec, a.held_out, a.k, seed=2)
    print(f"  {a.train} + {a.held_out} synthetic LoRAs in {time.perf_counter() - t0:.1f} s", flush=True)
    normalizer = WeightNormalizer.fit(train, per="layer", spec=spec)
    lae = LoraAutoencoder(cfg).to(a.device)
    xs, hs = normalizer.normalize(train).to(a.device), normalizer.normalize(held).to(a.device)
    before = held_out_errors(lae, hs, normalizer, held, spec)
    losses, train_s, mem = train_lae(lae, xs, train, a)
    after = held_out_errors(lae, hs, normalizer, held, spec)
    mean_lora = train.mean(0, keepdim=True).expand_as(held)
    baselines = {"zero": errors(torch.zeros_like(held), held, spec), "train_mean": errors(mean_lora, held, spec)}
    result = {
        "compression": {"lora_params": spec.num_params, "layers": spec.num_layers, "latent_shape": list(cfg.latent_shape),
                        "latent_size": cfg.tokens * cfg.latent_channels, "ratio": cfg.compression_ratio,
                        "lae_params": sum(p.numel() for p in lae.parameters()), "lae_config": cfg.to_dict()},
        "data": "synthetic rank-4 LoRAs from a k-dimensional family (no real identity LoRAs here)",
        "held_out": {"untrained": before, "trained": after, **{f"baseline_{k}": v for k, v in baselines.items()}},
        "training": {"steps": a.steps, "seconds": train_s, "s_per_step": train_s / max(1, a.steps),
                     "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                     **mem.result()},
    }
    print_summary(result, before, after, baselines, train_s, mem, a)
    write_json({"benchmark": "lae", "info": info, **result}, a.out, "lae")


def held_out_errors(lae, hs: torch.Tensor, normalizer, held: torch.Tensor, spec: LoraSpec) -> dict:
    """errors() of the LAE's reconstruction of the held-out LoRAs (normalized `hs`, raw `held`)."""
    lae.eval()
    with torch.no_grad():
        rec = torch.cat([lae(hs[i:i + 2])[0] for i in range(0, len(hs), 2)])
    lae.train()
    return errors(normalizer.denormalize(rec.float().cpu()), held, spec)


def train_lae(lae, xs: torch.Tensor, train: torch.Tensor, a) -> tuple[list[float], float, PeakMemory]:
    """a.steps AdamW steps of the weight-preserved loss on random batches: (losses, seconds, peak memory)."""
    opt = torch.optim.AdamW(lae.parameters(), lr=a.lr)
    gen, losses = torch.Generator().manual_seed(0), []
    t1 = time.perf_counter()
    with PeakMemory(a.device) as mem:
        for step in range(a.steps):
            idx = torch.randint(0, len(xs), (a.batch,), generator=gen)
            x_hat, _ = lae(xs[idx])
            loss = weight_preserved_loss(x_hat, xs[idx], lam=a.lam, x_raw=train[idx].to(a.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            print(f"  step {step + 1}/{a.steps}: loss {loss.item():.4f}", flush=True)
    return losses, time.perf_counter() - t1, mem


def print_summary(result: dict, before: dict, after: dict, baselines: dict, train_s: float, mem, a) -> None:
    c = result["compression"]
    print(f"\nLoRA {c['lora_params']:,} params ({c['layers']} layers) -> latent {c['latent_shape'][0]} x "
          f"{c['latent_shape'][1]} = {c['latent_size']:,}: {c['ratio']:.1f}x; LAE {c['lae_params'] / 1e6:.1f}M params")
    rows = [[name, f"{e['weight_rel_err']:.4f}", f"{e['dw_rel_err']:.4f}"] for name, e in
            (("LAE untrained", before), (f"LAE after {a.steps} steps", after), ("baseline: zero", baselines["zero"]),
             ("baseline: mean training LoRA", baselines["train_mean"]))]
    print_table(rows, ["held-out (synthetic)", "weight rel. err", "dW rel. err"])
    print(f"training: {train_s:.1f} s ({train_s / max(1, a.steps):.2f} s/step, batch {a.batch}); "
          f"peak RSS {mem.result()['peak_rss_gb']:.2f} GB")


if __name__ == "__main__":
    main()
