"""The shard loader: deterministic, split across ranks and workers, exactly resumable.

``ShardLoader(urls, batch_size, rank=0, world_size=1, num_workers=0, seed=0, shuffle=True,
shuffle_buffer=256, epochs=None, expand=None, transform=None)`` is an iterable of batches
(lists of ``{"__key__", "image": PIL RGB, "json": dict}``), infinite over epochs unless
``epochs`` is given. ``state_dict()`` / ``load_state_dict()`` resume exactly at the next
unseen sample.

How the stream is defined (so it can be replayed):

* ``L = max(1, num_workers)`` *logical* workers per rank, ``G = world_size * L`` in all;
  logical worker ``g = rank * L + w``. Each epoch the shard list is permuted with
  ``Random(f"{seed}:{epoch}")`` and worker ``g`` reads shards ``perm[g::G]``. Fewer shards
  than ``G`` is refused at start-up (``ConfigError``) instead of starving a worker.
* A worker reads its shards in that order (webdataset's tar reader), optionally expands
  each sample into several items (``expand(json) -> list[dict]``, e.g. one stage-1 query
  per category, from the JSON only), shuffles through webdataset's buffer shuffle with
  ``Random(f"{seed}:{epoch}:{g}")``, decodes, applies ``transform`` and groups
  ``batch_size`` items; a partial batch at an epoch's end continues into the next epoch.
* With ``num_workers >= 1`` a torch ``DataLoader`` (``batch_size=None``) runs the logical
  workers in processes; it hands out batches round-robin, so batch ``k`` of a rank comes
  from logical worker ``k % L``. With ``num_workers=0`` the single logical worker runs in
  the calling process.

Every batch carries its worker's position ``(epoch, items consumed in that epoch)``; the
loader records it when the batch reaches the caller (not when a worker prefetched it).
Restoring replays each worker's epoch up to its position without decoding images, and
rotates the DataLoader's worker ids by ``batches % L`` so the round-robin continues with
the right worker. Shard counts are checked against ``manifest.json`` next to the shards:
a truncated shard raises ``DataError`` naming it.
"""

from __future__ import annotations

import copy
import hashlib
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import _shuffle

from arr_coc.errors import ConfigError, DataError
from data_prep import tario

STATE_VERSION = 1


class ShardLoader:
    def __init__(self, urls: Sequence[str] | str, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 256,
                 epochs: int | None = None, expand: Callable[[dict], list[dict]] | None = None,
                 transform: Callable[[dict], dict] | None = None, prefetch_factor: int = 2,
                 multiprocessing_context: str | None = None):
        self.urls = _expand_urls(urls)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1 (got {batch_size})")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0 (got {num_workers})")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.seed, self.epochs = num_workers, seed, epochs
        self.logical_workers = max(1, num_workers)
        groups = world_size * self.logical_workers
        if len(self.urls) < groups:
            raise ConfigError(
                f"{len(self.urls)} shard(s) < {world_size} rank(s) x {self.logical_workers} worker(s): every worker "
                "needs a shard; reshard with a smaller --shard-size or use fewer workers/ranks")
        self._stream = _WorkerStreams(self.urls, batch_size, rank, world_size, self.logical_workers, seed,
                                      shuffle, shuffle_buffer, epochs, expand, transform)
        self._prefetch_factor, self._mp_context = prefetch_factor, multiprocessing_context
        self._positions = {w: (0, 0) for w in range(self.logical_workers)}
        self._batches = 0

    # -- iteration -------------------------------------------------------------------

    def __iter__(self) -> Iterator[list[dict]]:
        for item in self._source():
            if "error" in item:
                raise DataError(item["error"])
            self._positions[item["worker"]] = (item["epoch"], item["offset"])
            self._batches += 1
            yield item["batch"]

    def _source(self) -> Iterator[dict]:
        positions = dict(self._positions)
        if self.num_workers == 0:
            return self._stream.batches(0, positions[0])
        rotation = self._batches % self.logical_workers
        dataset = _BatchDataset(self._stream, positions, rotation)
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                               prefetch_factor=self._prefetch_factor,
                               multiprocessing_context=self._mp_context))

    # -- resume ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "shards": _fingerprint(self.urls),
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "batches": self._batches,
            "positions": {str(w): list(p) for w, p in self._positions.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("version", "shards", "seed", "rank", "world_size", "num_workers", "batch_size"):
            if state.get(key) != mine[key]:
                raise ConfigError(f"loader state: {key} is {state.get(key)!r}, this loader has {mine[key]!r}; "
                                  "resume needs the same shards, seed, ranks, workers and batch size")
        self._batches = int(state["batches"])
        self._positions = {int(w): (int(p[0]), int(p[1])) for w, p in state["positions"].items()}


def _identity(item):
    return item


class _BatchDataset(IterableDataset):
    """What each DataLoader worker runs: the batches of its (rotated) logical worker."""

    def __init__(self, stream: _WorkerStreams, positions: dict, rotation: int):
        self.stream, self.positions, self.rotation = stream, positions, rotation

    def __iter__(self):
        info = get_worker_info()
        worker_id = info.id if info is not None else 0
        logical = (worker_id + self.rotation) % self.stream.logical_workers
        torch.set_num_threads(1)
        return self.stream.batches(logical, self.positions[logical])


class _WorkerStreams:
    """The deterministic per-(rank, worker) item streams; picklable for DataLoader workers."""

    def __init__(self, urls, batch_size, rank, world_size, logical_workers, seed, shuffle, shuffle_buffer,
                 epochs, expand, transform):
        self.urls, self.batch_size, self.rank = urls, batch_size, rank
        self.world_size, self.logical_workers, self.seed = world_size, logical_workers, seed
        self.shuffle, self.shuffle_buffer, self.epochs = shuffle, shuffle_buffer, epochs
        self.expand, self.transform = expand, transform
        self.counts = _manifest_counts(urls)

    def group(self, logical: int) -> int:
        return self.rank * self.logical_workers + logical

    def epoch_shards(self, epoch: int, logical: int) -> list[str]:
        order = list(range(len(self.urls)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        groups = self.world_size * self.logical_workers
        return [self.urls[i] for i in order[self.group(logical)::groups]]

    def epoch_items(self, epoch: int, logical: int) -> Iterator[dict]:
        """Undecoded items of one worker's epoch, in stream order."""
        items = (item for url in self.epoch_shards(epoch, logical) for raw in self._read(url)
                 for item in self._expand(raw))
        if self.shuffle:
            rng = random.Random(f"{self.seed}:{epoch}:{self.group(logical)}")
            items = _shuffle(items, bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)
        return items

    def batches(self, logical: int, position: tuple[int, int]) -> Iterator[dict]:
        try:
            yield from self._batches(logical, position)
        except DataError as err:  # passed as data: a worker traceback would bury the one-line message
            yield {"error": str(err)}

    def _batches(self, logical: int, position: tuple[int, int]) -> Iterator[dict]:
        epoch, offset = position
        batch: list[dict] = []
        while self.epochs is None or epoch < self.epochs:
            seen = 0
            for seen, item in enumerate(self.epoch_items(epoch, logical), 1):
                if seen <= offset:
                    continue  # replay to the resume point without decoding
                batch.append(self._decode(item))
                if len(batch) == self.batch_size:
                    yield {"batch": batch, "worker": logical, "epoch": epoch, "offset": seen}
                    batch = []
            if seen == 0:
                raise DataError(f"rank {self.rank} worker {logical}: its shards hold no samples in epoch {epoch}")
            epoch, offset = epoch + 1, 0
        if batch:
            yield {"batch": batch, "worker": logical, "epoch": epoch, "offset": 0}

    def _read(self, url: str) -> Iterator[dict]:
        count = 0
        for raw in tario.iter_shard(url):
            count += 1
            yield raw
        expected = self.counts.get(url)
        if expected is not None and count != expected:
            raise DataError(f"{url}: {count} samples but the manifest says {expected} (truncated shard?)")

    def _expand(self, raw: dict) -> list[dict]:
        meta = tario.decode_json(raw)
        if self.expand is None:
            return [{"raw": raw, "json": meta, "key": raw["__key__"], "extra": {}}]
        # Each expanded item gets its own json copy: a transform may edit one without touching its siblings.
        return [{"raw": raw, "json": copy.deepcopy(meta) if i else meta, "key": f"{raw['__key__']}#{i}", "extra": extra}
                for i, extra in enumerate(self.expand(meta))]

    def _decode(self, item: dict) -> dict:
        raw = item["raw"]
        sample = {"__key__": item["key"], "image": tario.decode_sample_image(raw), "json": item["json"]}
        sample.update(item["extra"])
        return self.transform(sample) if self.transform is not None else sample


def _expand_urls(urls: Sequence[str] | str) -> list[str]:
    if isinstance(urls, (str, Path)):
        import braceexpand

        urls = list(braceexpand.braceexpand(str(urls)))
    urls = [str(u) for u in urls]
    if not urls:
        raise ConfigError("no shard urls given")
    return urls


def _fingerprint(urls: list[str]) -> str:
    return hashlib.sha256("\n".join(Path(u).name for u in urls).encode()).hexdigest()[:16]


def _manifest_counts(urls: list[str]) -> dict[str, int]:
    """Per-shard sample counts from ``manifest.json`` in the shards' folders (where there is one)."""
    from data_prep.readers import load_json
    from data_prep.shard import MANIFEST

    counts: dict[str, int] = {}
    for folder in sorted({Path(u).parent for u in urls}):
        if (folder / MANIFEST).is_file():
            for entry in load_json(folder / MANIFEST).get("shards", []):
                counts[str(folder / entry["name"])] = entry["count"]
    return {u: counts[str(Path(u))] for u in urls if str(Path(u)) in counts}
