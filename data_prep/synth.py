"""Synthetic scenes written in the real COCO and VQAv2 formats.

``generate(out_dir, images=240, seed=0, image_size=256, val_fraction=0.2) -> dict`` writes::

    out_dir/images/synth_{split}_{image_id:012d}.{jpg,png}   (about a quarter PNG)
    out_dir/instances_{train,val}.json                      COCO instances
    out_dir/questions_{train,val}.json                      VQAv2 questions
    out_dir/annotations_{train,val}.json                    VQAv2 annotations (10 answers each)

and returns a summary (paths and counts). A scene holds one shape repeated 1-4 times and
1-2 other shapes, in distinct colours, sizes and positions (overlaps allowed, never hiding
an object). Questions ask for the colour of a named shape, whether a coloured shape exists,
where it is (left/right/top/bottom), and how many of the repeated shape there are, mixed by
``QUESTION_MIX`` and built so the question text alone does not give the answer away. Some scenes are hard: small
objects, faint (low-contrast) objects drawn most of the way toward the grey background,
distractors of the same colour; the flags
sit in an extra ``"hard"`` list on the COCO image entry and on each VQAv2 question.
Answers carry annotator noise ("Yes", "two", "on the left") so the official normalisation
matters. Same ``seed`` -> identical files.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from data_prep.vocab import (
    ANSWER_PUNCTUATION,
    ANSWER_SYNONYMS,
    COLORS,
    NUMBER_WORDS,
    QUESTION_TEMPLATES,
    SHAPES,
    plural,
)

HARD_FLAGS = ("small", "low_contrast", "same_color_distractor")

# Non-contiguous ids, as in real COCO (1..90 with gaps).
CATEGORY_IDS: dict[str, int] = {shape: 3 * i + 2 for i, shape in enumerate(SHAPES)}

QUESTION_TYPES = {"color": "what color is the", "exists": "is there a", "where": "where is the", "count": "how many"}
ANSWER_TYPES = {"color": "other", "exists": "yes/no", "where": "other", "count": "number"}

_HARD_SCENE_PROB = 0.6
# A faint ("low_contrast") object is drawn this far from its colour toward the background
# (measured on 1000 scenes, seed 0, stage-2 model: flagged held-out questions 0.446 vs 0.551
# for the rest at 0.8; 0.533 vs 0.582 at 0.6; 0.559 vs 0.576 when the background was tinted
# toward the object's colour instead, which gave that colour away).
_FAINT_BLEND = 0.8
_EMPTY_SCENE_PROB = 0.03
_PNG_PROB = 0.25
_QUESTIONS_PER_IMAGE = 3


@dataclass
class SceneObject:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1/y1 exclusive)
    flags: set[str] = field(default_factory=set)

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    def coco_bbox(self) -> list[float]:
        x0, y0, x1, y1 = self.box
        return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


@dataclass
class Scene:
    background: tuple[int, int, int]
    objects: list[SceneObject]

    @property
    def flags(self) -> list[str]:
        return sorted(set().union(*(o.flags for o in self.objects))) if self.objects else []


# ----------------------------------------------------------------------------- scenes


def _overlap_fraction(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller box: how much of one object another could hide."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def _box_size(rng: random.Random, shape: str, size: int, small: bool) -> tuple[int, int]:
    lo, hi = (0.04, 0.07) if small else (0.12, 0.3)
    side = max(4, int(rng.uniform(lo, hi) * size))
    if shape == "bar":  # elongated, either way round
        long_side = min(size - 2, side * 2)
        return (long_side, max(3, side // 2)) if rng.random() < 0.5 else (max(3, side // 2), long_side)
    if shape == "triangle":
        return side, max(4, int(side * rng.uniform(0.8, 1.0)))
    return side, side


def _place(rng: random.Random, existing: list[SceneObject], w: int, h: int, size: int):
    """A box inside the image overlapping no existing object by more than 30%, or None."""
    for _ in range(40):
        x0, y0 = rng.randrange(0, size - w + 1), rng.randrange(0, size - h + 1)
        box = (x0, y0, x0 + w, y0 + h)
        if all(_overlap_fraction(box, o.box) <= 0.3 for o in existing):
            return box
    return None


def _blend(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b))  # type: ignore[return-value]


def scene_shapes(rng: random.Random) -> list[str]:
    """The shapes of one scene: a repeated shape (1-4 copies, uniform) and 1-2 other shapes
    once each, shuffled. "How many" asks about the repeated shape, so its answers spread
    evenly over 1..4; the shapes present once carry the colour questions."""
    repeated = rng.choice(SHAPES)
    others = rng.sample([s for s in SHAPES if s != repeated], rng.randint(1, 2))
    shapes = [repeated] * rng.randint(1, 4) + others
    rng.shuffle(shapes)
    return shapes


def make_scene(rng: random.Random, size: int) -> Scene:
    """Random objects and background; a hard scene gets one or more of the hard-case flags."""
    grey = rng.randrange(95, 165)
    background = (grey, grey + rng.randrange(-10, 11), grey + rng.randrange(-10, 11))
    if rng.random() < _EMPTY_SCENE_PROB:
        return Scene(background, [])
    hard = set()
    if rng.random() < _HARD_SCENE_PROB:
        hard = {flag for flag in HARD_FLAGS if rng.random() < 0.5} or {rng.choice(HARD_FLAGS)}
    objects: list[SceneObject] = []
    shapes = scene_shapes(rng)
    # Distinct colours (same-colour pairs are the "same_color_distractor" hard case only),
    # so a colour names one object and an absent colour is always available for "no".
    for index, (shape, color) in enumerate(zip(shapes, rng.sample(list(COLORS), len(shapes)))):
        small = "small" in hard and index == 0
        w, h = _box_size(rng, shape, size, small)
        box = _place(rng, objects, w, h, size)
        if box is not None:
            objects.append(SceneObject(shape, color, box, {"small"} if small else set()))
    if "same_color_distractor" in hard:
        target = objects[0]
        shape = rng.choice([s for s in SHAPES if s != target.shape])
        w, h = _box_size(rng, shape, size, small=False)
        box = _place(rng, objects, w, h, size)
        if box is not None:
            objects.append(SceneObject(shape, target.color, box, set()))
            target.flags.add("same_color_distractor")
    if "low_contrast" in hard:
        objects[-1].flags.add("low_contrast")
    return Scene(background, objects)


def render(scene: Scene, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_shape(draw, obj, fill_of(obj, scene.background))
    return image


def fill_of(obj: SceneObject, background: tuple[int, int, int]) -> tuple[int, int, int]:
    """The drawn colour: the named one, or for a faint object a blend toward the background
    (its hue stays that of its colour name, weaker; the background gives nothing away)."""
    if "low_contrast" in obj.flags:
        return _blend(COLORS[obj.color], background, _FAINT_BLEND)
    return COLORS[obj.color]


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = obj.box
    xe, ye = x1 - 1, y1 - 1  # PIL coordinates are inclusive
    w, h = x1 - x0, y1 - y0
    if obj.shape in ("square", "bar"):
        draw.rectangle((x0, y0, xe, ye), fill=fill)
    elif obj.shape == "circle":
        draw.ellipse((x0, y0, xe, ye), fill=fill)
    elif obj.shape == "ring":
        draw.ellipse((x0, y0, xe, ye), outline=fill, width=max(2, w // 5))
    elif obj.shape == "triangle":
        draw.polygon([(x0, ye), (xe, ye), ((x0 + xe) / 2, y0)], fill=fill)
    elif obj.shape == "cross":
        tw, th = max(1, w // 3), max(1, h // 3)
        draw.rectangle((x0 + tw, y0, xe - tw, ye), fill=fill)
        draw.rectangle((x0, y0 + th, xe, ye - th), fill=fill)
    else:
        raise ValueError(f"shape {obj.shape!r} has no drawing")


def _area(obj: SceneObject) -> float:
    x0, y0, x1, y1 = obj.box
    full = float((x1 - x0) * (y1 - y0))
    factor = {"circle": 0.785, "triangle": 0.5, "cross": 0.556, "ring": 0.5}.get(obj.shape, 1.0)
    return round(full * factor, 2)


# -------------------------------------------------------------------------- questions


def _where(obj: SceneObject, size: int) -> str | None:
    """left/right/top/bottom by the larger offset from the centre; None when unclear."""
    cx, cy = obj.center
    return side_of(cx, cy, size)


def side_of(cx: float, cy: float, size: float) -> str | None:
    """The side of a ``size``-square image a point lies on, or None near the centre/diagonals."""
    dx, dy = cx - size / 2, cy - size / 2
    if max(abs(dx), abs(dy)) < 0.15 * size or abs(abs(dx) - abs(dy)) < 0.08 * size:
        return None
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "bottom" if dy > 0 else "top"


# Stage 0's caption task: the question and an answer naming every object.
CAPTION_QUESTION = "what is in the image?"


def describe(objects: list[dict], width: int, height: int) -> str | None:
    """A caption of a sharded COCO record's objects: ``"red circle left . blue square top . ..."``.

    Objects are named top band to bottom band, left to right within a band: colour (when the
    object carries one), category, and side of the image (when clear). None without objects.
    A caption supervises every object of the scene at once, where a VQA answer names one
    (stage 0's optional caption mix; its measured effect is in stages.stage0).
    """
    if not objects:
        return None
    size = max(width, height)

    def centre(obj: dict) -> tuple[float, float]:
        x, y, w, h = obj["bbox"]
        return (x + w / 2) * size / width, (y + h / 2) * size / height

    def order(obj: dict) -> tuple[int, float]:
        cx, cy = centre(obj)
        return int(3 * cy // size), cx

    parts = []
    for obj in sorted(objects, key=order):
        words = [obj["color"]] if obj.get("color") else []
        words.append(obj["category"])
        side = side_of(*centre(obj), size)
        if side:
            words.append(side)
        parts.append(" ".join(words))
    return " . ".join(parts)


def _shape_flags(found: list[SceneObject]) -> set[str]:
    """Flags of a question about every object of one shape: its objects' own (small, faint)."""
    return set().union(*(o.flags - {"same_color_distractor"} for o in found))


def _distractor_flag(target: SceneObject, objects: list[SceneObject]) -> set[str]:
    same = any(o is not target and o.color == target.color and o.shape != target.shape for o in objects)
    return {"same_color_distractor"} if same else set()


def _question_candidates(rng: random.Random, scene: Scene, size: int) -> list[tuple[str, str, str, set[str]]]:
    """(kind, question, canonical answer, hard flags) for every question that has one clear answer.

    Built so that no answer can be guessed from the question text alone:

    * colour: only about a shape present exactly once (colours are drawn uniformly);
    * where: only about a colour+shape present once whose side is clear;
    * exists: "yes" names a present object, "no" names a present shape in a random colour
      absent from the image, so both cases mention a shape in the image and only the
      colour decides (``pick_questions`` then draws yes and no with equal odds);
    * count: about the scene's most frequent shape (the repeated one, 1-4 copies).
    """
    objs = scene.objects
    by_shape = {s: [o for o in objs if o.shape == s] for s in SHAPES}
    out: list[tuple[str, str, str, set[str]]] = []
    for shape, found in by_shape.items():
        if len(found) == 1:
            obj = found[0]
            flags = (obj.flags - {"same_color_distractor"}) | _distractor_flag(obj, objs)
            out.append(("color", QUESTION_TEMPLATES["color"].format(shape=shape), obj.color, flags))
    most = max((len(found) for found in by_shape.values()), default=0)
    if most:
        shape = rng.choice([s for s, found in by_shape.items() if len(found) == most])
        flags = _shape_flags(by_shape[shape])
        out.append(("count", QUESTION_TEMPLATES["count"].format(shapes=plural(shape)), str(most), flags))
    for obj in objs:
        twins = [o for o in objs if o.shape == obj.shape and o.color == obj.color]
        flags = (obj.flags - {"same_color_distractor"}) | _distractor_flag(obj, objs)
        out.append(("exists", QUESTION_TEMPLATES["exists"].format(color=obj.color, shape=obj.shape), "yes", flags))
        where = _where(obj, size)
        if len(twins) == 1 and where is not None:
            text = QUESTION_TEMPLATES["where"].format(color=obj.color, shape=obj.shape)
            out.append(("where", text, where, flags))
    absent = [c for c in COLORS if all(o.color != c for o in objs)]
    for shape in sorted({o.shape for o in objs}):  # "no": a present shape in a colour absent from the image
        if absent:
            # As hard as seeing the colour of every object of that shape (a small or faint one too).
            flags = _shape_flags(by_shape[shape])
            text = QUESTION_TEMPLATES["exists"].format(color=rng.choice(absent), shape=shape)
            out.append(("exists", text, "no", flags))
    if not objs:
        text = QUESTION_TEMPLATES["exists"].format(color=rng.choice(list(COLORS)), shape=rng.choice(SHAPES))
        out.append(("exists", text, "no", set()))
    return out


# Share of each question kind. Colour and position questions dominate: their answers
# need the image region of one named object, which is what a query-aware allocator keeps.
QUESTION_MIX: dict[str, float] = {"color": 0.35, "where": 0.3, "exists": 0.2, "count": 0.15}


def pick_questions(rng: random.Random, scene: Scene, size: int, count: int) -> list[tuple[str, str, str, set[str]]]:
    """Up to ``count`` distinct questions: kinds drawn by ``QUESTION_MIX`` among those the
    scene can ask, "exists" questions "yes" or "no" with equal odds."""
    pools: dict[tuple[str, str], list[tuple[str, str, str, set[str]]]] = {}
    for cand in _question_candidates(rng, scene, size):
        group = (cand[0], cand[2] if cand[0] == "exists" else "")
        pools.setdefault(group, []).append(cand)
    chosen: list[tuple[str, str, str, set[str]]] = []
    while len(chosen) < count and pools:
        kinds = sorted({kind for kind, _ in pools})
        kind = rng.choices(kinds, weights=[QUESTION_MIX[k] for k in kinds])[0]
        group = rng.choice(sorted(g for g in pools if g[0] == kind))
        cand = pools[group].pop(rng.randrange(len(pools[group])))
        if not pools[group]:
            del pools[group]
        if all(cand[1] != c[1] for c in chosen):
            chosen.append(cand)
    return chosen


def _surface_variant(rng: random.Random, answer: str) -> str:
    """A spelling that the official normalisation maps back to ``answer``."""
    if answer.isdigit() and rng.random() < 0.5:
        return NUMBER_WORDS[int(answer)]
    choice = rng.randrange(3)
    if choice == 0:
        return answer.capitalize()
    if choice == 1:
        return answer + rng.choice(ANSWER_PUNCTUATION)
    return ("the " + answer) if not answer.isdigit() else answer + " "


def _alternative(rng: random.Random, answer: str, kind: str) -> str:
    """A minority answer: a synonym/phrasing or an annotator mistake."""
    synonyms = ANSWER_SYNONYMS.get(answer, ())
    if synonyms and rng.random() < 0.7:
        return rng.choice(synonyms)
    if kind == "count":
        return str(min(9, max(0, int(answer) + rng.choice((-1, 1)))))  # single digits: in the vocabulary
    if kind == "exists":
        return "no" if answer == "yes" else "yes"
    if kind == "where":
        return rng.choice([w for w in ("left", "right", "top", "bottom") if w != answer])
    return rng.choice([c for c in COLORS if c != answer])


def noisy_answers(rng: random.Random, answer: str, kind: str) -> list[tuple[str, str]]:
    """10 (answer, confidence) pairs; at least 6 normalise to ``answer`` so it stays the majority."""
    out = []
    for i in range(10):
        r = rng.random()
        if i < 6 or r < 0.6:
            text = answer if r < 0.65 else _surface_variant(rng, answer)
            out.append((text, "yes"))
        else:
            out.append((_alternative(rng, answer, kind), rng.choice(("maybe", "no"))))
    rng.shuffle(out)
    return out


# ------------------------------------------------------------------------------ files


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _save_image(image: Image.Image, path: Path) -> None:
    if path.suffix == ".png":
        image.save(path, format="PNG", optimize=False)
    else:
        image.save(path, format="JPEG", quality=92)


def generate(out_dir: str | Path, images: int = 240, seed: int = 0, image_size: int = 256,
             val_fraction: float = 0.2) -> dict:
    """Write ``images`` synthetic scenes and their COCO / VQAv2 files; return a summary."""
    if images < 2:
        raise ValueError(f"images must be >= 2 (got {images})")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 (got {image_size})")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    n_val = min(images - 1, max(1, round(images * val_fraction)))
    splits = {"train": range(images - n_val), "val": range(images - n_val, images)}
    summary: dict = {"out": str(out), "seed": seed, "image_size": image_size, "splits": {}}
    for split, indices in splits.items():
        coco, questions, annotations = _split_files(out, split, indices, seed, image_size)
        _write_json(out / f"instances_{split}.json", coco)
        _write_json(out / f"questions_{split}.json", questions)
        _write_json(out / f"annotations_{split}.json", annotations)
        summary["splits"][split] = {
            "images": len(coco["images"]),
            "objects": len(coco["annotations"]),
            "questions": len(questions["questions"]),
            "instances": str(out / f"instances_{split}.json"),
            "questions_file": str(out / f"questions_{split}.json"),
            "annotations_file": str(out / f"annotations_{split}.json"),
        }
    summary["images_dir"] = str(out / "images")
    return summary


def _split_files(out: Path, split: str, indices: range, seed: int, size: int):
    info = {"description": "ARR-COC synthetic shapes", "version": "1.0", "year": 2026}
    licenses = [{"id": 1, "name": "CC0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}]
    categories = [{"id": CATEGORY_IDS[s], "name": s, "supercategory": "shape"} for s in SHAPES]
    coco = {"info": info, "licenses": licenses, "images": [], "annotations": [], "categories": categories}
    questions = {"info": info, "task_type": "Open-Ended", "data_type": "mscoco", "license": licenses[0],
                 "data_subtype": f"{split}2026", "questions": []}
    annotations = {"info": info, "data_type": "mscoco", "license": licenses[0],
                   "data_subtype": f"{split}2026", "annotations": []}
    for index in indices:
        rng = random.Random(f"arr-coc-synth:{seed}:{index}")
        image_id = 3 * index + 1  # sparse ids, like COCO: never confuse an id with an index
        scene = make_scene(rng, size)
        ext = "png" if rng.random() < _PNG_PROB else "jpg"
        file_name = f"synth_{split}_{image_id:012d}.{ext}"
        _save_image(render(scene, size), out / "images" / file_name)
        coco["images"].append({"id": image_id, "file_name": file_name, "width": size, "height": size,
                               "license": 1, "hard": scene.flags})
        for k, obj in enumerate(scene.objects):
            x0, y0, x1, y1 = obj.box
            coco["annotations"].append({
                "id": image_id * 100 + k, "image_id": image_id, "category_id": CATEGORY_IDS[obj.shape],
                "bbox": obj.coco_bbox(), "area": _area(obj), "iscrowd": 0,
                "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]], "color": obj.color,
            })
        for k, (kind, text, answer, flags) in enumerate(pick_questions(rng, scene, size, _QUESTIONS_PER_IMAGE)):
            question_id = image_id * 1000 + k
            questions["questions"].append({"image_id": image_id, "question": text, "question_id": question_id,
                                           "hard": sorted(flags)})
            answers = [{"answer": a, "answer_confidence": c, "answer_id": i + 1}
                       for i, (a, c) in enumerate(noisy_answers(rng, answer, kind))]
            annotations["annotations"].append({
                "question_id": question_id, "image_id": image_id, "question_type": QUESTION_TYPES[kind],
                "answer_type": ANSWER_TYPES[kind], "multiple_choice_answer": answer, "answers": answers,
            })
    return coco, questions, annotations
