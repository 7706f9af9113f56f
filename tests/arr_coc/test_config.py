from pathlib import Path

import pytest

from arr_coc.config import STAGE_NAMES, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def test_defaults_validate():
    cfg = load_config()
    assert cfg.run.root == "runs"
    assert [cfg.stage(n).budget >= 1 for n in STAGE_NAMES] == [True] * 5


def test_every_shipped_config_parses():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs, "no shipped configs"
    for path in configs:
        load_config(path)


def test_dotted_override_types(tmp_path):
    cfg = load_config(None, ["stages.stage1.budget=8", "run.name=x", "seed=3", "stages.stage2.lora.r=4"])
    assert cfg.stages.stage1.budget == 8 and cfg.run.name == "x" and cfg.seed == 3
    assert cfg.stages.stage2.lora.r == 4
    assert cfg.run_dir == Path("runs") / "x"


@pytest.mark.parametrize(
    "override, key",
    [
        ("stages.stage1.budgit=3", "stages.stage1.budgit"),
        ("stages.stage1.budget=abc", "stages.stage1.budget"),
        ("stages.stage1.budget=0", "stages.stage1"),
        ("model.family=llama", "model.family"),
        ("stages.mine.pool_samples=-1", "pool_samples"),
        ("nope=1", "nope"),
    ],
)
def test_bad_key_or_type_names_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert key in str(info.value)


def test_shipped_tiny_base_is_qwen3_vl_only():
    assert load_config(None, ["model.source=tiny-pretrained"]).model.source == "tiny-pretrained"
    with pytest.raises(ConfigError, match="tiny-pretrained"):
        load_config(None, ["model.source=tiny-pretrained", "model.family=qwen2_5_vl"])


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_partial_stage_override_keeps_that_stages_defaults():
    defaults = load_config()
    cfg = load_config(None, ["stages.stage1.max_steps=10", "stages.stage0.max_steps=5"])
    assert cfg.stages.stage1.max_steps == 10
    assert cfg.stages.stage1.lr == defaults.stages.stage1.lr
    assert cfg.stages.stage0.budget == defaults.stages.stage0.budget
    assert cfg.stages.stage0.lr == defaults.stages.stage0.lr
