"""Command line: `python -m difflora spec sdxl --rank 4`, `python -m difflora inspect FILE`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import DiffLoRAError


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def cmd_spec(args: argparse.Namespace) -> int:
    from .lora_spec import LoraSpec

    if args.base == "sdxl":
        spec = LoraSpec.sdxl(rank=args.rank, alpha=args.alpha)
    else:
        from safetensors import safe_open

        path = Path(args.base)
        if path.suffix.lower() != ".safetensors":
            raise DiffLoRAError(f"{path.name}: give 'sdxl' or a .safetensors UNet/checkpoint file.")
        try:
            with safe_open(str(path), framework="pt") as f:  # shapes only: no tensor data read
                shapes = {k: _ShapeOnly(tuple(f.get_slice(k).get_shape())) for k in f.keys()}
        except Exception as e:
            raise DiffLoRAError(f"{path.name}: not a readable .safetensors file ({e}).") from e
        spec = LoraSpec.from_state_dict(shapes, rank=args.rank, alpha=args.alpha)
    print(f"base:       {spec.base}")
    print(f"rank/alpha: {spec.rank} / {spec.alpha:g}")
    print(f"layers:     {spec.num_layers}")
    print(f"parameters: {spec.num_params:,} ({_human_bytes(spec.num_params * 2)} in fp16)")
    print(f"hash:       {spec.hash}")
    return 0


class _ShapeOnly:
    """Stands in for a tensor where only `.shape` is read (spec derivation needs no data)."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape


def cmd_inspect(args: argparse.Namespace) -> int:
    from .hypernet_file import CARRIED_KEY, CARRIED_PREFIX, carried_summary, check_hypernet

    path = Path(args.file)
    try:  # the loader's own checks, short of reading the weights
        meta, shapes = check_hypernet(path)
    except DiffLoRAError as e:
        print(f"not a valid DiffLoRA hypernet: {e}")
        return _inspect_lora(path)
    spec = meta["lora_spec"]
    total = sum(_numel(s) for s in shapes.values())
    print(f"DiffLoRA hypernet {path.name} (format {meta['difflora_format']})")
    print(f"  LoRA spec: base {spec['base']}, rank {spec['rank']}, {len(spec['layers'])} layers")
    for part in ("lae", "dit", "mif", "norm"):
        n = sum(_numel(s) for k, s in shapes.items() if k.startswith(part + "."))
        print(f"  {part}: {n:,} values")
    print(f"  total: {total:,} values in {len(shapes)} tensors")
    print("  encoders: " + json.dumps(meta["encoders"]))
    carried = carried_summary(meta, shapes)
    print("  carried encoders: " + (", ".join(
        f"{role} {c['kind']} ({c['dim']}-d, {c['values']:,} values under {CARRIED_PREFIX}{role}.)"
        for role, c in carried.items()) or "none (connect the encoders in the graph)"))
    for key in ("lae_config", "dit_config", "mif_config"):
        print(f"  {key}: {json.dumps(meta[key])}")
    for key, value in meta.items():
        if key not in ("lae_config", "dit_config", "mif_config", "lora_spec", "encoders", CARRIED_KEY):
            print(f"  {key}: {value}")
    return 0


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _inspect_lora(path: Path) -> int:
    """Second chance: is it a LoRA file? Print what it holds, or why it is unreadable."""
    from safetensors import safe_open

    from .pipeline import LORA_META_KEYS

    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return 1
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            meta = f.metadata() or {}
            ranks = {tuple(f.get_slice(k).get_shape())[0] for k in keys if k.endswith("lora_down.weight")
                     or k.endswith("lora_A.weight")}
    except Exception as e:
        print(f"not a readable .safetensors file: {e}")
        return 1
    downs = [k for k in keys if k.endswith(("lora_down.weight", "lora_A.weight"))]
    if not downs:
        return 1
    style = "kohya" if any(k.endswith("lora_down.weight") for k in downs) else "peft/diffusers"
    print(f"LoRA file {path.name}: {len(downs)} layers ({style} keys), rank {sorted(ranks)}")
    for k in LORA_META_KEYS:
        if k in meta:
            print(f"  {k}: {meta[k]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m difflora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("spec", help="print the LoRA spec (layers, parameters, hash) of a base model")
    p.add_argument("base", help="'sdxl' (built from its config, no weights) or a .safetensors UNet/checkpoint")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4, as the method spec)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: equal to rank)")
    p.set_defaults(func=cmd_spec)
    p = sub.add_parser("inspect", help="print what a hypernet or LoRA file holds, or why it is not valid")
    p.add_argument("file")
    p.set_defaults(func=cmd_inspect)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DiffLoRAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
