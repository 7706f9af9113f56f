import json
import random

from data_prep.masks import stage1_queries
from data_prep.synth import _alternative, _surface_variant, generate
from data_prep.vocab import (
    ANSWER_SYNONYMS,
    COLORS,
    NUMBER_ANSWERS,
    SHAPES,
    WHERE_ANSWERS,
    plural,
    split_words,
    vocabulary,
)


def test_every_generated_word_is_in_the_vocabulary(tmp_path):
    generate(tmp_path, images=60, seed=11, image_size=64)
    vocab = set(vocabulary())
    texts = []
    for split in ("train", "val"):
        questions = json.loads((tmp_path / f"questions_{split}.json").read_text())["questions"]
        annotations = json.loads((tmp_path / f"annotations_{split}.json").read_text())["annotations"]
        coco = json.loads((tmp_path / f"instances_{split}.json").read_text())
        texts += [q["question"] for q in questions]
        texts += [a["answer"] for ann in annotations for a in ann["answers"]]
        texts += [ann["multiple_choice_answer"] for ann in annotations]
        names = {c["id"]: c["name"] for c in coco["categories"]}
        meta = {"objects": [{"category": names[a["category_id"]]} for a in coco["annotations"]]}
        texts += [q["query"] for q in stage1_queries(meta)]
    missing = {w for text in texts for w in split_words(text)} - vocab
    assert not missing


def test_every_possible_answer_variant_is_in_the_vocabulary():
    vocab = set(vocabulary())
    rng = random.Random(0)
    answers = [*COLORS, *WHERE_ANSWERS, *NUMBER_ANSWERS, "yes", "no", *ANSWER_SYNONYMS]
    kinds = {"color", "where", "count", "exists"}
    variants = set()
    for _ in range(50):
        for answer in answers:
            variants.add(_surface_variant(rng, answer))
            for kind in kinds:
                if kind == "count" and not answer.isdigit():
                    continue
                variants.add(_alternative(rng, answer, kind))
    words = {w for v in variants for w in split_words(v)}
    assert words <= vocab, words - vocab
    assert {plural(s) for s in SHAPES} <= vocab
    assert plural("cross") == "crosses"
