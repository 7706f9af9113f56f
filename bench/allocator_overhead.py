"""Allocator overhead and prefill speed-up at Qwen3-VL-2B dimensions (random weights, CPU or GPU).

What it measures, side by side in one run (median of ``--reps`` repetitions, interleaved):

* the allocator (texture array, three scorers, balancer, top-K) on one image of a
  ``grid``×``grid`` merged-token grid — by default 32×32 = 1024 tokens, i.e. a 1024×1024 image
  (patch 16 → 64×64 patches, merge 2 → 32×32);
* the language-model prefill the wrapper runs (sequence surgery + decoder layers) for
  K ∈ {N/8, N/4, N/2} kept tokens and for all N, with T text tokens around the image.

The language model has the real 2B widths but only ``--layers`` decoder layers (memory and time on
a laptop). Forward hooks time the decoder layers themselves; the full 28-layer prefill is estimated
as (measured time − time in the layers) + time in the layers × 28 / ``--layers``, so the per-call
parts (sequence surgery, rotary tables, mask, final norm) are counted once, not scaled. The vision
encoder runs once, with ``--vision-layers`` blocks, timed separately: the allocator needs its
features, the comparison does not.

Clock: on CPU the default is one intra-op thread timed by the process's CPU time, which is what
the work costs even when other jobs share the cores (wall time under contention swung 2-10x
between runs); on CUDA, wall time with synchronisation. ``--clock wall --threads 2`` overrides.

Targets: allocator ≤ 3% of the full (K = N) prefill; measured prefill speed-up at each K ≥ 0.9 ×
the ideal token ratio (N + T) / (K + T).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

# Qwen/Qwen3-VL-2B-Instruct config.json, written out (nothing is downloaded).
QWEN3_VL_2B_TEXT = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
    num_attention_heads=16, num_key_value_heads=8, head_dim=128, hidden_act="silu",
    max_position_embeddings=262144, rms_norm_eps=1e-6, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                     "mrope_section": [24, 20, 20], "mrope_interleaved": True},
)
QWEN3_VL_2B_VISION = dict(
    depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
    deepstack_visual_indexes=[5, 11, 17], hidden_act="gelu_pytorch_tanh",
)
SPECIAL_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                   vision_end_token_id=151653)
IM_START, IM_END, ENDOFTEXT, NEWLINE, USER, ASSISTANT = 151644, 151645, 151643, 198, 872, 77091

TARGET_ALLOCATOR_FRACTION = 0.03
TARGET_SPEEDUP_FRACTION = 0.9


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers actually run (scaled to 28)")
    parser.add_argument("--vision-layers", type=int, default=1, help="vision blocks run once (features only)")
    parser.add_argument("--grid", type=int, default=32, help="merged grid side: N = grid² tokens")
    parser.add_argument("--text-tokens", type=int, default=32, help="T: text tokens around the image")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                        help="cpu: process CPU time (robust to other load on a shared machine; default on "
                             "CPU with one thread); wall: elapsed time (default on CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_model(args, dtype: torch.dtype):
    """ARRCOCQwen on a Qwen3-VL with the 2B widths, ``--layers`` decoder and ``--vision-layers`` blocks."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from arr_coc.config import AllocatorSection
    from arr_coc.qwen import ARRCOCQwen

    text = dict(QWEN3_VL_2B_TEXT, num_hidden_layers=args.layers)
    vision = dict(QWEN3_VL_2B_VISION, depth=args.vision_layers,
                  deepstack_visual_indexes=[i for i in (0, 1, 2) if i < args.vision_layers][: args.layers])
    config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **SPECIAL_IDS)
    torch.manual_seed(args.seed)
    vlm = Qwen3VLForConditionalGeneration(config).to(device=args.device, dtype=dtype).eval()
    vlm.generation_config.eos_token_id = [IM_END, ENDOFTEXT]
    vlm.generation_config.pad_token_id = ENDOFTEXT
    model = ARRCOCQwen(vlm, AllocatorSection(grad_mode="frozen")).to(args.device).eval()
    model.allocator.float()  # the allocator runs in float32 (as in training)
    return model


def build_inputs(args, device):
    """One chat prompt with a ``grid*32``-pixel synthetic scene and T text tokens (real Qwen ids)."""
    from arr_coc.demo import synthetic_scene
    from arr_coc.tiny import build_image_processor

    side = args.grid * 32  # patch 16 × merge 2 per merged token
    image, _ = synthetic_scene(args.seed, size=side)
    image_processor = build_image_processor("qwen3_vl", side)
    vision = image_processor(images=[image], return_tensors="pt")
    grid_thw = vision["image_grid_thw"]
    num_tokens = int(grid_thw.prod()) // 4
    if num_tokens != args.grid**2:
        raise ValueError(f"grid: expected {args.grid**2} merged tokens, the processor gave {num_tokens}")
    prefix = [IM_START, USER, NEWLINE, SPECIAL_IDS["vision_start_token_id"]]
    suffix = [IM_END, NEWLINE, IM_START, ASSISTANT, NEWLINE]
    question_len = args.text_tokens - len(prefix) - len(suffix) - 1
    if question_len < 1:
        raise ValueError(f"text_tokens: need at least {len(prefix) + len(suffix) + 2}")
    question = torch.randint(1000, 100000, (question_len,), generator=torch.Generator().manual_seed(args.seed))
    ids = prefix + [SPECIAL_IDS["image_token_id"]] * num_tokens + [SPECIAL_IDS["vision_end_token_id"]]
    ids += question.tolist() + suffix
    input_ids = torch.tensor([ids], device=device)
    pixels = torch.from_numpy(__import__("numpy").array(image)).permute(2, 0, 1).float() / 255
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": vision["pixel_values"].to(device),
        "image_grid_thw": grid_thw.to(device),
        "images": [pixels.to(device)],  # already 32-aligned: the processor's resize is the identity
    }, num_tokens


class LayerClock:
    """Seconds spent inside the decoder layers, via forward pre-/post-hooks (synchronised on CUDA)."""

    def __init__(self, layers, device: str):
        self.device = device
        self.now = CLOCK["now"]
        self.total = 0.0
        self._start = 0.0
        for layer in layers:
            layer.register_forward_pre_hook(self._enter)
            layer.register_forward_hook(self._leave)

    def _enter(self, *_):
        _sync(self.device)
        self._start = self.now()

    def _leave(self, *_):
        _sync(self.device)
        self.total += self.now() - self._start

    def reset(self) -> None:
        self.total = 0.0


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# Which clock times everything: wall time, or this process's CPU time. On a shared CPU a
# single-threaded run's CPU time is what the work costs, whatever else the machine is doing.
CLOCK = {"now": time.perf_counter}


def timed(fn, device: str) -> float:
    _sync(device)
    start = CLOCK["now"]()
    fn()
    _sync(device)
    return CLOCK["now"]() - start


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    clock = args.clock if args.clock != "auto" else ("cpu" if args.device == "cpu" and args.threads == 1 else "wall")
    CLOCK["now"] = time.process_time if clock == "cpu" else time.perf_counter
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                           else torch.float32)
    model = build_model(args, dtype)
    inputs, n = build_inputs(args, args.device)
    t = args.text_tokens
    budgets = [n // 8, n // 4, n // 2, n]
    scale = QWEN3_VL_2B_TEXT["num_hidden_layers"] / args.layers
    layer_clock = LayerClock(model._inner.language_model.layers, args.device)

    with torch.no_grad():
        vision_s = timed(lambda: model._vision(inputs["pixel_values"], inputs["image_grid_thw"]), args.device)
        vision_embeds, deepstack = model._vision(inputs["pixel_values"], inputs["image_grid_thw"])
        text_embeds = model._embed(inputs["input_ids"])
        queries = model._queries(inputs["input_ids"], inputs["attention_mask"], text_embeds)
        positions = model._rope_index(inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"], None)

        def allocate(k):
            return model._allocate(inputs["images"], inputs["image_grid_thw"], vision_embeds, queries, [k])

        def prefill(allocations):
            packed = model._pack(inputs["input_ids"], inputs["attention_mask"], None, positions, text_embeds,
                                 vision_embeds, deepstack, allocations)
            model._language_model(packed)

        def prefill_28_layers(k) -> float:
            """Estimated full-depth prefill: per-call parts once, decoder layers scaled to 28."""
            layer_clock.reset()
            measured = timed(lambda: prefill(kept[k]), args.device)
            return measured - layer_clock.total + layer_clock.total * scale

        kept = {k: (allocate(k) if k < n else [None]) for k in budgets}
        allocate(n // 4)  # warm-up
        prefill(kept[n // 8])
        alloc_times: list[float] = []
        prefill_times: dict[int, list[float]] = {k: [] for k in budgets}
        for _ in range(args.reps):  # interleaved: drift in machine load hits every setting alike
            alloc_times.append(timed(lambda: allocate(n // 4), args.device))
            for k in budgets:
                prefill_times[k].append(prefill_28_layers(k))

    allocator_s = statistics.median(alloc_times)
    prefill_s = {k: statistics.median(v) for k, v in prefill_times.items()}
    full = prefill_s[n]
    rows = []
    for k in budgets:
        ideal = (n + t) / (k + t)
        measured = full / prefill_s[k]
        rows.append({"K": k, "prefill_s": prefill_s[k], "speedup": measured, "ideal": ideal,
                     "ratio_to_ideal": measured / ideal, "allocator_fraction": allocator_s / prefill_s[k]})

    print(f"Qwen3-VL-2B widths, {args.layers}/28 decoder layers run (x{scale:g}), device {args.device}, "
          f"{str(dtype).removeprefix('torch.')}, N={n} ({args.grid}x{args.grid}), T={t}, reps={args.reps}, "
          f"{clock} clock, {torch.get_num_threads()} thread(s)")
    print(f"vision encoder ({args.vision_layers}/24 blocks, once, untimed in ratios): {vision_s:.3f} s")
    print(f"allocator (score {n} tokens + top-K): {allocator_s * 1000:.1f} ms  "
          f"= {allocator_s / full:.2%} of the full prefill")
    print(f"{'K':>6} {'prefill s (28 layers)':>22} {'speed-up':>9} {'ideal':>7} {'/ideal':>7} {'alloc/prefill':>14}")
    for row in rows:
        print(f"{row['K']:>6} {row['prefill_s']:>22.3f} {row['speedup']:>9.2f} {row['ideal']:>7.2f} "
              f"{row['ratio_to_ideal']:>7.2f} {row['allocator_fraction']:>14.2%}")

    allocator_fraction = allocator_s / full
    speedups_ok = all(r["ratio_to_ideal"] >= TARGET_SPEEDUP_FRACTION for r in rows if r["K"] < n)
    result = {
        "bench": "allocator_overhead",
        "device": args.device, "dtype": str(dtype).removeprefix("torch."), "layers_run": args.layers,
        "clock": clock, "threads": torch.get_num_threads(),
        "N": n, "T": t, "reps": args.reps,
        "vision_s": round(vision_s, 4),
        "allocator_ms": round(allocator_s * 1000, 2),
        "prefill_full_s": round(full, 4),
        "allocator_fraction": round(allocator_fraction, 4),
        "speedups": {str(r["K"]): round(r["speedup"], 3) for r in rows if r["K"] < n},
        "ideal": {str(r["K"]): round(r["ideal"], 3) for r in rows if r["K"] < n},
        "targets": {"allocator_fraction_max": TARGET_ALLOCATOR_FRACTION,
                    "speedup_min_fraction_of_ideal": TARGET_SPEEDUP_FRACTION},
        "pass": bool(allocator_fraction <= TARGET_ALLOCATOR_FRACTION and speedups_ok),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
