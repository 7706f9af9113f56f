"""The generic stage runner: engine, loop, evaluation, checkpoints, exact resume, MLflow, export.

``run_stage(name, cfg)`` drives any ``StageTask``:

1. validate up front (task, upstream artifact, compatibility of the checkpoint to resume);
2. build the task's model and a DeepSpeed engine over its trainable parameters;
3. restore the newest committed checkpoint (weights, optimizer, scheduler, step, loader
   position, RNG states, MLflow run id) unless ``resume=False``;
4. loop ``training_step`` → ``engine.backward`` → ``engine.step`` up to ``max_steps``,
   logging per step, evaluating every ``eval_every`` and checkpointing every
   ``checkpoint_every`` and at the end;
5. evaluate and export ``<stage_dir>/artifact/`` atomically.

Every rank runs the same module calls in the same order (ZeRO-3 gathers parameters
collectively: a rank that skipped a forward would hang the others); only rank 0
writes files and talks to MLflow.

Fault injection (tests of retries and resume): ``ARR_COC_FAIL_AT=<stage>:step<N>``
raises ``RuntimeError("injected fault at <stage>:step<N>")`` right after step N and
any checkpoint due at step N are committed.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from arr_coc.config import RunConfig, save_config
from arr_coc.errors import ConfigError
from stages import checkpoint as ckpt
from stages.base import StageContext, StageTask
from stages.common import UPSTREAM
from stages.engine import build_engine, device_for_rank, init_distributed, resolve_deepspeed_config
from stages.tasks import task_class
from stages.tracking import StageTracker

FAIL_AT_ENV = "ARR_COC_FAIL_AT"
TRAIN_LOG = "train_log.jsonl"
# Stage keys that do not change what is trained: resuming with other values is fine.
NON_TRAINING_STAGE_KEYS = ("enabled", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_samples")
# Config sections that change what a stage trains (besides its own stage section).
TRAINING_SECTIONS = ("seed", "model", "allocator", "data")


# ----------------------------------------------------------------------------- helpers


def _flat(data: Any, prefix: str) -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: data}


def training_config(cfg: RunConfig, name: str, init_from: Path | None, world_size: int) -> dict[str, Any]:
    """The dotted config values that decide what a stage trains (stored in every checkpoint).

    ``max_steps`` is included: it sets the cosine LR schedule, so a longer run is a
    different run. ``world_size`` is included because it sets the global batch.
    """
    data = cfg.to_dict()
    values: dict[str, Any] = {}
    for section in TRAINING_SECTIONS:
        values.update(_flat(data[section], section))
    stage = {k: v for k, v in data["stages"][name].items() if k not in NON_TRAINING_STAGE_KEYS}
    values.update(_flat(stage, f"stages.{name}"))
    values["init_from"] = str(Path(init_from).resolve()) if init_from else None
    values["world_size"] = world_size
    return values


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key (old -> new)`` for every training key whose value differs."""
    keys = sorted(set(saved) | set(current))
    return [f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in keys if saved.get(k) != current.get(k)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _mean_across_ranks(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def _broadcast(value: Any) -> Any:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def component_of(param_name: str) -> str:
    """Which part a parameter belongs to: ``lora`` for adapters, else the top-level child name."""
    return "lora" if "lora_" in param_name else param_name.split(".")[0]


def component_grad_norms(module: torch.nn.Module) -> dict[str, float]:
    """Per-component L2 norm of the full (unclipped) gradients, under any ZeRO stage.

    ``safe_get_full_grad`` is DeepSpeed's accessor for partitioned gradients; under
    ZeRO-3 it is a collective, so every rank calls it for every parameter.
    """
    from deepspeed.utils import safe_get_full_grad

    squares: dict[str, float] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        grad = safe_get_full_grad(param)
        part = component_of(name)
        value = 0.0 if grad is None else float(grad.detach().float().pow(2).sum())
        squares[part] = squares.get(part, 0.0) + value
    return {part: math.sqrt(total) for part, total in squares.items()}


@contextmanager
def evaluation_mode(module: torch.nn.Module):
    """Eval mode and no grad for a block, restoring each submodule's own mode after
    (a task may keep frozen parts in eval mode while training others), and the RNG."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with ckpt.preserved_rng(), torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place; the old one (if any) is removed after."""
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    if old.exists():
        shutil.rmtree(old)


def _fail_at(name: str, step: int) -> None:
    if os.environ.get(FAIL_AT_ENV) == f"{name}:step{step}":
        raise RuntimeError(f"injected fault at {name}:step{step}")


# ----------------------------------------------------------------------------- set-up


def effective_init_from(name: str, cfg: RunConfig, init_from: Path | None) -> Path | None:
    """``--init-from`` (must be a directory) or, failing that, the upstream stage's artifact in
    this run directory when it exists (the rule of ``stages.common.upstream_dir``)."""
    if init_from is not None:
        if not Path(init_from).is_dir():
            raise ConfigError(f"--init-from {init_from}: no such artifact directory")
        return Path(init_from)
    upstream = UPSTREAM.get(name)
    default = cfg.run_dir / upstream / "artifact" if upstream else None
    return default if default is not None and default.is_dir() else None


def check_upstream(task: StageTask, ctx: StageContext) -> None:
    if task.upstream_required() and ctx.init_from is None:
        default = ctx.run_dir / UPSTREAM.get(ctx.name, "<upstream>") / "artifact"
        raise ConfigError(
            f"{ctx.name} needs an upstream artifact: {default} does not exist (pass --init-from DIR)"
        )


def make_context(
    name: str, cfg: RunConfig, init_from: Path | None, rank: int, world_size: int
) -> StageContext:
    return StageContext(
        cfg=cfg,
        name=name,
        stage=cfg.stage(name),
        run_dir=cfg.run_dir,
        stage_dir=cfg.run_dir / name,
        init_from=init_from,
        rank=rank,
        world_size=world_size,
        device=device_for_rank(),
    )


def resume_point(stage_dir: Path, training: dict[str, Any]) -> ckpt.Checkpoint | None:
    """The newest committed checkpoint; ``ConfigError`` naming the keys if it trained another config.

    Reads only the commit markers, so it runs before any process group or engine exists.
    """
    found = ckpt.latest(stage_dir / "checkpoints")
    if found is None:
        return None
    differences = config_differences(found.marker.get("training_config", {}), training)
    if differences:
        raise ConfigError(
            f"{found.path}: cannot resume, the training config changed: {'; '.join(differences)} "
            "(restore those values or pass --no-resume)"
        )
    return found


def discard_checkpoints(ctx: StageContext) -> None:
    """``--no-resume``: older steps must not outrank (or be pruned in favour of) the new ones."""
    _barrier()
    root = ctx.stage_dir / "checkpoints"
    if ctx.rank == 0 and root.exists():
        shutil.rmtree(root)
    _barrier()


# ----------------------------------------------------------------------------- the run


class _Run:
    """State of one stage job between set-up and export.

    Everything that can be checked from files (stage name, upstream artifact, the
    checkpoint's training config) is checked before the process group, the task's data
    preparation and the engine, so a config error costs no start-up time.
    """

    def __init__(self, name: str, cfg: RunConfig, init_from: Path | None, resume: bool):
        cfg.stage(name)
        init_from = effective_init_from(name, cfg, init_from)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.training = training_config(cfg, name, init_from, world_size)
        self.resume_from = resume_point(cfg.run_dir / name, self.training) if resume else None
        rank, world_size = init_distributed()
        if world_size != self.training["world_size"]:  # a launcher that does not export WORLD_SIZE
            self.training["world_size"] = world_size
            self.resume_from = resume_point(cfg.run_dir / name, self.training) if resume else None
        self.ctx = make_context(name, cfg, init_from, rank, world_size)
        self.task = task_class(name)(self.ctx)
        check_upstream(self.task, self.ctx)
        if not resume and self.task.trains:
            discard_checkpoints(self.ctx)
        self.tracker = StageTracker(cfg, name, rank)
        self.step = 0
        self.train_seconds = 0.0
        self.samples = 0
        self.last_loss = float("nan")

    @property
    def rank(self) -> int:
        return self.ctx.rank

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[{self.ctx.name}] {message}", flush=True)

    def run(self) -> Path:
        seed_everything(self.ctx.cfg.seed)  # identical initial weights on every rank
        model = self.task.build_model()
        if not self.task.trains:
            self.tracker.start(None)
            with self._tracked():
                return self._finish(model.to(self.ctx.device))
        engine = build_engine(model, resolve_deepspeed_config(self.ctx.cfg, self.ctx.name))
        loader = self.task.train_loader()
        self.tracker.start(self._restore(engine, loader))
        with self._tracked():
            self._train(engine, loader)
            return self._finish(engine.module)

    @contextmanager
    def _tracked(self):
        """A crash ends the MLflow run FAILED (KILLED on Ctrl-C) and propagates."""
        try:
            yield
        except KeyboardInterrupt:
            self.tracker.end("KILLED")
            raise
        except BaseException:
            self.tracker.end("FAILED")
            raise

    def _restore(self, engine, loader) -> str | None:
        if self.resume_from is None:
            seed_everything(self.ctx.cfg.seed + self.rank)
            return None
        client, rank_state = ckpt.load(engine, self.resume_from, self.rank)
        loader.load_state_dict(rank_state["loader"])
        ckpt.set_rng_state(rank_state["rng"])
        self.step = int(client["step"])
        self.train_seconds = float(client.get("train_seconds", 0.0))
        self.samples = int(client.get("samples", 0))
        self.log(f"resumed from {self.resume_from.path} (step {self.step})")
        return client.get("mlflow_run_id")

    # -- the loop

    def _train(self, engine, loader) -> None:
        stage = self.ctx.stage
        batches = iter(loader)
        samples_per_step = stage.batch_size * stage.grad_accum * self.ctx.world_size
        while self.step < stage.max_steps:
            started = time.perf_counter()
            metrics = self._optimizer_step(engine, batches)
            elapsed = time.perf_counter() - started
            self.step += 1
            self.train_seconds += elapsed
            self.samples += samples_per_step
            metrics["samples_per_s"] = samples_per_step / elapsed if elapsed > 0 else 0.0
            self._log_step(metrics)
            if stage.eval_every and self.step % stage.eval_every == 0 and self.step < stage.max_steps:
                self._log_eval(self._evaluate(engine.module))
            if self.step % stage.checkpoint_every == 0 or self.step == stage.max_steps:
                self._save(engine, loader)
            _fail_at(self.ctx.name, self.step)

    def _optimizer_step(self, engine, batches) -> dict[str, float]:
        """``grad_accum`` micro-batches; the engine steps the optimizer at the boundary."""
        accum = self.ctx.stage.grad_accum
        losses: list[float] = []
        logs: dict[str, list[float]] = {}
        grad_norms: dict[str, float] = {}
        lr = 0.0
        for micro in range(accum):
            loss, step_logs = self.task.training_step(engine, next(batches))
            engine.backward(loss)
            if micro == accum - 1:
                grad_norms = component_grad_norms(engine.module)
                lr = float(engine.get_lr()[0])  # the rate this optimizer step applies
            engine.step()
            losses.append(float(loss.detach()))
            for key, value in _numbers(step_logs).items():
                logs.setdefault(key, []).append(value)
        self.last_loss = _mean_across_ranks(sum(losses) / len(losses), self.ctx.device)
        metrics = {key: sum(values) / len(values) for key, values in logs.items()}
        metrics.update({f"grad_norm/{part}": norm for part, norm in grad_norms.items()})
        total = engine.get_global_grad_norm()
        if total is not None:
            metrics["grad_norm"] = float(total)
        metrics["loss"] = self.last_loss
        metrics["lr"] = lr
        return metrics

    def _log_step(self, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(metrics, self.step)
        if self.rank == 0:
            self.ctx.stage_dir.mkdir(parents=True, exist_ok=True)
            with open(self.ctx.stage_dir / TRAIN_LOG, "a") as fh:
                fh.write(json.dumps({"step": self.step, **metrics}) + "\n")
        self.log(
            f"step {self.step}/{self.ctx.stage.max_steps} loss {metrics['loss']:.6f} lr {metrics['lr']:.3g}"
        )

    def _evaluate(self, module: torch.nn.Module) -> dict[str, float]:
        with evaluation_mode(module):
            return _numbers(self.task.evaluate(module))

    def _log_eval(self, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, self.step)
        self.log("eval " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def _save(self, engine, loader) -> None:
        run_id = _broadcast(self.tracker.run_id)
        client_state = {
            "step": self.step,
            "mlflow_run_id": run_id,
            "training_config": self.training,
            "train_seconds": self.train_seconds,
            "samples": self.samples,
        }
        rank_state = {"loader": loader.state_dict(), "rng": ckpt.rng_state()}
        marker = {"training_config": self.training, "mlflow_run_id": run_id, "time": time.time()}
        path = ckpt.save(
            engine,
            self.ctx.stage_dir / "checkpoints",
            self.step,
            client_state,
            rank_state,
            marker,
            keep=self.ctx.stage.keep_checkpoints,
            rank=self.rank,
        )
        self.log(f"checkpoint committed {path}")

    # -- the end

    def _finish(self, module: torch.nn.Module) -> Path:
        """Final evaluation, ``artifact/`` export, MLflow run FINISHED."""
        final = self._evaluate(module)
        self._log_eval(final)
        metrics = dict(final)
        if self.task.trains:
            metrics.update(
                {
                    "steps": float(self.step),
                    "train_loss": self.last_loss,
                    "train_seconds": self.train_seconds,
                    "samples_per_s": self.samples / self.train_seconds if self.train_seconds else 0.0,
                    "world_size": float(self.ctx.world_size),
                }
            )
        artifact = self._export(module, metrics)
        self.tracker.log_artifacts(artifact, "artifact")
        self.tracker.end("FINISHED")
        self.log(f"artifact {artifact}")
        return artifact

    def _export(self, module: torch.nn.Module, metrics: dict[str, float]) -> Path:
        """Every rank runs ``task.export`` (it may run the model); rank 0's output becomes
        ``artifact/`` by a rename once complete, other ranks write to a scratch folder."""
        stage_dir = self.ctx.stage_dir
        final = stage_dir / "artifact"
        if self.rank == 0:
            scratch = stage_dir / f".artifact.tmp-{os.getpid()}"
            if scratch.exists():
                shutil.rmtree(scratch)
            scratch.mkdir(parents=True)
        else:
            scratch = Path(tempfile.mkdtemp(prefix=f"arr-coc-{self.ctx.name}-rank{self.rank}-"))
        with evaluation_mode(module):
            self.task.export(module, scratch)
        _barrier()
        if self.rank == 0:
            save_config(self.ctx.cfg, scratch / "config.yaml")
            (scratch / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
            _replace_dir(scratch, final)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
        _barrier()
        return final


def run_stage(name: str, cfg: RunConfig, init_from: Path | str | None = None, resume: bool = True) -> Path:
    """Run one stage to the end (resuming from its newest committed checkpoint); returns ``artifact/``."""
    run = _Run(name, cfg, Path(init_from) if init_from is not None else None, resume)
    return run.run()
