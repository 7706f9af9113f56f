"""The wrapper against the unmodified Hugging Face model (tiny Qwen3-VL and Qwen2.5-VL, float32)."""

import pytest
import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from arr_coc.config import AllocatorSection
from arr_coc.processing import IGNORE_INDEX, VLProcessor
from arr_coc.qwen import ARRCOCQwen, causal_lm_loss
from arr_coc.tiny import build_image_processor, build_tiny_model, build_tiny_tokenizer

FAMILIES = ["qwen3_vl", "qwen2_5_vl"]
QUESTIONS = ["what color is the circle?", "is there a red square?"]


def _scene(width, height, seed):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


# Non-square and of different sizes: exercises padding and the max(gh, gw) rule of M-RoPE.
IMAGES = [_scene(256, 160, 0), _scene(140, 230, 1)]


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    family = request.param
    tokenizer = build_tiny_tokenizer()
    processor = VLProcessor(tokenizer, build_image_processor(family, 256))
    vlm = build_tiny_model(family, seed=0, tokenizer=tokenizer)
    torch.manual_seed(0)
    model = ARRCOCQwen(vlm, AllocatorSection(grad_mode="straight_through"), processor=processor).eval()
    batch = processor(IMAGES, QUESTIONS, ["red", "yes"])
    return family, model, processor, batch


def _hf_inputs(batch):
    return {k: v for k, v in batch.items() if k not in ("images", "labels")}


def _merged_counts(batch):
    return (batch["image_grid_thw"].prod(-1) // 4).tolist()


@pytest.mark.parametrize("keep_all", ["none", "explicit_n"])
def test_k_equals_n_matches_plain_model(setup, keep_all):
    _, model, _, batch = setup
    grids = batch["image_grid_thw"].tolist()
    assert grids[0] != grids[1]
    budget = None if keep_all == "none" else _merged_counts(batch)
    with torch.no_grad():
        reference = model.vlm(**_hf_inputs(batch), labels=batch["labels"])
        ours = model(**batch, budget=budget)
    assert torch.equal(ours.attention_mask, batch["attention_mask"])
    for row in range(2):
        valid = batch["attention_mask"][row].bool()
        diff = (ours.logits[row][valid] - reference.logits[row][valid]).abs().max().item()
        assert diff < 1e-5, f"sample {row}: max abs diff {diff}"
    assert abs(ours.loss.item() - reference.loss.item()) < 1e-5
    if keep_all == "explicit_n":
        assert [a.budget for a in ours.allocations] == _merged_counts(batch)


def _image_start(input_ids, image_token_id):
    return int((input_ids == image_token_id).nonzero()[0])


def test_kept_tokens_keep_their_positions(setup):
    _, model, _, batch = setup
    budgets = [5, 11]
    full, _ = model._inner.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"],
    )
    with torch.no_grad():
        out = model(**batch, budget=budgets)
    image_id = model.image_token_id
    for row, allocation in enumerate(out.allocations):
        _, grid_h, grid_w = (v // m for v, m in zip(batch["image_grid_thw"][row].tolist(), (1, 2, 2)))
        assert allocation.budget == budgets[row]
        indices = allocation.indices
        assert torch.equal(indices, indices.sort().values)
        ids = out.input_ids[row][out.attention_mask[row].bool()]
        positions = out.position_ids[:, row][:, out.attention_mask[row].bool()]
        slots = (ids == image_id).nonzero().squeeze(1)
        assert len(slots) == budgets[row]
        # 1) equal to what the unmodified model gives the same tokens
        original_slots = (batch["input_ids"][row] == image_id).nonzero().squeeze(1)[indices]
        assert torch.equal(positions[:, slots], full[:, row][:, original_slots])
        # 2) and to the M-RoPE rule written out: (s, s + row, s + col) from the image start s
        start = _image_start(batch["input_ids"][row], image_id)
        expected = torch.stack([torch.full_like(indices, start), start + indices // grid_w, start + indices % grid_w])
        assert torch.equal(positions[:, slots], expected)
        # text before the image is unchanged; after it, text continues at max image position + 1
        assert torch.equal(positions[:, :start], torch.arange(start).expand(3, -1))
        after = positions[:, slots[-1] + 1 :]
        first = start + max(grid_h, grid_w)
        assert torch.equal(after, torch.arange(first, first + after.shape[1]).expand(3, -1))
        tail = full[:, row][:, batch["attention_mask"][row].bool()][:, -after.shape[1] :]
        assert torch.equal(after, tail)


def test_k_less_than_n_equals_plain_model_on_the_kept_tokens(setup):
    """HF's own forward, fed the shortened ids, the kept features and the kept positions, agrees."""
    family, model, _, batch = setup
    with torch.no_grad():
        out = model(**batch, budget=[6, 9])
        features = model._inner.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
        kept = tuple(e[a.indices] for e, a in zip(features.pooler_output, out.allocations))
        if family == "qwen3_vl":
            deepstack = [tuple(f[a.indices] for f, a in zip(layer, out.allocations)) for layer in
                         features.deepstack_features]
            encoded = BaseModelOutputWithDeepstackFeatures(pooler_output=kept, deepstack_features=deepstack)
        else:
            encoded = BaseModelOutputWithPooling(pooler_output=kept)
        reference = model.vlm(
            input_ids=out.input_ids, attention_mask=out.attention_mask, position_ids=out.position_ids,
            mm_encoder_outputs={"image": encoded},
        )
    valid = out.attention_mask.bool()
    assert (out.logits[valid] - reference.logits[valid]).abs().max().item() < 1e-5
    # labels survive the surgery: the answer tokens are still labelled, in order
    for row in range(2):
        assert out.labels[row][out.labels[row] != IGNORE_INDEX].tolist() == \
            batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
    loss, per_sample = causal_lm_loss(reference.logits, out.labels)
    assert torch.allclose(out.loss, loss, atol=1e-6) and torch.allclose(out.per_sample_loss, per_sample, atol=1e-6)


def test_generate_matches_hf_generate(setup):
    _, model, processor, _ = setup
    prompts = processor(IMAGES, QUESTIONS)
    batched = model.generate_ids(**prompts, budget=None, max_new_tokens=5)
    for row in range(2):
        single = processor(IMAGES[row : row + 1], QUESTIONS[row : row + 1])
        with torch.no_grad():
            hf = model.vlm.generate(**_hf_inputs(single), max_new_tokens=5, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True)
        expected = hf.sequences[0, single["input_ids"].shape[1] :].tolist()
        ours, logits = model.generate_ids(**single, max_new_tokens=5, return_logits=True)
        assert ours == [expected]
        assert batched[row] == expected
        # the same next-token distributions at every step, not only the same argmax
        hf_logits = torch.stack(hf.logits, dim=1)
        assert (logits - hf_logits).abs().max().item() < 1e-4
    assert model.generate(**prompts, max_new_tokens=5) == [processor.decode(ids) for ids in batched]


def test_generate_with_different_budgets_per_sample(setup):
    _, model, processor, _ = setup
    prompts = processor(IMAGES, QUESTIONS)
    budgets = [4, 13]
    batched, batched_logits = model.generate_ids(**prompts, budget=budgets, max_new_tokens=5, return_logits=True)
    assert len(batched) == 2 and all(1 <= len(ids) <= 5 for ids in batched)
    for row in range(2):
        single = processor(IMAGES[row : row + 1], QUESTIONS[row : row + 1])
        ids, logits = model.generate_ids(**single, budget=budgets[row], max_new_tokens=5, return_logits=True)
        assert ids == [batched[row]]
        steps = len(ids[0])  # after <|im_end|> a finished row's logits are not meaningful
        assert (logits[0, :steps] - batched_logits[row, :steps]).abs().max().item() < 1e-4


def test_bad_budgets_name_the_argument(setup):
    _, model, _, batch = setup
    counts = _merged_counts(batch)
    for budget in (0, counts[1] + 1, [1], [3, -2]):
        with pytest.raises(ValueError, match="budget"):
            model(**batch, budget=budget)
    with pytest.raises(ValueError, match="budget"):
        model.score_tokens(**batch, budget=None)


def test_score_tokens_agrees_with_forward(setup):
    _, model, _, batch = setup
    scored = model.score_tokens(**batch, budget=7)
    with torch.no_grad():
        out = model(**batch, budget=7)
    for a, b, n in zip(scored, out.allocations, _merged_counts(batch)):
        assert a.scores.shape == (n,)
        assert torch.equal(a.indices, b.indices)
    # stage 1 trains the allocator on these scores: they carry a graph to its parameters
    scored[0].scores.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.allocator.parameters())
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("grad_mode", ["straight_through", "frozen"])
def test_gradient_reaches_allocator_only_when_straight_through(grad_mode):
    tokenizer = build_tiny_tokenizer()
    processor = VLProcessor(tokenizer, build_image_processor("qwen3_vl", 128))
    vlm = build_tiny_model("qwen3_vl", seed=0, tokenizer=tokenizer).requires_grad_(False)
    torch.manual_seed(0)
    model = ARRCOCQwen(vlm, AllocatorSection(grad_mode=grad_mode), processor=processor).train()
    batch = processor(IMAGES, QUESTIONS, ["red", "yes"])
    loss = model(**batch, budget=5).loss
    if grad_mode == "frozen":
        # frozen VLM and a gate without gradient: the answer loss reaches no parameter at all
        assert not loss.requires_grad
        return
    loss.backward()
    grads = [p.grad for p in model.allocator.participatory.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in vlm.parameters())


def test_lora_on_the_language_model_trains_through_the_wrapper():
    """Stage 2 wraps ``model.vlm`` in peft; the wrapper must still run the (adapted) layers."""
    from peft import LoraConfig, get_peft_model

    tokenizer = build_tiny_tokenizer()
    processor = VLProcessor(tokenizer, build_image_processor("qwen3_vl", 128))
    vlm = build_tiny_model("qwen3_vl", seed=0, tokenizer=tokenizer)
    torch.manual_seed(0)
    model = ARRCOCQwen(vlm, AllocatorSection(grad_mode="frozen"), processor=processor)
    batch = processor(IMAGES, QUESTIONS, ["red", "yes"])
    with torch.no_grad():
        before = model(**batch, budget=6).logits
    model.vlm = get_peft_model(model.vlm, LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    lora = [p for n, p in model.vlm.named_parameters() if "lora_B" in n]
    assert lora
    with torch.no_grad():
        for p in lora:
            p.fill_(0.01)  # LoRA B starts at zero; make the adapters change the output
    out = model(**batch, budget=6)
    assert (out.logits - before).abs().max() > 1e-4
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


def _left_padded(batch):
    """The same batch with padding moved to the left (as HF processors do for generation)."""
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "labels"):
        rows = []
        for row in range(batch[key].shape[0]):
            pad = int((batch["attention_mask"][row] == 0).sum())
            rows.append(torch.roll(batch[key][row], pad))
        out[key] = torch.stack(rows)
    return out


def test_left_padded_input_gives_the_same_result(setup):
    _, model, _, batch = setup
    left = _left_padded(batch)
    assert left["attention_mask"][:, 0].tolist() != batch["attention_mask"][:, 0].tolist()
    with torch.no_grad():
        right_out = model(**batch, budget=[7, 5])
        left_out = model(**left, budget=[7, 5])
    assert torch.equal(right_out.input_ids, left_out.input_ids)  # the wrapper re-pads on the right
    valid = right_out.attention_mask.bool()
    assert (right_out.logits[valid] - left_out.logits[valid]).abs().max().item() < 1e-5
    assert abs(right_out.loss.item() - left_out.loss.item()) < 1e-5
