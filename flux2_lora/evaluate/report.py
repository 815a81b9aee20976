"""Pictures and tables: labelled image grids, a small HTML page, plain-text tables and markdown."""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont


def _font(size: int = 12) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font: Any) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def labelled_grid(
    cells: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], col_labels: Sequence[str], min_cell: int = 128
) -> Image.Image:
    """Rows x columns of images with a label column on the left and a header row on top.

    Small images are scaled up (nearest) to `min_cell` pixels so that tiny test models still give a readable sheet."""
    w, h = cells[0][0].size
    scale = max(1, -(-min_cell // max(w, h)))
    cw, ch = w * scale, h * scale
    font = _font(12)
    label_w, header_h = 140, 34
    grid = Image.new("RGB", (label_w + cw * len(col_labels), header_h + ch * len(row_labels)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate(col_labels):
        lines = text.split("\n")[:2]
        for k, line in enumerate(lines):
            draw.text((label_w + j * cw + 3, 3 + 14 * k), _fit(draw, line, cw - 6, font), fill=(0, 0, 0), font=font)
    for i, text in enumerate(row_labels):
        draw.text((4, header_h + i * ch + 4), _fit(draw, text, label_w - 8, font), fill=(0, 0, 0), font=font)
        for j, im in enumerate(cells[i]):
            tile = im if scale == 1 else im.resize((cw, ch), Image.Resampling.NEAREST)
            grid.paste(tile, (label_w + j * cw, header_h + i * ch))
    return grid


def html_page(
    path: Path, title: str, row_labels: Sequence[str], col_labels: Sequence[str], files: Sequence[Sequence[Path]],
    notes: Sequence[str] = (),
) -> Path:  # fmt: skip
    """A self-contained page (images referenced relative to it): one table row per row label."""
    rel = [[os.path.relpath(f, path.parent) for f in row] for row in files]
    head = "".join(f"<th>{html.escape(c).replace(chr(10), '<br>')}</th>" for c in col_labels)
    body = []
    for label, row in zip(row_labels, rel, strict=True):
        tds = "".join(f'<td><img src="{html.escape(f)}" alt="{html.escape(label)}"></td>' for f in row)
        body.append(f"<tr><th>{html.escape(label)}</th>{tds}</tr>")
    note = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    path.write_text(
        "<!doctype html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif} table{border-collapse:collapse} th,td{border:1px solid #ccc;padding:4px;"
        "vertical-align:top;font-size:12px} img{width:192px;image-rendering:pixelated}"
        f"</style></head><body><h1>{html.escape(title)}</h1>{note}<table><tr><th></th>{head}</tr>"
        + "".join(body)
        + "</table></body></html>\n"
    )
    return path


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table: `columns` are (key, header); floats shown with 4 significant digits."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    data = [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(d[i]) for d in data)) if data else len(h) for i, (_, h) in enumerate(columns)]
    line = "  ".join(h.ljust(w) for (_, h), w in zip(columns, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(d, widths, strict=True)) for d in data]
    return "\n".join(out)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|")

    out = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(out)


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return path
