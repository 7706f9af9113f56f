"""The stages' view of the run's data: make sure shards exist, then read them.

``ensure_data(cfg)`` is idempotent: when both manifests exist it only returns their
folders; otherwise it generates the synthetic source into ``<run>/data/raw/`` (or reads
the COCO / VQAv2 paths of the config) and shards it with data_prep's writers, which
themselves keep finished shards. The flows' shard task calls the same function, so
``arr-coc stage stage1 --config configs/tiny.yaml`` also works on a fresh run directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from arr_coc.config import RunConfig
from arr_coc.errors import DataError

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class DataPaths:
    raw: Path
    """Synthetic source files (images, COCO and VQAv2 JSON)."""
    coco: Path
    """COCO shards: ``{train,val}-NNNNNN.tar`` + manifest."""
    vqav2: Path
    """VQAv2 shards."""


def data_paths(cfg: RunConfig) -> DataPaths:
    data_dir = cfg.run_dir / "data"
    return DataPaths(raw=data_dir / "raw", coco=data_dir / "shards" / "coco", vqav2=data_dir / "shards" / "vqav2")


def _is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def ensure_data(cfg: RunConfig) -> DataPaths:
    """Generate (synthetic) and shard the run's data unless both manifests exist.

    Under several ranks only rank 0 writes; the others wait at a barrier, so no two
    processes shard into the same folder.
    """
    paths = data_paths(cfg)
    rank = torch.distributed.get_rank() if _is_distributed() else 0
    if rank == 0 and not ((paths.coco / MANIFEST).is_file() and (paths.vqav2 / MANIFEST).is_file()):
        _prepare(cfg, paths)
    if _is_distributed():
        torch.distributed.barrier()
    return paths


def _prepare(cfg: RunConfig, paths: DataPaths) -> None:
    from data_prep import shard

    sources = _sources(cfg, paths)
    common = {"shard_size": cfg.data.shard_size, "workers": cfg.data.workers,
              "max_bad_fraction": cfg.data.max_bad_fraction}
    for split in ("train", "val"):
        shard.shard_coco(annotations=sources[f"coco_{split}"], images=sources["images"], out=paths.coco,
                         split=split, **common)
        shard.shard_vqav2(questions=sources[f"questions_{split}"], annotations=sources[f"annotations_{split}"],
                          images=sources["images"], out=paths.vqav2, split=split, **common)


def _sources(cfg: RunConfig, paths: DataPaths) -> dict[str, Path]:
    """Source files per split: generated synthetic ones, or the config's COCO / VQAv2 paths."""
    if cfg.data.source == "synthetic":
        from data_prep import synth

        if not (paths.raw / "instances_val.json").is_file():
            synth.generate(paths.raw, images=cfg.data.images, seed=cfg.seed, image_size=cfg.model.image_size,
                           val_fraction=cfg.data.val_fraction)
        raw = paths.raw
        return {
            "images": raw / "images",
            **{f"coco_{s}": raw / f"instances_{s}.json" for s in ("train", "val")},
            **{f"questions_{s}": raw / f"questions_{s}.json" for s in ("train", "val")},
            **{f"annotations_{s}": raw / f"annotations_{s}.json" for s in ("train", "val")},
        }
    data = cfg.data
    # Real COCO / VQAv2: one file each in the config; both splits share it and the shard
    # writer keeps the split named in the file (train2014 / val2014).
    return {
        "images": Path(data.coco_images),
        "coco_train": Path(data.coco_annotations), "coco_val": Path(data.coco_annotations),
        "questions_train": Path(data.vqa_questions), "questions_val": Path(data.vqa_questions),
        "annotations_train": Path(data.vqa_annotations), "annotations_val": Path(data.vqa_annotations),
    }


def shard_urls(shard_dir: Path, split: str) -> list[str]:
    """Sorted shard paths of one split; a DataError naming the folder when there are none."""
    urls = sorted(str(p) for p in Path(shard_dir).glob(f"{split}-*.tar"))
    if not urls:
        raise DataError(f"{shard_dir}: no {split}-*.tar shards (run `arr-coc shard` or delete {MANIFEST})")
    return urls


def read_samples(shard_dir: Path, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The first ``limit`` samples of a split in shard order, decoded like the loader does.

    Held-out evaluation must see the same samples every time, so this reads the shards
    in order with no shuffling, once.
    """
    samples: list[dict[str, Any]] = []
    for sample in iter_samples(shard_dir, split):
        samples.append(sample)
        if limit is not None and len(samples) >= limit:
            break
    return samples


def iter_samples(shard_dir: Path, split: str) -> Iterator[dict[str, Any]]:
    import io

    import webdataset as wds
    from PIL import Image

    for url in shard_urls(shard_dir, split):
        for raw in wds.WebDataset(url, shardshuffle=False, empty_check=False):
            image_key = next((k for k in ("jpg", "jpeg", "png") if k in raw), None)
            if image_key is None or "json" not in raw:
                raise DataError(f"{url}: sample {raw.get('__key__')!r} lacks an image or json part")
            yield {
                "__key__": raw["__key__"],
                "image": Image.open(io.BytesIO(raw[image_key])).convert("RGB"),
                "json": json.loads(raw["json"]),
            }
