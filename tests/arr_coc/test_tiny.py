import pytest
import torch
from PIL import Image

from arr_coc.config import ModelSection
from arr_coc.tiny import build_tiny_model, build_tiny_tokenizer, load_vlm, save_vlm
from data_prep.vocab import split_words, vocabulary


def test_tokenizer_covers_vocabulary_and_specials():
    tok = build_tiny_tokenizer()
    unk = tok.unk_token_id
    assert all(tok.convert_tokens_to_ids(w) != unk for w in vocabulary())
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Where is the red circle?<|im_end|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens == ["<|im_start|>", "user", "<|vision_start|>", "<|image_pad|>", "<|image_pad|>",
                      "<|vision_end|>", *split_words("Where is the red circle?"), "<|im_end|>"]
    assert unk not in ids
    assert tok.decode(tok("is there a blue ring?", add_special_tokens=False)["input_ids"]) == "is there a blue ring?"
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_tiny_model_config_matches_tokenizer(family):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(family, seed=0, tokenizer=tok)
    config = model.config
    assert config.text_config.vocab_size == len(tok)
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    text = config.text_config
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2
    assert config.vision_config.out_hidden_size == text.hidden_size
    if family == "qwen3_vl":
        assert config.vision_config.patch_size == 16
        assert len(config.vision_config.deepstack_visual_indexes) <= text.num_hidden_layers
    else:
        assert config.vision_config.patch_size == 14


def test_tiny_model_is_seeded():
    a = build_tiny_model("qwen3_vl", seed=1).state_dict()
    b = build_tiny_model("qwen3_vl", seed=1).state_dict()
    c = build_tiny_model("qwen3_vl", seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    with pytest.raises(ValueError, match="family"):
        build_tiny_model("llava", seed=0)


def _logits(model, processor):
    batch = processor([Image.new("RGB", (256, 256), (30, 90, 200))], ["what color is the square?"])
    inputs = {k: v for k, v in batch.items() if k not in ("images", "labels")}
    with torch.no_grad():
        return model(**inputs).logits, batch


def test_save_and_load_round_trip(tmp_path):
    section = ModelSection()
    model, processor = load_vlm(section)
    reference, batch = _logits(model, processor)
    assert batch["image_grid_thw"].tolist() == [[1, 16, 16]]  # default image_size 256 -> 64 merged tokens
    save_vlm(model, processor, tmp_path / "base")
    assert list((tmp_path / "base").glob("*.safetensors"))
    for loaded, loaded_processor in (
        load_vlm(section, base_dir=tmp_path / "base"),
        load_vlm(ModelSection(source=str(tmp_path / "base"))),  # the from_pretrained path for real checkpoints
    ):
        logits, _ = _logits(loaded, loaded_processor)
        assert torch.equal(logits, reference)
        assert loaded_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == processor.image_token_id


def test_load_vlm_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_vlm(ModelSection(), base_dir=tmp_path)
    _, processor = load_vlm(ModelSection(family="qwen2_5_vl", image_size=128))
    batch = processor([Image.new("RGB", (300, 300))], ["find the bar."])
    _, h, w = batch["image_grid_thw"][0].tolist()
    assert h * 14 * w * 14 <= 128 * 128


def test_shipped_base_matches_the_tiny_layout_and_its_provenance():
    """The shipped stage-0 export loads with safetensors, speaks today's tiny vocabulary (a
    vocabulary change makes it stale: remake it, see PROVENANCE.json) and is the file its
    provenance record names."""
    import hashlib
    import json

    from arr_coc.tiny import PRETRAINED_DIR, TINY_TEXT, TINY_VISION

    model, processor = load_vlm(ModelSection(source="tiny-pretrained"))
    assert not list(PRETRAINED_DIR.glob("*.bin")) and not list(PRETRAINED_DIR.glob("*.pt"))
    assert processor.tokenizer.get_vocab() == build_tiny_tokenizer().get_vocab()
    text, vision = model.config.text_config, model.config.vision_config
    assert {k: getattr(text, k) for k in TINY_TEXT} == TINY_TEXT
    assert {k: getattr(vision, k) for k in TINY_VISION} == TINY_VISION
    provenance = json.loads((PRETRAINED_DIR / "PROVENANCE.json").read_text())
    weights = (PRETRAINED_DIR / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == provenance["sha256"]["model.safetensors"]
    assert provenance["config"]["seed"] != 0  # trained on other scenes than the tests' (seed 0)
