"""The synthetic scene domain: shapes, colours, question templates, and the word list.

Shared by the scene generator (``data_prep.synth``) and the offline tiny model's
word-level tokenizer (``arr_coc.tiny``), so every word a synthetic question or
answer can contain is in the tokenizer's vocabulary.
"""

from __future__ import annotations

import re

# Category names double as COCO category names in the synthetic instances file.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "bar")

# Colour name -> RGB. Distinct enough to name, close pairs exist for hard cases.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}

# Words that answer "where is the X?": the half of the image holding the object's centre,
# by the larger offset from the centre.
WHERE_ANSWERS: tuple[str, ...] = ("left", "right", "top", "bottom")

NUMBER_ANSWERS: tuple[str, ...] = tuple(str(i) for i in range(10))

QUESTION_TEMPLATES: dict[str, str] = {
    "color": "what color is the {shape}?",
    "exists": "is there a {color} {shape}?",
    "where": "where is the {color} {shape}?",
    "count": "how many {shapes} are there?",
}


def plural(shape: str) -> str:
    """English plural of a shape name (``cross`` -> ``crosses``), used by count questions."""
    return shape + ("es" if shape.endswith(("s", "x")) else "s")


# Stage-1 query for a category (COCO and synthetic alike).
FIND_TEMPLATE = "find the {category}."

_EXTRA_WORDS = ("yes", "no", "image", "in", "the", "a", "an", "of", "is", "are", "there")

# Annotator noise in the synthetic VQAv2 answers: spelled-out numbers, casual yes/no,
# a colour synonym and phrasings of positions. The official VQA normalisation maps
# the number words and strips the punctuation; the rest stay minority answers.
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ANSWER_SYNONYMS: dict[str, tuple[str, ...]] = {
    "yes": ("yeah", "yep"),
    "no": ("nope",),
    "purple": ("violet",),
    "left": ("on the left", "left side"),
    "right": ("on the right", "right side"),
    "top": ("at the top", "top side"),
    "bottom": ("at the bottom", "bottom side"),
}
ANSWER_PUNCTUATION: tuple[str, ...] = (".", "!")


def split_words(text: str) -> list[str]:
    """How the word-level tokenizer splits text: lowercase words and single punctuation marks."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def vocabulary() -> list[str]:
    """Every word a synthetic question, query or answer can contain, sorted."""
    words: set[str] = set(_EXTRA_WORDS) | set(WHERE_ANSWERS) | set(NUMBER_ANSWERS)
    words |= set(COLORS) | set(NUMBER_WORDS) | set(ANSWER_PUNCTUATION)
    for variants in ANSWER_SYNONYMS.values():
        for variant in variants:
            words.update(split_words(variant))
    for shape in SHAPES:
        words.add(shape)
        words.add(plural(shape))
    for template in (*QUESTION_TEMPLATES.values(), FIND_TEMPLATE):
        skeleton = re.sub(r"\{\w+\}", " ", template)
        words.update(split_words(skeleton))
    return sorted(words)
