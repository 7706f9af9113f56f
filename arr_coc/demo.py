"""``arr-coc demo``: which image tokens does the allocator keep for a question?

Writes a PNG the size of the input image: the allocator's relevance scores as a heatmap over
the image, every kept merged token outlined; prints K/N and the VLM's greedy answer.

``--artifact DIR`` is a stage artifact (``<run>/<stage>/artifact/``):

* ``allocator.safetensors`` — allocator weights (safetensors only), loaded strictly; absent for
  a stage-0 artifact, and then the allocator is untrained (said so on stdout);
* ``lineage.json`` — ``{"base": ...}`` names the base VLM: a stage-0 export (``save_vlm``
  folder) for the tiny model, else the ``model.source`` given to ``from_pretrained``;
* ``config.yaml`` — the resolved run config (model and allocator sections, budget default);
* ``adapter/`` — optional peft LoRA adapters (stages 2 and 3), applied for the answer.

Without ``--artifact`` the tiny base and allocator are built from the default config (random
weights: a smoke test of the whole path). Without ``--image`` a synthetic scene is drawn.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from arr_coc.errors import ConfigError, DataError

DEFAULT_BUDGET = 16


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="heatmap of the allocator's token scores for one image and question",
        description="Heatmap of the allocator's token scores for one image and question; kept tokens outlined.",
    )
    parser.add_argument("--image", help="input image (default: a synthetic scene)")
    parser.add_argument("--question", help="question about the image (default for the synthetic scene)")
    parser.add_argument("--artifact", help="stage artifact folder (allocator.safetensors, lineage.json, config.yaml)")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--budget", type=int, default=None,
                        help=f"K tokens to keep (default: the artifact's stage budget, else {DEFAULT_BUDGET})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic scene")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    # Scoped, not global: the handler also runs in-process (tests, notebooks).
    with torch.no_grad():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    import torch

    image, question = _input(args)
    artifact = Path(args.artifact) if args.artifact else None
    model, processor, budget, cfg, notes = _load(artifact, args.budget)
    batch = processor([image], [question])
    num_tokens = int(batch["image_grid_thw"][0].prod()) // processor.merge_size**2
    budget = min(budget, num_tokens)
    allocation = model.score_tokens(**batch, budget=budget)[0]
    answer = model.generate(**batch, budget=budget, max_new_tokens=cfg.model.max_answer_tokens)[0]

    from stages.heatmaps import render

    original = torch.from_numpy(_to_array(image)).permute(2, 0, 1).float() / 255
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    render(original, allocation.scores, allocation.indices, allocation.grid_hw).save(out)
    for note in notes:
        print(note)
    print(f"question: {question}")
    print(f"kept {allocation.budget}/{num_tokens} tokens (grid {allocation.grid_hw[0]}x{allocation.grid_hw[1]})")
    print(f"answer: {answer}")
    print(f"wrote {out}")
    return 0


def _to_array(image):
    import numpy as np

    return np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy for torch.from_numpy


def _input(args: argparse.Namespace):
    """(PIL image, question): the given file or a synthetic scene with a question about it."""
    from PIL import Image, UnidentifiedImageError

    if args.image is None:
        return synthetic_scene(args.seed, args.question)
    path = Path(args.image)
    if not path.is_file():
        raise DataError(f"{path}: image not found")
    if not args.question:
        raise ConfigError("demo: --question is required with --image")
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: not a readable image ({err})") from None
    return image, args.question


def synthetic_scene(seed: int, question: str | None = None, size: int = 256):
    """A scene from the synthetic domain (``data_prep.synth``) and a question about one object."""
    from data_prep.synth import make_scene, render
    from data_prep.vocab import QUESTION_TEMPLATES

    rng = random.Random(seed)
    scene = make_scene(rng, size)
    while not scene.objects:  # the generator sometimes draws empty scenes on purpose
        scene = make_scene(rng, size)
    target = scene.objects[0]
    question = question or QUESTION_TEMPLATES["where"].format(color=target.color, shape=target.shape)
    return render(scene, size), question


def _load(artifact: Path | None, budget: int | None):
    """(ARRCOCQwen, VLProcessor, K, run config, notes) from an artifact folder or the default config."""
    from arr_coc.config import load_config
    from arr_coc.qwen import ARRCOCQwen
    from arr_coc.tiny import load_vlm

    notes: list[str] = []
    if artifact is None:
        cfg = load_config(None)
        model_vlm, processor = load_vlm(cfg.model)
        model = ARRCOCQwen(model_vlm, cfg.allocator, processor=processor)
        notes.append("note: no --artifact: tiny base and allocator with random weights")
    else:
        if not artifact.is_dir():
            raise DataError(f"{artifact}: artifact folder not found")
        config_path = artifact / "config.yaml"
        cfg = load_config(config_path if config_path.is_file() else None)
        hf_model, processor = load_vlm(cfg.model, base_dir=_base_dir(artifact, cfg))
        model = ARRCOCQwen(hf_model, cfg.allocator, processor=processor)
        notes += _load_weights(model, artifact)
        budget = budget if budget is not None else _stage_budget(cfg, artifact)
    budget = DEFAULT_BUDGET if budget is None else budget
    if budget < 1:
        raise ConfigError(f"demo: --budget must be >= 1 (got {budget})")
    return model.eval(), processor, budget, cfg, notes


def _base_dir(artifact: Path, cfg) -> Path | None:
    """The stage-0 export named by ``lineage.json`` (tiny), else ``None`` (``model.source`` is loaded)."""
    from stages.common import LINEAGE, read_lineage

    if not (artifact / LINEAGE).is_file():
        raise DataError(f"{artifact}: no {LINEAGE} (not a stage artifact?)")
    base = read_lineage(artifact).get("base")
    if cfg.model.source != "tiny":
        return None
    if not base or not Path(base).is_dir():
        raise DataError(f"{artifact / LINEAGE}: base {base!r} is not a stage-0 export folder")
    return Path(base)


def _load_weights(model, artifact: Path) -> list[str]:
    """Allocator (safetensors, strict) and optional LoRA adapters of the artifact."""
    from stages.common import ALLOCATOR_FILE, load_allocator

    notes = []
    if (artifact / ALLOCATOR_FILE).is_file():
        load_allocator(model, artifact)
        notes.append(f"allocator: {artifact / ALLOCATOR_FILE}")
    else:
        notes.append(f"note: {artifact} has no {ALLOCATOR_FILE}: allocator untrained (random weights)")
    adapter = artifact / "adapter"
    if (adapter / "adapter_model.safetensors").is_file():
        from peft import PeftModel

        model.vlm = PeftModel.from_pretrained(model.vlm, str(adapter))
        notes.append(f"adapters: {adapter}")
    return notes


def _stage_budget(cfg, artifact: Path) -> int | None:
    """The budget of the stage that wrote the artifact (``<run>/<stage>/artifact``), if known."""
    from arr_coc.config import STAGE_NAMES

    stage = artifact.resolve().parent.name
    return cfg.stage(stage).budget if stage in STAGE_NAMES and stage != "stage0" else None
