"""``arr-coc stage``: arguments, exit codes, one-line errors, --dry-run."""

from __future__ import annotations

import json

import pytest

from arr_coc.cli import main


def test_help_lists_stage_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["stage", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--config", "--set", "--init-from", "--resume", "--no-resume", "--dry-run"):
        assert option in out


def test_unknown_stage_is_usage_error(capsys):
    assert main(["stage", "stage9", "--config", "configs/tiny.yaml"]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_missing_init_from_names_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    argv = [
        "stage",
        "stage2",
        "--config",
        "configs/tiny.yaml",
        "--set",
        f"run.root={tmp_path}",
        "--init-from",
        str(missing),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --init-from {missing}: no such artifact directory"


def test_bad_override_names_key(capsys):
    assert (
        main(["stage", "stage1", "--config", "configs/tiny.yaml", "--set", "stages.stage1.max_step=3"]) == 2
    )
    assert "stages.stage1.max_step" in capsys.readouterr().err


def test_dry_run_prints_command_and_resolved_config(capsys):
    argv = [
        "stage",
        "stage1",
        "--config",
        "configs/tiny.yaml",
        "--set",
        "launcher.kind=deepspeed",
        "--set",
        "launcher.num_gpus=4",
        "--set",
        "stages.stage1.batch_size=2",
        "--no-resume",
        "--dry-run",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    command, config = out.split("\n", 1)
    assert "--num_gpus 4" in command and "--module stages.launch stage1" in command
    assert command.endswith("--no-resume")
    assert json.loads(config)["train_micro_batch_size_per_gpu"] == 2
