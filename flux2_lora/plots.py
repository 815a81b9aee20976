"""Pictures of a run, drawn with Pillow alone: the loss curve and the sample progress sheet."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

TRAIN_COLOR = (31, 119, 180)
VAL_COLOR = (214, 39, 40)


def _series(metrics_file: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train, val = [], []
    for line in metrics_file.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "loss" in rec and math.isfinite(rec["loss"]):
            train.append((rec["step"], rec["loss"]))
        if "val_loss" in rec and math.isfinite(rec["val_loss"]):
            val.append((rec["step"], rec["val_loss"]))
    return train, val


def loss_plot(metrics_file: Path, out: Path, size: tuple[int, int] = (800, 450)) -> Path | None:
    """Training loss (blue) and fixed-seed validation loss (red) against optimizer steps."""
    train, val = _series(metrics_file)
    points = train + val
    if len(points) < 2:
        return None
    w, h = size
    left, right, top, bottom = 70, 20, 30, 45
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    x0, x1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
    y0, y1 = min(values), max(values)
    pad = (y1 - y0) * 0.05 or 0.01
    y0, y1 = y0 - pad, y1 + pad
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()

    def xy(step: float, value: float) -> tuple[float, float]:
        return (
            left + (step - x0) / (x1 - x0) * (w - left - right),
            top + (y1 - value) / (y1 - y0) * (h - top - bottom),
        )

    d.rectangle((left, top, w - right, h - bottom), outline=(0, 0, 0))
    for k in range(5):
        v = y0 + (y1 - y0) * k / 4
        _, y = xy(x0, v)
        d.line((left - 4, y, left, y), fill=(0, 0, 0))
        d.text((5, y - 6), f"{v:.4g}", fill=(0, 0, 0), font=font)
        s = x0 + (x1 - x0) * k / 4
        x, _ = xy(s, y0)
        d.line((x, h - bottom, x, h - bottom + 4), fill=(0, 0, 0))
        d.text((x - 10, h - bottom + 8), f"{s:.0f}", fill=(0, 0, 0), font=font)
    d.text((w // 2 - 15, h - 18), "step", fill=(0, 0, 0), font=font)
    for series, color, label, dy in ((train, TRAIN_COLOR, "train loss", 0), (val, VAL_COLOR, "validation loss", 14)):
        if len(series) >= 2:
            d.line([xy(s, v) for s, v in series], fill=color, width=2)
        for s, v in series if len(series) < 50 else []:
            x, y = xy(s, v)
            d.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
        if series:
            d.line((w - right - 150, top + 12 + dy, w - right - 130, top + 12 + dy), fill=color, width=3)
            d.text((w - right - 125, top + 6 + dy), label, fill=(0, 0, 0), font=font)
    img.save(out)
    return out


def progress_sheet(samples_dir: Path, out: Path, max_rows: int = 12) -> Path | None:
    """One row per validation step, one column per sample prompt: how the LoRA changed the images."""
    pattern = re.compile(r"step-(\d+)-prompt-(\d+)\.png$")
    found: dict[int, dict[int, Path]] = {}
    for p in samples_dir.glob("step-*-prompt-*.png"):
        m = pattern.search(p.name)
        if m:
            found.setdefault(int(m.group(1)), {})[int(m.group(2))] = p
    if not found:
        return None
    steps = sorted(found)
    if len(steps) > max_rows:  # keep the first, the last, and evenly spaced ones between
        idx = sorted({round(i * (len(steps) - 1) / (max_rows - 1)) for i in range(max_rows)})
        steps = [steps[i] for i in idx]
    cols = max(len(v) for v in found.values())
    first = Image.open(next(iter(found[steps[0]].values())))
    tw, th = first.size
    label_w = 80
    sheet = Image.new("RGB", (label_w + cols * tw, len(steps) * th), "white")
    d = ImageDraw.Draw(sheet)
    for r, step in enumerate(steps):
        d.text((5, r * th + th // 2 - 6), f"step {step}", fill=(0, 0, 0), font=ImageFont.load_default())
        for c, p in sorted(found[step].items()):
            with Image.open(p) as im:
                sheet.paste(im.convert("RGB").resize((tw, th)), (label_w + c * tw, r * th))
    sheet.save(out)
    return out
