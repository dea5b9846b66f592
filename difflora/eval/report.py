"""Write an evaluation result as JSON, a markdown table laid out like the paper's, and a PNG plot.

The PNG is drawn with Pillow (no plotting library is a dependency): one panel per metric, one
bar per method, the value over each bar and the whiskers at +- one standard deviation over
identities.
"""

from __future__ import annotations

import json
from pathlib import Path

from .protocol import METRICS

# Seconds per identity, PhotoMaker Table 1 (V100) and HyperDreamBooth (docs/METHOD.md section 6).
PUBLISHED_TIME_S = {"DreamBooth-LoRA": 1284, "Textual Inversion": 2400, "IP-Adapter": 12, "PhotoMaker": 10,
                    "HyperDreamBooth": 20}


def metric_value(entry: dict | None) -> tuple[float | None, float | None]:
    """(mean, std) of a metric entry: summaries have mean/std, FID has value."""
    if not entry:
        return None, None
    if "value" in entry:
        return entry["value"], None
    return entry.get("mean"), entry.get("std")


def _cell(entry: dict | None, scale: float, skipped: bool) -> str:
    if skipped:
        return "skipped"
    mean, std = metric_value(entry)
    if mean is None:
        return "n/a"
    digits = 1 if scale != 1.0 or abs(mean) >= 10 else 3
    text = f"{mean * scale:.{digits}f}"
    # A spread that rounds to zero at the printed precision is float noise (a perfect method's
    # std is ~1e-7, not 0, depending on the machine): print ± only when it shows a difference.
    spread = f"{(std or 0.0) * scale:.{digits}f}"
    return text + (f" ± {spread}" if float(spread) else "")


def markdown_table(result: dict) -> str:
    skipped = result.get("skipped", {})
    head = ["Method"] + [f"{name} {'↑' if up else '↓'}" for _, name, up, _ in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, data in result["methods"].items():
        m = data["metrics"]
        cells = [_cell(m.get(k), scale, k in skipped) for k, _, _, scale in METRICS]
        lines.append("| " + " | ".join([method] + cells) + " |")
    notes = ["", "CLIP-T, CLIP-I, DINO and Face Sim are cosine similarities x 100, mean ± std over identities."]
    for method, data in result["methods"].items():
        c, m = data["counts"], data["metrics"]
        note = (f"{method}: {c['identities']} identities x {c['prompts']} prompts x {c['images_per_prompt']} "
                f"image(s) = {c['images']} images ({c['images_expected']} expected"
                f"{', the paper protocol' if c['paper_protocol'] else ''})")
        if "face_detected" in m and m["face_detected"]["mean"] is not None:
            note += f"; a face was found in {100 * m['face_detected']['mean']:.0f}% of them"
        if "fid" in m:
            note += (f"; FID of {m['fid']['n_generated']} images against {m['fid']['n_reference']} "
                     f"from {m['fid']['reference_set']}/ ({m['fid']['weights']})")
        notes.append(f"- {note}.")
    for key, needs in skipped.items():
        notes.append(f"- {key} skipped: {needs}.")
    if result.get("models"):
        notes.append("- models: " + ", ".join(f"{k} = {v}" for k, v in result["models"].items()) + ".")
    notes.append("- published personalization times (s per identity, V100): "
                 + ", ".join(f"{k} {v}" for k, v in PUBLISHED_TIME_S.items()) + ".")
    return "\n".join(lines + notes) + "\n"


def plot(result: dict, path: str | Path) -> Path:
    from PIL import Image, ImageDraw, ImageFont

    methods = list(result["methods"])
    panels = [(k, name, up, scale) for k, name, up, scale in METRICS
              if any(metric_value(result["methods"][m]["metrics"].get(k))[0] is not None for m in methods)]
    cols = max(1, min(4, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    pw, ph, pad = 300, 240, 40
    img = Image.new("RGB", (cols * pw, rows * ph + 30), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    for i, (m, c) in enumerate(zip(methods, palette * 10)):  # legend
        draw.rectangle([10 + 150 * i, 8, 22 + 150 * i, 20], fill=c)
        draw.text((28 + 150 * i, 6), m[:18], fill="black", font=font)
    if not panels:
        draw.text((10, 40), "no metric computed (see the markdown report for what was skipped)", fill="black", font=font)
    for p, (key, name, up, scale) in enumerate(panels):
        x0, y0 = (p % cols) * pw, 30 + (p // cols) * ph
        draw.text((x0 + pad, y0 + 4), f"{name} ({'higher' if up else 'lower'} is better)", fill="black", font=font)
        vals = [metric_value(result["methods"][m]["metrics"].get(key)) for m in methods]
        hi = max([(v or 0) * scale + (s or 0) * scale for v, s in vals] + [1e-9])
        lo = min([0.0] + [(v or 0) * scale - (s or 0) * scale for v, s in vals])
        base, top = y0 + ph - pad, y0 + 40
        span = (hi - lo) or 1.0

        def ypos(v: float) -> float:
            return base - (v - lo) / span * (base - top)
        draw.line([x0 + pad, ypos(0), x0 + pw - 10, ypos(0)], fill="gray")
        bw = (pw - pad - 20) / max(1, len(methods))
        for j, ((v, s), c) in enumerate(zip(vals, palette * 10)):
            if v is None:
                continue
            bx = x0 + pad + j * bw + bw * 0.15
            draw.rectangle([bx, min(ypos(v * scale), ypos(0)), bx + bw * 0.7, max(ypos(v * scale), ypos(0))], fill=c)
            if s:
                cx = bx + bw * 0.35
                draw.line([cx, ypos((v - s) * scale), cx, ypos((v + s) * scale)], fill="black", width=2)
            draw.text((bx, ypos(max(v, 0) * scale) - 16), f"{v * scale:.4g}", fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def write_report(result: dict, out: str | Path, stem: str = "eval") -> dict[str, Path]:
    """out/<stem>.json, out/<stem>.md, out/<stem>.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(result, indent=1), encoding="utf-8")
    paths["markdown"].write_text(markdown_table(result), encoding="utf-8")
    plot(result, paths["png"])
    return paths
