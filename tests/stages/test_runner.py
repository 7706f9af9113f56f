"""The stage runner with real DeepSpeed engines (CPU, gloo) on the toy task.

Exact resume: a run SIGKILLed after a checkpoint and resumed in a fresh process ends
with bitwise the same trainable weights, and logs the same losses after the kill
point, as an uninterrupted run; for ZeRO-2 and ZeRO-3.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from arr_coc.cli import main as cli_main
from arr_coc.config import load_config
from stages.runner import component_of, config_differences, training_config

STEPS = 8
BASE = [
    f"stages.stage1.max_steps={STEPS}",
    "stages.stage1.checkpoint_every=2",
    "stages.stage1.eval_every=3",
    "stages.stage1.batch_size=4",
    "stages.stage1.grad_accum=2",
    "stages.stage1.lr=0.01",
]


def settings(zero: int) -> list[str]:
    return [*BASE, f"stages.stage1.zero_stage={zero}"]


@pytest.fixture(scope="module")
def reference(toy):
    """Uninterrupted runs, one per ZeRO stage, made on first use."""
    done: dict[int, str] = {}

    def get(zero: int) -> str:
        if zero not in done:
            run = f"full-z{zero}"
            result = toy.run(run, settings(zero))
            assert result.returncode == 0, result.stderr[-3000:]
            done[zero] = run
        return done[zero]

    return get


# ----------------------------------------------------------------------------- unit


def test_training_config_keeps_training_keys_only():
    cfg = load_config(None, ["stages.stage1.lr=0.5", "stages.stage1.eval_every=7"])
    values = training_config(cfg, "stage1", None, world_size=2)
    assert values["stages.stage1.lr"] == 0.5
    assert values["seed"] == 0 and values["world_size"] == 2
    assert "stages.stage1.max_steps" in values and "data.images" in values
    for key in ("eval_every", "checkpoint_every", "keep_checkpoints", "eval_samples", "enabled"):
        assert f"stages.stage1.{key}" not in values
    assert not any(k.startswith(("stages.stage2", "run.", "mlflow.", "launcher.")) for k in values)


def test_config_differences_names_each_changed_key():
    diffs = config_differences(
        {"seed": 0, "stages.stage1.lr": 0.1, "x": 1}, {"seed": 1, "stages.stage1.lr": 0.1}
    )
    assert diffs == ["seed (0 -> 1)", "x (1 -> None)"]


def test_component_names():
    assert component_of("allocator.scorer.0.weight") == "allocator"
    assert component_of("vlm.base_model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == "lora"
    assert component_of("head.bias") == "head"


# ----------------------------------------------------------------------------- real engines


@pytest.mark.integration
# ZeRO-3 exact resume is covered on the real stage 2 below (LoRA adapters partitioned).
@pytest.mark.parametrize("zero", [2])
def test_sigkill_and_resume_is_exact(toy, helpers, reference, zero):
    full = reference(zero)
    run = f"killed-z{zero}"
    proc = toy.start(run, settings(zero), env={"TOY_STEP_SLEEP": "0.25"})
    checkpoints = toy.stage_dir(run) / "checkpoints"
    helpers.wait_for(checkpoints / "step-4" / "COMMITTED", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (checkpoints / f"step-{STEPS}").exists()
    assert not (toy.stage_dir(run) / "artifact").exists()

    resumed = helpers.check(toy.run(run, settings(zero)))
    assert "(step 4)" in resumed.stdout and "resumed from" in resumed.stdout

    reference_weights, resumed_weights = toy.weights(full), toy.weights(run)
    assert set(reference_weights) == {"allocator.0.weight", "allocator.0.bias", "head.weight", "head.bias"}
    for name, tensor in reference_weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name

    reference_losses, resumed_losses = toy.losses(full), toy.losses(run)
    assert sorted(resumed_losses) == list(range(1, STEPS + 1))
    for step in range(5, STEPS + 1):
        assert resumed_losses[step] == reference_losses[step], step
    assert reference_losses[STEPS] < reference_losses[1]  # it learned something

    metrics = json.loads((toy.stage_dir(run) / "artifact" / "metrics.json").read_text())
    assert metrics["steps"] == STEPS
    assert all(isinstance(v, float) for v in metrics.values())
    committed = sorted(p.parent.name for p in checkpoints.glob("step-*/COMMITTED"))
    assert committed == ["step-6", f"step-{STEPS}"]  # keep_checkpoints=2, oldest pruned


@pytest.mark.integration
def test_changed_training_config_is_refused_naming_keys(toy, helpers, reference, capsys):
    run = reference(2)
    before = toy.weights(run)
    # The check reads only the commit marker, so it fails before any engine or process
    # group exists and can run in this process through the command line.
    argv = toy.args(run, [*settings(2), "seed=5", "stages.stage1.lr=0.02"])
    assert cli_main(["stage", *argv]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error:") and f"step-{STEPS}" in line
    assert "seed (0 -> 5)" in line and "stages.stage1.lr (0.01 -> 0.02)" in line
    assert "checkpoint_every" not in line

    # Keys that do not change training may differ: the run resumes at its last step,
    # re-exports, and the weights come back from the checkpoint unchanged.
    same = helpers.check(
        toy.run(run, [*settings(2), "stages.stage1.eval_every=0", "stages.stage1.keep_checkpoints=3"])
    )
    assert f"(step {STEPS})" in same.stdout
    after = toy.weights(run)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.integration
def test_no_resume_starts_over(toy, helpers):
    sets = ["stages.stage1.max_steps=2", "stages.stage1.checkpoint_every=1"]
    helpers.check(toy.run("fresh", sets))
    again = helpers.check(toy.run("fresh", [*sets, "seed=3"], "--no-resume"))
    assert "resumed" not in again.stdout
    marker = json.loads((toy.stage_dir("fresh") / "checkpoints" / "step-2" / "COMMITTED").read_text())
    assert marker["training_config"]["seed"] == 3


@pytest.mark.integration
def test_missing_upstream_artifact_is_a_config_error(toy, helpers):
    # The toy "stage2" requires an upstream artifact; <run>/stage1/artifact does not exist.
    result = helpers.check(toy.run("orphan", [], name="stage2"), code=2)
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and "orphan/stage1/artifact" in line


@pytest.mark.integration
def test_task_without_training_only_evaluates_and_exports(toy, helpers):
    result = helpers.check(toy.run("scoring", [], name="mine"))
    artifact = toy.stage_dir("scoring", "mine") / "artifact"
    assert "step 1" not in result.stdout
    assert not (toy.stage_dir("scoring", "mine") / "checkpoints").exists()
    metrics = json.loads((artifact / "metrics.json").read_text())
    assert set(metrics) == {"mse"}
    assert (artifact / "config.yaml").is_file() and (artifact / "toy.safetensors").is_file()


# ----------------------------------------------------------------------------- real stages


@pytest.mark.integration
@pytest.mark.parametrize(("name", "zero"), [("stage1", 2), ("stage2", 3)])
def test_real_stage_sigkill_and_resume_is_exact(toy, helpers, tiny_base, name, zero):
    """Stage 1 (allocator, VLM frozen) under ZeRO-2 and stage 2 (LoRA + allocator) under
    ZeRO-3, on the tiny Qwen3-VL: kill after a committed checkpoint, resume, compare."""
    steps = 6
    sets = helpers.settings(name, steps, zero)
    if name == "stage1":
        init_from = tiny_base
    else:  # stage 2 starts from a (short) stage-1 artifact
        helpers.check(
            toy.run("s1-for-s2", helpers.settings("stage1", 2, 2), "--init-from", str(tiny_base), real=True)
        )
        init_from = toy.stage_dir("s1-for-s2") / "artifact"
    extra = ("--init-from", str(init_from))
    full, killed = f"{name}-full", f"{name}-killed"
    helpers.check(toy.run(full, sets, *extra, name=name, real=True))

    proc = subprocess.Popen(
        [*toy.command(real=True), *toy.args(killed, sets, name), *extra],
        cwd=Path(__file__).resolve().parents[2],
        env=toy.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = toy.stage_dir(killed, name) / "checkpoints"
    helpers.wait_for(checkpoints / "step-2" / "COMMITTED", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (toy.stage_dir(killed, name) / "artifact").exists()

    resumed = helpers.check(toy.run(killed, sets, *extra, name=name, real=True))
    match = re.search(r"resumed from .* \(step (\d+)\)", resumed.stdout)
    assert match and 2 <= int(match.group(1)) < steps

    reference, result = toy.all_weights(full, name), toy.all_weights(killed, name)
    assert reference and reference.keys() == result.keys()
    if name == "stage2":
        assert any("adapter" in key and "lora_B" in key for key in reference)
    for key, tensor in reference.items():
        assert tensor.numel() > 0 and torch.equal(tensor, result[key]), key
    reference_losses, resumed_losses = toy.losses(full, name), toy.losses(killed, name)
    assert sorted(resumed_losses) == list(range(1, steps + 1))
    for step in range(int(match.group(1)) + 1, steps + 1):
        assert resumed_losses[step] == reference_losses[step], step
