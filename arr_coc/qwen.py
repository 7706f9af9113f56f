"""ARR-COC in front of a Hugging Face Qwen-VL model: keep K of the N merged vision tokens.

The wrapper never changes what the vision encoder or the language model compute; it only changes
*which* image placeholders reach the language model:

1. the vision encoder runs unchanged on every whole image (``get_image_features``; Qwen3-VL also
   returns its deepstack features);
2. the query is the mean input embedding of the question tokens (between ``<|vision_end|>`` and the
   user turn's ``<|im_end|>``);
3. the allocator (``arr_coc.layer.ARRCOCLayer``) scores the N merged tokens and keeps K, ascending;
4. M-RoPE positions come from the model's own ``get_rope_index`` on the *original* sequence, and the
   removed image tokens' columns are dropped, so kept tokens keep their (t, h, w) positions and the
   text after the image sits exactly where the unmodified model puts it;
5. the shortened sequence (K placeholders) is rebuilt per sample and right-padded, the kept vision
   embeddings (times the allocator's gate) are scattered into the placeholders and Qwen3-VL's
   deepstack features are sliced with the same indices;
6. the language model runs with explicit ``(3, B, L)`` position ids, then the LM head.

With ``budget=None`` nothing is dropped and no allocator runs: the logits equal the plain HF model's.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, Qwen3VLForConditionalGeneration

from arr_coc.config import AllocatorSection
from arr_coc.processing import IGNORE_INDEX

Budget = int | list[int] | None


@dataclass
class ARRCOCOutput:
    """What ``ARRCOCQwen.forward`` returns; every ``[B, L, ...]`` tensor is on the shortened sequence."""

    loss: torch.Tensor | None  # mean CE over all label tokens of the batch
    logits: torch.Tensor  # [B, L, V]
    allocations: list  # per sample: arr_coc.layer.Allocation, or None when nothing was dropped
    attention_mask: torch.Tensor  # [B, L]
    per_sample_loss: torch.Tensor | None = None  # [B] mean CE over each sample's label tokens (hard mining)
    input_ids: torch.Tensor | None = None  # [B, L] with K image placeholders per sample
    position_ids: torch.Tensor | None = None  # [3, B, L] M-RoPE positions fed to the language model
    labels: torch.Tensor | None = None  # [B, L] aligned with input_ids


@dataclass
class _Packed:
    """The shortened batch the language model sees."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    inputs_embeds: torch.Tensor
    visual_pos_masks: torch.Tensor
    deepstack: list[torch.Tensor] | None


class ARRCOCQwen(nn.Module):
    """A Qwen3-VL / Qwen2.5-VL ``ForConditionalGeneration`` model with an ``ARRCOCLayer`` at ``.allocator``."""

    def __init__(self, vlm: nn.Module, allocator_config: AllocatorSection | None = None,
                 allocator: nn.Module | None = None, processor=None):
        super().__init__()
        self.vlm = vlm
        self.processor = processor  # VLProcessor: decodes generated answers
        config = self._base().config
        hidden = config.text_config.hidden_size
        if allocator is None:
            from arr_coc.layer import ARRCOCLayer

            allocator = ARRCOCLayer(allocator_config or AllocatorSection(), vision_dim=hidden, query_dim=hidden)
        self.allocator = allocator
        self.image_token_id = config.image_token_id
        self.vision_end_token_id = config.vision_end_token_id
        self.merge_size = config.vision_config.spatial_merge_size
        self.has_deepstack = isinstance(self._base(), Qwen3VLForConditionalGeneration)

    # ----------------------------------------------------------------- model parts
    def _base(self) -> nn.Module:
        """The HF ``...ForConditionalGeneration`` (unwrapping a peft model; LoRA layers live inside it)."""
        vlm = self.vlm
        return vlm.get_base_model() if hasattr(vlm, "get_base_model") else vlm

    @property
    def _inner(self) -> nn.Module:
        return self._base().model  # Qwen3VLModel / Qwen2_5_VLModel

    def _eos_ids(self) -> set[int]:
        """``<|im_end|>`` (and, for real checkpoints, ``<|endoftext|>``): end of a turn."""
        eos = self._base().generation_config.eos_token_id
        return set(eos if isinstance(eos, list) else [eos])

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._inner.get_input_embeddings()(input_ids)

    # ----------------------------------------------------------------- vision + allocator
    def _vision(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
        """Per-image merged vision embeddings ``[N_i, D]`` and per-layer deepstack features (Qwen3-VL)."""
        frozen = not any(p.requires_grad for p in self._inner.visual.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            features = self._inner.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        embeds = list(features.pooler_output)
        deepstack = None
        if self.has_deepstack:
            deepstack = [list(layer) for layer in features.deepstack_features]
        return embeds, deepstack

    def _queries(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """Mean embedding of each sample's question tokens (after ``<|vision_end|>``, before ``<|im_end|>``)."""
        stops = self._eos_ids()
        queries = []
        for row in range(input_ids.shape[0]):
            slots = attention_mask[row].nonzero().squeeze(1)  # works for left or right padding
            ids = input_ids[row, slots].tolist()
            if self.vision_end_token_id not in ids:
                raise ValueError(f"input_ids: sample {row} has no <|vision_end|> token")
            start = ids.index(self.vision_end_token_id) + 1
            end = next((j for j in range(start, len(ids)) if ids[j] in stops), len(ids))
            if end <= start:
                raise ValueError(f"question: sample {row} has no question tokens")
            queries.append(embeds[row, slots[start:end]].mean(0))
        return torch.stack(queries)

    def _budgets(self, budget: Budget, counts: list[int]) -> list[int | None]:
        """Per-sample K (``None``: keep all); ``ValueError`` naming ``budget`` when out of [1, N]."""
        if budget is None:
            return [None] * len(counts)
        budgets = list(budget) if isinstance(budget, (list, tuple)) else [budget] * len(counts)
        if len(budgets) != len(counts):
            raise ValueError(f"budget: {len(budgets)} values for a batch of {len(counts)}")
        checked = []
        for index, (k, n) in enumerate(zip(budgets, counts)):
            try:
                value = None if isinstance(k, bool) else operator.index(k)  # ints, numpy/torch integers
            except TypeError:
                value = None
            if value is None or not 1 <= value <= n:
                raise ValueError(f"budget: K={k!r} for sample {index} must be an int in [1, N={n}]")
            checked.append(value)
        return checked

    def _allocate(self, images, image_grid_thw, vision_embeds, queries, budgets):
        """Run the allocator per image; ``None`` entries keep every token."""
        if images is None and any(k is not None for k in budgets):
            raise ValueError("images: the allocator needs the resized images (VLProcessor output 'images')")
        if all(k is None for k in budgets):
            return list(budgets)
        dtype = _param_dtype(self.allocator, queries.dtype)
        allocations = []
        for i, k in enumerate(budgets):
            if k is None:
                allocations.append(None)
                continue
            _, grid_h, grid_w = (int(v) for v in image_grid_thw[i])
            grid_hw = (grid_h // self.merge_size, grid_w // self.merge_size)
            allocations.append(
                self.allocator(images[i], grid_hw, vision_embeds[i].to(dtype), queries[i].to(dtype), k)
            )
        return allocations

    # ----------------------------------------------------------------- sequence surgery
    def _rope_index(self, input_ids, attention_mask, image_grid_thw, mm_token_type_ids):
        """Full M-RoPE positions ``[3, B, L]`` of the original sequence, by the model's own rule."""
        if mm_token_type_ids is None:
            mm_token_type_ids = (input_ids == self.image_token_id).to(torch.int32)
        positions, _ = self._inner.get_rope_index(
            input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
            attention_mask=attention_mask,
        )
        return positions

    def _pack(self, input_ids, attention_mask, labels, positions, text_embeds, vision_embeds, deepstack,
              allocations) -> _Packed:
        """Drop the removed image tokens, scatter the kept vision features, right-pad the batch."""
        keeps, kept_embeds, kept_deepstack = [], [], []
        for row, allocation in enumerate(allocations):
            valid = attention_mask[row].bool()
            is_image = input_ids[row] == self.image_token_id
            keep = valid.clone()
            embeds = vision_embeds[row]
            index = None
            if allocation is not None:
                index = allocation.indices.to(input_ids.device)
                image_slots = is_image.nonzero().squeeze(1)
                keep[image_slots] = False
                keep[image_slots[index]] = True
                embeds = embeds[index] * allocation.gate.to(embeds.dtype)[:, None]
            keeps.append(keep)
            kept_embeds.append(embeds)
            if deepstack is not None:
                kept_deepstack.append([layer[row] if index is None else layer[row][index] for layer in deepstack])

        lengths = [int(k.sum()) for k in keeps]
        width = max(lengths)
        batch = len(keeps)
        new_ids = input_ids.new_full((batch, width), _pad_id(self._base()))
        new_mask = attention_mask.new_zeros((batch, width))
        new_pos = positions.new_zeros((3, batch, width))
        new_labels = None if labels is None else labels.new_full((batch, width), IGNORE_INDEX)
        new_text = text_embeds.new_zeros((batch, width, text_embeds.shape[-1]))
        for row, keep in enumerate(keeps):
            n = lengths[row]
            new_ids[row, :n] = input_ids[row][keep]
            new_mask[row, :n] = 1
            new_pos[:, row, :n] = positions[:, row][:, keep]
            new_text[row, :n] = text_embeds[row][keep]
            if new_labels is not None:
                new_labels[row, :n] = labels[row][keep]

        image_mask = new_ids == self.image_token_id
        vision = torch.cat(kept_embeds).to(new_text.dtype)
        inputs_embeds = new_text.masked_scatter(image_mask.unsqueeze(-1), vision)
        stacked = None
        if deepstack is not None:
            stacked = [torch.cat([per_row[layer] for per_row in kept_deepstack]) for layer in range(len(deepstack))]
        return _Packed(new_ids, new_mask, new_pos, new_labels, inputs_embeds, image_mask, stacked)

    def _language_model(self, packed: _Packed, past_key_values=None, use_cache: bool = False):
        kwargs = {}
        if self.has_deepstack:
            kwargs = {"visual_pos_masks": packed.visual_pos_masks, "deepstack_visual_embeds": packed.deepstack}
        return self._inner.language_model(
            input_ids=None,
            inputs_embeds=packed.inputs_embeds,
            attention_mask=packed.attention_mask,
            position_ids=packed.position_ids,  # (3, B, L): M-RoPE (t, h, w); no packed-sequence text row
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )

    def _prepare(self, input_ids, attention_mask, pixel_values, image_grid_thw, images, labels, budget,
                 mm_token_type_ids) -> tuple[_Packed, list]:
        vision_embeds, deepstack = self._vision(pixel_values, image_grid_thw)
        counts = [e.shape[0] for e in vision_embeds]
        budgets = self._budgets(budget, counts)
        text_embeds = self._embed(input_ids)
        queries = self._queries(input_ids, attention_mask, text_embeds) if any(
            k is not None for k in budgets) else None
        allocations = self._allocate(images, image_grid_thw, vision_embeds, queries, budgets)
        positions = self._rope_index(input_ids, attention_mask, image_grid_thw, mm_token_type_ids)
        packed = self._pack(input_ids, attention_mask, labels, positions, text_embeds, vision_embeds, deepstack,
                            allocations)
        return packed, allocations

    # ----------------------------------------------------------------- public API
    def forward(self, input_ids, attention_mask, pixel_values, image_grid_thw, images=None, labels=None,
                budget: Budget = None, mm_token_type_ids=None) -> ARRCOCOutput:
        """Logits (and loss with ``labels``) on the sequence with K image tokens per sample.

        ``budget``: ``None`` keeps every token (no allocator), an int is K for every sample, a list
        gives K per sample.
        """
        packed, allocations = self._prepare(input_ids, attention_mask, pixel_values, image_grid_thw, images,
                                            labels, budget, mm_token_type_ids)
        hidden = self._language_model(packed).last_hidden_state
        logits = self._base().lm_head(hidden)
        loss, per_sample = (None, None) if packed.labels is None else causal_lm_loss(logits, packed.labels)
        return ARRCOCOutput(loss=loss, logits=logits, allocations=allocations,
                            attention_mask=packed.attention_mask, per_sample_loss=per_sample,
                            input_ids=packed.input_ids, position_ids=packed.position_ids, labels=packed.labels)

    def score_tokens(self, input_ids, attention_mask, pixel_values, image_grid_thw, images, budget: Budget,
                     **_unused) -> list:
        """Vision encoder + allocator only (no language model): one ``Allocation`` per sample.

        Differentiable in the allocator (stage 1 trains on these scores); the frozen vision encoder
        runs without a graph. Wrap in ``torch.no_grad()`` for inference.
        """
        vision_embeds, _ = self._vision(pixel_values, image_grid_thw)
        budgets = self._budgets(budget, [e.shape[0] for e in vision_embeds])
        if any(k is None for k in budgets):
            raise ValueError("budget: score_tokens needs K (an int or one per sample)")
        queries = self._queries(input_ids, attention_mask, self._embed(input_ids))
        return self._allocate(images, image_grid_thw, vision_embeds, queries, budgets)

    @torch.no_grad()
    def generate_ids(self, input_ids, attention_mask, pixel_values, image_grid_thw, images=None,
                     budget: Budget = None, max_new_tokens: int = 4, mm_token_type_ids=None,
                     return_logits: bool = False, **_unused):
        """Greedy decoding with a KV cache; per sample the new token ids up to and including ``<|im_end|>``.

        With ``return_logits`` also the ``[B, steps, V]`` next-token logits of every step.

        New tokens are appended after the (right-padded) prompt; padding stays masked. The n-th new
        token of a sample sits at M-RoPE position ``max(prompt positions) + n`` on all three axes,
        which is what HF's ``rope_deltas`` gives the unmodified model.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1 (got {max_new_tokens})")
        packed, _ = self._prepare(input_ids, attention_mask, pixel_values, image_grid_thw, images, None, budget,
                                  mm_token_type_ids)
        base = self._base()
        eos_ids = self._eos_ids()
        lengths = packed.attention_mask.sum(1)
        rows = torch.arange(len(lengths), device=lengths.device)
        next_pos = packed.position_ids.amax(dim=(0, 2)) + 1  # [B]
        cache = DynamicCache(config=base.config.get_text_config())
        out = self._language_model(packed, past_key_values=cache, use_cache=True)
        last_hidden = out.last_hidden_state[rows, lengths - 1]
        mask = packed.attention_mask
        generated: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        step_logits = []
        for step in range(max_new_tokens):
            step_logits.append(base.lm_head(last_hidden))
            tokens = step_logits[-1].argmax(-1)
            for row, token in enumerate(tokens.tolist()):
                if not done[row]:
                    generated[row].append(token)
                    done[row] = token in eos_ids
            if all(done) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            step_packed = _Packed(
                input_ids=tokens[:, None], attention_mask=mask,
                position_ids=(next_pos + step).view(1, -1, 1).expand(3, -1, 1),
                labels=None, inputs_embeds=self._embed(tokens[:, None]),
                visual_pos_masks=None, deepstack=None,
            )
            out = self._language_model(step_packed, past_key_values=cache, use_cache=True)
            last_hidden = out.last_hidden_state[:, -1]
        if return_logits:
            return generated, torch.stack(step_logits, dim=1)
        return generated

    def generate(self, *args, **kwargs) -> list[str]:
        """Greedy answers as strings (special tokens dropped), decoded by ``self.processor``."""
        if self.processor is None:
            raise ValueError("processor: ARRCOCQwen(..., processor=VLProcessor) is needed to decode answers")
        return [self.processor.decode(row) for row in self.generate_ids(*args, **kwargs)]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token CE over label tokens: (mean over all label tokens, mean per sample ``[B]``)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view(shift_labels.shape)
    counted = (shift_labels != IGNORE_INDEX).float()
    loss = token_loss.sum() / counted.sum().clamp(min=1.0)
    per_sample = token_loss.sum(1) / counted.sum(1).clamp(min=1.0)
    return loss, per_sample


def _pad_id(model: nn.Module) -> int:
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.config.get_text_config().pad_token_id
    return 0 if pad is None else int(pad)


def _param_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return default
