"""LoRA state dicts out (kohya keys) and in (kohya or peft/diffusers keys), through diffusers'
own converters.

Kohya keys use diffusers module paths (`lora_unet_down_blocks_1_…_attn1_to_q.lora_down.weight`),
which ComfyUI's LoraLoader, diffusers' `load_lora_weights` and A1111/Forge all read. Kohya
files from kohya-ss use SGM block names (`lora_unet_input_blocks_4_1_…`); both are read.
Everything read is rescaled so that dW = `spec.scale * up @ down`, whatever the file's alpha.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Mapping

import torch
from torch import Tensor

from .errors import DiffLoRAError, LoraSpecMismatch
from .lora_spec import LoraSpec
from .lora_weights import Layers, truncate_rank

_KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
_PEFT_MARKERS = (".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", "_lora.down.", "_lora.up.")
_SGM_PATTERNS = ("input_blocks", "middle_block", "output_blocks")
_WHAT_TO_DO = ("DiffLoRA LoRAs target to_q/to_k/to_v/to_out.0 of attn1 and attn2 in every UNet "
               "transformer block; train with exactly those target modules on the spec's base model")


def to_kohya(spec: LoraSpec, layers: Mapping[str, tuple[Tensor, Tensor]],
             dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Kohya-keyed state dict: 3 keys per layer (`.lora_down.weight`, `.lora_up.weight`, `.alpha`)."""
    from diffusers.utils import convert_state_dict_to_kohya

    peft_sd = {}
    for layer in spec.layers:
        if layer.name not in layers:
            raise LoraSpecMismatch(f"Layer {layer.name} is missing from the weights to save: "
                                   "pass one (down, up) pair for every layer of the spec.")
        down, up = layers[layer.name]
        dt = dtype or down.dtype
        peft_sd[f"unet.{layer.name}.lora_A.weight"] = down.detach().to(dt).contiguous()
        peft_sd[f"unet.{layer.name}.lora_B.weight"] = up.detach().to(dt).contiguous()
    kohya = convert_state_dict_to_kohya(peft_sd)
    for layer in spec.layers:
        # diffusers writes alpha = rank (scale 1); our factors mean dW = (alpha / rank) * up @ down.
        kohya[f"{layer.kohya_name}.alpha"] = torch.tensor(spec.alpha, dtype=torch.float32)
    expected = {f"{x.kohya_name}{s}" for x in spec.layers for s in _KOHYA_SUFFIXES}
    if set(kohya) != expected:  # guards against a diffusers change in key spelling
        raise DiffLoRAError(f"diffusers' kohya converter produced unexpected keys (e.g. "
                            f"{sorted(set(kohya) ^ expected)[0]}): pin diffusers to the tested version.")
    return kohya


def from_kohya(spec: LoraSpec, sd: Mapping[str, Tensor], ignore_extra: bool = False,
               reduce_rank: bool = False) -> Layers:
    """Layers from a kohya-keyed LoRA (SGM or diffusers block names), rescaled to `spec.scale`.

    A missing `.alpha` means alpha = rank (kohya's convention). `ignore_extra` drops keys outside
    the spec (text encoder, feed-forward, ...); `reduce_rank` keeps the top `spec.rank` singular
    components of a higher-rank LoRA instead of refusing it.
    """
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
    from diffusers.utils import convert_unet_state_dict_to_peft

    unet_sd, extras = {}, []
    for key, value in sd.items():
        if key.startswith("lora_unet_") and key.endswith(_KOHYA_SUFFIXES):
            unet_sd[key] = value
        else:  # text encoder keys, DoRA scales, LyCORIS variants, ...
            extras.append(key)
    if not unet_sd:
        raise LoraSpecMismatch(f"No kohya UNet LoRA keys (lora_unet_….lora_down.weight) among {len(sd)} keys "
                               f"(e.g. {next(iter(sd), '<empty>')!r}): this is not a kohya SDXL LoRA.")
    if any(p in k for k in unet_sd for p in _SGM_PATTERNS) and any(
            p in k for k in unet_sd for p in ("down_blocks", "mid_block", "up_blocks")):
        # diffusers would silently drop the SGM-named half of such a file.
        raise LoraSpecMismatch("This LoRA mixes SGM (input_blocks) and diffusers (down_blocks) key names: "
                               "re-save it with one naming.")
    config = SimpleNamespace(layers_per_block=_layers_per_block(spec))
    try:
        # The same function as StableDiffusionXLPipeline.lora_state_dict; it pops from its input.
        converted, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(dict(unet_sd), unet_config=config)
    except ValueError as e:
        raise LoraSpecMismatch(f"diffusers could not convert this kohya LoRA ({e}); only plain LoRA "
                               "(lora_down/lora_up) files are supported.") from e
    peft_sd = convert_unet_state_dict_to_peft(converted)
    layer_alphas = {}
    for key, alpha in (alphas or {}).items():
        # diffusers names alphas '<old-style down key>.alpha'; map them like the weights.
        (name,) = convert_unet_state_dict_to_peft({key.removeprefix("unet.").removesuffix(".alpha"): 0})
        layer_alphas[name.removesuffix(".lora_A.weight")] = float(alpha)
    downs, ups = _split_peft(peft_sd, extras)
    return _assemble(spec, downs, ups, layer_alphas, None, extras, ignore_extra, reduce_rank)


def from_peft(spec: LoraSpec, sd: Mapping[str, Tensor], alpha: float | None = None,
              ignore_extra: bool = False, reduce_rank: bool = False) -> Layers:
    """Layers from a peft/diffusers-keyed LoRA (`[unet.]<module>.lora_A.weight` / `lora_B`).

    peft files carry no alpha: pass the adapter's `lora_alpha` (diffusers stores it in the
    file's `lora_adapter_metadata`; `load_lora_file` reads it). None means alpha = rank,
    diffusers' convention for LoRAs without alphas. Per-layer `<module>.alpha` keys win.
    """
    from diffusers.utils import convert_unet_state_dict_to_peft

    body, extras, layer_alphas = {}, [], {}
    for key, value in sd.items():
        if key.startswith(("text_encoder", "lora_te")):
            extras.append(key)
            continue
        bare = key.removeprefix("base_model.model.").removeprefix("unet.")
        if bare.endswith(".alpha"):
            layer_alphas[bare.removesuffix(".alpha")] = float(value)
        else:
            body[bare] = value
    # Maps old diffusers spellings (to_q_lora.down, lora.down) to peft's lora_A / lora_B.
    downs, ups = _split_peft(convert_unet_state_dict_to_peft(body), extras)
    return _assemble(spec, downs, ups, layer_alphas, alpha, extras, ignore_extra, reduce_rank)


def detect_format(sd: Mapping[str, Tensor]) -> str:
    """'kohya' or 'peft'; raises `LoraSpecMismatch` when the dict is neither."""
    keys = list(sd)
    if any(k.startswith(("lora_unet_", "lora_te")) and ".lora_down." in k for k in keys):
        return "kohya"
    if any(m in k for k in keys for m in _PEFT_MARKERS):
        return "peft"
    raise LoraSpecMismatch(f"Not a LoRA state dict: none of its {len(keys)} keys (e.g. "
                           f"{keys[0] if keys else '<empty>'!r}) is a lora_down / lora_A weight.")


def load_lora_state_dict(spec: LoraSpec, sd: Mapping[str, Tensor], alpha: float | None = None,
                         ignore_extra: bool = False, reduce_rank: bool = False) -> Layers:
    """Detect kohya vs peft keys and load with `from_kohya` / `from_peft` (`alpha`: peft only)."""
    if detect_format(sd) == "kohya":
        return from_kohya(spec, sd, ignore_extra=ignore_extra, reduce_rank=reduce_rank)
    return from_peft(spec, sd, alpha=alpha, ignore_extra=ignore_extra, reduce_rank=reduce_rank)


def load_lora_file(spec: LoraSpec, path: str | Path, ignore_extra: bool = False,
                   reduce_rank: bool = False) -> Layers:
    """Read a `.safetensors` LoRA (kohya or diffusers/peft). Pickle formats are refused."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise DiffLoRAError(
            f"Refusing to read {path.name}: only .safetensors LoRA files are read, because "
            f"{path.suffix or 'extension-less'} files are Python pickles that can run code when opened. "
            "Convert it to .safetensors in a trusted environment and load that."
        )
    if not path.is_file():
        raise DiffLoRAError(f"LoRA file {path} does not exist: check the path.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise DiffLoRAError(f"{path.name} is not a readable .safetensors file ({e}): re-download it.") from e
    alpha = None
    if "lora_adapter_metadata" in meta:  # written by diffusers' save_lora_weights
        adapter = json.loads(meta["lora_adapter_metadata"])
        alpha = adapter.get("unet.lora_alpha", adapter.get("lora_alpha"))
    return load_lora_state_dict(spec, sd, alpha=alpha, ignore_extra=ignore_extra, reduce_rank=reduce_rank)


# ---- shared checks ------------------------------------------------------------------------
def _layers_per_block(spec: LoraSpec) -> int:
    # diffusers needs it to map SGM block numbers; a down block has layers_per_block attentions.
    idx = [int(n.split(".")[3]) for n in spec.layer_names if n.startswith("down_blocks.")]
    return max(idx) + 1 if idx else 2


def _split_peft(peft_sd: Mapping[str, Tensor], extras: list[str]) -> tuple[dict, dict]:
    downs, ups = {}, {}
    for key, value in peft_sd.items():
        name = key.removeprefix("unet.")
        if name.endswith(".lora_A.weight"):
            downs[name.removesuffix(".lora_A.weight")] = value
        elif name.endswith(".lora_B.weight"):
            ups[name.removesuffix(".lora_B.weight")] = value
        else:
            extras.append(key)
    return downs, ups


def _assemble(spec: LoraSpec, downs: dict, ups: dict, layer_alphas: dict, default_alpha: float | None,
              extras: list[str], ignore_extra: bool, reduce_rank: bool) -> Layers:
    extras = (extras + [f"{n}.lora_A.weight" for n in downs if n not in spec]
              + [f"{n}.lora_B.weight" for n in ups if n not in spec])
    missing = [n for n in spec.layer_names if n not in downs or n not in ups]
    if missing:
        raise LoraSpecMismatch(
            f"This LoRA lacks {len(missing)} of the spec's {spec.num_layers} layers (e.g. {missing[0]}, "
            f"kohya key {spec.layer(missing[0]).kohya_name}); "
            f"spec: {spec.describe()}. {_WHAT_TO_DO}."
        )
    if extras and not ignore_extra:
        raise LoraSpecMismatch(
            f"This LoRA has {len(extras)} keys outside the spec (e.g. {sorted(extras)[0]}); spec: "
            f"{spec.describe()}. {_WHAT_TO_DO}, or pass ignore_extra=True to drop them "
            "(the LoRA then loses what those layers did)."
        )
    out = {}
    for layer in spec.layers:
        down, up = downs[layer.name].float(), ups[layer.name].float()
        r = down.shape[0]
        if tuple(down.shape) != (r, layer.in_features) or tuple(up.shape) != (layer.out_features, r):
            raise LoraSpecMismatch(
                f"Layer {layer.name} has down {tuple(down.shape)} / up {tuple(up.shape)} but the spec's base "
                f"model has {layer.in_features} -> {layer.out_features}: the LoRA was trained on another "
                "base model."
            )
        if r > spec.rank and not reduce_rank:
            raise LoraSpecMismatch(
                f"This LoRA has rank {r} (at {layer.name}) but the spec has rank {spec.rank}: pass "
                f"reduce_rank=True to keep its top {spec.rank} singular components (an approximation), "
                f"or use a spec of rank {r}."
            )
        alpha = layer_alphas.get(layer.name, default_alpha if default_alpha is not None else r)
        # File meaning: dW = (alpha / r) * up @ down; ours: spec.scale * up' @ down'.
        up = up * ((float(alpha) / r) / spec.scale)
        out[layer.name] = truncate_rank(down, up, spec.rank)
    return out
