import hashlib
import json
from collections import Counter

import numpy as np
from PIL import Image

from data_prep.synth import CATEGORY_IDS, HARD_FLAGS, SceneObject, fill_of, generate, make_scene, render
from data_prep.vocab import COLORS
from data_prep.vqa_norm import majority_answer


def _digest(folder):
    sha = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        sha.update(path.name.encode())
        sha.update(path.read_bytes())
    return sha.hexdigest()


def _load(folder, name):
    return json.loads((folder / name).read_text())


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    generate(tmp_path / "a", images=8, seed=5, image_size=48)
    generate(tmp_path / "b", images=8, seed=5, image_size=48)
    generate(tmp_path / "c", images=8, seed=6, image_size=48)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_coco_instances_follow_the_real_format(synth_raw):
    train, val = _load(synth_raw, "instances_train.json"), _load(synth_raw, "instances_val.json")
    assert len(train["images"]) == 24 and len(val["images"]) == 6
    assert {i["id"] for i in train["images"]}.isdisjoint({i["id"] for i in val["images"]})
    ids = sorted(c["id"] for c in train["categories"])
    assert ids == sorted(CATEGORY_IDS.values()) and ids != list(range(1, len(ids) + 1))  # non-contiguous
    images = {i["id"]: i for i in train["images"]}
    for ann in train["annotations"]:
        x, y, w, h = ann["bbox"]
        image = images[ann["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= image["width"] and y + h <= image["height"]
        assert ann["iscrowd"] == 0 and ann["area"] > 0
    formats = Counter(Image.open(synth_raw / "images" / i["file_name"]).format for i in train["images"] + val["images"])
    assert formats["JPEG"] > 0 and formats["PNG"] > 0


def test_vqav2_files_follow_the_real_format(synth_raw):
    questions = _load(synth_raw, "questions_train.json")
    annotations = _load(synth_raw, "annotations_train.json")
    assert {"info", "license", "data_subtype", "questions"} <= questions.keys()
    assert {"info", "license", "data_subtype", "annotations"} <= annotations.keys()
    by_qid = {a["question_id"]: a for a in annotations["annotations"]}
    assert len(by_qid) == len(questions["questions"])
    for q in questions["questions"]:
        ann = by_qid[q["question_id"]]
        assert ann["image_id"] == q["image_id"]
        assert len(ann["answers"]) == 10
        assert [a["answer_id"] for a in ann["answers"]] == list(range(1, 11))
        assert {a["answer_confidence"] for a in ann["answers"]} <= {"yes", "maybe", "no"}
        assert majority_answer([a["answer"] for a in ann["answers"]]) == ann["multiple_choice_answer"]
        assert set(q["hard"]) <= set(HARD_FLAGS)
    types = {a["question_type"] for a in annotations["annotations"]}
    assert types == {"what color is the", "is there a", "where is the", "how many"}


def test_answers_are_noisy_so_normalisation_matters(tmp_path):
    generate(tmp_path, images=40, seed=2, image_size=48)
    anns = _load(tmp_path, "annotations_train.json")["annotations"]
    raw = [a["answer"] for ann in anns for a in ann["answers"]]
    assert any(r != r.lower() or r.endswith((".", "!")) for r in raw)
    assert any(r in ("one", "two", "three", "zero") for r in raw)


def test_hard_flags_are_recorded_on_images_and_questions(tmp_path):
    generate(tmp_path, images=60, seed=4, image_size=64)
    coco = _load(tmp_path, "instances_train.json")
    image_flags = {f for i in coco["images"] for f in i["hard"]}
    question_flags = {f for q in _load(tmp_path, "questions_train.json")["questions"] for f in q["hard"]}
    assert image_flags == set(HARD_FLAGS)
    assert question_flags == set(HARD_FLAGS)
    small = [a for a in coco["annotations"] if a["bbox"][2] <= 0.08 * 64 and a["bbox"][3] <= 0.08 * 64]
    assert small  # small objects really are small


def test_answers_match_the_pixels(tmp_path):
    """Colour answers are the colour drawn in the box; "where" answers match the box centre."""
    generate(tmp_path, images=120, seed=8, image_size=96)
    coco = _load(tmp_path, "instances_train.json")
    names = {c["id"]: c["name"] for c in coco["categories"]}
    images = {i["id"]: i for i in coco["images"]}
    checked = faint = 0
    for ann in coco["annotations"]:
        image = images[ann["image_id"]]
        if names[ann["category_id"]] not in ("square", "circle") or not image["file_name"].endswith(".png"):
            continue
        x, y, w, h = ann["bbox"]
        others = [a for a in coco["annotations"] if a["image_id"] == ann["image_id"] and a["id"] > ann["id"]]
        cx, cy = int(x + w / 2), int(y + h / 2)
        if any(o["bbox"][0] <= cx < o["bbox"][0] + o["bbox"][2] and o["bbox"][1] <= cy < o["bbox"][1] + o["bbox"][3]
               for o in others):
            continue  # drawn over by a later object
        pixels = np.asarray(Image.open(tmp_path / "images" / image["file_name"]).convert("RGB"))
        pixel = tuple(int(v) for v in pixels[cy, cx])
        if pixel != COLORS[ann["color"]]:  # only a faint object may differ: its colour toward the background
            values, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
            background = tuple(int(v) for v in values[counts.argmax()])
            assert "low_contrast" in image["hard"], (image["file_name"], ann["color"], pixel)
            assert pixel == fill_of(SceneObject("square", ann["color"], (0, 0, 1, 1), {"low_contrast"}), background)
            faint += 1
        checked += 1
    assert checked >= 5 and faint >= 1
    questions = _load(tmp_path, "questions_train.json")["questions"]
    anns = {a["question_id"]: a for a in _load(tmp_path, "annotations_train.json")["annotations"]}
    for q in questions:
        if not q["question"].startswith("where is the"):
            continue
        color, shape = q["question"][len("where is the "):-1].split()
        (box,) = [a["bbox"] for a in coco["annotations"] if a["image_id"] == q["image_id"]
                  and a["color"] == color and names[a["category_id"]] == shape]
        dx, dy = box[0] + box[2] / 2 - 48, box[1] + box[3] / 2 - 48
        expected = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("bottom" if dy > 0 else "top")
        assert anns[q["question_id"]]["multiple_choice_answer"] == expected


def test_describe_names_objects_by_band_then_left_to_right():
    from data_prep.synth import describe

    objects = [
        {"category": "square", "bbox": [160, 10, 40, 40], "color": "blue"},   # top band, right
        {"category": "circle", "bbox": [10, 110, 30, 30], "color": "red"},    # middle band, left
        {"category": "cross", "bbox": [100, 12, 30, 30]},                     # top band, no colour
        {"category": "ring", "bbox": [113, 113, 30, 30], "color": "white"},   # centre: no side
    ]
    assert describe(objects, 256, 256) == "cross top . blue square top . red circle left . white ring"
    assert describe([], 256, 256) is None


def test_low_contrast_objects_are_faint_on_an_untinted_background():
    """A low-contrast object is drawn nearer the background than its named colour; the
    background stays the scene's grey, so the image does not give the colour away."""
    import random

    scenes = [make_scene(random.Random(f"faint:{i}"), 64) for i in range(200)]
    faint = [(s, o) for s in scenes for o in s.objects if "low_contrast" in o.flags]
    assert faint
    probed = 0
    for scene, obj in faint:
        r, g, b = scene.background
        assert max(r, g, b) - min(r, g, b) <= 20  # a grey, as in every scene
        if obj.shape in ("ring", "cross"):
            continue  # their centre is off the stroke
        x0, y0, x1, y1 = obj.box
        probe = (x0 + (x1 - x0) // 2, y1 - 2 if obj.shape == "triangle" else y0 + (y1 - y0) // 2)
        pixel = render(scene, 64).getpixel(probe)  # the faint object is the last drawn: on top
        if pixel == scene.background:
            continue  # a thin shape the probe missed
        to_background = sum(abs(p - q) for p, q in zip(pixel, scene.background))
        to_named = sum(abs(p - q) for p, q in zip(pixel, COLORS[obj.color]))
        assert to_background < to_named, (obj, pixel)
        probed += 1
    assert probed >= 5
