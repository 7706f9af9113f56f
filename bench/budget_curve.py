"""VQA accuracy vs token budget: the curriculum's allocator against query-agnostic selectors.

Runs the tiny curriculum through the real runner on CPU, by default
``configs/tiny-pretrained.yaml``: from the shipped tiny base, stage 1 → 2 → mining → 3, as a
production run starts from a pretrained checkpoint (``--base scratch`` runs stage 0 first).
Then, on held-out synthetic VQA questions, it swaps selectors into the final model (its
LoRA adapters stay) and measures VQA soft accuracy of greedy answers at
K ∈ {N/16, N/8, N/4, N/2, N} for: the trained allocator, random, centre prior,
saliency only (bottom-up image saliency) and vision-token norm (query-agnostic).
K = N is the all-token model (no selection). It also prints the training samples/s of
every stage and the ZeRO-3 / ZeRO-2 step-time ratio of stage 2 measured side by side.

Targets: at K = N/4 the allocator keeps >= 97% of the all-token accuracy, and at K = N/8
it beats every query-agnostic selector by >= 10 points.

    .venv/bin/python bench/budget_curve.py              # about 10 minutes on 2 cores
    .venv/bin/python bench/budget_curve.py --root runs/bench --reuse   # keep / reuse the curriculum

The last line is one JSON object: figures, targets and "pass".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

SELECTORS = ("allocator", "random", "centre", "saliency", "vision_norm")
QUERY_AGNOSTIC = ("random", "centre", "saliency", "vision_norm")
STAGES = ("stage0", "stage1", "stage2", "mine", "stage3")
RETAIN_TARGET = 0.97
MARGIN_TARGET = 0.10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny-pretrained.yaml"),
                        help="run config; its stage settings are used, with the step counts below")
    parser.add_argument("--root", default=None, help="run root (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true", help="reuse finished stage artifacts under --root")
    parser.add_argument("--base", choices=("pretrained", "scratch"), default="pretrained",
                        help="start from the shipped tiny base, or warm the tiny model up with stage 0")
    parser.add_argument("--images", type=int, default=1500, help="synthetic images (train + val)")
    parser.add_argument("--stage0-steps", type=int, default=400, help="--base scratch only")
    parser.add_argument("--stage1-steps", type=int, default=200)
    parser.add_argument("--stage2-steps", type=int, default=300)
    parser.add_argument("--stage3-steps", type=int, default=150)
    parser.add_argument("--eval-questions", type=int, default=288, help="held-out questions per point")
    parser.add_argument("--zero-steps", type=int, default=8, help="stage-2 steps per ZeRO timing run")
    return parser.parse_args()


def stage_overrides(args: argparse.Namespace, root: Path) -> list[str]:
    """The config's stage settings with this run's root, data size and step counts."""
    sets = [f"run.root={root}", "run.name=budget-curve", f"data.images={args.images}"]
    steps = {"stage1": args.stage1_steps, "stage2": args.stage2_steps, "stage3": args.stage3_steps}
    if args.base == "scratch":
        sets += ["model.source=tiny", "stages.stage0.enabled=true"]
        steps["stage0"] = args.stage0_steps
    for stage, count in steps.items():
        sets += [f"stages.{stage}.max_steps={count}", f"stages.{stage}.checkpoint_every={count}"]
    return sets


def run_curriculum(cfg, reuse: bool) -> dict[str, dict]:
    from stages.runner import run_stage

    metrics = {}
    for stage in STAGES if cfg.stages.stage0.enabled else STAGES[1:]:
        artifact = cfg.run_dir / stage / "artifact"
        if not (reuse and (artifact / "metrics.json").is_file()):
            print(f"-- training {stage}", flush=True)
            run_stage(stage, cfg, resume=False)
        metrics[stage] = json.loads((artifact / "metrics.json").read_text())
    return metrics


def final_model(cfg):
    """The stage-3 model: base + allocator + adapters from its artifact (safetensors)."""
    from stages.common import build_vlm, load_allocator, read_lineage
    from stages.runner import make_context
    from stages.stage2 import load_lora

    artifact = cfg.run_dir / "stage3" / "artifact"
    ctx = make_context("stage3", cfg, None, 0, 1)
    model, processor = build_vlm(ctx, read_lineage(artifact)["base"])
    load_allocator(model, artifact)
    load_lora(model, artifact)
    return model.eval(), processor


def budget_curve(cfg, questions: int) -> tuple[list[int], dict[str, dict[int, float]], int]:
    from stages.data import data_paths, read_samples
    from stages.evaluate import SelectorAllocator, swapped_allocator, vqa_accuracy

    model, processor = final_model(cfg)
    samples = read_samples(data_paths(cfg).vqav2, "val", questions)
    grid = processor([samples[0]["image"]], [samples[0]["json"]["question"]])["image_grid_thw"]
    tokens = int(grid[0].prod()) // processor.merge_size**2
    budgets = [tokens // 16, tokens // 8, tokens // 4, tokens // 2, tokens]
    device = torch.device("cpu")
    all_tokens = vqa_accuracy(model, processor, samples, None, 16, cfg.model.max_answer_tokens, device)
    curve: dict[str, dict[int, float]] = {}
    for name in SELECTORS:
        selector = None if name == "allocator" else SelectorAllocator(name, seed=cfg.seed)
        curve[name] = {}
        with swapped_allocator(model, selector):
            for k in budgets[:-1]:
                curve[name][k] = vqa_accuracy(
                    model, processor, samples, k, 16, cfg.model.max_answer_tokens, device
                )
        curve[name][tokens] = all_tokens
        print(f"   {name:<12} " + "  ".join(f"K={k}: {a:.3f}" for k, a in curve[name].items()), flush=True)
    return budgets, curve, len(samples)


def step_seconds(stage_dir: Path, samples_per_step: int) -> float:
    """Median seconds per optimizer step, first two steps (warm-up) left out."""
    entries = [json.loads(line) for line in (stage_dir / "train_log.jsonl").read_text().splitlines()]
    per_step = [samples_per_step / e["samples_per_s"] for e in entries[2:] if e.get("samples_per_s")]
    return statistics.median(per_step)


def zero_ratio(args, root: Path, stage1_artifact: Path) -> tuple[float, float]:
    """Stage-2 median step time under ZeRO-2 and ZeRO-3, same settings, run back to back."""
    from arr_coc.config import load_config
    from stages.runner import run_stage

    times = {}
    for zero in (2, 3):
        sets = stage_overrides(args, root) + [
            f"run.name=zero{zero}",
            f"stages.stage2.zero_stage={zero}",
            f"stages.stage2.max_steps={args.zero_steps}",
            f"stages.stage2.checkpoint_every={args.zero_steps}",
            "stages.stage2.eval_samples=4",
        ]
        cfg = load_config(args.config, sets)
        print(f"-- timing stage2 under ZeRO-{zero}", flush=True)
        run_stage("stage2", cfg, init_from=stage1_artifact, resume=False)
        stage = cfg.stage("stage2")
        times[zero] = step_seconds(cfg.run_dir / "stage2", stage.batch_size * stage.grad_accum)
    return times[2], times[3]


def main() -> int:
    args = parse_args()
    torch.set_num_threads(1)  # the machine is shared; one intra-op thread keeps timings stable
    from arr_coc.config import load_config

    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="arr-coc-budget-curve-"))
    cfg = load_config(args.config, stage_overrides(args, root))
    started = time.perf_counter()
    stage_metrics = run_curriculum(cfg, args.reuse)
    print("-- evaluating selectors", flush=True)
    budgets, curve, evaluated = budget_curve(cfg, args.eval_questions)
    zero2, zero3 = zero_ratio(args, root, cfg.run_dir / "stage1" / "artifact")

    n = budgets[-1]
    quarter, eighth = budgets[2], budgets[1]
    all_tokens = curve["allocator"][n]
    retained = curve["allocator"][quarter] / all_tokens if all_tokens else 0.0
    margins = {name: curve["allocator"][eighth] - curve[name][eighth] for name in QUERY_AGNOSTIC}
    passed = retained >= RETAIN_TARGET and min(margins.values()) >= MARGIN_TARGET

    print(f"\nVQA soft accuracy on {evaluated} held-out questions (N = {n} merged tokens)")
    print(f"{'selector':<12}" + "".join(f"{f'K={k}':>9}" for k in budgets))
    for name in SELECTORS:
        print(f"{name:<12}" + "".join(f"{curve[name][k]:>9.3f}" for k in budgets))
    print(f"\nallocator at K=N/4 keeps {retained:.1%} of all-token accuracy (target >= {RETAIN_TARGET:.0%})")
    print(
        "allocator - selector at K=N/8: "
        + ", ".join(f"{k} {v:+.3f}" for k, v in margins.items())
        + f" (target >= +{MARGIN_TARGET:.2f} each)"
    )
    print(
        "\ntraining samples/s per stage: "
        + ", ".join(f"{s} {m['samples_per_s']:.1f}" for s, m in stage_metrics.items() if "samples_per_s" in m)
    )
    print(
        f"stage-2 step time: ZeRO-2 {zero2 * 1000:.0f} ms, ZeRO-3 {zero3 * 1000:.0f} ms, "
        f"ratio {zero3 / zero2:.2f}"
    )
    print(f"total wall {time.perf_counter() - started:.0f} s, run root {root}")

    result = {
        "tokens": n,
        "budgets": budgets,
        "accuracy": {name: {str(k): round(v, 4) for k, v in curve[name].items()} for name in SELECTORS},
        "retained_at_quarter": round(retained, 4),
        "margin_at_eighth": {k: round(v, 4) for k, v in margins.items()},
        "samples_per_s": {
            s: round(m["samples_per_s"], 2) for s, m in stage_metrics.items() if "samples_per_s" in m
        },
        "stage_metrics": {
            s: {k: round(v, 4) for k, v in m.items() if isinstance(v, float)}
            for s, m in stage_metrics.items()
        },
        "zero2_step_s": round(zero2, 4),
        "zero3_step_s": round(zero3, 4),
        "zero3_over_zero2": round(zero3 / zero2, 3),
        "eval_questions": evaluated,
        "targets": {"retained_at_quarter": RETAIN_TARGET, "margin_at_eighth": MARGIN_TARGET},
        "pass": bool(passed),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
