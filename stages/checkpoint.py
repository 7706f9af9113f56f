"""Stage checkpoints: ``<stage_dir>/checkpoints/step-N/`` with a commit marker written last.

DeepSpeed writes the engine state (trainable weights, optimizer, LR scheduler, the
shared client state) with ``engine.save_checkpoint``; each rank adds one small file
with what is per rank (data-loader position, RNG states). Only after every rank has
finished writing does rank 0 write ``COMMITTED`` (JSON: step, the training-relevant
config, the MLflow run id). A directory without the marker is a write that was cut
off: it is never loaded, it is replaced when that step is saved again, and pruning
removes it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

COMMIT_MARKER = "COMMITTED"
STEP_DIR = re.compile(r"^step-(\d+)$")
KILL_IN_CHECKPOINT_ENV = "ARR_COC_KILL_IN_CHECKPOINT"
"""Fault injection: ``<step>`` SIGKILLs the process after the engine wrote step ``<step>``
and before its commit marker (tests of a crash during a checkpoint write)."""


@dataclass
class Checkpoint:
    step: int
    path: Path
    marker: dict[str, Any]


def step_tag(step: int) -> str:
    return f"step-{step}"


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def committed(root: Path) -> list[Checkpoint]:
    """Complete checkpoints under ``root``, oldest first; directories without a marker are skipped."""
    found = []
    if not root.is_dir():
        return found
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        marker = child / COMMIT_MARKER
        if match and child.is_dir() and marker.is_file():
            found.append(Checkpoint(int(match.group(1)), child, json.loads(marker.read_text())))
    return sorted(found, key=lambda c: c.step)


def latest(root: Path) -> Checkpoint | None:
    found = committed(root)
    return found[-1] if found else None


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU (and CUDA) generator states, as tensors and plain values
    so the file loads with ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def preserved_rng():
    """Run a block (evaluation, export) without moving the training RNG streams, so
    when and how often a stage evaluates never changes what it trains."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def _rank_file(path: Path, rank: int) -> Path:
    return path / f"runner_state_rank{rank}.pt"


def save(
    engine,
    root: Path,
    step: int,
    client_state: dict[str, Any],
    rank_state: dict[str, Any],
    marker: dict[str, Any],
    keep: int,
    rank: int,
) -> Path:
    """Write ``root/step-N/`` on all ranks, commit it, then prune to the newest ``keep``."""
    path = root / step_tag(step)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if path.exists():  # a cut-off write of this step from an earlier attempt
            shutil.rmtree(path)
    _barrier()
    # Frozen parameters come from the task's build_model (base weights, upstream
    # artifact); only what training changes goes into the checkpoint.
    engine.save_checkpoint(
        str(root),
        tag=step_tag(step),
        client_state=client_state,
        save_latest=False,
        exclude_frozen_parameters=True,
    )
    torch.save(rank_state, _rank_file(path, rank))
    _barrier()
    if os.environ.get(KILL_IN_CHECKPOINT_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0:
        _write_json_atomic(path / COMMIT_MARKER, {"step": step, **marker})
    _barrier()
    if rank == 0:
        prune(root, keep)
    _barrier()
    return path


def prune(root: Path, keep: int) -> None:
    """Remove every step directory except the newest ``keep`` committed ones."""
    kept = {c.path.name for c in committed(root)[-keep:]}
    for child in root.iterdir():
        if STEP_DIR.match(child.name) and child.is_dir() and child.name not in kept:
            shutil.rmtree(child)


def _deepspeed_safe_globals() -> list[Any]:
    """The few DeepSpeed classes its checkpoints pickle besides tensors and builtins."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def use_weights_only_loading(engine) -> None:
    """Make the engine read its checkpoint files with ``torch.load(weights_only=True)``.

    DeepSpeed's stock ``TorchCheckpointEngine.load`` unpickles arbitrary objects
    (``weights_only=False``); a checkpoint directory is not trusted input, so loading is
    restricted to tensors, builtins and an explicit allowlist of DeepSpeed's own classes.
    Saving is unchanged.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    stock = engine.checkpoint_engine
    if not isinstance(stock, TorchCheckpointEngine) or getattr(stock, "weights_only", False):
        return
    allowed = _deepspeed_safe_globals()

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    stock.load = load
    stock.weights_only = True


def load(engine, checkpoint: Checkpoint, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore engine (weights, optimizer, scheduler) from a committed checkpoint.

    Returns ``(client_state, rank_state)``; the caller restores loader and RNG. Every file is
    read with ``weights_only=True`` (see ``use_weights_only_loading``).
    """
    use_weights_only_loading(engine)
    load_path, client_state = engine.load_checkpoint(
        str(checkpoint.path.parent),
        tag=checkpoint.path.name,
        load_module_strict=False,  # frozen parameters are not in the checkpoint
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise RuntimeError(f"{checkpoint.path}: DeepSpeed could not load this checkpoint")
    rank_file = _rank_file(checkpoint.path, rank)
    if not rank_file.is_file():
        raise RuntimeError(f"{rank_file}: missing (checkpoint written with a different world size?)")
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
    return client_state or {}, rank_state
