import pytest
from data_files import save_image, write_json

from arr_coc.errors import DataError
from data_prep.readers import image_index, infer_split, read_coco, read_vqav2


def _coco_2017(tmp_path):
    """A real-style instances file: 2017 names, gaps in category ids, a crowd RLE, an empty image."""
    images = tmp_path / "val2017"
    images.mkdir()
    for image_id in (9, 25, 30):
        save_image(images / f"{image_id:012d}.jpg")
    data = {
        "info": {"year": 2017}, "licenses": [],
        "images": [
            {"id": 25, "file_name": "000000000025.jpg", "width": 64, "height": 48},
            {"id": 9, "file_name": "000000000009.jpg", "width": 64, "height": 48},
            {"id": 30, "file_name": "000000000030.jpg", "width": 64, "height": 48},  # no annotations
        ],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                       {"id": 90, "name": "toothbrush", "supercategory": "indoor"}],
        "annotations": [
            {"id": 1, "image_id": 9, "category_id": 90, "bbox": [1.5, 2.0, 10.0, 8.0], "area": 80, "iscrowd": 0,
             "segmentation": [[1.5, 2, 11.5, 2, 11.5, 10]]},
            {"id": 2, "image_id": 9, "category_id": 1, "bbox": [0, 0, 64, 30], "area": 900, "iscrowd": 1,
             "segmentation": {"counts": [0, 10, 20], "size": [48, 64]}},
            {"id": 3, "image_id": 25, "category_id": 1, "bbox": [5, 5, 5, 5], "area": 25, "iscrowd": 0},
            {"id": 4, "image_id": 777, "category_id": 1, "bbox": [5, 5, 5, 5], "area": 25, "iscrowd": 0},
            {"id": 5, "image_id": 25, "category_id": 12, "bbox": [5, 5, 5, 5], "area": 25, "iscrowd": 0},
        ],
    }
    return write_json(tmp_path / "instances_val2017.json", data), images


def test_coco_reader_handles_real_files(tmp_path):
    annotations, images = _coco_2017(tmp_path)
    records, skipped = read_coco(annotations, images)
    assert [r["meta"]["image_id"] for r in records] == [9, 25, 30]  # sorted by id
    first = records[0]["meta"]
    assert [(o["category"], o["iscrowd"]) for o in first["objects"]] == [("toothbrush", False), ("person", True)]
    assert records[2]["meta"]["objects"] == []  # kept: an image with nothing annotated
    assert records[0]["image_path"].endswith("val2017/000000000009.jpg")
    reasons = {s["record"]: s["reason"] for s in skipped}
    assert reasons == {"annotation 4": "unknown image_id 777", "annotation 5": "unknown category_id 12"}


def test_malformed_json_names_file_and_position(tmp_path):
    bad = tmp_path / "instances_train2014.json"
    bad.write_text('{"images": [\n  {"id": 1,, }]}')
    with pytest.raises(DataError, match=r"instances_train2014.json: malformed JSON at line 2 column 12"):
        read_coco(bad, tmp_path)


def test_missing_key_is_named(tmp_path):
    path = write_json(tmp_path / "instances_train.json", {"images": [], "annotations": []})
    with pytest.raises(DataError, match="missing key 'categories'"):
        read_coco(path, tmp_path)


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("instances_val2017.json", "val"),
        ("instances_train2014.json", "train"),
        ("v2_OpenEnded_mscoco_train2014_questions.json", "train"),
        ("v2_mscoco_val2014_annotations.json", "val"),
        ("v2_OpenEnded_mscoco_test-dev2015_questions.json", "test"),
        ("my_questions.json", "train"),
    ],
)
def test_split_is_inferred_from_the_file_name(name, split):
    assert infer_split(f"/data/{name}") == split


def test_image_index_reads_coco_2014_2017_and_synthetic_names(tmp_path):
    for name in ("COCO_train2014_000000000009.jpg", "000000000010.jpg", "synth_val_000000000013.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    index = image_index(tmp_path)
    assert sorted(index) == [9, 10, 13]
    (tmp_path / "COCO_val2014_000000000010.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="image id 10 is ambiguous"):
        image_index(tmp_path)


def _vqa(tmp_path, questions, annotations):
    images = tmp_path / "train2014"
    images.mkdir(exist_ok=True)
    for image_id in (1, 2):
        save_image(images / f"COCO_train2014_{image_id:012d}.jpg")
    q = write_json(tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json",
                   {"info": {}, "license": {}, "data_subtype": "train2014", "questions": questions})
    a = None
    if annotations is not None:
        a = write_json(tmp_path / "v2_mscoco_train2014_annotations.json",
                       {"info": {}, "license": {}, "data_subtype": "train2014", "annotations": annotations})
    return q, a, images


def _ann(qid, image_id, answers):
    return {"question_id": qid, "image_id": image_id, "question_type": "how many", "answer_type": "number",
            "multiple_choice_answer": answers[0],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}


def test_vqav2_joins_by_question_id_not_list_order(tmp_path):
    questions = [{"image_id": 1, "question": "How many dogs?", "question_id": 10},
                 {"image_id": 2, "question": "Is it red?", "question_id": 20},
                 {"image_id": 2, "question": "   ", "question_id": 30},
                 {"image_id": 1, "question": "What is it?", "question_id": 40}]
    annotations = [_ann(20, 2, ["Yes", "yes.", "no"]),  # reversed order on purpose
                   _ann(10, 1, ["two", "2", "3", "Two!"]),
                   _ann(30, 2, ["x"]),
                   _ann(99, 1, ["y"])]
    q, a, images = _vqa(tmp_path, questions, annotations)
    records, skipped = read_vqav2(q, a, images, "train")
    by_qid = {r["meta"]["question_id"]: r["meta"] for r in records}
    assert sorted(by_qid) == [10, 20]
    assert by_qid[10]["answers"] == ["two", "2", "3", "Two!"] and by_qid[10]["answer"] == "2"
    assert by_qid[20]["answer"] == "yes" and by_qid[20]["question"] == "Is it red?"
    assert records[0]["image_path"].endswith("COCO_train2014_000000000001.jpg")
    reasons = {s["record"]: s["reason"] for s in skipped}
    assert reasons == {"question 30": "empty question", "question 40": "no annotation for question_id",
                       "annotation 99": "annotation for unknown question_id"}


def test_vqav2_test_split_keeps_questions_without_answers(tmp_path):
    questions = [{"image_id": 1, "question": "How many dogs?", "question_id": 10}]
    q, _, images = _vqa(tmp_path, questions, None)
    records, skipped = read_vqav2(q, None, images, "test")
    assert skipped == [] and records[0]["meta"]["answers"] == [] and records[0]["meta"]["answer"] is None


def test_vqav2_image_id_mismatch_is_skipped(tmp_path):
    questions = [{"image_id": 1, "question": "How many dogs?", "question_id": 10}]
    q, a, images = _vqa(tmp_path, questions, [_ann(10, 2, ["2"])])
    records, skipped = read_vqav2(q, a, images, "train")
    assert records == [] and "annotation image_id 2 != question image_id 1" in skipped[0]["reason"]
