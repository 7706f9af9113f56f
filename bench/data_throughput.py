"""Shard loader vs. a folder of files, and sharding throughput, measured side by side.

    python bench/data_throughput.py [--images 2000] [--image-size 256] [--workers 2] [--batch-size 32]

1. Generates synthetic scenes, shards them (COCO kind) with 1 and with 2 writer processes:
   images/s each.
2. Unpacks the same shards into a folder (``<key>.jpg|png`` + ``<key>.json`` per sample),
   so both readers see byte-identical images and JSON.
3. Reads one epoch with ``ShardLoader`` and with a map-style ``Dataset`` over the folder in a
   torch ``DataLoader``: same worker count, batch size and decoding (``tario.decode_image``,
   ``json.loads``). Each reader runs with a warm page cache and a cold one (every file's pages
   are dropped with ``posix_fadvise(DONTNEED)`` before the pass: the situation of a dataset
   larger than RAM or on network storage, which is what shards are for).

Ends with one JSON line: figures, targets and ``pass`` (cold-cache loader/folder ratio >= 3).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep import tario  # noqa: E402
from data_prep.loader import ShardLoader  # noqa: E402
from data_prep.shard import shard_coco, shard_urls  # noqa: E402
from data_prep.synth import generate  # noqa: E402

TARGET_RATIO = 3.0


class FolderDataset(Dataset):
    """The baseline: one image file and one JSON file per sample, read on demand."""

    def __init__(self, folder: Path):
        self.images = sorted(p for p in folder.iterdir() if p.suffix in (".jpg", ".png"))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        path = self.images[index]
        image = tario.decode_image(path.read_bytes())
        meta = json.loads(path.with_suffix(".json").read_bytes())
        return {"__key__": path.stem, "image": image, "json": meta}


def _as_list(batch):
    return batch


def _drop_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _timed_epoch(batches, expected: int) -> float:
    start = time.perf_counter()
    count = sum(len(batch) for batch in batches)
    elapsed = time.perf_counter() - start
    if count != expected:
        raise RuntimeError(f"read {count} samples, expected {expected}")
    return count / elapsed


def _shard_rate(raw: Path, out: Path, workers: int, shard_size: int, images: int) -> float:
    start = time.perf_counter()
    shard_coco(raw / "instances_train.json", raw / "images", out, shard_size=shard_size, workers=workers,
               progress=False)
    return images / (time.perf_counter() - start)


def _unpack(urls: list[str], folder: Path) -> None:
    folder.mkdir(parents=True)
    for url in urls:
        for raw in tario.iter_shard(url):
            ext = tario.image_key(raw)
            (folder / f"{raw['__key__']}.{ext}").write_bytes(raw[ext])
            (folder / f"{raw['__key__']}.json").write_bytes(raw["json"])


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="arr-coc-bench-"))
    try:
        raw = work / "raw"
        generate(raw, images=args.images, seed=0, image_size=args.image_size, val_fraction=0.01)
        train_images = len(json.loads((raw / "instances_train.json").read_text())["images"])
        rates = {w: _shard_rate(raw, work / f"shards{w}", w, args.shard_size, train_images) for w in (1, 2)}
        urls = shard_urls(work / "shards2", "train")
        folder = work / "folder"
        _unpack(urls, folder)
        folder_files = sorted(folder.iterdir())
        shard_files = [Path(u) for u in urls]

        def loader_pass():
            loader = ShardLoader(urls, batch_size=args.batch_size, num_workers=args.workers, seed=0, epochs=1)
            return _timed_epoch(loader, train_images)

        def folder_pass():
            loader = DataLoader(FolderDataset(folder), batch_size=args.batch_size, shuffle=True,
                                num_workers=args.workers, collate_fn=_as_list,
                                generator=torch.Generator().manual_seed(0))
            return _timed_epoch(loader, train_images)

        # Readers alternate within each repeat (best pass kept) so load from other processes
        # on the machine hits both alike.
        results: dict[str, float] = {}
        readers = (("shards", loader_pass, shard_files), ("folder", folder_pass, folder_files))
        for cache in ("warm", "cold"):
            if cache == "warm":
                for _, fn, _ in readers:
                    fn()  # fill the page cache
            for _ in range(args.repeats):
                for name, fn, files in readers:
                    if cache == "cold":
                        _drop_cache(files)
                    key = f"{name}_{cache}"
                    results[key] = max(results.get(key, 0.0), fn())
        return {"images": train_images, "image_size": args.image_size, "workers": args.workers,
                "batch_size": args.batch_size, "shard_images_per_s_1w": rates[1], "shard_images_per_s_2w": rates[2],
                **{f"{k}_samples_per_s": v for k, v in results.items()},
                "ratio_warm": results["shards_warm"] / results["folder_warm"],
                "ratio_cold": results["shards_cold"] / results["folder_cold"]}
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="synthetic images (default 2000)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="reader processes for both readers")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=2, help="passes per measurement (best kept)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    r = run(args)
    print(f"{r['images']} images of {r['image_size']} px, {r['workers']} reader workers, batch {r['batch_size']}")
    print(f"{'reader':<34}{'warm cache':>14}{'cold cache':>14}")
    print(f"{'ShardLoader (samples/s)':<34}{r['shards_warm_samples_per_s']:>14.0f}{r['shards_cold_samples_per_s']:>14.0f}")
    print(f"{'folder Dataset (samples/s)':<34}{r['folder_warm_samples_per_s']:>14.0f}{r['folder_cold_samples_per_s']:>14.0f}")
    print(f"{'ratio shards / folder':<34}{r['ratio_warm']:>14.2f}{r['ratio_cold']:>14.2f}")
    print(f"sharding: {r['shard_images_per_s_1w']:.0f} images/s with 1 worker, "
          f"{r['shard_images_per_s_2w']:.0f} images/s with 2 workers")
    r["targets"] = {"ratio_cold": TARGET_RATIO}
    r["pass"] = r["ratio_cold"] >= TARGET_RATIO
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
