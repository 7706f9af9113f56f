"""DeepSpeed configuration and engine set-up for one stage.

The JSON files under ``deepspeed_configs/`` hold everything that does not depend on
the run (ZeRO stage, bucket sizes, offload targets, optimizer and scheduler types);
every value marked ``"auto"`` comes from the stage config here, so a run config is the
single source of truth for batch size, accumulation, clipping, learning rate and
schedule.

Hardware-dependent choices, made here rather than in the JSON:

* ``bf16.enabled``: on with CUDA (A100/H100), off on CPU, where training is fp32.
* ``optimizer.params.torch_adam``: on CPU DeepSpeed's ``FusedAdam`` (a CUDA kernel)
  and ``DeepSpeedCPUAdam`` (a C++ op compiled on first use) are not usable, so the
  engine builds ``torch.optim.AdamW``, which is deterministic on CPU. On CUDA the
  engine picks ``FusedAdam`` or, with optimizer offload, ``DeepSpeedCPUAdam``.
* ``offload_*.device``: ``cpu`` with CUDA; ``none`` on CPU, where the parameters and
  optimizer state already live in host memory (offload only means something on GPUs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from arr_coc.config import RunConfig, StageSection
from arr_coc.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "deepspeed_configs"
DEFAULT_CONFIG = {2: "zero2.json", 3: "zero3.json"}

# AdamW settings the run config does not expose; a StageSection field of the same
# name (if one is added later) takes precedence.
OPTIMIZER_DEFAULTS: dict[str, Any] = {"betas": [0.9, 0.999], "weight_decay": 0.0}


def cuda_available() -> bool:
    return torch.cuda.is_available()


def config_path(stage: StageSection) -> Path:
    """The DeepSpeed JSON for a stage: ``stage.deepspeed_config`` or the one for its ZeRO stage."""
    name = stage.deepspeed_config or DEFAULT_CONFIG[stage.zero_stage]
    path = Path(name)
    if not path.is_absolute() and not path.exists():
        path = CONFIG_DIR / name
    if not path.is_file():
        raise ConfigError(f"deepspeed_config: {name}: file not found (looked in {CONFIG_DIR})")
    return path


def auto_values(cfg: RunConfig, name: str) -> dict[str, Any]:
    """Values for every ``"auto"`` field, keyed by dotted path in the DeepSpeed JSON."""
    stage = cfg.stage(name)
    cuda = cuda_available()
    offload = "cpu" if cuda else "none"
    return {
        "train_micro_batch_size_per_gpu": stage.batch_size,
        "gradient_accumulation_steps": stage.grad_accum,
        "gradient_clipping": stage.grad_clip,
        "bf16.enabled": cuda,
        "fp16.enabled": False,
        "optimizer.params.lr": stage.lr,
        "optimizer.params.betas": list(getattr(stage, "betas", OPTIMIZER_DEFAULTS["betas"])),
        "optimizer.params.weight_decay": getattr(stage, "weight_decay", OPTIMIZER_DEFAULTS["weight_decay"]),
        "optimizer.params.torch_adam": not cuda,
        # DeepSpeed's WarmupCosineLR warms up over at least 2 steps, runs the first optimizer
        # step at lr 0 (scheduler "not started") and the second at warmup_min_ratio * lr;
        # starting the ramp at 1/(W+1) makes steps 2..W+1 climb linearly to the peak
        # instead of spending a second step at lr 0.
        "scheduler.params.warmup_num_steps": max(2, stage.warmup_steps),
        "scheduler.params.warmup_min_ratio": 1.0 / (max(2, stage.warmup_steps) + 1),
        "scheduler.params.total_num_steps": stage.max_steps,
        "scheduler.params.warmup_max_lr": stage.lr,
        "zero_optimization.offload_optimizer.device": offload,
        "zero_optimization.offload_param.device": offload,
    }


def _fill(node: Any, values: dict[str, Any], source: Path, key: str = "") -> Any:
    """Copy ``node`` replacing each ``"auto"`` with ``values[<dotted key>]``."""
    if isinstance(node, dict):
        return {k: _fill(v, values, source, f"{key}.{k}" if key else k) for k, v in node.items()}
    if node == "auto":
        if key not in values:
            raise ConfigError(f'{source}: {key}: no stage-config value for "auto"')
        return values[key]
    return node


def resolve_deepspeed_config(cfg: RunConfig, name: str) -> dict[str, Any]:
    """The stage's DeepSpeed JSON with every ``"auto"`` filled from the stage config.

    ``zero_stage`` in the stage config wins over the file's ``zero_optimization.stage``
    so ``--set stages.stage1.zero_stage=3`` works with any file.
    """
    stage = cfg.stage(name)
    path = config_path(stage)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON: {err}") from None
    resolved = _fill(raw, auto_values(cfg, name), path)
    resolved.setdefault("zero_optimization", {})["stage"] = stage.zero_stage
    if not cuda_available():
        resolved.setdefault("bf16", {})["enabled"] = False
    return resolved


def init_distributed() -> tuple[int, int]:
    """Join (or, for a single in-process run, create) the process group; returns (rank, world_size).

    A single process started without a launcher gets the env a launcher would set,
    so DeepSpeed's engine (which needs a process group even for one rank) works the
    same in-process on CPU as under ``deepspeed --num_gpus N``.
    """
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(
                {
                    "RANK": "0",
                    "LOCAL_RANK": "0",
                    "WORLD_SIZE": "1",
                    "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
                    "MASTER_PORT": os.environ.get("MASTER_PORT") or str(free_port()),
                }
            )
        backend = "nccl" if cuda_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, dist_init_required=True)
    return dist.get_rank(), dist.get_world_size()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def device_for_rank() -> torch.device:
    if cuda_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any]):
    """``deepspeed.initialize`` over the trainable parameters; returns the engine.

    The engine owns the optimizer (built from ``ds_config["optimizer"]``), the LR
    schedule, gradient accumulation, clipping and checkpoint I/O.
    """
    import deepspeed

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("the stage model has no trainable parameters (requires_grad)")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    return engine
