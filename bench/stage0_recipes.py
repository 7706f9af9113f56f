"""Which stage-0 warm-up recipe makes the from-scratch tiny Qwen3-VL read the image?

A probe beside the pipeline (plain AdamW on the HF model, no DeepSpeed, no shards) so many
recipes can be compared side by side in one run. Every recipe trains the same tiny model on
the same synthetic scenes and is evaluated every ``--eval-every`` steps on the same held-out
questions twice: with the real images and with uniform grey ones. The metric is first
answer-token accuracy under teacher forcing; the real-minus-blank gap is what the model reads
from the pixels (the questions carry no text-only shortcut, see data_prep.synth).

    python bench/stage0_recipes.py --scenes 3000 --steps 1500 --recipes vqa,cap50 [--device cuda]

Prints one JSON line per evaluation and a final table (recipe, samples seen, real, blank,
gap, per-kind real accuracy).

Measured 2026-11-30 on one H200 (all recipes as parallel processes on 4000 scenes, 448
held-out questions, each stopped by --time-limit; first-token accuracy real / blank / gap):

    recipe               samples  real   blank  gap
    vqa                   14816  0.328  0.297  +0.031
    vqa_vis               14416  0.295  0.288  +0.007   vision 4 x 128 wide
    vqa_theta             18576  0.364  0.286  +0.078   rope_theta 1e4, lr 1e-3
    cap50                 14736  0.321  0.310  +0.011   half of each batch captions, lr 3e-3
    cap50_lr1e3           14848  0.377  0.312  +0.065
    cap50_theta           14752  0.393  0.306  +0.087
    cap50_theta_lr1e3     18400  0.353  0.315  +0.038   (+0.056 at 16000)
    cap50_theta_lm4       17360  0.371  0.308  +0.062   (+0.087 at 9600)
    cap50_lm4             14288  0.312  0.221  +0.092
    cap50_wide            14240  0.308  0.208  +0.100   text and vision 128 wide
    cap75                 14704  0.326  0.252  +0.074
    cap50_bs64            20800  0.375  0.297  +0.078
    cap50_vis             14224  0.230  0.225  +0.004
    cap_first             14736  0.201  0.221  -0.020   captions only for the first 30%

Read: at ~15k samples every recipe is still near the answer priors (colour questions learn
first, 0.30-0.38 against a 0.13 prior; count / where / exists at chance) and a single
evaluation moves by +-0.03 ("exists" flips between always-yes and always-no). Captions,
lr 1e-3 and rope_theta 1e4 (now the tiny default) are each worth a few points; a wider
vision encoder alone is not. The recipes are run longer than this on CPU in the shipped base
(arr_coc/assets/tiny-qwen3vl-synth/PROVENANCE.json).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arr_coc.processing import IGNORE_INDEX, VLProcessor  # noqa: E402
from arr_coc.tiny import build_image_processor, build_tiny_tokenizer, tiny_config  # noqa: E402
from data_prep.synth import CAPTION_QUESTION, QUESTION_TYPES, describe, generate  # noqa: E402


@dataclass
class Recipe:
    caption_fraction: float = 0.0
    """Share of each batch that is a caption sample."""
    caption_only_until: float = 0.0
    """Fraction of the run trained on captions only (a caption-first curriculum)."""
    lr: float = 3e-3
    batch_size: int = 16
    text: dict = field(default_factory=dict)
    """Overrides of the tiny text config."""
    vision: dict = field(default_factory=dict)
    """Overrides of the tiny vision config."""


RECIPES = {
    "vqa": Recipe(),
    "cap50": Recipe(caption_fraction=0.5),
    "cap50_lr1e3": Recipe(caption_fraction=0.5, lr=1e-3),
    "cap_first": Recipe(caption_fraction=0.5, caption_only_until=0.3),
    "cap50_bs64": Recipe(caption_fraction=0.5, batch_size=64),
    "cap50_vis": Recipe(caption_fraction=0.5, vision=dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4)),
    "cap50_lm4": Recipe(caption_fraction=0.5, text=dict(num_hidden_layers=4)),
    "cap50_theta": Recipe(caption_fraction=0.5, text=dict(rope_theta=10_000.0)),
    "vqa_vis": Recipe(vision=dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4)),
    "cap75": Recipe(caption_fraction=0.75),
    "vqa_theta": Recipe(lr=1e-3, text=dict(rope_theta=10_000.0)),
    "cap50_theta_lr1e3": Recipe(caption_fraction=0.5, lr=1e-3, text=dict(rope_theta=10_000.0)),
    "cap50_theta_lm4": Recipe(caption_fraction=0.5, lr=1e-3, text=dict(rope_theta=10_000.0, num_hidden_layers=4)),
    "cap75_theta_lm4": Recipe(caption_fraction=0.75, lr=1e-3, text=dict(rope_theta=10_000.0, num_hidden_layers=4)),
    "cap50_theta_lm3": Recipe(caption_fraction=0.5, lr=1e-3, text=dict(rope_theta=10_000.0, num_hidden_layers=3)),
    "best_bs64": Recipe(caption_fraction=0.5, lr=1e-3, batch_size=64, text=dict(rope_theta=10_000.0)),
    "best_bs32": Recipe(caption_fraction=0.5, lr=1e-3, batch_size=32, text=dict(rope_theta=10_000.0)),
    "cap50_wide": Recipe(caption_fraction=0.5, text=dict(hidden_size=128, intermediate_size=256, head_dim=32),
                         vision=dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4)),
}


def kind_of(question: str) -> str:
    return next((kind for kind, prefix in QUESTION_TYPES.items() if question.startswith(prefix)), "caption")


def load_split(root: Path, split: str) -> tuple[list[dict], list[dict]]:
    """(vqa samples, caption samples) with file paths; answers are the canonical ones."""
    coco = json.loads((root / f"instances_{split}.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    objects: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        objects.setdefault(ann["image_id"], []).append(
            {"bbox": ann["bbox"], "category": names[ann["category_id"]], "color": ann.get("color")})
    images = {im["id"]: im for im in coco["images"]}
    questions = json.loads((root / f"questions_{split}.json").read_text())["questions"]
    answers = {a["question_id"]: a["multiple_choice_answer"]
               for a in json.loads((root / f"annotations_{split}.json").read_text())["annotations"]}
    vqa = [{"image_id": q["image_id"], "question": q["question"], "answer": answers[q["question_id"]]}
           for q in questions]
    captions = []
    for image_id, im in images.items():
        caption = describe(objects.get(image_id, []), im["width"], im["height"])
        if caption:
            captions.append({"image_id": image_id, "question": CAPTION_QUESTION, "answer": caption})
    paths = {image_id: root / "images" / im["file_name"] for image_id, im in images.items()}
    return vqa, captions, paths


class Encoded:
    """Pixel values per image (once) and token rows per sample, batched on demand."""

    def __init__(self, processor: VLProcessor, paths: dict[int, Path], device: torch.device):
        self.processor, self.device = processor, device
        self.pixels: dict[int, torch.Tensor] = {}
        grid = None
        for image_id, path in paths.items():
            vision = processor.image_processor(images=[Image.open(path).convert("RGB")], return_tensors="pt")
            self.pixels[image_id] = vision["pixel_values"].to(device, torch.float16)
            grid = vision["image_grid_thw"]
        self.grid = grid
        self.tokens = int(grid.prod()) // processor.merge_size**2
        blank = processor.image_processor(images=[Image.new("RGB", (256, 256), (130, 130, 130))],
                                          return_tensors="pt")
        self.blank = blank["pixel_values"].to(device, torch.float16)

    def batch(self, samples: list[dict], blank: bool = False) -> dict:
        rows = [self.processor._sequence(s["question"], self.tokens, s["answer"], i) for i, s in enumerate(samples)]
        out = self.processor._pad(rows, with_labels=True)
        pixels = [self.blank if blank else self.pixels[s["image_id"]] for s in samples]
        out["pixel_values"] = torch.cat(pixels).float()
        out["image_grid_thw"] = self.grid.repeat(len(samples), 1)
        return {k: v.to(self.device) for k, v in out.items()}


def build_model(recipe: Recipe, tokenizer, seed: int, device: torch.device):
    from transformers import Qwen3VLForConditionalGeneration

    config = tiny_config("qwen3_vl", tokenizer)
    for key, value in recipe.text.items():
        if key == "rope_theta":
            config.text_config.rope_parameters["rope_theta"] = value
        else:
            setattr(config.text_config, key, value)
    for key, value in recipe.vision.items():
        setattr(config.vision_config, key, value)
    config.vision_config.out_hidden_size = config.text_config.hidden_size
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(config).to(device)


@torch.no_grad()
def first_token_accuracy(model, data: Encoded, samples: list[dict], blank: bool) -> tuple[float, dict]:
    model.eval()
    hits, per_kind = [], {}
    for start in range(0, len(samples), 64):
        chunk = samples[start : start + 64]
        batch = data.batch(chunk, blank=blank)
        labels = batch.pop("labels")
        logits = model(**batch).logits
        first = (labels != IGNORE_INDEX).float().argmax(1)  # first answer position
        rows = torch.arange(len(chunk), device=labels.device)
        pred = logits[rows, first - 1].argmax(-1)
        for s, ok in zip(chunk, (pred == labels[rows, first]).tolist()):
            hits.append(ok)
            per_kind.setdefault(kind_of(s["question"]), []).append(ok)
    model.train()
    return sum(hits) / len(hits), {k: round(sum(v) / len(v), 3) for k, v in per_kind.items()}


def train(name: str, recipe: Recipe, args, tokenizer, data: Encoded, train_vqa, train_caps, val) -> list[dict]:
    device = data.device
    model = build_model(recipe, tokenizer, args.seed, device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    rng = random.Random(args.seed)
    results, start = [], time.time()
    for step in range(1, args.steps + 1):
        n_caps = recipe.batch_size if step <= recipe.caption_only_until * args.steps else round(
            recipe.batch_size * recipe.caption_fraction)
        batch = rng.sample(train_vqa, recipe.batch_size - n_caps) + rng.sample(train_caps, n_caps)
        inputs = data.batch(batch)
        loss = model(**inputs).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        out_of_time = time.time() - start > args.time_limit
        if step % args.eval_every == 0 or step == args.steps or out_of_time:
            real, kinds = first_token_accuracy(model, data, val, blank=False)
            blank, _ = first_token_accuracy(model, data, val, blank=True)
            row = {"recipe": name, "step": step, "samples": step * recipe.batch_size, "loss": round(loss.item(), 3),
                   "real": round(real, 3), "blank": round(blank, 3), "gap": round(real - blank, 3),
                   "kinds": kinds, "seconds": round(time.time() - start, 1)}
            print(json.dumps(row), flush=True)
            results.append(row)
        if out_of_time:
            break
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--val-questions", type=int, default=448)
    parser.add_argument("--recipes", default="vqa,cap50")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--time-limit", type=float, default=float("inf"), help="seconds of training per recipe")
    parser.add_argument("--data", default=None, help="reuse a generated folder (made if missing)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    root = Path(args.data or tempfile.mkdtemp(prefix="stage0_recipes_"))
    if not (root / "instances_val.json").exists():
        generate(root, images=args.scenes, seed=args.seed, image_size=256, val_fraction=0.15)
    train_vqa, train_caps, paths = load_split(root, "train")
    val, _, val_paths = load_split(root, "val")
    val = val[: args.val_questions]
    tokenizer = build_tiny_tokenizer()
    processor = VLProcessor(tokenizer, build_image_processor("qwen3_vl", 256))
    data = Encoded(processor, {**paths, **val_paths}, device)
    print(json.dumps({"scenes": args.scenes, "train_questions": len(train_vqa), "captions": len(train_caps),
                      "val_questions": len(val)}), flush=True)
    final = []
    for name in args.recipes.split(","):
        final.append(train(name, RECIPES[name], args, tokenizer, data, train_vqa, train_caps, val)[-1])
    print(f"{'recipe':14s} {'samples':>8s} {'real':>6s} {'blank':>6s} {'gap':>6s}  per-kind real")
    for row in final:
        print(f"{row['recipe']:14s} {row['samples']:8d} {row['real']:6.3f} {row['blank']:6.3f} {row['gap']:6.3f}  "
              f"{row['kinds']}")


if __name__ == "__main__":
    main()
