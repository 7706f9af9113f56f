"""Chat prompts with one image and a question, batched for Qwen-VL.

``VLProcessor`` turns (image, question[, answer]) triples into the tensors a Qwen-VL model takes,
with the exact Qwen chat layout::

    <|im_start|>user\\n<|vision_start|><|image_pad|>×N<|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n
    {answer}<|im_end|>                                  (training only)

N is the number of *merged* vision tokens of that image (``t·h·w / merge²``), so images of
different sizes give sequences of different lengths: the batch is right-padded and carries an
attention mask. The prompt is tokenized segment by segment (every boundary is a special token or
a newline), which is what lets us label the answer span exactly; Qwen's BPE pre-tokenizer never
merges across a special token or a newline, so the ids match tokenizing the whole string.

It also returns ``images``: each image as float ``[3, H, W]`` in [0, 1] at the processor's resized
size, recovered from the very pixel patches the encoder sees, so the texture array aligns with the
vision tokens by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

IGNORE_INDEX = -100
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
# Text around the image and question; segments end at special tokens or newlines.
USER_PREFIX = f"{IM_START}user\n{VISION_START}"
ASSISTANT_PREFIX = f"{IM_END}\n{IM_START}assistant\n"


class VLProcessor:
    """Builds batched Qwen-VL chat inputs from a tokenizer and a ``Qwen2VLImageProcessorPil``."""

    def __init__(self, tokenizer, image_processor, max_question_tokens: int | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_question_tokens = max_question_tokens
        self.image_token_id = self._token_id(IMAGE_PAD)
        self.vision_end_id = self._token_id(VISION_END)
        self.im_end_id = self._token_id(IM_END)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.im_end_id

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {token} token (not a Qwen-VL tokenizer?)")
        return token_id

    @property
    def patch_size(self) -> int:
        return self.image_processor.patch_size

    @property
    def merge_size(self) -> int:
        return self.image_processor.merge_size

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(
        self,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        answers: Sequence[str] | None = None,
    ) -> dict:
        """Tensors for a batch; ``labels`` is ``None`` without answers (inference prompts)."""
        images, questions = list(images), list(questions)
        if len(images) != len(questions) or (answers is not None and len(answers) != len(images)):
            raise ValueError("images, questions and answers must have the same length")
        if not images:
            raise ValueError("images: empty batch")
        for index, image in enumerate(images):
            self._check_image(image, index)
        vision = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        grid_thw = vision["image_grid_thw"]
        merged_counts = (grid_thw.prod(-1) // self.merge_size**2).tolist()
        rows = [
            self._sequence(question, count, None if answers is None else answers[i], i)
            for i, (question, count) in enumerate(zip(questions, merged_counts))
        ]
        batch = self._pad(rows, with_labels=answers is not None)
        batch["pixel_values"] = vision["pixel_values"]
        batch["image_grid_thw"] = grid_thw
        batch["images"] = self.unpatchify(vision["pixel_values"], grid_thw)
        return batch

    def _check_image(self, image, index: int) -> None:
        if not isinstance(image, Image.Image):
            raise ValueError(f"image {index}: expected a PIL image, got {type(image).__name__}")
        width, height = image.size
        if min(width, height) < self.patch_size:
            raise ValueError(
                f"image {index}: {width}x{height} is smaller than one {self.patch_size}x{self.patch_size} patch"
            )

    def _sequence(self, question: str, merged_tokens: int, answer: str | None, index: int):
        """(input_ids, labels) of one chat; labels cover answer tokens and the closing ``<|im_end|>``."""
        if not question or not question.strip():
            raise ValueError(f"question {index}: empty question")
        question_ids = self._encode(question)
        if self.max_question_tokens is not None and len(question_ids) > self.max_question_tokens:
            raise ValueError(
                f"question {index}: {len(question_ids)} tokens, more than max_question_tokens="
                f"{self.max_question_tokens}: {question!r}"
            )
        prompt = (
            self._encode(USER_PREFIX)
            + [self.image_token_id] * merged_tokens
            + [self.vision_end_id]
            + question_ids
            + self._encode(ASSISTANT_PREFIX)
        )
        if answer is None:
            return prompt, None
        answer_ids = self._encode(answer) + [self.im_end_id]
        return prompt + answer_ids, [IGNORE_INDEX] * len(prompt) + answer_ids

    def _pad(self, rows, with_labels: bool) -> dict:
        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long) if with_labels else None
        for row, (ids, row_labels) in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            if labels is not None:
                labels[row, : len(ids)] = torch.tensor(row_labels)
        # HF Qwen-VL needs the modality of every token (0 text, 1 image) to place M-RoPE positions.
        mm_token_type_ids = (input_ids == self.image_token_id).to(torch.int32)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": mm_token_type_ids,
            "labels": labels,
        }

    def unpatchify(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Undo the processor's patch layout and normalisation: ``[3, H, W]`` in [0, 1] per image.

        The processor orders patches as (h/m, w/m, m, m) blocks, each flattened as (C, T, P, P)
        with the frame repeated T times; we take frame 0.
        """
        patch, merge = self.patch_size, self.merge_size
        temporal = self.image_processor.temporal_patch_size
        mean = torch.tensor(self.image_processor.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.image_processor.image_std, dtype=torch.float32).view(3, 1, 1)
        out, start = [], 0
        for _, grid_h, grid_w in grid_thw.tolist():
            count = grid_h * grid_w
            patches = pixel_values[start : start + count].float()
            start += count
            blocks = patches.view(grid_h // merge, grid_w // merge, merge, merge, 3, temporal, patch, patch)
            image = blocks[:, :, :, :, :, 0].permute(4, 0, 2, 5, 1, 3, 6)
            image = image.reshape(3, grid_h * patch, grid_w * patch)
            out.append((image * std + mean).clamp(0.0, 1.0))
        return out

    def decode(self, token_ids) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()
