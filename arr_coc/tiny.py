"""The offline base model: a tiny Qwen-VL built from a config, and the loader for real ones.

Nothing is fetched at run time here, so the embedded default builds

* a word-level tokenizer (``tokenizers``) over the synthetic vocabulary plus the Qwen chat and
  vision special tokens, wrapped as a ``PreTrainedTokenizerFast``;
* a tiny ``Qwen3VLForConditionalGeneration`` (or ``Qwen2_5_VLForConditionalGeneration``) whose
  config mirrors the real layout (patch 16 / 14, merge 2, temporal patch 2, interleaved or
  sectioned M-RoPE, deepstack layers) at toy widths;
* the PIL Qwen2-VL image processor (no torchvision).

``load_vlm`` returns the same ``(hf_model, VLProcessor)`` pair for the tiny model, a stage-0
artifact (``save_vlm`` output) and a real ``from_pretrained`` checkpoint, so everything
downstream runs one code path.

``source: tiny-pretrained`` is the tiny analogue of a pretrained checkpoint: a stage-0 export
shipped in ``arr_coc/assets/tiny-qwen3vl-synth`` (2.0 MB of safetensors, made by this
project's own stage 0 on scenes of another seed than any test's; ``PROVENANCE.json`` holds
the command, commit and measured figures). It loads through ``from_pretrained`` as a real
checkpoint does, so runs that need a base which already reads the image (the stage 1-3
learning tests, ``bench/budget_curve.py``) skip stage 0 exactly as production configs do.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from arr_coc.config import PRETRAINED_SOURCE, ModelSection
from arr_coc.processing import VLProcessor
from data_prep.vocab import vocabulary

PAD_TOKEN = "<|endoftext|>"
UNK_TOKEN = "[UNK]"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
# Order fixes the ids: specials first, so the tiny ids are stable across vocabulary changes.
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, UNK_TOKEN)
# Words of the chat template itself (role names), not in the scene vocabulary.
CHAT_WORDS = ("user", "assistant", "system")

FAMILIES = ("qwen3_vl", "qwen2_5_vl")
# The real models' vision patch sizes; the image processor must match the encoder.
PATCH_SIZE = {"qwen3_vl": 16, "qwen2_5_vl": 14}
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
# Qwen3-VL normalises with 0.5/0.5, Qwen2.5-VL with the CLIP statistics (as the real processors do).
IMAGE_STATS = {
    "qwen3_vl": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    "qwen2_5_vl": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
}

# Toy widths: big enough that M-RoPE sections, GQA and deepstack are all exercised.
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=2048)
TINY_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4)

# The shipped stage-0 export (``model.source: tiny-pretrained``).
PRETRAINED_DIR = Path(__file__).resolve().parent / "assets" / "tiny-qwen3vl-synth"


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: lowercase words and single punctuation marks (``vocab.split_words``)."""
    words = [w for w in (*CHAT_WORDS, *vocabulary()) if w not in SPECIAL_TOKENS]
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *dict.fromkeys(words)))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[a-z0-9]+|[^\sa-z0-9]"), "isolated")]
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        extra_special_tokens=[IM_START, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD],
        padding_side="right",
        model_max_length=4096,
    )


def build_image_processor(family: str, image_size: int) -> Qwen2VLImageProcessorPil:
    """The PIL Qwen2-VL processor with the family's patch size, bounded to ``image_size``² pixels."""
    _check_family(family)
    mean, std = IMAGE_STATS[family]
    processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE[family], merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE,
        image_mean=mean, image_std=std,
    )
    return bound_image_size(processor, image_size)


def bound_image_size(image_processor: Qwen2VLImageProcessorPil, image_size: int) -> Qwen2VLImageProcessorPil:
    """At most ``image_size``² pixels, at least one merged token (``smart_resize`` keeps the aspect)."""
    factor = image_processor.patch_size * image_processor.merge_size
    image_processor.size = {"shortest_edge": factor * factor, "longest_edge": image_size * image_size}
    return image_processor


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)} (got {family!r})")


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    return {
        "image_token_id": ids[IMAGE_PAD],
        "video_token_id": ids[VIDEO_PAD],
        "vision_start_token_id": ids[VISION_START],
        "vision_end_token_id": ids[VISION_END],
    }


def tiny_config(family: str, tokenizer: PreTrainedTokenizerFast) -> Qwen3VLConfig | Qwen2_5_VLConfig:
    """The tiny config: real layout, toy widths, token ids matching ``tokenizer``."""
    _check_family(family)
    text = dict(TINY_TEXT, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    vision = dict(TINY_VISION, patch_size=PATCH_SIZE[family], spatial_merge_size=MERGE_SIZE,
                  temporal_patch_size=TEMPORAL_PATCH_SIZE, out_hidden_size=text["hidden_size"])
    # Sections of M-RoPE split head_dim/2 = 8 frequencies over (t, h, w), as the real ratios do.
    # rope_theta is scaled to the 16-wide heads: the real 5e6 (128-wide heads) leaves the width
    # axis at most 0.02 rad per grid column here, nearly position-blind; 1e4 gives it 0.1.
    if family == "qwen3_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10_000.0,
                                   "mrope_section": [4, 2, 2], "mrope_interleaved": True}
        vision.update(num_position_embeddings=256, deepstack_visual_indexes=[0, 1],
                      hidden_act="gelu_pytorch_tanh")
        config = Qwen3VLConfig(text_config=text, vision_config=vision, **_special_ids(tokenizer))
    else:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]}
        text.update(bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        # One windowed and one full-attention block, as the real encoder interleaves them.
        vision.update(window_size=112, fullatt_block_indexes=[1], tokens_per_second=2)
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_special_ids(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    return config


def build_tiny_model(family: str = "qwen3_vl", seed: int = 0,
                     tokenizer: PreTrainedTokenizerFast | None = None) -> PreTrainedModel:
    """A randomly initialised tiny Qwen-VL; the same seed gives the same weights."""
    tokenizer = tokenizer or build_tiny_tokenizer()
    config = tiny_config(family, tokenizer)
    model_class = Qwen3VLForConditionalGeneration if family == "qwen3_vl" else Qwen2_5_VLForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    _set_generation_ids(model, tokenizer)
    return model.eval()


def _set_generation_ids(model: PreTrainedModel, tokenizer) -> None:
    """Greedy decoding stops at ``<|im_end|>`` and pads with the tokenizer's pad token."""
    generation = model.generation_config
    generation.eos_token_id = tokenizer.convert_tokens_to_ids(IM_END)
    generation.pad_token_id = tokenizer.pad_token_id
    generation.do_sample = False


def _torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_vlm(model_section: ModelSection, base_dir: str | Path | None = None) -> tuple[PreTrainedModel, VLProcessor]:
    """The frozen base VLM and its processor.

    ``source: tiny`` builds the tiny model (seed 0) or, when ``base_dir`` holds a stage-0 export
    (``save_vlm``), loads those weights; ``tiny-pretrained`` loads the shipped export; any other ``source`` is a local path or hub name given to
    ``from_pretrained`` (nothing is fetched here: it must already be on disk or in the HF cache).
    """
    if base_dir is None and model_section.source == PRETRAINED_SOURCE:
        base_dir = PRETRAINED_DIR
    if base_dir is not None:
        base_dir = Path(base_dir)
        if not any(base_dir.glob("*.safetensors")):
            raise FileNotFoundError(f"{base_dir}: no *.safetensors base weights (expected a save_vlm export)")
        return _from_pretrained(str(base_dir), model_section)
    if model_section.source == "tiny":
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(model_section.family, seed=0, tokenizer=tokenizer)
        model = model.to(_torch_dtype(model_section.dtype))
        image_processor = build_image_processor(model_section.family, model_section.image_size)
        return model, _processor(tokenizer, image_processor, model, model_section)
    return _from_pretrained(model_section.source, model_section)


def _from_pretrained(source: str, model_section: ModelSection) -> tuple[PreTrainedModel, VLProcessor]:
    model_class = (Qwen3VLForConditionalGeneration if model_section.family == "qwen3_vl"
                   else Qwen2_5_VLForConditionalGeneration)
    model = model_class.from_pretrained(
        source, trust_remote_code=model_section.trust_remote_code, dtype=_torch_dtype(model_section.dtype)
    )
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=model_section.trust_remote_code)
    image_processor = bound_image_size(Qwen2VLImageProcessorPil.from_pretrained(source), model_section.image_size)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD_TOKEN
    _set_generation_ids(model, tokenizer)
    return model.eval(), _processor(tokenizer, image_processor, model, model_section)


def _processor(tokenizer, image_processor, model: PreTrainedModel, model_section: ModelSection) -> VLProcessor:
    patch = model.config.vision_config.patch_size
    if image_processor.patch_size != patch:
        raise ValueError(f"image processor patch_size {image_processor.patch_size} != vision encoder {patch}")
    return VLProcessor(tokenizer, image_processor, max_question_tokens=model_section.max_question_tokens)


def save_vlm(model: PreTrainedModel, processor: VLProcessor, out_dir: str | Path) -> Path:
    """Write weights (safetensors), config, tokenizer and image processor: ``load_vlm(..., base_dir)``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.tokenizer.save_pretrained(out_dir)
    processor.image_processor.save_pretrained(out_dir)
    return out_dir
