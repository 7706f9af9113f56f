"""Readers for COCO instances and VQAv2 question/annotation files -> shard records.

A *record* is what one shard sample is made of before its image is read::

    {"key": str, "image_path": str, "meta": dict}

``meta`` becomes the sample's ``.json`` once the image has been checked (boxes are clipped
to the real image size then). Readers return ``(records, skipped)``; ``skipped`` lists
``{"record": ..., "reason": ...}`` for input that cannot become a sample. Malformed JSON
is a ``DataError`` naming the file and position; a missing key names the file and key.

* ``read_coco(annotations, images_dir)``: 2014 and 2017 files, non-contiguous category
  ids, crowd regions (kept, flagged ``iscrowd``), images without annotations (kept with no
  objects), annotations with an unknown image or category id (skipped, counted).
* ``read_vqav2(questions, annotations | None, images_dir, split)``: joined by
  ``question_id``; ``answer`` is the most frequent answer after the official
  normalisation. Without an annotations file (test splits) every question is kept with no
  answers; with one, a question lacking an annotation is skipped unless the split is a
  test split.
* ``image_index(images_dir)``: image id -> file for folders named like COCO
  (``COCO_train2014_000000000009.jpg``, ``000000000009.jpg``) or the synthetic set.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from arr_coc.errors import DataError
from data_prep.vqa_norm import majority_answer

_SPLIT_RE = re.compile(r"(train|val|test)")
_IMAGE_ID_RE = re.compile(r"(\d+)\.(jpe?g|png)$", re.IGNORECASE)


def infer_split(path: str | Path) -> str:
    """``train``/``val``/``test`` from a file name (``instances_val2017.json`` -> ``val``), else ``train``."""
    match = _SPLIT_RE.search(Path(path).name.lower())
    return match.group(1) if match else "train"


def load_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level must be a JSON object")
    return data


def _list_field(data: dict, key: str, path: str | Path) -> list:
    if key not in data:
        raise DataError(f"{path}: missing key {key!r}")
    if not isinstance(data[key], list):
        raise DataError(f"{path}: {key!r} must be a list")
    return data[key]


def _field(entry: dict, key: str, path: str | Path, where: str):
    if not isinstance(entry, dict) or key not in entry:
        raise DataError(f"{path}: {where}: missing key {key!r}")
    return entry[key]


# ------------------------------------------------------------------------------- COCO


def read_coco(annotations: str | Path, images_dir: str | Path) -> tuple[list[dict], list[dict]]:
    data = load_json(annotations)
    images = _list_field(data, "images", annotations)
    anns = _list_field(data, "annotations", annotations)
    cats = _list_field(data, "categories", annotations)
    category_names = {
        _field(c, "id", annotations, f"categories[{i}]"): _field(c, "name", annotations, f"categories[{i}]")
        for i, c in enumerate(cats)
    }
    skipped: list[dict] = []
    by_id: dict[int, dict] = {}
    for i, image in enumerate(images):
        image_id = _field(image, "id", annotations, f"images[{i}]")
        if image_id in by_id:
            skipped.append({"record": f"image {image_id}", "reason": "duplicate image id"})
            continue
        by_id[image_id] = image
    objects: dict[int, list[dict]] = {image_id: [] for image_id in by_id}
    for i, ann in enumerate(anns):
        ann_id = ann.get("id", f"#{i}") if isinstance(ann, dict) else f"#{i}"
        image_id = _field(ann, "image_id", annotations, f"annotations[{i}]")
        if image_id not in by_id:
            skipped.append({"record": f"annotation {ann_id}", "reason": f"unknown image_id {image_id}"})
            continue
        category_id = ann.get("category_id")
        if category_id not in category_names:
            skipped.append({"record": f"annotation {ann_id}", "reason": f"unknown category_id {category_id}"})
            continue
        obj = {
            "id": ann_id,
            "category": category_names[category_id],
            "bbox": ann.get("bbox"),
            "iscrowd": bool(ann.get("iscrowd", 0)),
            "area": ann.get("area"),
        }
        if isinstance(ann.get("color"), str):  # an attribute some sources carry (the synthetic scenes do)
            obj["color"] = ann["color"]
        objects[image_id].append(obj)
    records = []
    for image_id in sorted(by_id, key=_sort_key):
        image = by_id[image_id]
        file_name = _field(image, "file_name", annotations, f"image {image_id}")
        meta = {
            "image_id": image_id,
            "file_name": file_name,
            "width": image.get("width"),
            "height": image.get("height"),
            "objects": objects[image_id],
        }
        if "hard" in image:
            meta["hard"] = list(image["hard"])
        records.append({"key": _key(image_id), "image_path": str(Path(images_dir) / file_name), "meta": meta})
    return records, skipped


def _sort_key(value) -> tuple:
    return (0, value, "") if isinstance(value, int) else (1, 0, str(value))


def _key(value) -> str:
    """A webdataset key: zero-padded ids; no dots (they separate key from extension)."""
    if isinstance(value, int):
        return f"{value:015d}"
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(value))


# ------------------------------------------------------------------------------ VQAv2


def image_index(images_dir: str | Path) -> dict[int, str]:
    """Image id -> path, from the trailing digits of each image file name."""
    index: dict[int, str] = {}
    try:
        entries = sorted(os.scandir(images_dir), key=lambda e: e.name)
    except FileNotFoundError:
        raise DataError(f"{images_dir}: image folder not found") from None
    for entry in entries:
        match = _IMAGE_ID_RE.search(entry.name)
        if not match or not entry.is_file():
            continue
        image_id = int(match.group(1))
        if image_id in index:
            raise DataError(f"{images_dir}: image id {image_id} is ambiguous: {Path(index[image_id]).name}, {entry.name}")
        index[image_id] = entry.path
    return index


def read_vqav2(questions: str | Path, annotations: str | Path | None, images_dir: str | Path,
               split: str) -> tuple[list[dict], list[dict]]:
    qdata = load_json(questions)
    question_list = _list_field(qdata, "questions", questions)
    answers_by_qid: dict = {}
    skipped: list[dict] = []
    if annotations is not None:
        adata = load_json(annotations)
        for i, ann in enumerate(_list_field(adata, "annotations", annotations)):
            qid = _field(ann, "question_id", annotations, f"annotations[{i}]")
            answers_by_qid[qid] = ann
    files = image_index(images_dir)
    seen: set = set()
    asked: set = set()
    records = []
    for i, q in enumerate(question_list):
        qid = _field(q, "question_id", questions, f"questions[{i}]")
        asked.add(qid)
        image_id = _field(q, "image_id", questions, f"questions[{i}]")
        text = q.get("question")
        reason = _question_problem(qid, image_id, text, seen, answers_by_qid, annotations, split)
        if reason:
            skipped.append({"record": f"question {qid}", "reason": reason})
            continue
        seen.add(qid)
        ann = answers_by_qid.get(qid)
        raw_answers = [str(a.get("answer", "")) for a in ann.get("answers", [])] if ann else []
        meta = {"question_id": qid, "image_id": image_id, "question": text.strip(), "answers": raw_answers,
                "answer": majority_answer(raw_answers)}
        for key in ("question_type", "answer_type", "multiple_choice_answer"):
            if ann and key in ann:
                meta[key] = ann[key]
        if "hard" in q:
            meta["hard"] = list(q["hard"])
        image_path = files.get(image_id) if isinstance(image_id, int) else None
        records.append({"key": _key(qid), "image_path": image_path or f"<no file for image_id {image_id}>",
                        "meta": meta})
    for qid in answers_by_qid:
        if qid not in asked:
            skipped.append({"record": f"annotation {qid}", "reason": "annotation for unknown question_id"})
    records.sort(key=lambda r: _sort_key(r["meta"]["question_id"]))
    return records, skipped


def _question_problem(qid, image_id, text, seen, answers_by_qid, annotations, split) -> str | None:
    if qid in seen:
        return "duplicate question_id"
    if not isinstance(text, str) or not text.strip():
        return "empty question"
    ann = answers_by_qid.get(qid)
    if annotations is not None and ann is None and not split.startswith("test"):
        return "no annotation for question_id"
    if ann is not None and ann.get("image_id", image_id) != image_id:
        return f"annotation image_id {ann.get('image_id')} != question image_id {image_id}"
    return None
