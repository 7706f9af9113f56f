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
SPLITS = ("train", "val")


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
    return DataPaths(
        raw=data_dir / "raw", coco=data_dir / "shards" / "coco", vqav2=data_dir / "shards" / "vqav2"
    )


def _is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def ensure_data(cfg: RunConfig) -> DataPaths:
    """Generate (synthetic) and shard the run's data unless both manifests hold their splits.

    Under several ranks only rank 0 writes; the others wait at a barrier, so no two
    processes shard into the same folder.
    """
    paths = data_paths(cfg)
    rank = torch.distributed.get_rank() if _is_distributed() else 0
    if rank == 0 and not (_complete(paths.coco) and _complete(paths.vqav2)):
        _prepare(cfg, paths)
    if _is_distributed():
        torch.distributed.barrier()
    return paths


def _complete(shard_dir: Path) -> bool:
    """Both splits are marked complete (a split's section appears after its first shard, so
    presence alone would take an interrupted sharding run for a finished one)."""
    path = shard_dir / MANIFEST
    if not path.is_file():
        return False
    splits = json.loads(path.read_text()).get("splits", {})
    return all(splits.get(split, {}).get("complete", False) for split in SPLITS)


def _prepare(cfg: RunConfig, paths: DataPaths) -> None:
    from data_prep import shard

    options = {
        "shard_size": cfg.data.shard_size,
        "workers": cfg.data.workers,
        "max_bad_fraction": cfg.data.max_bad_fraction,
        "progress": False,
    }
    if cfg.data.source == "synthetic":
        raw = paths.raw
        if not all(
            (raw / f"{name}_{split}.json").is_file()
            for name in ("instances", "questions", "annotations")
            for split in SPLITS
        ):
            from data_prep import synth

            synth.generate(
                raw,
                images=cfg.data.images,
                seed=cfg.seed,
                image_size=cfg.model.image_size,
                val_fraction=cfg.data.val_fraction,
            )
        for split in SPLITS:
            shard.shard_coco(
                raw / f"instances_{split}.json", raw / "images", paths.coco, split=split, **options
            )
            shard.shard_vqav2(
                raw / f"questions_{split}.json",
                raw / f"annotations_{split}.json",
                raw / "images",
                paths.vqav2,
                split=split,
                **options,
            )
        return
    # Real COCO / VQAv2: the split comes from the file names (train2014, val2017, ...).
    data = cfg.data
    shard.shard_coco(data.coco_annotations, data.coco_images, paths.coco, **options)
    shard.shard_vqav2(data.vqa_questions, data.vqa_annotations, data.vqa_images, paths.vqav2, **options)


def shard_urls(shard_dir: Path, split: str) -> list[str]:
    """A split's shard paths in manifest order (DataError naming the manifest when absent)."""
    from data_prep import shard

    return shard.shard_urls(shard_dir, split)


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
        # Every rank reads the same held-out samples (the same module calls on every rank),
        # so no node or worker splitting here (webdataset refuses multi-node by default).
        dataset = wds.WebDataset(
            url, shardshuffle=False, empty_check=False, nodesplitter=_all_shards, workersplitter=_all_shards
        )
        for raw in dataset:
            image_key = next((k for k in ("jpg", "jpeg", "png") if k in raw), None)
            if image_key is None or "json" not in raw:
                raise DataError(f"{url}: sample {raw.get('__key__')!r} lacks an image or json part")
            yield {
                "__key__": raw["__key__"],
                "image": Image.open(io.BytesIO(raw[image_key])).convert("RGB"),
                "image_bytes": raw[image_key],  # as stored: mining re-shards them unchanged
                "json": json.loads(raw["json"]),
            }


def _all_shards(urls):
    """A webdataset splitter that keeps every shard."""
    return urls


class JoinedLoader:
    """Each batch joins one batch of every part, in order: e.g. VQA + captions (stage 0),
    hard + replay (stage 3).

    ``parts`` maps a name to a data_prep ``ShardLoader`` (``None``: the part is off) and the
    fields stamped on its items (``{"hard": True}``). The state is the parts' own states,
    keyed by name, so resume is exact.
    """

    def __init__(self, parts: dict[str, tuple[Any, dict[str, Any]] | None]):
        self.parts = {name: part for name, part in parts.items() if part is not None}

    def __iter__(self):
        streams = [(iter(loader), fields) for loader, fields in self.parts.values()]
        while True:
            yield [{**item, **fields} for stream, fields in streams for item in next(stream)]

    def state_dict(self) -> dict[str, Any]:
        return {name: loader.state_dict() for name, (loader, _) in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.parts) - set(state))
        if missing:
            raise DataError(f"loader state: no state for part(s) {', '.join(missing)}")
        for name, (loader, _) in self.parts.items():
            loader.load_state_dict(state[name])
