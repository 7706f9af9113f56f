"""Stage-1 supervision: token-grid relevance masks from COCO boxes, and the query expansion.

* ``box_mask(objects, category, width, height, grid_hw, resized_hw=None) -> Tensor[gh, gw]``:
  the share of each merged-token cell covered by the union of the category's boxes, in
  [0, 1]. ``objects`` are shard-sample objects (``{"category", "bbox": [x, y, w, h]}`` in
  pixels of the ``width`` x ``height`` stored image). The processor resizes the image to
  ``resized_hw`` (rows, cols) and the merged grid ``grid_hw`` tiles that resized image
  exactly (tiny default: 256x256 -> 8x8 cells of 32 px), so boxes are scaled by the resize
  and cut by the grid of the model, not a fixed one.
* ``stage1_queries(json) -> list[{"category", "query"}]``: one "find the <category>." query
  per category present in an image (crowd-only categories included: the region holds them).
  Pass it as ``ShardLoader(..., expand=stage1_queries)``: each image then yields one sample
  per query, and ``box_mask(sample["json"]["objects"], sample["category"], ...)`` is its target.
"""

from __future__ import annotations

import torch

from data_prep.vocab import FIND_TEMPLATE


def box_mask(objects: list[dict], category: str, width: int, height: int, grid_hw: tuple[int, int],
             resized_hw: tuple[int, int] | None = None, include_crowd: bool = True) -> torch.Tensor:
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    if gh < 1 or gw < 1:
        raise ValueError(f"grid_hw must be positive (got {grid_hw})")
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive (got {width}x{height})")
    rh, rw = resized_hw if resized_hw is not None else (height, width)
    if rh <= 0 or rw <= 0:
        raise ValueError(f"resized_hw must be positive (got {resized_hw})")
    sx, sy = rw / width, rh / height  # stored -> resized scale (the processor's resize)
    boxes = []
    for obj in objects:
        if obj["category"] != category or (obj.get("iscrowd") and not include_crowd):
            continue
        x, y, w, h = obj["bbox"]
        # Box edges in cell units of the resized image, clipped to the grid.
        x0, x1 = max(0.0, x * sx * gw / rw), min(float(gw), (x + w) * sx * gw / rw)
        y0, y1 = max(0.0, y * sy * gh / rh), min(float(gh), (y + h) * sy * gh / rh)
        if x1 > x0 and y1 > y0:
            boxes.append((x0, y0, x1, y1))
    if not boxes:
        return torch.zeros(gh, gw)
    return _union_cover(torch.tensor(boxes, dtype=torch.float64), gh, gw).to(torch.float32)


def _union_cover(boxes: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """Exact share of each unit cell covered by the union of ``boxes`` [B, 4] (cell units).

    Cutting the plane at every box edge and every cell edge gives elementary rectangles
    that lie in one cell and are either fully inside some box or outside all of them.
    """
    xs = torch.unique(torch.cat([boxes[:, 0], boxes[:, 2], torch.arange(gw + 1, dtype=torch.float64)]))
    ys = torch.unique(torch.cat([boxes[:, 1], boxes[:, 3], torch.arange(gh + 1, dtype=torch.float64)]))
    cx, cy = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2  # centres of the elementary intervals
    in_x = (cx[None, :] > boxes[:, 0:1]) & (cx[None, :] < boxes[:, 2:3])  # [B, X]
    in_y = (cy[None, :] > boxes[:, 1:2]) & (cy[None, :] < boxes[:, 3:4])  # [B, Y]
    inside = (in_y[:, :, None] & in_x[:, None, :]).any(dim=0)  # [Y, X]
    area = (ys[1:] - ys[:-1])[:, None] * (xs[1:] - xs[:-1])[None, :]
    col, row = cx.floor().long().clamp_(0, gw - 1), cy.floor().long().clamp_(0, gh - 1)
    cell = (row[:, None] * gw + col[None, :]).flatten()
    covered = torch.zeros(gh * gw, dtype=torch.float64)
    covered.index_add_(0, cell, (inside * area).flatten())
    return covered.view(gh, gw).clamp_(0, 1)


def stage1_queries(meta: dict) -> list[dict]:
    categories = sorted({obj["category"] for obj in meta.get("objects", [])})
    return [{"category": c, "query": FIND_TEMPLATE.format(category=c)} for c in categories]
