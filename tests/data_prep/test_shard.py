import json
import os

import numpy as np
import pytest
from data_files import save_image, write_json
from PIL import Image

from arr_coc.errors import DataError
from data_prep.loader import ShardLoader
from data_prep.shard import inspect, read_manifest, shard_coco, shard_hf_dataset, shard_urls, shard_vqav2
from data_prep.tario import iter_shard


def _one_epoch(urls, **kw):
    loader = ShardLoader(urls, batch_size=2, seed=1, epochs=1, **kw)
    return [sample for batch in loader for sample in batch]


def _pixels(image):
    return np.asarray(image.convert("RGB"))


def _coco(synth_raw, out, split="train", **kw):
    kw.setdefault("progress", False)
    return shard_coco(synth_raw / f"instances_{split}.json", synth_raw / "images", out, shard_size=5, **kw)


def test_coco_round_trip_gives_every_image_once_with_identical_content(synth_raw, tmp_path):
    summary = _coco(synth_raw, tmp_path)
    assert summary["samples"] == 24 and summary["shards"] == 5 and summary["skipped"] == 0
    source = json.loads((synth_raw / "instances_train.json").read_text())
    names = {c["id"]: c["name"] for c in source["categories"]}
    samples = _one_epoch(shard_urls(tmp_path, "train"))
    assert sorted(s["json"]["image_id"] for s in samples) == sorted(i["id"] for i in source["images"])
    images = {i["id"]: i for i in source["images"]}
    for sample in samples:
        meta = sample["json"]
        image = images[meta["image_id"]]
        expected = [(names[a["category_id"]], a["bbox"]) for a in source["annotations"] if a["image_id"] == image["id"]]
        assert [(o["category"], o["bbox"]) for o in meta["objects"]] == expected
        assert (meta["width"], meta["height"], meta["hard"]) == (image["width"], image["height"], image["hard"])
        assert sample["image"].mode == "RGB"
        assert np.array_equal(_pixels(sample["image"]), _pixels(Image.open(synth_raw / "images" / image["file_name"])))


def test_vqav2_round_trip_gives_every_question_once(synth_raw, tmp_path):
    summary = shard_vqav2(synth_raw / "questions_train.json", synth_raw / "annotations_train.json",
                          synth_raw / "images", tmp_path, shard_size=16, workers=2, progress=False)
    questions = json.loads((synth_raw / "questions_train.json").read_text())["questions"]
    anns = {a["question_id"]: a for a in json.loads((synth_raw / "annotations_train.json").read_text())["annotations"]}
    assert summary["samples"] == len(questions)
    samples = _one_epoch(shard_urls(tmp_path, "train"))
    by_qid = {s["json"]["question_id"]: s for s in samples}
    assert len(by_qid) == len(samples) == len(questions)
    for q in questions:
        meta = by_qid[q["question_id"]]["json"]
        ann = anns[q["question_id"]]
        assert meta["question"] == q["question"] and meta["image_id"] == q["image_id"]
        assert meta["answers"] == [a["answer"] for a in ann["answers"]]
        assert meta["answer"] == ann["multiple_choice_answer"]
        assert meta["hard"] == q["hard"]


def test_manifest_records_counts_checksums_sources_and_both_splits(synth_raw, tmp_path):
    _coco(synth_raw, tmp_path, "train")
    _coco(synth_raw, tmp_path, "val")
    manifest = read_manifest(tmp_path)
    assert manifest["schema_version"] == 1 and manifest["kind"] == "coco"
    assert manifest["totals"]["samples"] == 30 and manifest["totals"]["shards"] == 7
    for entry in manifest["shards"]:
        assert entry["count"] == sum(1 for _ in iter_shard(tmp_path / entry["name"]))
    train = manifest["splits"]["train"]
    assert train["complete"] and train["sources"]["annotations"]["sha256"]
    assert train["sources"]["images"]["files"] == 24
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == sorted(e["name"] for e in manifest["shards"])
    assert not list(tmp_path.glob(".*.tmp"))
    assert inspect(tmp_path)["ok"]


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.tar")}


def test_rerun_keeps_verified_shards_and_rewrites_only_missing_or_damaged(synth_raw, tmp_path):
    _coco(synth_raw, tmp_path)
    before = _mtimes(tmp_path)
    shas = {e["name"]: e["sha256"] for e in read_manifest(tmp_path)["shards"]}
    again = _coco(synth_raw, tmp_path)
    assert (again["written"], again["kept"]) == (0, 5) and _mtimes(tmp_path) == before

    (tmp_path / "train-000001.tar").unlink()
    path = tmp_path / "train-000003.tar"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert not inspect(tmp_path)["ok"]
    repaired = _coco(synth_raw, tmp_path)
    assert (repaired["written"], repaired["kept"]) == (2, 3)
    after = _mtimes(tmp_path)
    assert {n for n in after if after[n] != before[n]} == {"train-000001.tar", "train-000003.tar"}
    assert {e["name"]: e["sha256"] for e in read_manifest(tmp_path)["shards"]} == shas  # byte-identical rewrite
    assert inspect(tmp_path)["ok"]


def test_parallel_workers_write_the_same_shards(synth_raw, tmp_path):
    _coco(synth_raw, tmp_path / "one", workers=1)
    _coco(synth_raw, tmp_path / "two", workers=2)
    assert read_manifest(tmp_path / "one")["shards"] == read_manifest(tmp_path / "two")["shards"]


def test_changed_options_rewrite_and_drop_stale_shards(synth_raw, tmp_path):
    _coco(synth_raw, tmp_path)
    shard_coco(synth_raw / "instances_train.json", synth_raw / "images", tmp_path, shard_size=12, progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    with pytest.raises(DataError, match="holds coco shards"):
        shard_vqav2(synth_raw / "questions_train.json", synth_raw / "annotations_train.json", synth_raw / "images",
                    tmp_path, progress=False)


def _bad_coco(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    save_image(images / "1.jpg")
    save_image(images / "2.jpg", mode="CMYK")
    save_image(images / "3.jpg", mode="L")
    save_image(images / "4.png", mode="RGBA")
    save_image(images / "5.png", mode="P")
    save_image(images / "6.png", mode="I;16")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    noise.save(images / "7.jpg", quality=95)
    data = (images / "7.jpg").read_bytes()
    (images / "7.jpg").write_bytes(data[: len(data) * 6 // 10])  # truncated JPEG
    (images / "8.jpg").write_bytes(b"not an image at all")
    save_image(images / "10.jpg", size=(32, 32))  # size disagrees with the annotations
    entries = [{"id": i, "file_name": f"{i}.{'png' if i in (4, 5, 6) else 'jpg'}", "width": 64, "height": 48}
               for i in range(1, 11)]
    boxes = [[10, 10, 20, 20],  # fine
             [0, 5, 0, 10],  # zero width: dropped
             [100, 100, 5, 5],  # outside the image: dropped
             [50, 40, 30, 20],  # partly outside: clipped to [50, 40, 14, 8]
             [-5, -5, 10, 10],  # partly outside: clipped to [0, 0, 5, 5]
             "oops"]  # malformed: dropped
    anns = [{"id": 100 + k, "image_id": 1, "category_id": 7, "bbox": b, "area": 1, "iscrowd": 0}
            for k, b in enumerate(boxes)]
    anns.append({"id": 200, "image_id": 555, "category_id": 7, "bbox": [1, 1, 2, 2], "area": 4, "iscrowd": 0})
    path = write_json(tmp_path / "instances_train.json",
                      {"images": entries, "annotations": anns, "categories": [{"id": 7, "name": "dog"}]})
    return path, images


def test_bad_input_is_converted_clipped_or_skipped_and_counted(tmp_path):
    annotations, images = _bad_coco(tmp_path)
    out = tmp_path / "shards"
    summary = shard_coco(annotations, images, out, shard_size=4, max_bad_fraction=1.0, progress=False)
    assert summary["samples"] == 6
    assert summary["boxes"] == {"kept": 1, "clipped": 2, "dropped": 3}
    skipped = read_manifest(out)["splits"]["train"]["skipped"]
    reasons = {s["record"]: s["reason"] for s in skipped}
    assert "corrupt or truncated image" in reasons["image 7"] and "corrupt or truncated image" in reasons["image 8"]
    assert reasons["image 9"].startswith("missing image file") and reasons["image 9"].endswith("9.jpg")
    assert reasons["image 10"] == "image is 32x32 but the annotations say 64x48"
    assert reasons["annotation 200"] == "unknown image_id 555"
    assert "degenerate or out-of-image box [0, 5, 0, 10]" in reasons["annotation 101 (image 1)"]
    assert "annotation 105 (image 1)" in reasons
    samples = {s["json"]["image_id"]: s for s in _one_epoch(shard_urls(out, "train"))}
    assert sorted(samples) == [1, 2, 3, 4, 5, 6]
    for sample in samples.values():  # CMYK, grayscale, RGBA, palette and 16-bit PNG all decode to RGB
        assert sample["image"].mode == "RGB" and sample["image"].size == (64, 48)
    assert [o["bbox"] for o in samples[1]["json"]["objects"]] == [[10, 10, 20, 20], [50, 40, 14, 8], [0, 0, 5, 5]]
    red = _pixels(samples[2]["image"])[10, 10]
    assert red[0] > 150 and red[1] < 90  # the CMYK image is still red after conversion


def test_max_bad_fraction_fails_with_counts_after_writing_the_manifest(tmp_path):
    annotations, images = _bad_coco(tmp_path)
    out = tmp_path / "shards"
    # 17 records: 10 images + 6 annotations on image 1 + 1 annotation of an unknown image;
    # 8 bad: 4 unreadable images, 3 dropped boxes, the orphan annotation.
    with pytest.raises(DataError, match=r"8 of 17 records skipped \(47.1%\) > max-bad-fraction 5.0%"):
        shard_coco(annotations, images, out, shard_size=4, progress=False)
    assert len(read_manifest(out)["splits"]["train"]["skipped"]) == 8


def test_empty_question_is_a_counted_skip(synth_raw, tmp_path):
    questions = json.loads((synth_raw / "questions_val.json").read_text())
    questions["questions"][0]["question"] = ""
    path = write_json(tmp_path / "questions_val.json", questions)
    summary = shard_vqav2(path, synth_raw / "annotations_val.json", synth_raw / "images", tmp_path / "out",
                          max_bad_fraction=0.5, progress=False)
    assert summary["skipped"] == 1
    (entry,) = read_manifest(tmp_path / "out")["splits"]["val"]["skipped"]
    assert entry == {"record": f"question {questions['questions'][0]['question_id']}", "reason": "empty question"}


def test_hf_dataset_shards_through_the_same_writer(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (40, 30), (10 * i, 200, 30)) for i in range(6)]
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answers": datasets.Sequence(datasets.Value("string")),
                                  "question_id": datasets.Value("int64"),
                                  "hard": datasets.Sequence(datasets.Value("string"))})
    table = datasets.Dataset.from_dict(
        {"image": images, "question": [f"is there a red circle {i}?" for i in range(6)],
         "answers": [["Yes", "yes.", "no"]] * 6, "question_id": [50 + i for i in range(6)],
         "hard": [["small"] if i % 2 else [] for i in range(6)]}, features=features)
    table.save_to_disk(str(tmp_path / "saved"))
    summary = shard_hf_dataset(datasets.load_from_disk(str(tmp_path / "saved")), tmp_path / "out", split="train",
                               shard_size=2, workers=2, progress=False)
    assert summary["samples"] == 6 and summary["shards"] == 3
    samples = sorted(_one_epoch(shard_urls(tmp_path / "out", "train")), key=lambda s: s["json"]["question_id"])
    for i, sample in enumerate(samples):
        assert sample["json"]["question_id"] == 50 + i and sample["json"]["answer"] == "yes"
        assert sample["json"]["answers"] == ["Yes", "yes.", "no"]
        assert sample["json"]["hard"] == (["small"] if i % 2 else [])
        assert np.array_equal(_pixels(sample["image"]), _pixels(images[i]))
    assert os.path.isfile(tmp_path / "out" / "manifest.json")
