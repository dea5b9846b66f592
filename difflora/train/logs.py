"""Run logs: metrics.csv (train rows), eval.csv (validation rows) and loss_curve.png.

CSV because it needs nothing installed and every tool reads it; floats are written with
repr() so a resumed run's rows can be compared exactly with an uninterrupted run's. The plot
is drawn with Pillow (matplotlib is not a dependency): log-scale loss over steps, validation
points on top.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path


class CsvLog:
    """Append-only CSV with a fixed header; `truncate_after(step)` drops rows a resume will redo."""

    def __init__(self, path: str | Path, columns: list[str]):
        self.path, self.columns = Path(path), list(columns)

    def truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        with open(self.path, newline="", encoding="utf-8") as f:
            self.columns = next(csv.reader(f), self.columns)  # keep the file's own header
        self._write([r for r in self.rows() if int(r["step"]) <= step], "w")

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    def append(self, row: dict) -> None:
        self._write([row], "a")

    def _write(self, rows: list[dict], mode: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = mode == "w" or not self.path.is_file() or self.path.stat().st_size == 0
        columns = self.columns
        if not new:  # keep the file's own header (eval columns are known only at the first eval)
            with open(self.path, newline="", encoding="utf-8") as f:
                columns = next(csv.reader(f), columns)
        with open(self.path, mode, newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            if new:
                w.writeheader()
            for r in rows:
                w.writerow({k: _fmt(v) for k, v in r.items()})


def _fmt(v):
    return repr(float(v)) if isinstance(v, float) else v


def plot_loss_curve(metrics_csv: str | Path, eval_csv: str | Path, png: str | Path, title: str = "") -> Path:
    """Train loss (line) and the first validation metric (dots), log10 y axis, 800x480 PNG."""
    from PIL import Image, ImageDraw

    train = [(int(r["step"]), float(r["loss"])) for r in CsvLog(metrics_csv, []).rows()]
    evals = CsvLog(eval_csv, []).rows()
    key = next((k for k in (evals[0] if evals else {}) if k != "step"), None)
    val = [(int(r["step"]), float(r[key])) for r in evals if key and r.get(key) not in ("", None)]
    W, H, L, R, T, B = 800, 480, 70, 20, 40, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    pts = [(s, v) for s, v in train + val if v > 0 and math.isfinite(v)]
    if pts:
        s0, s1 = min(p[0] for p in pts), max(p[0] for p in pts)
        y0, y1 = math.log10(min(p[1] for p in pts)), math.log10(max(p[1] for p in pts))
        s1, y1 = (s1 if s1 > s0 else s0 + 1), (y1 if y1 > y0 else y0 + 1)

        def xy(s, v):
            return (L + (s - s0) / (s1 - s0) * (W - L - R), T + (y1 - math.log10(v)) / (y1 - y0) * (H - T - B))

        d.rectangle([L, T, W - R, H - B], outline="black")
        for frac in (0, 0.5, 1):  # three y ticks and two x ticks are enough to read a curve
            y = y0 + frac * (y1 - y0)
            d.text((4, xy(s0, 10 ** y)[1] - 6), f"{10 ** y:.3g}", fill="black")
        d.text((L, H - B + 8), str(s0), fill="black")
        d.text((W - R - 40, H - B + 8), str(s1), fill="black")
        good = [(s, v) for s, v in train if v > 0 and math.isfinite(v)]
        if len(good) > 1:
            d.line([xy(s, v) for s, v in good], fill=(31, 119, 180), width=2)
        for s, v in val:
            if v > 0 and math.isfinite(v):
                x, y = xy(s, v)
                d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(214, 39, 40))
    d.text((L, 12), f"{title}  train loss (blue, log scale)" + (f", {key} (red)" if key else ""), fill="black")
    d.text((W // 2 - 20, H - 22), "step", fill="black")
    png = Path(png)
    img.save(png)
    return png
