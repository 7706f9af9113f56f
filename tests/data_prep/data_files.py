"""Helpers for the data_prep tests (imported as a plain module, like tests/stages/toy_task.py)."""

import json
from pathlib import Path

from PIL import Image


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def save_image(path: Path, mode: str = "RGB", size=(64, 48), color=(200, 30, 30), fmt=None) -> Path:
    """An image file of the given PIL mode (CMYK/L JPEG, RGBA/P PNG, ...)."""
    if mode == "CMYK":
        color = (0, 220, 220, 30)
    elif mode in ("L", "P", "I;16"):
        color = 120
    elif mode == "RGBA":
        color = (*color, 128)
    Image.new(mode, size, color).save(path, format=fmt)
    return path
