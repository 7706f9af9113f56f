"""Launcher command lines and the multi-process entry (``deepspeed --num_gpus 2`` on CPU/gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from arr_coc.config import load_config
from stages import launch
from stages.engine import free_port

REPO = Path(__file__).resolve().parents[2]


def test_inprocess_command():
    cfg = load_config(None, [])
    cmd = launch.launcher_command(cfg, "stage2", "configs/tiny.yaml", ["seed=1"], "runs/tiny/stage1/artifact")
    assert cmd[:4] == [sys.executable, "-m", "arr_coc.cli", "stage"]
    assert cmd[4:] == [
        "stage2",
        "--config",
        "configs/tiny.yaml",
        "--set",
        "seed=1",
        "--init-from",
        "runs/tiny/stage1/artifact",
    ]


def test_deepspeed_and_hostfile_commands():
    cfg = load_config(None, ["launcher.kind=deepspeed", "launcher.num_gpus=8", "launcher.master_port=29555"])
    cmd = launch.launcher_command(cfg, "stage1", "c.yaml", [], None)
    assert Path(cmd[0]).name == "deepspeed"
    assert cmd[1:] == [
        "--num_gpus",
        "8",
        "--master_port",
        "29555",
        "--module",
        "stages.launch",
        "stage1",
        "--config",
        "c.yaml",
    ]
    cfg = load_config(None, ["launcher.kind=hostfile", "launcher.hostfile=/etc/hosts.ds"])
    cmd = launch.launcher_command(cfg, "stage3", "c.yaml", None, None)
    assert cmd[1:3] == ["--hostfile", "/etc/hosts.ds"] and "--num_gpus" not in cmd
    assert cmd[cmd.index("--module") + 1] == "stages.launch"


def test_main_drops_launcher_local_rank(monkeypatch):
    seen = []
    monkeypatch.setattr("arr_coc.cli.main", lambda argv: seen.append(argv) or 0)
    assert launch.main(["--local_rank=1", "stage1", "--config", "c.yaml", "--no-resume", "--debug"]) == 0
    assert launch.main(["--local_rank", "0", "stage2", "--config", "c.yaml"]) == 0
    assert seen == [
        ["--debug", "stage", "stage1", "--config", "c.yaml", "--no-resume"],
        ["stage", "stage2", "--config", "c.yaml"],
    ]


@pytest.mark.integration
def test_deepspeed_two_processes_run_real_stage1_and_stage2(toy, helpers, tiny_base):
    """The tiny Qwen3-VL stages 1 and 2 under ``deepspeed --num_gpus 2`` (CPU, gloo, ZeRO-3);
    the artifacts load with safetensors and stage 2 carries non-empty LoRA adapters."""
    from safetensors.torch import load_file

    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    artifacts = {}
    upstream = tiny_base
    for name in ("stage1", "stage2"):
        args = toy.args("two-ranks-real", [*helpers.settings(name, 2, 3), "data.shard_size=4"], name)
        cmd = [
            deepspeed,
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "--module",
            "stages.launch",
            *args,
            "--init-from",
            str(upstream),
        ]
        result = helpers.check(
            subprocess.run(cmd, cwd=REPO, env=toy.env(), capture_output=True, text=True, timeout=500)
        )
        assert result.stdout.count(f"[{name}] step 2/2") == 1  # only rank 0 logs
        upstream = artifacts[name] = toy.stage_dir("two-ranks-real", name) / "artifact"
        metrics = json.loads((upstream / "metrics.json").read_text())
        assert metrics["world_size"] == 2 and metrics["steps"] == 2
        step = toy.stage_dir("two-ranks-real", name) / "checkpoints" / "step-2"
        assert sorted(p.name for p in step.glob("runner_state_rank*.pt")) == [
            "runner_state_rank0.pt",
            "runner_state_rank1.pt",
        ]
        assert len(list(step.glob("zero_pp_rank_*_optim_states.pt"))) == 2  # ZeRO-3 shards
    allocator = load_file(str(artifacts["stage1"] / "allocator.safetensors"))
    assert allocator and all(t.numel() > 0 for t in allocator.values())
    adapters = list((artifacts["stage2"]).rglob("adapter_model.safetensors"))
    assert len(adapters) == 1
    lora = load_file(str(adapters[0]))
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in lora.items())
