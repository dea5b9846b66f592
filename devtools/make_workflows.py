"""Writes the shipped example workflows (workflows/*.json, UI format) and their previews.

    python -m devtools.make_workflows        # needs the harness ComfyUI; rewrites workflows/

Each graph is declared once below; socket and widget lists come from a live server's
/object_info, so the files match what ComfyUI's frontend itself would save. Node ids are
part of the contract (users' edits and our tests refer to them): never renumber a node.
The preview PNG is a drawing of the graph that also embeds it, so dragging the picture
onto ComfyUI opens the workflow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from difflora.diffusion import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"

# Real-use model names; the harness links its tiny models under these names.
CKPT = "sd_xl_base_1.0.safetensors"
CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
HYPERNET = "difflora_sdxl.safetensors"
# The toy world's files ship inside the pack (assets/toyworld), registered as model folders.
TOY_BASE = "toy_sdxl.safetensors"
TOY_HYPERNET = "difflora_toy.safetensors"
TOY_PHOTO = "heldout_00.png"
TOY_POSITIVE = "a photo of a sks person, blue background, smiling"
POSITIVE = "a photo of a person, portrait, natural light, detailed face"
NEGATIVE = "blurry, deformed, low quality"
# Sample Identity LoRA Latent at the pack's defaults, written out so a saved graph keeps them.
LORA_SAMPLING = {"seed": 0, "steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE, "eta": 0.0, "sampler": DEFAULT_SAMPLER}


@dataclass
class N:
    """A node: id (fixed forever), class, position, widget values by name."""

    id: int
    type: str
    pos: tuple[int, int]
    widgets: dict = field(default_factory=dict)
    title: str | None = None
    size: tuple[int, int] | None = None  # at least this big (an image preview drawn large); None: fit the widgets


FRONTEND_ONLY = {"Note"}


def note(node_id: int, pos: tuple[int, int], text: str, size: tuple[int, int] = (340, 220)) -> N:
    """A Note node: what to connect and what to expect, on the canvas beside the graph."""
    return N(node_id, "Note", pos, {"text": text, "size": size})


# (src id, src output slot) -> (dst id, input name)
Link = tuple[int, int, int, str]


def _common_front(ref_nodes: list[N]) -> tuple[list[N], list[Link]]:
    nodes = [
        N(1, "CheckpointLoaderSimple", (0, 0), {"ckpt_name": CKPT}),
        N(3, "CLIPVisionLoader", (0, 400), {"clip_name": CLIP_VISION}),
        N(4, "DiffLoRAFaceAnalysisLoader", (0, 520), {"model": "auto", "provider": "CPU"}),
        N(5, "DiffLoRAHypernetLoader", (0, 680), {"hypernet_name": HYPERNET, "device": "auto", "dtype": "auto"}),
        N(6, "DiffLoRAEncodeMixedFeatures", (340, 420),
          {"face_choice": "largest", "face_index": 0, "on_no_face": "error"}),
        N(7, "DiffLoRASampleLoraLatent", (680, 420), LORA_SAMPLING),
        N(8, "DiffLoRADecodeLora", (1020, 420)),
        *ref_nodes,
    ]
    links = [(5, 0, 6, "hypernet"), (3, 0, 6, "clip_vision"), (4, 0, 6, "face_analysis"),
             (5, 0, 7, "hypernet"), (6, 0, 7, "features"), (5, 0, 8, "hypernet"), (7, 0, 8, "lora_latent")]
    return nodes, links


# The toy world's 64 px images, enlarged (nearest: every pixel a sharp square) and shown large, so a
# newcomer sees the person's hair, eyes and glasses instead of a thumbnail.
TOY_ENLARGE, TOY_PREVIEW = 4, (400, 500)


def _sampling(apply_id: int, strength: float, ksampler_id: int, decode_id: int, save_id: int, x: int, y: int,
              prefix: str, save_title: str | None = None, enlarge: int = 1) -> tuple[list[N], list[Link]]:
    nodes = [
        N(apply_id, "DiffLoRAApplyLora", (x, y), {"strength": strength}),
        N(ksampler_id, "KSampler", (x + 340, y), {"seed": 42, "steps": 30, "cfg": 5.0, "sampler_name": "dpmpp_2m",
                                                  "scheduler": "karras", "denoise": 1.0}),
        N(decode_id, "VAEDecode", (x + 680, y)),
        N(save_id, "SaveImage", (x + 1020, y), {"filename_prefix": prefix}, save_title,
          TOY_PREVIEW if enlarge > 1 else None),
    ]
    links = [(1, 0, apply_id, "model"), (8, 0, apply_id, "lora"), (apply_id, 0, ksampler_id, "model"),
             (10, 0, ksampler_id, "positive"), (11, 0, ksampler_id, "negative"), (12, 0, ksampler_id, "latent_image"),
             (ksampler_id, 0, decode_id, "samples"), (1, 2, decode_id, "vae")]
    if enlarge > 1:  # VAE Decode -> Upscale Image By (below it) -> Save Image
        scale_id = save_id + 2
        nodes.append(N(scale_id, "ImageScaleBy", (x + 680, y + 120),
                       {"upscale_method": "nearest-exact", "scale_by": float(enlarge)}, f"Enlarge {enlarge}x"))
        links += [(decode_id, 0, scale_id, "image"), (scale_id, 0, save_id, "images")]
    else:
        links.append((decode_id, 0, save_id, "images"))
    return nodes, links


def _prompts() -> tuple[list[N], list[Link]]:
    nodes = [N(10, "CLIPTextEncode", (340, 0), {"text": POSITIVE}, "Positive prompt"),
             N(11, "CLIPTextEncode", (340, 200), {"text": NEGATIVE}, "Negative prompt"),
             N(12, "EmptyLatentImage", (680, 0), {"width": 1024, "height": 1024, "batch_size": 1})]
    return nodes, [(1, 1, 10, "clip"), (1, 1, 11, "clip")]


def _toy_world() -> tuple[list[N], list[Link]]:
    """Everything from the pack: the toy base, a held-out person's photo, the toy hypernet (which
    carries its face and image encoders, so no CLIP vision or face analysis is connected)."""
    nodes = [
        N(1, "DiffLoRAToyWorldBaseLoader", (0, 0), {"ckpt_name": TOY_BASE}),
        N(2, "DiffLoRAToyWorldPhoto", (0, 180), {"photo": TOY_PHOTO}, "Reference photo"),
        N(5, "DiffLoRAHypernetLoader", (0, 680), {"hypernet_name": TOY_HYPERNET, "device": "auto", "dtype": "auto"}),
        N(6, "DiffLoRAEncodeMixedFeatures", (340, 420),
          {"face_choice": "largest", "face_index": 0, "on_no_face": "error"}),
        N(7, "DiffLoRASampleLoraLatent", (680, 420), LORA_SAMPLING),
        N(8, "DiffLoRADecodeLora", (1020, 420)),
        N(10, "CLIPTextEncode", (340, 0), {"text": TOY_POSITIVE}, "Positive prompt"),
        N(11, "CLIPTextEncode", (340, 200), {"text": ""}, "Negative prompt"),
        N(12, "EmptyLatentImage", (680, 0), {"width": 64, "height": 64, "batch_size": 4}),
        N(17, "DiffLoRASaveLora", (1360, 420), {"filename_prefix": "difflora/toy_identity"}),
    ]
    links = [(5, 0, 6, "hypernet"), (2, 0, 6, "images"), (5, 0, 7, "hypernet"), (6, 0, 7, "features"),
             (5, 0, 8, "hypernet"), (7, 0, 8, "lora_latent"), (1, 1, 10, "clip"), (1, 1, 11, "clip"),
             (8, 0, 17, "lora")]
    rows = ((1.0, "difflora/toy_personalized", "Personalized (predicted LoRA)"),
            (0.0, "difflora/toy_base", "Base model (LoRA off, same seed)"))
    for i, (strength, prefix, title) in enumerate(rows):
        base = 13 if i == 0 else 30
        s, sl = _sampling(base, strength, base + 1, base + 2, base + 3, 1020, 0 if i == 0 else 700, prefix, title,
                          enlarge=TOY_ENLARGE)
        for n in s:
            if n.type == "KSampler":
                n.widgets.update(steps=20, cfg=4.0)
        nodes, links = nodes + s, links + sl
    return nodes, links


# Refine Identity LoRA: photo -> predicted LoRA -> refined LoRA; rows: predicted only, refined.
REFINE_ID = 40
TOY_REFINE = {"steps": 20, "learning_rate": 2e-3, "seed": 0, "prompt": "a photo of {trigger}", "trigger": "a sks person"}
# On SDXL: HyperDreamBooth's 40 steps at DreamBooth-LoRA's SDXL rate (not measured here: no SDXL on this machine).
SDXL_REFINE = {"steps": 40, "learning_rate": 1e-4, "seed": 0, "prompt": "a photo of {trigger}", "trigger": "sks person"}


def _refine_rows(nodes: list[N], links: list[Link], settings: dict, prefix: str, extra_links: list[Link],
                 ksampler: dict | None = None, enlarge: int = 1) -> tuple[list[N], list[Link]]:
    """The predicted-only row (13-16) and the refined row (30-33) beside it, and the Refine node."""
    nodes = nodes + [N(REFINE_ID, "DiffLoRARefineLora", (680, 900), settings, "Refine Identity LoRA")]
    links = links + [(1, 0, REFINE_ID, "model"), (1, 1, REFINE_ID, "clip"), (1, 2, REFINE_ID, "vae"),
                     (2, 0, REFINE_ID, "images"), (8, 0, REFINE_ID, "lora"), *extra_links]
    for base, y, name in ((13, 0, "predicted"), (30, 900, "refined")):
        title = "Predicted LoRA only" if name == "predicted" else "Refined LoRA"
        s, sl = _sampling(base, 1.0, base + 1, base + 2, base + 3, 1020, y, f"{prefix}_{name}", title, enlarge)
        if base == 30:  # the refined LoRA instead of the predicted one
            sl = [(REFINE_ID, 0, base, "lora") if (d, n) == (base, "lora") else (a, b, d, n) for a, b, d, n in sl]
        for n in s:
            if n.type == "KSampler" and ksampler:
                n.widgets.update(ksampler)
        nodes, links = nodes + s, links + sl
    save = N(17, "DiffLoRASaveLora", (1360, 1300), {"filename_prefix": f"{prefix}_refined"}, "Save refined LoRA")
    return nodes + [save], links + [(REFINE_ID, 0, 17, "lora")]


def _toy_refine() -> tuple[list[N], list[Link]]:
    nodes, links = _toy_world()
    keep = {1, 2, 5, 6, 7, 8, 10, 11, 12}
    nodes = [n for n in nodes if n.id in keep]
    links = [x for x in links if x[0] in keep and x[2] in keep]
    return _refine_rows(nodes, links, TOY_REFINE, "difflora/toy", [(5, 0, REFINE_ID, "hypernet")],
                        {"steps": 20, "cfg": 4.0}, enlarge=TOY_ENLARGE)


def _sdxl_refine() -> tuple[list[N], list[Link]]:
    front, links = _common_front([N(2, "LoadImage", (0, 180), {"image": "reference.png"}, "Reference photo")])
    p, pl = _prompts()
    return _refine_rows(front + p, links + [(2, 0, 6, "images")] + pl, SDXL_REFINE, "difflora/refine",
                        [(4, 0, REFINE_ID, "face_analysis")])


NOTES = {
    "difflora_refine": "Predict, then refine, with nothing to download (the toy world). The top row draws the person "
                       "with the LoRA predicted from 'Reference photo'; the bottom row with that LoRA after 20 steps "
                       "of Refine Identity LoRA on the same photo (about a second on a CPU). In the toy world the "
                       "prediction is worth about 60 steps of training from zero, and refined 80 steps it beats a "
                       "LoRA trained 80 steps (docs/TOYWORLD.md). The refined LoRA is saved to models/loras/difflora/.",
    "difflora_refine_sdxl": "Predict, then refine on your SDXL: as difflora_basic, then Refine Identity LoRA trains the "
                            "predicted LoRA 40 steps further on the reference photo(s) (only the LoRA trains; a GPU "
                            "takes seconds, a CPU minutes). Bottom row: the refined LoRA; top: the prediction alone. "
                            "Leave 'lora' empty to train from zero. Use the trigger ('sks person') in your prompt.",
    "difflora_toy_world": "Try DiffLoRA with nothing to download: every file here ships with the pack (the toy world, "
                          "64x64 rendered faces). Queue it: in seconds on a CPU, the top row draws the person in "
                          "'Reference photo' with the LoRA predicted from that one photo; the bottom row is the base "
                          "model at LoRA strength 0, same seed. The LoRA is saved to models/loras/difflora/. Pick "
                          "another person in 'Reference photo'.",
    "difflora_basic": "Connect an SDXL checkpoint, the CLIP vision model your hypernet was trained with, a hypernet "
                      "from models/difflora and a photo in ComfyUI/input (face model auto picks the one the hypernet "
                      "needs). Expect: images of that person, and the predicted LoRA saved to models/loras/difflora/.",
    "difflora_multi_reference": "Three photos of one person, batched: their embeddings are averaged into one "
                                "identity. Put them in ComfyUI/input; the rest is as in difflora_basic.",
    "difflora_export_lora": "Only predicts and saves the LoRA (no SDXL model needed): load it later with any SDXL "
                            "tool's LoRA loader (kohya keys, in models/loras/difflora/).",
    "difflora_strength_sweep": "The same seed at LoRA strength 0.0, 0.5 and 1.0: how much of the person the "
                               "predicted LoRA adds. The rest is as in difflora_basic.",
}
NOTE_ID = 90  # never used by a real node

# What each template card says (the stock template browser shows only the file name: web/difflora.js
# puts these in place of it, read from web/templates.json, which write_all writes from here).
DESCRIPTIONS = {
    "difflora_toy_world": "No downloads: every file ships with the pack. The toy world (64x64 faces) runs the "
                          "whole DiffLoRA chain on a CPU in seconds: one photo, a predicted LoRA, images with and "
                          "without it.",
    "difflora_basic": "Needs downloads: an SDXL checkpoint, CLIP vision ViT-H and a DiffLoRA hypernet. One photo of "
                      "a person: a predicted SDXL LoRA, saved, and images of that person.",
    "difflora_multi_reference": "Needs downloads (as difflora_basic). Three photos of one person, averaged into one "
                                "identity.",
    "difflora_export_lora": "Needs downloads: CLIP vision ViT-H and a DiffLoRA hypernet (no SDXL checkpoint). "
                            "Predicts and saves the LoRA only.",
    "difflora_strength_sweep": "Needs downloads (as difflora_basic). The same seed at LoRA strength 0.0, 0.5 and 1.0.",
    "difflora_refine": "No downloads: every file ships with the pack. Predict, then refine, in the toy world: the "
                       "predicted LoRA's image beside the one after 20 steps of Refine Identity LoRA.",
    "difflora_refine_sdxl": "Needs downloads (as difflora_basic). Predict, then refine on your SDXL: the predicted "
                            "LoRA's image beside the refined one (without a LoRA input, Refine starts from zero).",
}
TEMPLATE_INDEX = Path(__file__).resolve().parent.parent / "web" / "templates.json"
# Loaders of files a user downloads (the toy world's files ship with the pack).
DOWNLOADED = {"CheckpointLoaderSimple": "ckpt_name", "CLIPVisionLoader": "clip_name",
              "DiffLoRAHypernetLoader": "hypernet_name"}


def needs_downloads(nodes: list[N]) -> bool:
    """Whether a graph loads a file the pack does not ship (what its template card must say)."""
    return any(n.type in DOWNLOADED and n.widgets.get(DOWNLOADED[n.type]) != TOY_HYPERNET for n in nodes)


def graphs() -> dict[str, tuple[list[N], list[Link]]]:
    out = {name: (nodes + [note(NOTE_ID, (0, 1000) if name in ("difflora_toy_world", "difflora_refine") else (340, 760), NOTES[name])], links)
           for name, (nodes, links) in _graphs().items()}
    return out


def _graphs() -> dict[str, tuple[list[N], list[Link]]]:
    out = {"difflora_toy_world": _toy_world(), "difflora_refine": _toy_refine(), "difflora_refine_sdxl": _sdxl_refine()}
    ref = [N(2, "LoadImage", (0, 180), {"image": "reference.png"}, "Reference photo")]

    front, links = _common_front(ref)
    p, pl = _prompts()
    s, sl = _sampling(13, 1.0, 14, 15, 16, 1020, 0, "difflora/basic")
    save = [N(17, "DiffLoRASaveLora", (1360, 420), {"filename_prefix": "difflora/identity"})]
    out["difflora_basic"] = (front + p + s + save, links + [(2, 0, 6, "images")] + pl + sl + [(8, 0, 17, "lora")])

    refs = [N(2, "LoadImage", (0, 180), {"image": "reference_1.png"}, "Reference photo 1"),
            N(18, "LoadImage", (-340, 180), {"image": "reference_2.png"}, "Reference photo 2"),
            N(19, "LoadImage", (-340, 520), {"image": "reference_3.png"}, "Reference photo 3"),
            N(20, "ImageBatch", (-340, 880)), N(21, "ImageBatch", (0, 880))]
    front, links = _common_front(refs)
    s, sl = _sampling(13, 1.0, 14, 15, 16, 1020, 0, "difflora/multi_reference")
    batch = [(2, 0, 20, "image1"), (18, 0, 20, "image2"), (20, 0, 21, "image1"), (19, 0, 21, "image2"),
             (21, 0, 6, "images")]
    out["difflora_multi_reference"] = (front + p + s, links + batch + pl + sl)

    front, links = _common_front(ref)
    front = [n for n in front if n.id != 1]  # no image model needed to export a LoRA
    save = [N(17, "DiffLoRASaveLora", (1020, 600), {"filename_prefix": "difflora/identity"})]
    out["difflora_export_lora"] = (front + save, links + [(2, 0, 6, "images"), (8, 0, 17, "lora")])

    front, links = _common_front(ref)
    nodes, all_links = front + p, links + [(2, 0, 6, "images")] + pl
    for i, strength in enumerate((0.0, 0.5, 1.0)):
        base = 30 + 4 * i
        s, sl = _sampling(base, strength, base + 1, base + 2, base + 3, 1020, 0 if i == 0 else 300 + 400 * i,
                          f"difflora/strength_{strength:.1f}", f"LoRA strength {strength:.1f}")
        nodes, all_links = nodes + s, all_links + sl
    out["difflora_strength_sweep"] = (nodes, all_links)
    return out


def _is_widget(spec: list) -> bool:
    return isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def to_ui(nodes: list[N], links: list[Link], info: dict) -> dict:
    """The UI-format document ComfyUI's frontend saves (workflow version 0.4)."""
    by_id = {n.id: n for n in nodes}
    ui_links, ui_nodes = [], []
    link_ids: dict[tuple[int, str], int] = {}
    out_links: dict[tuple[int, int], list[int]] = {}
    for i, (src, slot, dst, name) in enumerate(links, start=1):
        kind = info[by_id[src].type]["output"][slot]
        ui_links.append([i, src, slot, dst, None, kind])
        link_ids[(dst, name)] = i
        out_links.setdefault((src, slot), []).append(i)
    for order, n in enumerate(nodes):
        if n.type in FRONTEND_ONLY:  # a Note: the frontend's own node, no /object_info entry, never queued
            ui_nodes.append({"id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.widgets["size"]),
                             "flags": {}, "order": order, "mode": 0, "inputs": [], "outputs": [],
                             "properties": {}, "widgets_values": [n.widgets["text"]],
                             "color": "#432", "bgcolor": "#653"})
            continue
        spec = info[n.type]
        sockets, values = [], []
        for section in ("required", "optional"):
            for name, s in spec["input"].get(section, {}).items():
                if _is_widget(s):
                    if name not in n.widgets and "default" not in (s[1] if len(s) > 1 else {}):
                        raise KeyError(f"node {n.id} ({n.type}) needs a value for widget {name!r}")
                    values.append(n.widgets.get(name, s[1].get("default") if len(s) > 1 else None))
                    if len(s) > 1 and s[1].get("control_after_generate"):
                        values.append("fixed")
                    if n.type == "LoadImage" and name == "image":
                        values.append("image")
                else:
                    sockets.append({"name": name, "type": s[0], "link": link_ids.get((n.id, name))})
        for (dst, name), lid in link_ids.items():
            if dst == n.id and not any(x["name"] == name for x in sockets):
                raise KeyError(f"node {n.id} ({n.type}) has no socket {name!r}")
        for lid_slot, sock in enumerate(sockets):
            if sock["link"] is not None:
                ui_links[sock["link"] - 1][4] = lid_slot
        outputs = [{"name": name, "type": kind, "links": out_links.get((n.id, slot), []), "slot_index": slot}
                   for slot, (kind, name) in enumerate(zip(spec["output"], spec.get("output_name", spec["output"])))]
        node = {"id": n.id, "type": n.type, "pos": list(n.pos), "size": [300, 60 + 26 * (len(values) + len(sockets))],
                "flags": {}, "order": order, "mode": 0, "inputs": sockets, "outputs": outputs,
                "properties": {"Node name for S&R": n.type}, "widgets_values": values}
        if n.size:
            node["size"] = [max(a, b) for a, b in zip(node["size"], n.size)]
        if n.title:
            node["title"] = n.title
        ui_nodes.append(node)
    _stack_columns(ui_nodes)
    return {"last_node_id": max(by_id), "last_link_id": len(ui_links), "nodes": ui_nodes, "links": ui_links,
            "groups": [], "config": {}, "extra": {"ds": fit_view(ui_nodes)}, "version": 0.4}


# The frontend draws a node's title bar above its position, and Load Image's photo preview inside it.
TITLE_H, GAP = 30, 30
# Room for the photo a node previews: the preview never grows the node over the next one.
PREVIEW_H = {"LoadImage": 380, "DiffLoRAToyWorldPhoto": 380}
# Where the graph must fit at the saved view, in a 1920 x 1080 window: right of the side bar, below the
# tab bar and the workflow name, left of the minimap in the bottom-right corner.
WINDOW = (1920, 1080)
VIEW = (80, 140, 1640, 1050)


def _stack_columns(ui_nodes: list[dict]) -> None:
    """Nodes sharing an x form a column: each starts below the one above it (size + title + gap)."""
    columns: dict[int, list[dict]] = {}
    for n in ui_nodes:
        n["size"][1] = max(n["size"][1], PREVIEW_H.get(n["type"], 0))
        columns.setdefault(n["pos"][0], []).append(n)
    for column in columns.values():
        column.sort(key=lambda n: n["pos"][1])
        for above, n in zip(column, column[1:]):
            n["pos"][1] = max(n["pos"][1], above["pos"][1] + above["size"][1] + TITLE_H + GAP)


def fit_view(ui_nodes: list[dict]) -> dict:
    """The saved view (scale, offset) that shows the whole graph inside VIEW."""
    x0 = min(n["pos"][0] for n in ui_nodes)
    y0 = min(n["pos"][1] for n in ui_nodes) - TITLE_H
    x1 = max(n["pos"][0] + n["size"][0] for n in ui_nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in ui_nodes)
    left, top, right, bottom = VIEW
    scale = round(min(1.0, (right - left) / (x1 - x0), (bottom - top) / (y1 - y0)), 3)
    return {"scale": scale, "offset": [round(left / scale - x0), round(top / scale - y0)]}


def render_preview(workflow: dict, path: Path, names: dict[str, str]) -> None:
    """A drawing of the graph (boxes, titles, links) with the workflow embedded as PNG text,
    the way ComfyUI embeds workflows in the images it saves."""
    from PIL import Image, ImageDraw, PngImagePlugin

    nodes = workflow["nodes"]
    x0 = min(n["pos"][0] for n in nodes) - 40
    y0 = min(n["pos"][1] for n in nodes) - 40
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes) + 40
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes) + 40
    scale = 0.5
    img = Image.new("RGB", (int((x1 - x0) * scale), int((y1 - y0) * scale)), (32, 32, 36))
    draw = ImageDraw.Draw(img)
    box = {n["id"]: [(n["pos"][0] - x0) * scale, (n["pos"][1] - y0) * scale,
                     (n["pos"][0] - x0 + n["size"][0]) * scale, (n["pos"][1] - y0 + n["size"][1]) * scale]
           for n in nodes}
    for _, src, _, dst, _, _ in workflow["links"]:
        a, b = box[src], box[dst]
        draw.line([(a[2], (a[1] + a[3]) / 2), (b[0], (b[1] + b[3]) / 2)], fill=(140, 170, 220), width=2)
    for n in nodes:
        ours = n["type"].startswith("DiffLoRA")
        draw.rectangle(box[n["id"]], fill=(70, 50, 110) if ours else (60, 60, 66), outline=(200, 200, 210))
        label = n.get("title") or names.get(n["type"], n["type"])
        draw.text((box[n["id"]][0] + 6, box[n["id"]][1] + 6), label, fill=(240, 240, 240))
    info = PngImagePlugin.PngInfo()
    info.add_text("workflow", json.dumps(workflow))
    img.save(path, pnginfo=info)


def write_all(object_info: dict, folder: Path = WORKFLOWS) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (nodes, links) in graphs().items():
        wf = to_ui(nodes, links, object_info)
        path = folder / f"{name}.json"
        path.write_text(json.dumps(wf, indent=1) + "\n")
        titles = {k: v.get("display_name") or k for k, v in object_info.items()}
        render_preview(wf, folder / f"{name}.png", titles)
        written.append(path)
    return written


def template_index() -> str:
    return json.dumps({"descriptions": DESCRIPTIONS}, indent=1) + "\n"


def main() -> None:
    from .comfy_server import ComfyServer
    from .get_comfyui import get_comfyui

    with ComfyServer(get_comfyui()) as server:
        for path in write_all(server.object_info()):
            print(f"wrote {path} and its preview")
    TEMPLATE_INDEX.write_text(template_index())
    print(f"wrote {TEMPLATE_INDEX}")


if __name__ == "__main__":
    main()
