import pytest
import torch
from PIL import Image

from arr_coc.processing import IGNORE_INDEX, VLProcessor
from arr_coc.tiny import build_image_processor, build_tiny_tokenizer


@pytest.fixture(scope="module")
def processor():
    return VLProcessor(build_tiny_tokenizer(), build_image_processor("qwen3_vl", 256), max_question_tokens=12)


def _image(width, height, colour=(200, 30, 30)):
    return Image.new("RGB", (width, height), colour)


def test_prompt_layout_and_labels(processor):
    tok = processor.tokenizer
    batch = processor([_image(256, 256)], ["what color is the circle?"], ["red"])
    ids = batch["input_ids"][0].tolist()
    # 256x256 at patch 16, merge 2 -> 16x16 patches -> 8x8 = 64 merged tokens
    assert batch["image_grid_thw"].tolist() == [[1, 16, 16]]
    assert ids.count(processor.image_token_id) == 64
    expected = (
        tok.convert_tokens_to_ids(["<|im_start|>", "user", "<|vision_start|>"])
        + [processor.image_token_id] * 64
        + tok.convert_tokens_to_ids(["<|vision_end|>", "what", "color", "is", "the", "circle", "?"])
        + tok.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>", "assistant", "red", "<|im_end|>"])
    )
    assert ids == expected
    labels = batch["labels"][0].tolist()
    assert labels[-2:] == tok.convert_tokens_to_ids(["red", "<|im_end|>"])
    assert all(v == IGNORE_INDEX for v in labels[:-2])
    assert batch["mm_token_type_ids"][0].sum().item() == 64


def test_batch_of_different_sizes_is_right_padded(processor):
    images = [_image(256, 256), _image(200, 130, (20, 200, 40))]
    batch = processor(images, ["is there a red square?", "where is the bar?"], ["yes", "left"])
    grids = batch["image_grid_thw"].tolist()
    assert grids[0] != grids[1]
    counts = [g[1] * g[2] // 4 for g in grids]
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths[0] - lengths[1] == (counts[0] - counts[1]) + 1  # "is there a red square ?" vs "where is the bar ?"
    short = lengths.index(min(lengths))
    assert batch["attention_mask"][short, min(lengths):].sum() == 0
    assert (batch["input_ids"][short, min(lengths):] == processor.pad_token_id).all()
    assert (batch["labels"][short, min(lengths):] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape[0] == sum(g[1] * g[2] for g in grids)
    assert processor([_image(64, 64)], ["find the ring."])["labels"] is None


def test_images_are_the_resized_pixels(processor):
    images = [_image(256, 256, (200, 30, 30)), _image(200, 130, (20, 200, 40))]
    batch = processor(images, ["find the ring.", "find the bar."])
    for image, grid, colour in zip(batch["images"], batch["image_grid_thw"].tolist(), [(200, 30, 30), (20, 200, 40)]):
        assert image.shape == (3, grid[1] * 16, grid[2] * 16)
        expected = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1) / 255
        assert torch.allclose(image, expected.expand_as(image), atol=1e-5)


def test_images_keep_spatial_layout(processor):
    # left half black, right half white: the recovered image must keep it in place
    image = Image.new("RGB", (128, 64), (0, 0, 0))
    image.paste((255, 255, 255), (64, 0, 128, 64))
    out = processor([image], ["find the bar."])["images"][0]
    assert out.shape == (3, 64, 128)
    assert out[:, :, :60].max() < 0.05 and out[:, :, 68:].min() > 0.95


def test_bad_inputs_name_the_argument(processor):
    with pytest.raises(ValueError, match="question"):
        processor([_image(64, 64)], ["   "])
    with pytest.raises(ValueError, match="image"):
        processor([_image(8, 64)], ["find the ring."])
    with pytest.raises(ValueError, match="max_question_tokens"):
        processor([_image(64, 64)], ["is there a red circle and a blue square and a green ring here ?"])
    with pytest.raises(ValueError, match="same length"):
        processor([_image(64, 64)], ["a", "b"])
