"""Reading shard tars and decoding their samples (shared by the loader and ``shard inspect``).

* ``iter_shard(path) -> Iterator[raw sample]``: webdataset's tar reader over one shard; a raw
  sample is ``{"__key__", "__url__", "jpg"|"png": bytes, "json": bytes}``. A truncated or
  corrupt tar raises ``DataError`` naming the shard.
* ``decode_image(data) -> PIL RGB``: CMYK, grayscale, palette and 16-bit images are converted.
* ``decode_sample(raw) -> {"__key__", "image": PIL RGB, "json": dict}``
  (``decode_sample_image(raw)`` for the image alone).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

from PIL import Image
from webdataset import tariterators

from arr_coc.errors import DataError

IMAGE_EXTENSIONS = ("jpg", "png")


_TAR_BLOCK = 512


def _check_complete(stream, url: str) -> None:
    """A finished tar ends in two zero blocks. A file cut at a member boundary reads cleanly to
    its end with tarfile's stream reader, so without this check it would pass as a short shard."""
    size = stream.seek(0, 2)
    if size < 2 * _TAR_BLOCK or size % _TAR_BLOCK:
        raise DataError(f"{url}: truncated or corrupt shard ({size} bytes is not a whole tar)")
    stream.seek(size - 2 * _TAR_BLOCK)
    if stream.read(2 * _TAR_BLOCK).strip(b"\0"):
        raise DataError(f"{url}: truncated or corrupt shard (no end-of-archive marker)")
    stream.seek(0)


def iter_shard(path: str | Path) -> Iterator[dict]:
    """Raw samples of one shard in stored order; errors name the shard."""
    url = str(path)
    try:
        with open(url, "rb") as stream:
            _check_complete(stream, url)
            files = tariterators.tar_file_expander([{"url": url, "stream": stream}])
            yield from tariterators.group_by_keys(files)
    except FileNotFoundError:
        raise DataError(f"{url}: shard file not found") from None
    except (tarfile.TarError, OSError, ValueError, EOFError) as err:
        reason = str(err.args[0]) if err.args else type(err).__name__
        raise DataError(f"{url}: truncated or corrupt shard ({reason.split(' @ ')[0]})") from None


def image_key(raw: dict) -> str:
    """The image entry of a raw sample (``jpg`` or ``png``)."""
    for ext in IMAGE_EXTENSIONS:
        if ext in raw:
            return ext
    raise DataError(f"{raw.get('__url__', '?')}: sample {raw.get('__key__')!r} has no jpg/png image")


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> PIL RGB. Mode conversions keep the picture (16-bit scaled, alpha dropped)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def decode_json(raw: dict) -> dict:
    try:
        return json.loads(raw["json"])
    except (KeyError, ValueError) as err:
        raise DataError(f"{raw.get('__url__', '?')}: sample {raw.get('__key__')!r} has no valid json ({err})") from None


def decode_sample_image(raw: dict) -> Image.Image:
    """The image of a raw shard sample as PIL RGB; errors name the shard and sample."""
    try:
        return decode_image(raw[image_key(raw)])
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{raw.get('__url__', '?')}: sample {raw['__key__']!r}: undecodable image ({err})") from None


def decode_sample(raw: dict) -> dict:
    """A raw shard sample -> ``{"__key__", "image": PIL RGB, "json": dict}``."""
    return {"__key__": raw["__key__"], "image": decode_sample_image(raw), "json": decode_json(raw)}
