"""The per-site update-norm plot (PNG), shallow → deep, drawn with Pillow (a diffusers dependency).

Deterministic: the same numbers give the same bytes, so re-rendering a card does not
change the files of an erasure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def short_site(key: str) -> str:
    """``text_encoder.….layers.3.mlp.fc2`` → ``te L3``; ``unet.down_blocks.0….attn2.to_k`` → ``down0 k``;
    ``transformer.context_embedder`` → ``context embedder``."""
    parts = key.split(".")
    if key.startswith("text_encoder"):
        marker = "layers" if "layers" in parts else "layer"
        layer = parts[parts.index(marker) + 1] if marker in parts else "?"
        return ("te2 L" if key.startswith("text_encoder_2") else "te L") + layer
    if key.startswith("transformer."):  # an MMDiT's text input: context_embedder, the pooled text linear
        return "pooled" if "time_text_embed" in parts else parts[1].replace("_", " ")
    block = parts[1].replace("_blocks", "").replace("_block", "")
    index = parts[2] if parts[1] != "mid_block" else ""
    return f"{block}{index} {parts[-1][-1]}"


def site_norm_plot(series: Mapping[str, Mapping[str, float]], path: str | Path, *, title: str) -> Path:
    """Grouped bars of ``||ΔW||_F / ||W||_F`` per site (sites in the order of the first series)."""
    from PIL import Image, ImageDraw, ImageFont

    sites = list(next(iter(series.values())).keys()) if series else []
    for values in series.values():
        sites += [s for s in values if s not in sites]
    n_series = max(len(series), 1)
    bar = 10 if n_series > 1 else 16
    group = bar * n_series + 8
    left, right, top, bottom = 56, 16, 48 + 14 * n_series, 80
    width = max(420, left + right + 8 + group * len(sites))
    height = 300 + top
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    peak = max((v for values in series.values() for v in values.values()), default=1.0) or 1.0
    plot_h = height - top - bottom
    draw.text((8, 8), title, fill="black", font=font)
    draw.text((8, 22), "relative update norm ||dW||_F / ||W||_F per edited layer, shallow -> deep", fill="black", font=font)
    for j, label in enumerate(series):
        y = 38 + 14 * j
        draw.rectangle((left, y, left + 10, y + 10), fill=COLORS[j % len(COLORS)])
        draw.text((left + 16, y - 1), label, fill="black", font=font)
    draw.line((left, top, left, top + plot_h), fill="black")
    draw.line((left, top + plot_h, width - right, top + plot_h), fill="black")
    for tick in range(5):
        value = peak * tick / 4
        y = top + plot_h - plot_h * tick / 4
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((6, y - 6), f"{value:.2g}", fill="black", font=font)
    for i, site in enumerate(sites):
        x0 = left + 8 + i * group
        for j, values in enumerate(series.values()):
            value = values.get(site)
            if value is None:
                continue
            h = plot_h * value / peak
            draw.rectangle((x0 + j * bar, top + plot_h - h, x0 + (j + 1) * bar - 2, top + plot_h), fill=COLORS[j % len(COLORS)])
        text = short_site(site)
        label = Image.new("RGB", (bottom - 6, 12), "white")
        pen = ImageDraw.Draw(label)
        pen.text((label.width - pen.textlength(text, font=font), 0), text, fill="black", font=font)
        image.paste(label.rotate(90, expand=True), (x0 + (bar * n_series) // 2 - 7, top + plot_h + 4))
    path = Path(path)
    image.save(path, format="PNG", optimize=False)
    return path
