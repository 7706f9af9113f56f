"""Run configuration: one YAML file validated by pydantic, with dotted overrides.

Every section is a small pydantic model with a docstring per field and
``extra="forbid"``, so a typo or a wrong type fails before any work starts with
an error that names the key (``stages.stage1.budget``).  ``--set a.b=c``
overrides any key; the value is parsed as YAML (``--set seed=3`` is an int,
``--set run.name=x`` a string).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from arr_coc.errors import ConfigError

STAGE_NAMES = ("stage0", "stage1", "stage2", "mine", "stage3")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class RunSection(_Section):
    name: str = "tiny"
    """Run name: the run directory is ``<root>/<name>/``."""
    root: str = "runs"
    """Folder holding run directories."""


# ``model.source`` naming the shipped stage-0 export (``arr_coc.tiny.PRETRAINED_DIR``).
PRETRAINED_SOURCE = "tiny-pretrained"


class ModelSection(_Section):
    family: Literal["qwen3_vl", "qwen2_5_vl"] = "qwen3_vl"
    """Which Hugging Face model family the wrapper drives."""
    source: str = "tiny"
    """``tiny`` builds the embedded offline model from a config (stage 0 warms it up);
    ``tiny-pretrained`` loads the shipped stage-0 export (``arr_coc.tiny``); anything else is a
    local path or hub name passed to ``from_pretrained`` (nothing is fetched here)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype of the frozen VLM."""
    trust_remote_code: bool = False
    """Passed to ``from_pretrained``; off by default."""
    image_size: int = 256
    """Pixel-area bound: images are resized (aspect kept, sides multiples of patch*merge) to at
    most image_size**2 pixels, so the tiny default 256 gives an 8x8 merged grid."""
    max_question_tokens: int = 32
    """Questions longer than this (in tokens) are an error naming the record."""
    max_answer_tokens: int = 4
    """Greedy decoding length for generated answers."""

    @model_validator(mode="after")
    def _check(self) -> ModelSection:
        if self.image_size < 32:
            raise ValueError("image_size must be >= 32")
        if self.source == PRETRAINED_SOURCE and self.family != "qwen3_vl":
            raise ValueError("source tiny-pretrained is a qwen3_vl model (set family: qwen3_vl)")
        return self


class AllocatorSection(_Section):
    hidden: int = 64
    """Width of the scorers' hidden layers."""
    grad_mode: Literal["frozen", "straight_through", "gumbel"] = "straight_through"
    """How gradient reaches the allocator through the discrete top-K."""
    adaptive: bool = False
    """Pick K per sample in [budget_min, budget_max] instead of a fixed budget."""
    budget_min: int = 8
    """Smallest K when adaptive."""
    budget_max: int = 48
    """Largest K when adaptive."""
    coupling_dim: int = 16
    """Width of the participatory scorer's query–content space; its two projections
    (``(vision_dim + query_dim) * coupling_dim`` weights) dominate the allocator's size."""
    gumbel_scale: float = 1.0
    """Scale of the Gumbel noise added to the scores before top-K (``gumbel`` mode, training only)."""

    @model_validator(mode="after")
    def _check(self) -> AllocatorSection:
        for key in ("hidden", "budget_min", "coupling_dim"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1")
        if self.budget_max < self.budget_min:
            raise ValueError("budget_max must be >= budget_min")
        if self.gumbel_scale < 0:
            raise ValueError("gumbel_scale must be >= 0")
        return self


class DataSection(_Section):
    source: Literal["synthetic", "coco"] = "synthetic"
    """``synthetic`` generates scenes into the run directory; ``coco`` reads the paths below."""
    images: int = 240
    """Synthetic image count (train + validation)."""
    val_fraction: float = 0.2
    """Share of images held out for validation (never trained on)."""
    shard_size: int = 64
    """Samples per WebDataset shard."""
    workers: int = 1
    """Parallel sharding workers and loader workers per rank."""
    coco_annotations: str | None = None
    """COCO instances JSON (``source: coco``)."""
    coco_images: str | None = None
    """COCO image folder (``source: coco``)."""
    vqa_questions: str | None = None
    """VQAv2 questions JSON (``source: coco``)."""
    vqa_annotations: str | None = None
    """VQAv2 annotations JSON (``source: coco``)."""
    vqa_images: str | None = None
    """Image folder for the VQAv2 questions (``source: coco``)."""
    max_bad_fraction: float = 0.05
    """Sharding fails when more than this share of records is skipped."""

    @model_validator(mode="after")
    def _check(self) -> DataSection:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("val_fraction must be in (0, 1)")
        if self.images < 2:
            raise ValueError("images must be >= 2")
        if self.source == "coco":
            for key in ("coco_annotations", "coco_images", "vqa_questions", "vqa_annotations", "vqa_images"):
                if getattr(self, key) is None:
                    raise ValueError(f"{key} is required when source is coco")
        return self


class LoraSection(_Section):
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA alpha (scale = alpha / r)."""
    dropout: float = 0.0
    """LoRA dropout."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    """Language-model module names that get adapters (add gate/up/down_proj for the MLP)."""


class StageSection(_Section):
    enabled: bool = True
    """Run this stage in the curriculum."""
    max_steps: int = 40
    """Optimizer steps."""
    checkpoint_every: int = 20
    """Save ``checkpoints/step-N/`` every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept (oldest pruned first); at least 2."""
    eval_every: int = 0
    """Evaluate on held-out data every this many steps (0: only at the end)."""
    budget: int = 16
    """K: image tokens kept per sample."""
    lr: float = 1e-3
    """Peak learning rate (warmup then cosine decay)."""
    warmup_steps: int = 2
    """Linear warmup steps."""
    batch_size: int = 4
    """Micro-batch size per rank."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    grad_clip: float = 1.0
    """Gradient clipping norm (done by the DeepSpeed engine)."""
    zero_stage: Literal[2, 3] = 2
    """ZeRO stage."""
    deepspeed_config: str | None = None
    """DeepSpeed JSON under ``deepspeed_configs/``; default picks by ``zero_stage``."""
    eval_samples: int = 32
    """Held-out samples used per evaluation."""
    grad_mode: Literal["frozen", "straight_through", "gumbel"] | None = None
    """Override of ``allocator.grad_mode`` for this stage."""
    lora: LoraSection = LoraSection()
    """LoRA settings (stage 2 and 3)."""
    hard_weight: float = 2.0
    """Loss weight of hard examples (stage 3)."""
    replay_fraction: float = 0.5
    """Share of normal data mixed into the hard set (stage 3)."""
    hard_fraction: float = 0.3
    """Hardest share of the pool kept by mining (of each stratum, see ``hard_strata``)."""
    hard_strata: Literal["answer", "none"] = "answer"
    """Mining takes the hardest share within each group of pool questions with the same answer
    ("answer"), so the hard set keeps the pool's answer mix and hardening does not shift the
    answer priors; "none": the hardest share of the whole pool."""
    pool_samples: int = 0
    """Training questions mining scores, the first ones in shard order (0: the whole split)."""
    caption_fraction: float = 0.0
    """Share of each batch that is a caption of a COCO-shard image (stage 0 warm-up)."""

    @model_validator(mode="after")
    def _check(self) -> StageSection:
        for key in ("max_steps", "checkpoint_every", "budget", "batch_size", "grad_accum"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1")
        if self.keep_checkpoints < 2:
            raise ValueError("keep_checkpoints must be >= 2")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ValueError("replay_fraction must be in [0, 1)")
        if not 0.0 <= self.caption_fraction < 1.0:
            raise ValueError("caption_fraction must be in [0, 1)")
        if self.pool_samples < 0:
            raise ValueError("pool_samples must be >= 0 (0: the whole training split)")
        if not 0.0 < self.hard_fraction <= 1.0:
            raise ValueError("hard_fraction must be in (0, 1]")
        return self


# Per-stage defaults that differ from StageSection's. A YAML/--set value for a stage is merged
# over these, so `--set stages.stage1.max_steps=10` keeps stage 1's own lr.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "stage0": {"max_steps": 200, "lr": 3e-3, "budget": 64},
    "stage1": {"lr": 3e-3},
    "stage2": {"lr": 1e-3},
    "mine": {"max_steps": 1},
    "stage3": {"lr": 3e-4},
}


class StagesSection(_Section):
    stage0: StageSection = StageSection(**STAGE_DEFAULTS["stage0"])
    """Tiny base warm-up (embedded default only): all tokens, whole VLM trained."""
    stage1: StageSection = StageSection(**STAGE_DEFAULTS["stage1"])
    """Proxy-IoU: VLM frozen, allocator supervised by box masks."""
    stage2: StageSection = StageSection(**STAGE_DEFAULTS["stage2"])
    """LoRA end-to-end VQA."""
    mine: StageSection = StageSection(**STAGE_DEFAULTS["mine"])
    """Hard-example mining with the stage-2 model."""
    stage3: StageSection = StageSection(**STAGE_DEFAULTS["stage3"])
    """Hard-example hardening."""

    @model_validator(mode="before")
    @classmethod
    def _merge_stage_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for name, defaults in STAGE_DEFAULTS.items():
            if isinstance(data.get(name), dict):
                merged[name] = {**defaults, **data[name]}
        return merged


class LauncherSection(_Section):
    kind: Literal["inprocess", "deepspeed", "hostfile"] = "inprocess"
    """How stage jobs start: in one process (CPU/gloo), ``deepspeed --num_gpus``, or a hostfile."""
    num_gpus: int = 1
    """Processes per node for the ``deepspeed`` launcher."""
    hostfile: str | None = None
    """DeepSpeed hostfile for multi-node runs."""
    master_port: int = 29500
    """Rendezvous port."""

    @model_validator(mode="after")
    def _check(self) -> LauncherSection:
        if self.kind == "hostfile" and not self.hostfile:
            raise ValueError("hostfile is required when kind is hostfile")
        if self.num_gpus < 1:
            raise ValueError("num_gpus must be >= 1")
        return self


class MlflowSection(_Section):
    tracking_uri: str | None = None
    """Tracking URI; default is ``MLFLOW_TRACKING_URI`` or a sqlite store in the run directory."""
    experiment: str = "arr-coc"
    """Experiment name."""
    registered_model: str = "arr-coc-allocator"
    """Model-registry name for the final allocator + adapters."""


class RunConfig(_Section):
    run: RunSection = RunSection()
    """Where the run lives."""
    seed: int = 0
    """Seed for data generation, initialisation and shuffling."""
    model: ModelSection = ModelSection()
    """The VLM."""
    allocator: AllocatorSection = AllocatorSection()
    """The ARR-COC allocator."""
    data: DataSection = DataSection()
    """Training data."""
    stages: StagesSection = StagesSection()
    """Per-stage settings."""
    launcher: LauncherSection = LauncherSection()
    """How stage jobs are launched."""
    mlflow: MlflowSection = MlflowSection()
    """Experiment tracking."""

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name

    def stage(self, name: str) -> StageSection:
        if name not in STAGE_NAMES:
            raise ConfigError(f"unknown stage {name!r}; expected one of {', '.join(STAGE_NAMES)}")
        return getattr(self.stages, name)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self, keys: list[str] | None = None) -> str:
        """sha256 of the resolved config (or of the listed dotted keys)."""
        data = self.to_dict()
        if keys is not None:
            data = {k: get_dotted(data, k) for k in keys}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def get_dotted(data: dict[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        node = node[part]
    return node


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.sub=value")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {assignment!r}: empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _describe(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in first and first["type"] not in ("missing",):
        msg = f"{msg} (got {first['input']!r})"
    return f"{source}: {key}: {msg}"


def config_from_dict(data: dict[str, Any], source: str = "<config>") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults), apply ``--set`` overrides, validate."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}:{where} invalid YAML: {getattr(err, 'problem', err)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = loaded
    for assignment in overrides or []:
        apply_override(data, assignment)
    return config_from_dict(data, source)


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
