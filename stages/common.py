"""What the stage tasks share: the base model and its lineage, the allocator's weights,
batches from shard samples, and full-parameter access under ZeRO-3.

Lineage: every artifact records ``lineage.json`` ``{"base": ..., "init_from": ...}``.
``base`` is the stage-0 export (``<run>/stage0/artifact/base``) for the tiny model or
``model.source`` otherwise, so any downstream stage (and the demo) rebuilds the same VLM
from one file, however long the chain of ``init_from`` hand-offs.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from arr_coc.errors import ConfigError
from stages.base import StageContext

LINEAGE = "lineage.json"
ALLOCATOR_FILE = "allocator.safetensors"
# The stage whose artifact a stage starts from when --init-from is not given.
UPSTREAM = {"stage1": "stage0", "stage2": "stage1", "mine": "stage2", "stage3": "mine"}


def unwrap(model: nn.Module) -> nn.Module:
    """The user module inside a DeepSpeed engine (or the module itself)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def full_parameters(module: nn.Module, params: Sequence[nn.Parameter] | None = None) -> Iterator[None]:
    """Inside the block every parameter holds its full value, also under ZeRO-3.

    ZeRO-3 partitions parameters across ranks (a local ``param`` is an empty placeholder);
    ``GatheredParameters`` collects them on every rank for reading. A no-op otherwise.
    """
    params = list(module.parameters()) if params is None else list(params)
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def named_state(module: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """CPU copies of (trainable) parameters and buffers by name, gathered under ZeRO-3."""
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad or not trainable_only]
    with full_parameters(module, [p for _, p in params]):
        state = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in params}
    if not trainable_only:
        state.update({n: b.detach().to("cpu", copy=True).contiguous() for n, b in module.named_buffers()})
    return state


def is_writer(ctx: StageContext) -> bool:
    """Only rank 0 writes files; every rank still makes the same module calls."""
    return ctx.rank == 0


# ----------------------------------------------------------------------------- lineage


def upstream_dir(ctx: StageContext) -> Path | None:
    """``--init-from`` or, failing that, the upstream stage's artifact in this run directory."""
    if ctx.init_from is not None:
        path = Path(ctx.init_from)
        if not path.is_dir():
            raise ConfigError(f"--init-from {path}: no such artifact directory")
        return path
    upstream = UPSTREAM.get(ctx.name)
    if upstream is None:
        return None
    default = ctx.run_dir / upstream / "artifact"
    return default if default.is_dir() else None


def require_upstream(ctx: StageContext) -> Path:
    path = upstream_dir(ctx)
    if path is None:
        default = ctx.run_dir / UPSTREAM[ctx.name] / "artifact"
        raise ConfigError(
            f"{ctx.name} starts from the {UPSTREAM[ctx.name]} artifact: {default} does not exist "
            f"(run `arr-coc stage {UPSTREAM[ctx.name]}` first or pass --init-from DIR)"
        )
    return path


def read_lineage(artifact_dir: Path) -> dict[str, Any]:
    """The lineage record with relative paths resolved against the artifact folder."""
    path = Path(artifact_dir) / LINEAGE
    if not path.is_file():
        raise ConfigError(f"{path}: missing (not a stage artifact?)")
    record = json.loads(path.read_text())
    for key in ("base", "init_from"):
        value = record.get(key)
        if value and not Path(value).is_absolute() and (Path(artifact_dir) / value).exists():
            record[key] = str((Path(artifact_dir) / value).resolve())
    return record


def base_of(ctx: StageContext, upstream: Path | None) -> str:
    """The base VLM this stage trains on: the stage-0 export (tiny) or ``model.source``."""
    if ctx.cfg.model.source != "tiny":
        return ctx.cfg.model.source
    if upstream is None:
        default = ctx.run_dir / "stage0" / "artifact"
        raise ConfigError(
            f"{ctx.name} on the tiny model needs the stage-0 base: {default} does not exist "
            "(run `arr-coc stage stage0` first or pass --init-from DIR)"
        )
    return read_lineage(upstream)["base"]


def write_lineage(ctx: StageContext, artifact_dir: Path, base: str | Path, init_from: Path | None) -> None:
    """``lineage.json``: the base (a path or a model name) and the upstream artifact.

    Paths inside the run directory are stored relative to this stage's final
    ``artifact/`` folder (the runner renames ``artifact_dir`` there), so a run directory
    can be moved or copied whole; paths elsewhere are stored absolute.
    """
    final = (ctx.stage_dir / "artifact").resolve()
    run_dir = ctx.run_dir.resolve()

    def portable(value: str | Path | None) -> str | None:
        if value is None:
            return None
        path = Path(value)
        if isinstance(value, str) and not path.is_absolute() and not path.exists():
            return value  # a model name such as a hub id
        path = path.resolve()
        return os.path.relpath(path, final) if path.is_relative_to(run_dir) else str(path)

    record = {"base": portable(base), "init_from": portable(init_from)}
    (Path(artifact_dir) / LINEAGE).write_text(json.dumps(record, indent=2))


# ----------------------------------------------------------------------------- model


def build_vlm(ctx: StageContext, base: str):
    """(ARRCOCQwen, VLProcessor) on the given base, everything frozen, on ``ctx.device``."""
    from arr_coc.qwen import ARRCOCQwen
    from arr_coc.tiny import load_vlm

    # Tiny: ``base`` is a stage-0 export, or "tiny" for stage 0 itself (built from the config).
    base_dir = base if ctx.cfg.model.source == "tiny" and base != "tiny" else None
    hf_model, processor = load_vlm(ctx.cfg.model, base_dir=base_dir)
    grad_mode = ctx.stage.grad_mode or ctx.cfg.allocator.grad_mode
    allocator_cfg = ctx.cfg.allocator.model_copy(update={"grad_mode": grad_mode})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.cfg.seed)
        model = ARRCOCQwen(hf_model, allocator_cfg)
    model.requires_grad_(False)
    return model.to(ctx.device), processor


def load_allocator(model: nn.Module, artifact_dir: Path) -> None:
    """Allocator weights from ``allocator.safetensors`` (safetensors only, strict)."""
    path = Path(artifact_dir) / ALLOCATOR_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: missing allocator weights")
    state = load_file(str(path))
    allocator = unwrap(model).allocator
    with full_parameters(allocator):
        allocator.load_state_dict(state, strict=True)


def save_allocator(model: nn.Module, artifact_dir: Path, write: bool = True) -> None:
    state = named_state(unwrap(model).allocator)
    if write:
        save_file(state, str(Path(artifact_dir) / ALLOCATOR_FILE))


# ----------------------------------------------------------------------------- batches


def merged_grid(grid_thw: torch.Tensor, merge: int) -> list[tuple[int, int]]:
    """Per image (gh, gw) of the merged token grid."""
    return [(int(h) // merge, int(w) // merge) for _, h, w in grid_thw.tolist()]


def token_counts(grid_thw: torch.Tensor, merge: int) -> list[int]:
    """Merged vision tokens per image."""
    return [int(t * h * w) // (merge * merge) for t, h, w in grid_thw.tolist()]


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: (
            v.to(device)
            if isinstance(v, torch.Tensor)
            else [x.to(device) for x in v]
            if isinstance(v, list) and v and isinstance(v[0], torch.Tensor)
            else v
        )
        for k, v in batch.items()
    }


def vqa_inputs(processor, samples: Sequence[dict[str, Any]], device: torch.device, with_answers: bool):
    """Processor tensors for VQA samples (answer = the normalised majority answer)."""
    images = [s["image"] for s in samples]
    questions = [s["json"]["question"] for s in samples]
    answers = [s["json"]["answer"] for s in samples] if with_answers else None
    batch = processor(images, questions, answers)
    if batch.get("labels") is None:
        batch.pop("labels", None)
    return to_device(batch, device)
