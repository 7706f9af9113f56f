"""WebDataset sharding per the shard contract, and ``inspect``.

* ``shard_coco(annotations, images_dir, out_dir, split=None, shard_size=1000, workers=1,
  max_bad_fraction=0.05, progress=True) -> dict``
* ``shard_vqav2(questions, annotations, images_dir, out_dir, ...)`` (``annotations`` may be
  ``None`` for test splits)
* ``shard_hf_dataset(dataset, out_dir, split="train", image_column="image",
  question_column="question", answers_column="answers", ...)``: any ``datasets.Dataset``
  (or one from ``load_from_disk``) with image / question / answers columns -> VQAv2 samples.
  The image may be an ``Image`` feature, bytes, a path or a PIL image; answers a list of
  strings, of ``{"answer": ...}`` or one string; other JSON-able columns (``question_id``,
  ``image_id``, ``hard``, ...) are copied into the sample's json (ids default to the row).
* ``inspect(out_dir) -> dict``: re-hashes and re-reads every shard of the manifest.
* ``shard_urls(out_dir, split) -> list[str]``: the shard paths of a split, for the loader.

``OUT/`` holds ``{split}-NNNNNN.tar`` and one ``manifest.json`` (several splits of one kind
may share it). Records are sorted by id and cut into shard-sized chunks *before* images are
read, so shard ``i`` always holds the same records; a chunk loses the records whose image
is missing or corrupt (listed in the manifest). Workers (``multiprocessing``, one chunk per
task) write each shard through ``webdataset.TarWriter`` to a hidden temporary name and
rename it when complete; the tar bytes are deterministic (fixed mtime), so a shard's sha256
is stable. A re-run with the same sources and options keeps every shard whose sha256 still
matches and rewrites only missing or damaged ones. Exceeding ``max_bad_fraction`` raises
``DataError`` with the counts after the manifest is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import re
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter

from arr_coc.errors import DataError
from data_prep import readers
from data_prep.tario import iter_shard
from data_prep.vqa_norm import majority_answer

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{6})\.tar$")


class _Skip(Exception):
    """A record that cannot become a sample; the message is the manifest reason."""


# ------------------------------------------------------------------------ public API


def shard_coco(annotations, images_dir, out_dir, split: str | None = None, shard_size: int = 1000,
               workers: int = 1, max_bad_fraction: float = 0.05, progress: bool = True) -> dict:
    split = split or readers.infer_split(annotations)
    records, skipped = readers.read_coco(annotations, images_dir)
    sources = {"annotations": _file_fingerprint(annotations), "images": _images_fingerprint(images_dir, records)}
    # Input records: every image and every annotation entry (skips of either are "bad").
    total = len(records) + sum(len(r["meta"]["objects"]) for r in records) + len(skipped)
    return _run("coco", split, records, skipped, total, out_dir, shard_size, workers, max_bad_fraction,
                sources, progress)


def shard_vqav2(questions, annotations, images_dir, out_dir, split: str | None = None, shard_size: int = 1000,
                workers: int = 1, max_bad_fraction: float = 0.05, progress: bool = True) -> dict:
    split = split or readers.infer_split(questions)
    records, skipped = readers.read_vqav2(questions, annotations, images_dir, split)
    sources = {"questions": _file_fingerprint(questions), "images": _images_fingerprint(images_dir, records)}
    if annotations is not None:
        sources["annotations"] = _file_fingerprint(annotations)
    total = len(records) + len(skipped)
    return _run("vqav2", split, records, skipped, total, out_dir, shard_size, workers, max_bad_fraction,
                sources, progress)


def shard_hf_dataset(dataset, out_dir, split: str = "train", image_column: str = "image",
                     question_column: str = "question", answers_column: str = "answers",
                     shard_size: int = 1000, workers: int = 1, max_bad_fraction: float = 0.05,
                     progress: bool = True) -> dict:
    """Shard a ``datasets.Dataset`` with image / question / answers columns as VQAv2 samples."""
    for column in (image_column, question_column, answers_column):
        if column not in dataset.column_names:
            raise DataError(f"dataset: missing column {column!r} (has {', '.join(dataset.column_names)})")
    dataset = _undecoded_images(dataset, image_column)
    records = [{"key": f"{i:015d}", "hf_row": i, "meta": {}} for i in range(len(dataset))]
    columns = (image_column, question_column, answers_column)
    sources = {"dataset": {"fingerprint": getattr(dataset, "_fingerprint", None), "rows": len(dataset),
                           "columns": list(columns)}}
    return _run("vqav2", split, records, [], len(records), out_dir, shard_size, workers, max_bad_fraction,
                sources, progress, hf=(dataset, columns))


def shard_urls(out_dir, split: str) -> list[str]:
    """Paths of a split's shards, in order, from the manifest."""
    manifest = read_manifest(out_dir)
    section = manifest["splits"].get(split)
    if section is None:
        raise DataError(f"{Path(out_dir) / MANIFEST}: no split {split!r} (has {', '.join(manifest['splits'])})")
    return [str(Path(out_dir) / s["name"]) for s in section["shards"]]


def read_manifest(out_dir) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no manifest (not a shard folder, or sharding never finished a shard)")
    return readers.load_json(path)


def inspect(out_dir) -> dict:
    """Verify every shard of the manifest (sha256 and a full read); report counts and problems."""
    out = Path(out_dir)
    manifest = read_manifest(out)
    report: dict = {"kind": manifest.get("kind"), "splits": {}, "shards": [], "problems": []}
    listed = set()
    for split, section in sorted(manifest["splits"].items()):
        report["splits"][split] = {"shards": len(section["shards"]), "samples": section["samples"],
                                   "skipped": len(section["skipped"]), "complete": section["complete"]}
        if not section["complete"]:
            report["problems"].append(f"split {split}: sharding did not finish")
        for entry in section["shards"]:
            listed.add(entry["name"])
            status = _check_shard(out / entry["name"], entry)
            report["shards"].append({"name": entry["name"], "split": split, "count": entry["count"], "status": status})
            if status != "ok":
                report["problems"].append(f"{entry['name']}: {status}")
    for path in sorted(out.glob("*.tar")):
        if path.name not in listed:
            report["problems"].append(f"{path.name}: not in the manifest")
    report["ok"] = not report["problems"]
    return report


# ------------------------------------------------------------------------- the run


def _run(kind, split, records, skipped, total, out_dir, shard_size, workers, max_bad_fraction, sources,
         progress, hf=None) -> dict:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1 (got {shard_size})")
    if workers < 1:
        raise ValueError(f"workers must be >= 1 (got {workers})")
    if not _SHARD_RE.match(f"{split}-000000.tar"):
        raise ValueError(f"split {split!r}: use letters, digits and _")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    options = {"shard_size": shard_size}
    plan = _digest({"schema": SCHEMA_VERSION, "kind": kind, "split": split, "sources": sources,
                    "options": options, "records": [r["key"] for r in records]})
    chunks = [records[i:i + shard_size] for i in range(0, len(records), shard_size)]
    names = [f"{split}-{i:06d}.tar" for i in range(len(chunks))]
    kept = _verified_shards(out, kind, split, plan, names)
    section = {"plan": plan, "complete": False, "sources": sources, "options": options, "records": total,
               "samples": 0, "read_skipped": skipped, "shards": []}
    _remove_stale(out, split, set(names))
    todo = [(i, chunk) for i, chunk in enumerate(chunks) if names[i] not in kept]
    results = dict(kept)
    bar = tqdm(total=len(records), file=sys.stderr, disable=not progress, unit="rec", desc=f"{kind} {split}")
    bar.update(sum(r["count"] + len(r["skipped"]) for r in kept.values()))
    for result in _map(out, split, todo, workers, hf):
        results[result["name"]] = result
        bar.update(result["count"] + len(result["skipped"]))
        _save_section(out, kind, split, _finish_section(section, results, names))
    bar.close()
    section = _finish_section(section, results, names)
    section["complete"] = True
    _save_section(out, kind, split, section)
    bad = len(section["skipped"])
    summary = {"out": str(out), "split": split, "shards": len(names), "written": len(todo), "kept": len(kept),
               "samples": section["samples"], "records": total, "skipped": bad, "boxes": section["boxes"]}
    if total and bad / total > max_bad_fraction:
        raise DataError(f"{out / MANIFEST}: {bad} of {total} records skipped ({bad / total:.1%}) > "
                        f"max-bad-fraction {max_bad_fraction:.1%}; reasons in the manifest's skipped list")
    return summary


def _finish_section(section: dict, results: dict, names: list[str]) -> dict:
    done = [results[n] for n in names if n in results]
    section = dict(section)
    section["shards"] = [{k: r[k] for k in ("name", "count", "sha256", "bytes", "skipped", "boxes")} for r in done]
    section["samples"] = sum(r["count"] for r in done)
    section["skipped"] = section["read_skipped"] + [s for r in done for s in r["skipped"]]
    section["boxes"] = {k: sum(r["boxes"].get(k, 0) for r in done) for k in ("kept", "clipped", "dropped")}
    return section


def _map(out: Path, split: str, todo: list, workers: int, hf):
    """Write the shards of ``todo`` (in order with one worker, as finished with several)."""
    tasks = [(str(out), split, index, chunk) for index, chunk in todo]
    global _HF_SOURCE
    _HF_SOURCE = hf
    try:
        if workers == 1 or len(tasks) <= 1:
            yield from map(_write_shard, tasks)
            return
        # fork: workers inherit the imported modules (and the HF dataset) instead of re-importing torch.
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(min(workers, len(tasks))) as pool:
            yield from pool.imap_unordered(_write_shard, tasks)
    finally:
        _HF_SOURCE = None


# ----------------------------------------------------------------------- one shard

_HF_SOURCE = None  # (dataset, columns) while sharding a datasets.Dataset


class _HashingFile:
    """File wrapper that hashes what the tar writer writes (no second read of the shard)."""

    def __init__(self, raw):
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def _write_shard(task) -> dict:
    out_dir, split, index, chunk = task
    name = f"{split}-{index:06d}.tar"
    final = Path(out_dir) / name
    tmp = Path(out_dir) / f".{name}.{os.getpid()}.tmp"
    skipped: list[dict] = []
    boxes = {"kept": 0, "clipped": 0, "dropped": 0}
    count = 0
    try:
        with open(tmp, "wb") as raw:
            hashing = _HashingFile(raw)
            with TarWriter(hashing, encoder=False, mtime=0) as writer:
                for record in chunk:
                    try:
                        sample = _make_sample(record, boxes, skipped)
                    except _Skip as why:
                        skipped.append({"record": _record_name(record), "reason": str(why)})
                        continue
                    writer.write(sample)
                    count += 1
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return {"name": name, "count": count, "sha256": hashing.sha.hexdigest(), "bytes": hashing.size,
            "skipped": skipped, "boxes": boxes}


def _record_name(record: dict) -> str:
    meta = record["meta"]
    if "question_id" in meta:
        return f"question {meta['question_id']}"
    if "image_id" in meta:
        return f"image {meta['image_id']}"
    return f"row {record.get('hf_row', record['key'])}"


def _make_sample(record: dict, boxes: dict, dropped: list) -> dict:
    if "hf_row" in record:
        data, meta = _hf_row(record["hf_row"])
    else:
        data, meta = _read_file(record["image_path"]), dict(record["meta"])
    ext, data, width, height = _checked_image(data)
    if "objects" in meta:
        _check_size(meta, width, height)
        meta["objects"] = _clip_objects(meta["objects"], width, height, boxes, dropped, meta["image_id"])
    meta["width"], meta["height"] = width, height
    return {"__key__": record["key"], ext: data, "json": json.dumps(meta, sort_keys=True).encode()}


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError):
        raise _Skip(f"missing image file {path}") from None


def _checked_image(data: bytes) -> tuple[str, bytes, int, int]:
    """Fully decode once (catches truncation); keep JPEG/PNG bytes as stored, re-encode others as PNG."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # PIL raises many types for bad bytes
        raise _Skip(f"corrupt or truncated image ({type(err).__name__}: {err})") from None
    if image.format in ("JPEG", "PNG"):
        return ("jpg" if image.format == "JPEG" else "png"), data, image.width, image.height
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "png", buffer.getvalue(), image.width, image.height


def _check_size(meta: dict, width: int, height: int) -> None:
    declared = (meta.get("width"), meta.get("height"))
    if None not in declared and declared != (width, height):
        raise _Skip(f"image is {width}x{height} but the annotations say {declared[0]}x{declared[1]}")


def _clip_objects(objects: list[dict], width: int, height: int, boxes: dict, dropped: list, image_id) -> list[dict]:
    """Clip boxes to the image; drop (and list) boxes that are malformed or empty after clipping."""
    kept = []
    for obj in objects:
        bbox = obj.get("bbox")
        ok = isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)
        if ok and all(math.isfinite(v) for v in bbox):
            x, y, w, h = bbox
            x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)
            if x1 > x0 and y1 > y0:
                clipped = (x0, y0, x1, y1) != (x, y, x + w, y + h)
                boxes["clipped" if clipped else "kept"] += 1
                kept.append({"category": obj["category"], "bbox": [x0, y0, x1 - x0, y1 - y0],
                             "iscrowd": obj["iscrowd"], "area": obj.get("area"), "id": obj.get("id"),
                             **({"color": obj["color"]} if "color" in obj else {})})
                continue
        boxes["dropped"] += 1
        dropped.append({"record": f"annotation {obj.get('id')} (image {image_id})",
                        "reason": f"degenerate or out-of-image box {bbox} in {width}x{height} image",
                        "kind": "box"})
    return kept


def _hf_row(row: int) -> tuple[bytes, dict]:
    dataset, (image_col, question_col, answers_col) = _HF_SOURCE
    item = dataset[row]
    question = item[question_col]
    if not isinstance(question, str) or not question.strip():
        raise _Skip("empty question")
    answers = _answer_strings(item[answers_col])
    meta = {"question": question.strip(), "answers": answers, "answer": majority_answer(answers)}
    for column, value in item.items():  # other columns ride along (question_id, image_id, hard, ...)
        if column not in (image_col, question_col, answers_col) and column not in meta and _jsonable(value):
            meta[column] = value
    meta.setdefault("question_id", row)
    meta.setdefault("image_id", row)
    return _image_bytes(item[image_col]), meta


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _answer_strings(value) -> list[str]:
    """answers as a list of strings, a list of ``{"answer": ...}`` (HF VQAv2) or one string."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(a["answer"]) if isinstance(a, dict) else str(a) for a in value]


def _image_bytes(value) -> bytes:
    if isinstance(value, dict):  # datasets Image(decode=False): {"bytes", "path"}
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            return _read_file(value["path"])
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return _read_file(value)
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    raise _Skip(f"no image in column (got {type(value).__name__})")


def _undecoded_images(dataset, column: str):
    """Ask ``datasets`` for the stored image bytes instead of decoding to PIL and re-encoding."""
    from datasets import Image as ImageFeature

    if isinstance(dataset.features.get(column), ImageFeature):
        return dataset.cast_column(column, ImageFeature(decode=False))
    return dataset


# ------------------------------------------------------------------------ manifest


def _verified_shards(out: Path, kind: str, split: str, plan: str, names: list[str]) -> dict:
    """Shards of an earlier run of the same plan whose file still has the recorded sha256."""
    path = out / MANIFEST
    if not path.is_file():
        return {}
    manifest = readers.load_json(path)
    if manifest.get("kind") not in (None, kind):
        raise DataError(f"{path}: folder holds {manifest['kind']} shards; use another --out for {kind}")
    section = manifest.get("splits", {}).get(split)
    if not section or section.get("plan") != plan:
        return {}
    kept = {}
    for entry in section["shards"]:
        shard = out / entry["name"]
        if entry["name"] in names and shard.is_file() and _sha256(shard) == entry["sha256"]:
            kept[entry["name"]] = {**entry, "skipped": entry.get("skipped", [])}
    return kept


def _remove_stale(out: Path, split: str, names: set[str]) -> None:
    """Delete this split's shards that the current plan does not have (an older, longer plan)
    and temporary files of interrupted runs."""
    for path in out.glob(f".{split}-*.tmp"):
        path.unlink()
    for path in out.glob(f"{split}-*.tar"):
        match = _SHARD_RE.match(path.name)
        if match and match.group("split") == split and path.name not in names:
            path.unlink()


@contextlib.contextmanager
def _locked(out: Path):
    with open(out / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _save_section(out: Path, kind: str, split: str, section: dict) -> None:
    """Read-modify-write the manifest under a lock (other splits may share the folder)."""
    path = out / MANIFEST
    with _locked(out):
        manifest = readers.load_json(path) if path.is_file() else {}
        splits = manifest.get("splits", {})
        splits[split] = {k: v for k, v in section.items() if k != "read_skipped"}
        shards = [{"name": s["name"], "split": name, "count": s["count"], "sha256": s["sha256"]}
                  for name, sec in sorted(splits.items()) for s in sec["shards"]]
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "kind": kind,
            "totals": {"shards": len(shards), "samples": sum(s["count"] for s in shards),
                       "skipped": sum(len(sec["skipped"]) for sec in splits.values()),
                       "records": sum(sec["records"] for sec in splits.values())},
            "shards": shards,
            "splits": splits,
        }
        tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, path)


def _check_shard(path: Path, entry: dict) -> str:
    if not path.is_file():
        return "missing"
    if _sha256(path) != entry["sha256"]:
        try:
            count = sum(1 for _ in iter_shard(path))
        except DataError as err:
            return f"damaged: sha256 mismatch; {str(err).split(': ', 1)[1]}"
        return f"damaged: sha256 mismatch ({count} samples readable, manifest says {entry['count']})"
    count = sum(1 for _ in iter_shard(path))
    return "ok" if count == entry["count"] else f"damaged: {count} samples, manifest says {entry['count']}"


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _file_fingerprint(path) -> dict:
    path = Path(path)
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": _sha256(path)}


def _images_fingerprint(images_dir, records: list[dict]) -> dict:
    """Folder, file count and total bytes of the referenced images (stat only, no reading)."""
    present, total = 0, 0
    for record in records:
        with contextlib.suppress(OSError):
            total += os.stat(record["image_path"]).st_size
            present += 1
    return {"path": str(Path(images_dir).resolve()), "files": present, "bytes": total}

