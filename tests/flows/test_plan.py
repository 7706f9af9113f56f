"""The curriculum plan and ``arr-coc curriculum --dry-run``."""

from pathlib import Path

import pytest

from arr_coc.cli import main
from arr_coc.errors import ConfigError
from flows.plan import build_plan, expand_run_name

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_tiny_plan_chains_artifacts(tiny_config):
    plan = build_plan(tiny_config)
    names = [s.name for s in plan.stages]
    assert names == ["stage0", "stage1", "stage2", "mine", "stage3"]
    run = plan.run_dir
    by_name = {s.name: s for s in plan.stages}
    assert by_name["stage0"].init_from is None
    assert by_name["stage2"].init_from == run / "stage1" / "artifact"
    assert by_name["stage3"].init_from == run / "mine" / "artifact"
    assert by_name["stage3"].reads == [run / "mine" / "artifact", run / "stage2" / "artifact"]
    for stage in plan.stages:
        assert stage.command[stage.command.index("--config") + 1] == str(tiny_config)
        if stage.init_from:
            assert stage.command[stage.command.index("--init-from") + 1] == str(stage.init_from)


def test_slices_and_stage0_only_for_the_tiny_base(tiny_config):
    plan = build_plan(tiny_config, stop_after="stage1")
    assert [s.name for s in plan.stages] == ["stage0", "stage1"]
    with pytest.raises(ConfigError, match="stop_after"):
        build_plan(tiny_config, start_at="stage2", stop_after="stage1")
    with pytest.raises(ConfigError, match=r"start_at: 'stage0' is not a stage"):
        build_plan(tiny_config, overrides=["stages.stage0.enabled=false"], start_at="stage0")


def test_start_at_needs_the_upstream_artifact(tiny_config):
    with pytest.raises(ConfigError) as info:
        build_plan(tiny_config, start_at="stage2")
    assert str(info.value).startswith(str(tiny_config.parent / "runs" / "tiny-test" / "stage1" / "artifact"))
    artifact = tiny_config.parent / "runs" / "tiny-test" / "stage1" / "artifact"
    artifact.mkdir(parents=True)
    (artifact / "metrics.json").write_text("{}")
    plan = build_plan(tiny_config, start_at="stage2")
    assert plan.skipped == ["stage0", "stage1"]
    assert [s.name for s in plan.stages] == ["stage2", "mine", "stage3"]


def test_run_name_date():
    assert expand_run_name("nightly-{date}").startswith("nightly-20")
    assert len(expand_run_name("nightly-{date}")) == len("nightly-") + 8


@pytest.mark.parametrize("config", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_dry_runs(config, capsys):
    # CI has no /data: the production config is checked without its dataset paths.
    assert main(["curriculum", "--config", str(config), "--dry-run", "--skip-data-check"]) == 0
    out = capsys.readouterr().out
    assert out.count("command: ") >= 4
    assert '"train_micro_batch_size_per_gpu"' in out
    assert '"auto"' not in out


def test_production_dry_run_shows_the_gpu_job(capsys):
    config = REPO / "configs" / "qwen3vl-2b-8xa100.yaml"
    assert main(["curriculum", "--config", str(config), "--dry-run", "--skip-data-check"]) == 0
    out = capsys.readouterr().out
    sections = {part.split()[0]: part for part in out.split("== ")[1:]}
    assert set(sections) == {"stage1", "stage2", "mine", "stage3"}
    assert "deepspeed --num_gpus 8" in sections["stage1"] and "--module stages.launch" in sections["stage1"]
    assert '"stage": 2' in sections["stage1"]
    for name in ("stage2", "stage3"):
        assert '"stage": 3' in sections[name]
        assert '"enabled": true' in sections[name]  # bf16


@pytest.mark.parametrize(
    "extra, names",
    [
        (["--set", "stages.stage1.bogus=1"], "stages.stage1.bogus: unknown key"),
        (["--set", "stages.stage2.max_steps=lots"], "stages.stage2.max_steps"),
        (
            ["--set", "data.source=coco", "--set", "data.coco_annotations=/nope/a.json"],
            "coco_images is required",
        ),
        (["--start-at", "stage3"], "mine/artifact"),
    ],
)
def test_bad_config_is_one_line_exit_2(tiny_config, capsys, extra, names):
    assert main(["curriculum", "--config", str(tiny_config), "--dry-run", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert names in err[0]


def test_missing_data_path_names_the_key_and_path(tmp_path, capsys):
    paths = {k: str(tmp_path) for k in ("coco_images", "vqa_questions", "vqa_annotations", "vqa_images")}
    sets = [f"data.{k}={v}" for k, v in paths.items()]
    sets += ["data.source=coco", f"data.coco_annotations={tmp_path}/missing.json", f"run.root={tmp_path}"]
    argv = ["curriculum", "--config", str(REPO / "configs" / "tiny.yaml"), "--dry-run"]
    for item in sets:
        argv += ["--set", item]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: data.coco_annotations: {tmp_path}/missing.json: not found"
