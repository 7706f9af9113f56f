"""Heatmap PNGs of the allocator's scores with the kept tokens outlined.

Each stage exports them for the same fixed validation images (the first samples of the
validation shards, in shard order), so heatmaps of successive stages compare directly.
Drawn with PIL only: the score grid is upsampled to the image with nearest-neighbour
cells, blended over the image in a red-yellow ramp, and every kept cell is outlined.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

HEATMAP_DIR = "heatmaps"
OVERLAY_ALPHA = 0.55


def score_colours(scores: np.ndarray) -> np.ndarray:
    """Min-max normalised scores → RGB ramp dark-red (low) .. yellow (high), uint8 ``[..., 3]``."""
    low, high = float(scores.min()), float(scores.max())
    unit = (scores - low) / (high - low) if high > low else np.zeros_like(scores)
    red = 80 + 175 * np.clip(unit * 2, 0, 1)
    green = 255 * np.clip(unit * 2 - 1, 0, 1)
    return np.stack([red, green, np.zeros_like(unit)], axis=-1).astype(np.uint8)


def render(
    image: torch.Tensor, scores: torch.Tensor, kept: torch.Tensor, grid_hw: tuple[int, int]
) -> Image.Image:
    """``image`` float [3, H, W] in [0, 1]; ``scores`` [N]; ``kept`` indices into the N cells."""
    gh, gw = grid_hw
    base = Image.fromarray(
        (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
    )
    width, height = base.size
    colours = Image.fromarray(score_colours(scores.detach().float().cpu().numpy().reshape(gh, gw)))
    overlay = Image.blend(base, colours.resize((width, height), Image.NEAREST), OVERLAY_ALPHA)
    draw = ImageDraw.Draw(overlay)
    cell_w, cell_h = width / gw, height / gh
    for index in kept.tolist():
        row, col = divmod(int(index), gw)
        box = (col * cell_w, row * cell_h, (col + 1) * cell_w - 1, (row + 1) * cell_h - 1)
        draw.rectangle(box, outline=(0, 255, 255), width=2)
    return overlay


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "query"


def write_heatmaps(
    out_dir: Path,
    names: Sequence[str],
    images: Sequence[torch.Tensor],
    allocations: Sequence,
    grids: Sequence[tuple[int, int]],
) -> list[Path]:
    """One PNG per sample (``NN-<name>.png``) into ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, (name, image, allocation, grid) in enumerate(zip(names, images, allocations, grids)):
        path = out_dir / f"{number:02d}-{slug(name)}.png"
        render(image, allocation.scores, allocation.indices, grid).save(path)
        paths.append(path)
    return paths
